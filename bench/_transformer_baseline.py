"""A small decoder-only Transformer with a KV cache: the baseline of `bench/context_length.py`.

Not a served model: it exists to show what a state-space model avoids. Pre-norm blocks
(RMSNorm, causal multi-head self-attention, GELU MLP), fixed sinusoidal positions (no
parameters, any length), a head tied to the embedding.

Two ways to run it:
- `forward(tokens)`: the whole sequence at once with a causal mask (the reference), and
  optionally fill a `KVCache` with every position's keys and values (prefill);
- `step(token, cache)`: one new token attending to everything cached so far, the decode
  path whose time and memory grow with the context. A test checks the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DecoderConfig:
    vocab_size: int = 97
    d_model: int = 144
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must divide into {self.n_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class KVCache:
    """Keys and values of every past position, per layer, in preallocated buffers (so a
    step writes in place instead of copying the whole cache)."""

    def __init__(self, config: DecoderConfig, batch: int, capacity: int) -> None:
        shape = (batch, config.n_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape) for _ in range(config.n_layers)]  # [B, H, cap, Dh] each
        self.values = [torch.zeros(shape) for _ in range(config.n_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of the positions in use (what a server would have to keep per session)."""
        per_position = sum(k[:, :, :1].nbytes + v[:, :, :1].nbytes for k, v in self.pairs())
        return per_position * self.length

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.keys, self.values, strict=True))


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """positions [T] -> [T, d_model], the encoding of Vaswani et al. (2017)."""
    half = d_model // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / half)  # [half]
    angles = positions.float().unsqueeze(-1) * frequencies  # [T, half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [T, d_model]


class SelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, Dh]."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _merge(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Causal attention over x [B, T, D]; with a cache, its first T slots are filled."""
        q, k, v = self._heads(x)  # [B, H, T, Dh] each
        if cache is not None:
            cache[0][:, :, : k.shape[2]] = k
            cache[1][:, :, : v.shape[2]] = v
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], position: int) -> Tensor:
        """x [B, 1, D] at `position`, attending to cached positions 0..position."""
        q, k, v = self._heads(x)  # [B, H, 1, Dh] each
        keys, values = cache
        keys[:, :, position : position + 1] = k
        values[:, :, position : position + 1] = v
        context = position + 1
        y = F.scaled_dot_product_attention(q, keys[:, :, :context], values[:, :, :context])
        return self._merge(y)  # [B, 1, D]


class DecoderBlock(nn.Module):
    """x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.norm1 = nn.RMSNorm(config.d_model)
        self.attention = SelfAttention(config)
        self.norm2 = nn.RMSNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, config.d_model, bias=False),
        )

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], position: int) -> Tensor:
        x = x + self.attention.step(self.norm1(x), cache, position)
        return x + self.mlp(self.norm2(x))


class TransformerDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch, capacity)

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """tokens [B, T] from position 0 -> logits [B, T, V]; fills an empty `cache`."""
        T = tokens.shape[1]
        if cache is not None and (cache.length != 0 or cache.capacity < T):
            raise ValueError(f"prefill needs an empty cache of capacity >= {T}")
        x = self.embed(tokens) + sinusoidal_positions(torch.arange(T), self.config.d_model)
        pairs = cache.pairs() if cache is not None else [None] * len(self.layers)
        for layer, pair in zip(self.layers, pairs, strict=True):
            x = layer(x, pair)  # [B, T, D]
        if cache is not None:
            cache.length = T
        return self.head(self.norm(x))  # [B, T, V]

    def step(self, token: Tensor, cache: KVCache) -> Tensor:
        """token [B] at position cache.length -> logits [B, V]; appends to the cache."""
        position = cache.length
        if position >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} positions)")
        positions = sinusoidal_positions(torch.tensor([position]), self.config.d_model)
        x = self.embed(token).unsqueeze(1) + positions  # [B, 1, D]
        for layer, pair in zip(self.layers, cache.pairs(), strict=True):
            x = layer.step(x, pair, position)
        cache.length = position + 1
        return self.head(self.norm(x))[:, 0]  # [B, V]

    def macs_per_step(self, context: int) -> int:
        """Multiply-accumulates of one decode step with `context` cached positions."""
        D, L = self.config.d_model, self.config.n_layers
        weights = L * (4 * D * D + 2 * self.config.mlp_ratio * D * D) + D * self.config.vocab_size
        return weights + L * 2 * (context + 1) * D  # q·K and softmax·V over every position
