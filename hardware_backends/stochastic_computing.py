"""Bipolar stochastic computing: numbers as random bitstreams, products as XNOR gates.

A value v in [-1, 1] is a stream of N bits with P(bit = 1) = (v + 1)/2, so v = 2·mean − 1.
For independent streams the XNOR of two bits is 1 with probability (1 + a·b)/2: one gate
multiplies. A dot product Σ_j x_j·w_j then needs an adder, one of two kinds:

- counting ("count", an accumulative parallel counter): count the ones of every product
  stream and add the counts exactly; the estimate Σ_j (2·c_j/N − 1) has variance
  Σ_j (1 − (x_j w_j)²)/N.
- scaled addition ("mux"): a multiplexer passes, at bit k, the product bit of input s_k
  (s_k uniform over the n inputs), so the output stream encodes (1/n)·Σ_j x_j w_j with
  variance (1 − m²)/N for that mean m; the sum is n times it (the error grows with fan-in).

Either way the error falls as 1/√N. Bits are drawn by comparing the encoded probability
with a random number per bit: independent uniforms from a seeded PRNG ("random"), or a
scrambled Sobol sequence ("sobol", low discrepancy: x, w and the select line use its first,
second and third dimensions), whose error falls closer to 1/N.

Simulation without looping over bits: with bits b ∈ {0, 1}, XNOR(a, w) = 1 − a − w + 2·a·w,
so the total count Σ_j Σ_k XNOR(a_jk, w_ijk) of every output i is an ordinary matrix product
of the 0/1 bit matrices (inner dimension n·N) plus row sums. This is exact bit-level
arithmetic on explicitly drawn streams; the input streams of one row are shared by all its
outputs, as on a chip. For "mux" only the bits the select line picks are ever observed, so
only those are drawn (the same values, bit for bit, as drawing all and selecting).
`reference_sc_matvec` does the same with packed bits, XNOR and popcount per product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SOURCES = ("random", "sobol")
ACCUMULATIONS = ("count", "mux")
# Rows of the bit matrix materialised at once (elements), to bound memory.
CHUNK_ELEMENTS = 1 << 23
# float32 adds 0/1 exactly up to 2^24; longer inner sums are done in float64.
EXACT_FLOAT32_SUM = 1 << 24


@dataclass(frozen=True)
class StreamConfig:
    length: int = 1024  # bits per stream, N
    source: str = "random"
    accumulation: str = "count"

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"stream length must be a positive integer, got {self.length!r}")
        if self.source not in SOURCES:
            raise ValueError(f"stream source must be one of {SOURCES}, got {self.source!r}")
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(
                f"accumulation must be one of {ACCUMULATIONS}, got {self.accumulation!r}"
            )


class BitSource:
    """The random numbers that bitstreams are compared against, per operand.

    Operand 0 draws the input streams, 1 the weight streams, 2 the mux select line.
    "random": fresh independent uniforms per stream and bit from a seeded generator.
    "sobol": one scrambled Sobol point per bit, the same for every stream of an operand.
    """

    def __init__(self, kind: str, length: int, seed: int) -> None:
        StreamConfig(length=length, source=kind)  # validates
        self.kind, self.length = kind, length
        self.generator = torch.Generator().manual_seed(seed)
        self._sobol: Tensor | None = None
        if kind == "sobol":
            engine = torch.quasirandom.SobolEngine(dimension=3, scramble=True, seed=seed)
            self._sobol = engine.draw(length).T.contiguous()  # [3, N]

    def uniforms(self, operand: int, shape: tuple[int, ...]) -> Tensor:
        """Numbers in [0, 1) for streams of the given shape: [*shape, N]."""
        if self._sobol is not None:
            return self._sobol[operand].expand(*shape, self.length)
        return torch.rand(*shape, self.length, generator=self.generator)

    def select(self, n_inputs: int) -> Tensor:
        """The mux select line: which input each bit position takes, [N] in [0, n_inputs)."""
        u = self.uniforms(2, ())  # [N]
        return (u * n_inputs).long().clamp(max=n_inputs - 1)


def to_probability(values: Tensor) -> Tensor:
    """Bipolar encoding: v in [-1, 1] -> P(bit = 1) = (v + 1)/2."""
    return (values.clamp(-1.0, 1.0) + 1.0) / 2.0


def encode(values: Tensor, uniforms: Tensor) -> Tensor:
    """Bits (as 0./1. floats) of streams for `values [...]` against `uniforms [..., N]`."""
    return (uniforms < to_probability(values).unsqueeze(-1)).float()


def decode(bits: Tensor) -> Tensor:
    """Bipolar value of streams [..., N]: 2·(fraction of ones) − 1."""
    return 2.0 * bits.mean(dim=-1) - 1.0


def xnor(a: Tensor, b: Tensor) -> Tensor:
    """Bitwise XNOR of 0/1 streams: the bipolar product."""
    return 1.0 - a - b + 2.0 * a * b


def _xnor_counts(a: Tensor, w: Tensor) -> Tensor:
    """Σ over the inner dim of XNOR(a, w) for 0/1 matrices a [R, L], w [O, L] -> [R, O]."""
    dtype = torch.float64 if a.shape[1] >= EXACT_FLOAT32_SUM else torch.float32
    a, w = a.to(dtype), w.to(dtype)
    ones_a = a.sum(dim=1, keepdim=True)  # [R, 1]
    ones_w = w.sum(dim=1).unsqueeze(0)  # [1, O]
    return a.shape[1] - ones_a - ones_w + 2.0 * (a @ w.T)  # [R, O]


def sc_matvec(x: Tensor, w: Tensor, source: BitSource, accumulation: str) -> Tensor:
    """Estimate x @ w.T by stochastic computing. x [R, n], w [O, n], entries in [-1, 1]."""
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"inner dimensions differ: x {list(x.shape)}, w {list(w.shape)}")
    n, length = w.shape[1], source.length
    if accumulation == "mux":
        select = source.select(n)  # [N]
        x_bits = (source.uniforms(0, (x.shape[0],)) < to_probability(x)[:, select]).float()
        w_bits = (source.uniforms(1, (w.shape[0],)) < to_probability(w)[:, select]).float()
        counts = _xnor_counts(x_bits, w_bits)  # [R, O], ones of each mux output stream
        return n * (2.0 * counts / length - 1.0)
    if accumulation != "count":
        raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
    w_bits = encode(w, source.uniforms(1, tuple(w.shape))).reshape(w.shape[0], n * length)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (n * length))
    out = []
    for chunk in x.split(rows_per_chunk):
        x_bits = encode(chunk, source.uniforms(0, tuple(chunk.shape)))  # [r, n, N]
        counts = _xnor_counts(x_bits.reshape(chunk.shape[0], n * length), w_bits)  # [r, O]
        out.append(2.0 * counts / length - n)  # Σ_j (2·c_j/N − 1)
    return torch.cat(out).float()


def _popcount(packed: np.ndarray) -> np.ndarray:
    return np.bitwise_count(packed).sum(axis=-1)


def reference_sc_matvec(
    x: Tensor, w: Tensor, source: BitSource, accumulation: str, junk_seed: int = 12345
) -> Tensor:
    """The slow, literal version of `sc_matvec`: every stream drawn in full and packed into
    bytes, every product an XNOR of packed streams, every count a popcount, one (row, output)
    at a time. For "mux" the bits the select line never picks are filled from an unrelated
    generator (`junk_seed`): they must not change the result. Consumes `source` exactly as
    `sc_matvec` does (call it on a fresh source with the same seed)."""
    n, length = w.shape[1], source.length
    junk = torch.Generator().manual_seed(junk_seed)
    if accumulation == "mux":
        select = source.select(n)  # [N]
        picked = torch.zeros(n, length, dtype=torch.bool)
        picked[select, torch.arange(length)] = True  # [n, N]
        x_sel = source.uniforms(0, (x.shape[0],))  # [R, N]
        w_sel = source.uniforms(1, (w.shape[0],))  # [O, N]
        x_u = torch.where(
            picked, x_sel.unsqueeze(1), torch.rand(x.shape[0], n, length, generator=junk)
        )
        w_u = torch.where(
            picked, w_sel.unsqueeze(1), torch.rand(w.shape[0], n, length, generator=junk)
        )
    else:
        w_u = source.uniforms(1, tuple(w.shape))  # [O, n, N]
        x_u = source.uniforms(0, tuple(x.shape))  # [R, n, N]
    x_bits = np.packbits(encode(x, x_u).numpy().astype(bool), axis=-1)  # [R, n, bytes]
    w_bits = np.packbits(encode(w, w_u).numpy().astype(bool), axis=-1)  # [O, n, bytes]
    # Padding bits of the last byte are 0 in both operands, so XNOR sets them: mask them off.
    valid = np.packbits(np.ones(length, dtype=bool))
    out = torch.zeros(x.shape[0], w.shape[0])
    for r in range(x.shape[0]):
        for i in range(w.shape[0]):
            products = ~(x_bits[r] ^ w_bits[i]) & valid  # [n, bytes], one XNOR stream per input
            if accumulation == "count":
                counts = _popcount(products)  # [n]
                out[r, i] = float(np.sum(2.0 * counts / length - 1.0))
            else:
                stream = np.unpackbits(products, axis=-1, count=length)  # [n, N]
                mux_out = stream[select.numpy(), np.arange(length)]  # [N]
                out[r, i] = n * (2.0 * mux_out.sum() / length - 1.0)
    return out


class StochasticMatmul:
    """``F.linear`` by bitstreams: inputs scaled by their row abs-max and the weights by the
    matrix abs-max into [-1, 1], multiplied by `sc_matvec`, scaled back; bias digital.
    Weight streams are drawn afresh on every call and shared by the rows of that call."""

    def __init__(self, weight: Tensor, config: StreamConfig, source: BitSource) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be a matrix [out, in], got shape {list(weight.shape)}")
        if source.length != config.length or source.kind != config.source:
            raise ValueError("the bit source does not match the stream config")
        self.config, self.source = config, source
        weight = weight.detach().float()
        abs_max = float(weight.abs().max())
        self.weight_scale = abs_max if abs_max > 0 else 1.0
        self.weight = weight / self.weight_scale  # [out, in] in [-1, 1]
        self.macs = 0

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        out_features, in_features = self.weight.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"expected {in_features} input features, got {x.shape[-1]}")
        rows = x.reshape(-1, in_features).float()  # [R, in]
        scale = rows.abs().amax(dim=1, keepdim=True)  # [R, 1]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = sc_matvec(rows / scale, self.weight, self.source, self.config.accumulation)
        y = y * scale * self.weight_scale  # [R, out]
        self.macs += rows.shape[0] * in_features * out_features
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).view(*x.shape[:-1], out_features)
