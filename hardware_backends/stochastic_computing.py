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
second and third dimensions, the same sequence for every stream), whose error falls closer
to 1/N.

The simulated chip computes one input row at a time: x_j's stream is generated once for the
row and fans out to every output (so the outputs of a row are correlated through it), each
weight has its own stream, and a mux select line is shared by the outputs of the row. With
"random" sources all of them are fresh for every row. Nothing loops over bits in Python:
"random" draws the bit counts that determine the result (binomial counts, exact in
distribution, see `_random_matvec`), "sobol" counts the bits exactly with prefix sums (see
`_sobol_matvec`). `reference_sc_matvec` draws every bit and computes with packed bits, XNOR
and popcount; tests check it against both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SOURCES = ("random", "sobol")
ACCUMULATIONS = ("count", "mux")
# The "sobol" counting table has (N + 1)² int16 entries: 34 MB at N = 4096.
MAX_STREAM_LENGTH = 4096
# Both fast paths count per (row, output, input): rows are taken in chunks so that one such
# intermediate holds at most this many entries (4 MiB at 4 bytes each), whatever the batch.
MAX_CHUNK_ENTRIES = 1 << 20


@dataclass(frozen=True)
class StreamConfig:
    length: int = 1024  # bits per stream, N
    source: str = "random"
    accumulation: str = "count"

    def __post_init__(self) -> None:
        length = self.length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"stream length must be a positive integer, got {length!r}")
        if length > MAX_STREAM_LENGTH:
            raise ValueError(f"stream length must be at most {MAX_STREAM_LENGTH}, got {length}")
        if self.source not in SOURCES:
            raise ValueError(f"stream source must be one of {SOURCES}, got {self.source!r}")
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(
                f"accumulation must be one of {ACCUMULATIONS}, got {self.accumulation!r}"
            )


class BitSource:
    """The numbers that bitstreams are compared against, per operand.

    Operand 0 draws the input streams, 1 the weight streams, 2 the mux select line.
    "random": fresh independent uniforms from a seeded generator on every draw.
    "sobol": one scrambled Sobol point per bit, the same for every stream of an operand.
    """

    def __init__(self, kind: str, length: int, seed: int) -> None:
        StreamConfig(length=length, source=kind)  # validates
        self.kind, self.length = kind, length
        self.generator = torch.Generator().manual_seed(seed)
        self._sobol: Tensor | None = None
        self._tables: dict[tuple[int, str], _SobolCounts] = {}
        if kind == "sobol":
            engine = torch.quasirandom.SobolEngine(dimension=3, scramble=True, seed=seed)
            self._sobol = engine.draw(length).T.contiguous()  # [3, N]

    def sobol_counts(self, n_inputs: int, accumulation: str) -> _SobolCounts:
        """The counting table for `n_inputs` inputs, built once per (n_inputs, accumulation)."""
        key = (n_inputs, accumulation)
        if key not in self._tables:
            self._tables[key] = _SobolCounts(self, n_inputs, accumulation)
        return self._tables[key]

    def sequence(self, operand: int) -> Tensor:
        """The low-discrepancy sequence of one operand, [N] ("sobol" only)."""
        if self._sobol is None:
            raise ValueError("only a 'sobol' source has a fixed sequence")
        return self._sobol[operand]

    def uniforms(self, operand: int, shape: tuple[int, ...]) -> Tensor:
        """Numbers in [0, 1) for streams of the given shape: [*shape, N]."""
        if self._sobol is not None:
            return self._sobol[operand].expand(*shape, self.length)
        return torch.rand(*shape, self.length, generator=self.generator)

    def select(self, n_inputs: int) -> Tensor:
        """A mux select line: which input each bit position takes, [N] in [0, n_inputs)."""
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


def _random_matvec(x: Tensor, w: Tensor, source: BitSource, accumulation: str) -> Tensor:
    """Independent streams, simulated through their bit counts (exact in distribution).

    Per row: draw the select line (mux) and so the number m_j of bit positions that carry
    input j (m_j = N without a mux); the ones of x_j's stream among them, n1_j ~ Bin(m_j, p_j);
    then for every output i the XNOR ones of the product stream, (w bits that are 1 where x
    is 1) + (w bits that are 0 where x is 0) = Bin(n1_j, q_ij) + Bin(m_j − n1_j, 1 − q_ij).
    Positions carry no information beyond these counts for independent bits, and n1_j is
    shared by all outputs of the row, as x_j's stream is on a chip.
    """
    rows, n = x.shape
    length, generator = source.length, source.generator
    if accumulation == "mux":
        select = torch.randint(n, (rows, length), generator=generator)  # [R, N] select lines
        groups = torch.zeros(rows, n).scatter_add_(1, select, torch.ones(rows, length))  # [R, n]
    else:
        groups = torch.full((rows, n), float(length))  # [R, n]
    # Counts up to N = 4096 are exact in float32; float32 halves the [R, O, n] intermediates.
    p, q = to_probability(x).float(), to_probability(w).float()  # [R, n], [O, n]
    x_ones = torch.binomial(groups, p, generator=generator)  # [R, n]
    x_ones = x_ones.unsqueeze(1).expand(rows, w.shape[0], n)  # [R, O, n]
    x_zeros = groups.unsqueeze(1).expand_as(x_ones) - x_ones  # [R, O, n]
    both_one = torch.binomial(x_ones, q.expand_as(x_ones), generator=generator)  # [R, O, n]
    both_zero = torch.binomial(x_zeros, (1.0 - q).expand_as(x_zeros), generator=generator)
    return (both_one + both_zero).sum(dim=-1).double()  # [R, O] ones of all product bits taken


class _SobolCounts:
    """Bit-exact counting for a "sobol" source without drawing a single stream.

    Every input stream compares against the same sequence u (every weight stream against v),
    so within the bit positions of input j (all N, or those the mux select line gives j)
    x_j is 1 exactly on the m_j positions with the smallest u, and w_ij is 1 exactly on the
    positions whose v is among the t_ij smallest. Order the positions by (group, u) and let
    Q[p, t] count, among the first p of them, those whose v-rank is below t: a table that
    depends on the sequence only. Then, for a group starting at position s with size G,
    P(m, t) = Q[s + m, t] − Q[s, t] counts the bits where x and w are both 1, and the XNOR
    ones of (x_j, w_ij) are 2·P(m, t) + G − m − P(G, t).
    """

    def __init__(self, source: BitSource, n_inputs: int, accumulation: str) -> None:
        length = source.length
        u = source.sequence(0).double()  # [N]
        group = source.select(n_inputs).double() if accumulation == "mux" else torch.zeros(length)
        self.key_sorted, order = torch.sort(group.double() + u)  # group first, then u: exact
        groups = torch.arange(n_inputs + 1, dtype=torch.float64)
        bounds = torch.searchsorted(self.key_sorted, groups) if accumulation == "mux" else None
        if bounds is None:
            self.start = torch.zeros(n_inputs, dtype=torch.long)
            self.size = torch.full((n_inputs,), length, dtype=torch.long)
        else:
            self.start, self.size = bounds[:-1], bounds[1:] - bounds[:-1]  # [n]
        self.v_sorted, v_order = torch.sort(source.sequence(1))
        v_rank = torch.empty(length, dtype=torch.long)
        v_rank[v_order] = torch.arange(length)
        hits = torch.zeros(length + 1, length + 1, dtype=torch.int16)
        hits[torch.arange(1, length + 1), v_rank[order] + 1] = 1  # row p+1: position p
        self.table = hits.cumsum(0, dtype=torch.int16).cumsum(1, dtype=torch.int16)  # Q
        self.accumulation = accumulation

    def ones(self, x: Tensor, w: Tensor) -> Tensor:
        """XNOR ones of every product stream, summed over inputs: [R, O]."""
        n = x.shape[1]
        p = to_probability(x).double()  # [R, n]
        offsets = torch.arange(n, dtype=torch.float64) if self.accumulation == "mux" else 0.0
        m = torch.searchsorted(self.key_sorted, p + offsets) - self.start  # [R, n]
        t = torch.searchsorted(self.v_sorted, to_probability(w))  # [O, n], v-ranks below q
        width = self.table.shape[1]
        flat = self.table.view(-1)
        base = flat[self.start * width + t].int()  # [O, n]
        at_m = flat[(self.start + m).unsqueeze(1) * width + t].int() - base  # [R, O, n]
        at_end = flat[(self.start + self.size) * width + t].int() - base  # [O, n]
        xnor_ones = 2 * at_m + self.size - m.unsqueeze(1) - at_end  # [R, O, n] int32
        return xnor_ones.sum(dim=-1).double()  # [R, O]


def sc_matvec(
    x: Tensor,
    w: Tensor,
    source: BitSource,
    accumulation: str,
    max_chunk_entries: int = MAX_CHUNK_ENTRIES,
) -> Tensor:
    """Estimate x @ w.T by stochastic computing. x [R, n], w [O, n], entries in [-1, 1].

    Rows run in chunks whose [rows, O, n] intermediates hold at most `max_chunk_entries`
    entries (at least one row at a time), so memory does not grow with the batch."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [R, n] and w [O, n], got {list(x.shape)} and {list(w.shape)}")
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
    rows_per_chunk = max(1, max_chunk_entries // max(1, w.shape[0] * w.shape[1]))
    if source.kind == "sobol":
        counts = source.sobol_counts(x.shape[1], accumulation)
        parts = [counts.ones(chunk, w) for chunk in x.split(rows_per_chunk)]
    else:
        parts = [
            _random_matvec(chunk, w, source, accumulation) for chunk in x.split(rows_per_chunk)
        ]
    ones = torch.cat(parts) if parts else torch.zeros(0, w.shape[0], dtype=torch.float64)  # [R, O]
    n, length = w.shape[1], source.length
    if accumulation == "mux":
        return (n * (2.0 * ones / length - 1.0)).float()  # n · (mux output in bipolar)
    return (2.0 * ones / length - n).float()  # Σ_j (2·c_j/N − 1)


def _popcount(packed: np.ndarray) -> np.ndarray:
    return np.bitwise_count(packed).sum(axis=-1)


def reference_sc_matvec(x: Tensor, w: Tensor, source: BitSource, accumulation: str) -> Tensor:
    """The slow, literal version of `sc_matvec`: for each row, every stream drawn in full
    (fresh ones for "random"), packed into bytes; every product an XNOR of packed streams;
    counts by popcount, or by reading the mux output bit by bit. One (row, output) at a time.
    Identical to `sc_matvec` for "sobol"; the same distribution for "random"."""
    n, length = w.shape[1], source.length
    # Padding bits of the last byte are 0 in both operands, so XNOR sets them: mask them off.
    valid = np.packbits(np.ones(length, dtype=bool))
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for r in range(x.shape[0]):
        select = source.select(n).numpy() if accumulation == "mux" else None  # [N]
        x_bits = encode(x[r], source.uniforms(0, (n,))).numpy().astype(bool)  # [n, N]
        w_bits = encode(w, source.uniforms(1, tuple(w.shape))).numpy().astype(bool)  # [O, n, N]
        x_packed, w_packed = np.packbits(x_bits, axis=-1), np.packbits(w_bits, axis=-1)
        for i in range(w.shape[0]):
            products = ~(x_packed ^ w_packed[i]) & valid  # [n, bytes], one stream per input
            if select is None:
                out[r, i] = float(np.sum(2.0 * _popcount(products) / length - 1.0))
            else:
                stream = np.unpackbits(products, axis=-1, count=length)  # [n, N]
                mux_out = stream[select, np.arange(length)]  # [N]
                out[r, i] = n * (2.0 * mux_out.sum() / length - 1.0)
    return out.float()


class StochasticMatmul:
    """``F.linear`` by bitstreams: inputs scaled by their row abs-max and the weights by the
    matrix abs-max into [-1, 1], multiplied by `sc_matvec`, scaled back; bias digital."""

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
