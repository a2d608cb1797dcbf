"""A small decoder-only Transformer with a KV cache: the baseline of `bench/context_length.py`.

Not a served model: it exists to show what a state-space model avoids. Pre-norm blocks
(RMSNorm, causal multi-head self-attention, GELU MLP), fixed sinusoidal positions (no
parameters, any length), a head tied to the embedding.

Two ways to run it:
- `forward(tokens)`: the whole sequence at once with a causal mask (the reference), and
  optionally fill a `KVCache` with every position's keys and values (prefill);
- `step(token, cache)`: one new token attending to everything cached so far, the decode
  path whose time and memory grow with the context. A test checks the two agree.

The decode step gets the care the state-space model's fused step gets (models/fused.py):
fused QKV, SDPA over a preallocated cache written in place, the positions precomputed with
the cache, every matmul weight stored transposed, each RMSNorm's gain folded into the matmul
after it, the residual adds inside the output matmuls, the whole step one function compiled
by TorchScript, as the SSM's. `step_reference` is the plain module-by-module step beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fused import DerivedWeights, rms_folded, script, transposed


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


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """positions [T] -> [T, d_model], the encoding of Vaswani et al. (2017)."""
    half = d_model // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / half)  # [half]
    angles = positions.float().unsqueeze(-1) * frequencies  # [T, half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [T, d_model]


class KVCache:
    """Keys and values of every past position, per layer, in preallocated buffers (so a
    step writes in place instead of copying the whole cache)."""

    def __init__(self, config: DecoderConfig, batch: int, capacity: int) -> None:
        shape = (batch, config.n_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape) for _ in range(config.n_layers)]  # [B, H, cap, Dh] each
        self.values = [torch.zeros(shape) for _ in range(config.n_layers)]
        self.positions = sinusoidal_positions(torch.arange(capacity), config.d_model)  # [cap, D]
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
        self._fused = DerivedWeights(_derive)

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
        """token [B] at position cache.length -> logits [B, V]; appends to the cache. The
        fused step (`decode_step`) without autograd, else `step_reference`."""
        if torch.is_grad_enabled():
            return self.step_reference(token, cache)
        position = cache.length
        if position >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} positions)")
        logits = scripted_decode_step(
            token, position, cache.positions, cache.keys, cache.values, *self._fused.get(self)
        )
        cache.length = position + 1
        return logits

    def step_reference(self, token: Tensor, cache: KVCache) -> Tensor:
        """`step` module by module: the reference of the fused step."""
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


# ---- the fused decode step -----------------------------------------------------------------


def decode_step(
    token: Tensor,  # [B]
    position: int,
    positions: Tensor,  # [capacity, D]
    keys: list[Tensor],  # [B, H, capacity, Dh] per layer, written at `position`
    values: list[Tensor],
    embed: Tensor,  # [V, D]
    layers: list[list[Tensor]],  # see `_derive`
    sqrt_d_eps: Tensor,  # 0-dim
    n_heads: int,
    head_t: Tensor,  # [D, V]
) -> Tensor:
    """One decode step over the cache: logits [B, V]. Views come from unbind and narrow (one
    op each), RMSNorm is a division by hypot(‖x‖, √(D·eps)) after the matmul it feeds."""
    x = F.embedding(token, embed).add_(positions.select(0, position))  # [B, D]
    B, D = x.shape
    for i in range(len(layers)):
        qkv_t, out_t, up_t, down_t = layers[i]
        rms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), sqrt_d_eps)
        q, k, v = torch.mm(x, qkv_t).div_(rms).view(B, 3, n_heads, 1, D // n_heads).unbind(1)
        keys[i].narrow(2, position, 1).copy_(k)  # [B, H, 1, Dh]
        values[i].narrow(2, position, 1).copy_(v)
        y = F.scaled_dot_product_attention(
            q, keys[i].narrow(2, 0, position + 1), values[i].narrow(2, 0, position + 1)
        )  # [B, H, 1, Dh]
        x = torch.addmm(x, y.view(B, D), out_t)  # [B, D], the residual included
        rms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), sqrt_d_eps)
        x = torch.addmm(x, F.gelu(torch.mm(x, up_t).div_(rms)), down_t)  # [B, D]
    rms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), sqrt_d_eps)
    return torch.mm(x, head_t).div_(rms)  # [B, V]


scripted_decode_step = script(decode_step)


def _derive(model: TransformerDecoder) -> tuple:
    """The arguments of `decode_step` after the cache."""
    layers = []
    for layer in model.layers:
        qkv_t, _ = rms_folded(layer.attention.qkv.weight, layer.norm1)  # [D, 3D]
        up_t, _ = rms_folded(layer.mlp[0].weight, layer.norm2)  # [D, 4D]
        out_t, down_t = transposed(layer.attention.out.weight), transposed(layer.mlp[2].weight)
        layers.append([qkv_t, out_t, up_t, down_t])
    head_t, sqrt_d_eps = rms_folded(model.head.weight, model.norm)  # every norm: the same eps
    return model.embed.weight, layers, sqrt_d_eps, model.config.n_heads, head_t
