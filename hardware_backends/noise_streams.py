"""Per-sequence noise streams: noise drawn per read that depends only on the sequence's own
stream and step, never on what else shares its batch.

Served sequences are batched: a session's step runs in one forward pass with other
sessions' steps. Drawing a batch's output noise from one generator would make a sequence's
answer depend on its neighbours and their order. Instead every sequence carries a stream
in its state (`NOISE_STREAM`, int64 [B, 2]: stream id, steps taken). At each step the
runner turns them into one 64-bit key per sequence, SplitMix64's output number `step` for
seed `stream` (`step_keys`), and each read of a crossbar takes its standard-normal noise
from a fixed table of Gaussian draws (`gaussian_table`, one per process, seeded) at two
offsets hashed from (key, matrix, call, pass); the table holds draws of variance 1/2, so
the sum of the two windows is a standard normal vector. A random-access stream like this
costs one gather per read instead of one generator per sequence. Two reads share table
values only where one of their windows overlaps one of the other's (probability about
4·2L / 2^21 per pair of reads of L outputs, and then only part of each sum), so reads are
independent for every practical purpose.

The integer arithmetic exists twice, on Python ints (one sequence, the common case of a
session step, at a fraction of the cost of tensor ops on one element) and on int64 tensors
(a batch); a test checks that they agree bit for bit.
"""

from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

NOISE_STREAM = "noise_stream"  # state entry: int64 [B, 2] (stream id, steps taken)
TABLE_BITS = 21
TABLE_SIZE = 1 << TABLE_BITS  # window offsets: 21 bits of a hash
WINDOW_PAD = 1 << 16  # the table runs this far past the last offset, so windows up to ...
TABLE_SEED = 20_261_202
MAX_WINDOW = TABLE_SIZE // 2  # ... this long need no range reduction; at most this long
SMALL_STEP = 16  # a step of up to this many sequences keeps its keys as Python ints
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_OFFSET_MASK = TABLE_SIZE - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 that holds the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64(value: int) -> int:
    """SplitMix64's finaliser on an unsigned 64-bit value (Python int in [0, 2^64))."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """z >> bits on the unsigned bits of an int64 tensor (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64_tensor(z: Tensor) -> Tensor:
    """`mix64` on an int64 tensor (its bits read as unsigned; int64 products wrap)."""
    z = (z ^ _logical_shift(z, 30)) * _signed(_MIX1)
    z = (z ^ _logical_shift(z, 27)) * _signed(_MIX2)
    return z ^ _logical_shift(z, 31)


def step_key(stream: int, step: int) -> int:
    """SplitMix64's output number `step` for seed `stream`: this step's key, as an int64
    (`mix64` and `_signed` inline: once per step of every session)."""
    z = (stream + (step + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


def step_keys(streams: Tensor) -> Tensor:
    """`step_key` of every row of a stream entry [B, 2] -> int64 [B]."""
    seeds = streams[:, 0] + (streams[:, 1] + 1) * _signed(_GOLDEN)
    return mix64_tensor(seeds)


def stream_of(name: str | bytes) -> int:
    """A stream id for a name (a session id, say) or bytes: 63 bits of their hash."""
    data = name.encode() if isinstance(name, str) else name
    return mix64(zlib.crc32(data) | (zlib.adler32(data) << 32)) >> 1


def seed_streams(state: dict[str, Tensor], streams: list[int]) -> dict[str, Tensor]:
    """`state` (fresh from a runner's init_state) with its sequences' stream ids set, e.g.
    from `stream_of(session_id)`; a state without noise streams is returned as it is."""
    entry = state.get(NOISE_STREAM)
    if entry is None:
        return state
    if len(streams) != entry.shape[0]:
        raise ValueError(f"{len(streams)} stream ids for a state of {entry.shape[0]} sequences")
    seeded = entry.clone()
    seeded[:, 0] = torch.tensor(streams, dtype=torch.int64)
    return {**state, NOISE_STREAM: seeded}


def seed_streams_from_inputs(state: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """`state` with each sequence's stream id hashed from its own inputs x [B, T, ...]: a
    stateless request's noise then depends on nothing but its inputs (the same inputs, the
    same answer, whatever else shares the batch). Unchanged without noise streams."""
    if NOISE_STREAM not in state:
        return state
    rows = x.detach().cpu().contiguous()
    return seed_streams(state, [stream_of(row.numpy().tobytes()) for row in rows])


def salt(*parts: object) -> int:
    """An odd 64-bit multiplier (as an int64) for one (matrix, call, pass) of a step."""
    return _signed(mix64(zlib.crc32(repr(parts).encode()) * _GOLDEN) | 1)


_table: Tensor | None = None
_table_lock = threading.Lock()
_scaled_tables: dict[float, Tensor] = {}  # scale -> the table times it, most recent last
SCALED_TABLES = 4  # scaled tables kept for later engines (each engine holds its own too)


def gaussian_table(scale: float = 1.0) -> Tensor:
    """The process's table of normal draws of variance 1/2, float32 [TABLE_SIZE + WINDOW_PAD]
    (8.3 MiB, made once, seeded): the sum of two windows is a standard normal vector.

    With a `scale`, the table times it (each value rounded once to float32, 8.3 MiB more):
    the sum of two of its windows is a normal vector of std `scale`, drawn without a
    multiply per read."""
    global _table
    if _table is None:
        with _table_lock:
            if _table is None:
                generator = torch.Generator().manual_seed(TABLE_SEED)
                draws = torch.randn(TABLE_SIZE + WINDOW_PAD, generator=generator)
                _table = draws.mul_(math.sqrt(0.5))
    if scale == 1.0:
        return _table
    with _table_lock:
        table = _scaled_tables.pop(scale, None)
        if table is None:
            table = _table * scale
        _scaled_tables[scale] = table
        while len(_scaled_tables) > SCALED_TABLES:
            _scaled_tables.pop(next(iter(_scaled_tables)))
    return table


def window_offsets(key: int, multiplier: int, length: int) -> tuple[int, int]:
    """The two table offsets of one read of `length` outputs for one sequence's key: bits
    43-63 and 22-42 of key · multiplier (mod 2^64), reduced to the table's range when the
    window is longer than its padding."""
    h = (key * multiplier) & _MASK64
    first, second = (h >> 43) & _OFFSET_MASK, (h >> 22) & _OFFSET_MASK
    if length > WINDOW_PAD:
        span = TABLE_SIZE + WINDOW_PAD - length + 1
        return first % span, second % span
    return first, second


def window_offsets_tensor(keys: Tensor, multiplier: int, length: int) -> tuple[Tensor, Tensor]:
    """`window_offsets` for int64 keys [R] -> two int64 [R]."""
    h = keys * multiplier
    first, second = (h >> 43) & _OFFSET_MASK, (h >> 22) & _OFFSET_MASK
    if length > WINDOW_PAD:
        span = TABLE_SIZE + WINDOW_PAD - length + 1
        return first % span, second % span
    return first, second


@dataclass
class StepStreams:
    """The keys of the sequences in the step being run, shared by a runner's engines.

    Outside a step all are None (engines then draw from their own generator). In a step of
    one sequence `key` is its key as a Python int (the common case of a session step: no
    tensor op on one element); of a few (at most SMALL_STEP), `key_list` holds them as
    Python ints (a dozen int64 tensor ops cost more than the arithmetic on a few ints, and
    a read of at most SMALL_STEP rows takes its windows with a numpy add per row); of more,
    `keys` is int64 [B]."""

    key: int | None = None
    keys: Tensor | None = None
    key_list: list[int] | None = None
    calls: dict[str, int] = field(default_factory=dict)  # reads of each matrix this step

    @property
    def active(self) -> bool:
        return self.key is not None or self.key_list is not None or self.keys is not None

    @property
    def sequences(self) -> int:
        if self.key is not None:
            return 1
        if self.key_list is not None:
            return len(self.key_list)
        return int(self.keys.shape[0])  # type: ignore[union-attr]

    def begin(self, streams: Tensor) -> None:
        """Set the keys from a stream entry [B, 2] for one step."""
        count = streams.shape[0]
        if count == 1:
            stream, step = streams.tolist()[0]  # no indexing op: one call on [1, 2]
            self.key, self.key_list, self.keys = step_key(stream, step), None, None
        elif count <= SMALL_STEP:
            keys = [step_key(stream, step) for stream, step in streams.tolist()]
            self.key, self.key_list, self.keys = None, keys, None
        else:
            self.key, self.key_list, self.keys = None, None, step_keys(streams)
        self.calls.clear()

    def end(self) -> None:
        self.key = self.key_list = self.keys = None
        self.calls.clear()


class KeyedNoise:
    """Standard-normal noise for the reads of one matrix, keyed per sequence.

    `draw(rows, length, call, pass_, scale)` returns [R, length] ([length] for a step of one
    sequence of one row, which broadcasts as [1, length]) of std `scale` (the windows of
    `gaussian_table(scale)`): each row's noise from its sequence's key, so a row's numbers
    never depend on the other rows. Rows map to the step's B sequences as a leading [B, M]
    (M rows per sequence, e.g. several positions)."""

    def __init__(self, streams: StepStreams, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError("a keyed noise source needs the matrix's name")
        self.streams = streams
        self.name = name
        self._multipliers: dict[tuple[int, int, int], int] = {}
        self._scratch: dict[tuple[int, int], Tensor] = {}
        self._tables: dict[float, tuple[Tensor, np.ndarray]] = {}  # scale -> table, as numpy

    @property
    def active(self) -> bool:
        return self.streams.active

    def next_call(self) -> int:
        """The index of this read of the matrix within the step (0, then 1 if reused ...)."""
        call = self.streams.calls.get(self.name, 0)
        self.streams.calls[self.name] = call + 1
        return call

    def _multiplier(self, call: int, pass_: int, position: int) -> int:
        index = (call, pass_, position)
        multiplier = self._multipliers.get(index)
        if multiplier is None:
            multiplier = self._multipliers[index] = salt(self.name, call, pass_, position)
        return multiplier

    def _table(self, scale: float) -> tuple[Tensor, np.ndarray]:
        """`gaussian_table(scale)` and its numpy view, held by this source once used."""
        tables = self._tables.get(scale)
        if tables is None:
            table = gaussian_table(scale)
            tables = self._tables[scale] = (table, table.numpy())
        return tables

    def draw(self, rows: int, length: int, call: int, pass_: int = 0, scale: float = 1.0) -> Tensor:
        if length > MAX_WINDOW:
            raise ValueError(f"a read of {length} outputs exceeds the noise table's windows")
        if not self.streams.active:
            raise RuntimeError("keyed noise drawn outside a step")
        table, array = self._table(scale)  # the same values, as a tensor and as numpy
        sequences = self.streams.sequences
        if rows % sequences:
            raise ValueError(f"{rows} rows do not split over {sequences} sequences")
        per_sequence = rows // sequences
        key = self.streams.key
        if key is not None and per_sequence == 1:  # one row: [length], broadcast as [1, length]
            first, second = window_offsets(key, self._multiplier(call, pass_, 0), length)
            return table[first : first + length] + table[second : second + length]
        key_list = [key] if key is not None else self.streams.key_list
        if key_list is not None and rows <= SMALL_STEP:  # a few rows: Python ints, numpy adds
            drawn = np.empty((rows, length), dtype=np.float32)
            multipliers = [self._multiplier(call, pass_, m) for m in range(per_sequence)]
            row = 0
            for sequence_key in key_list:
                for multiplier in multipliers:  # row b·M + m
                    first, second = window_offsets(sequence_key, multiplier, length)
                    window = array[first : first + length]
                    np.add(window, array[second : second + length], drawn[row])
                    row += 1
            return torch.from_numpy(drawn)  # [R, length]
        keys = self.streams.keys
        if keys is None:
            keys = torch.tensor(key_list, dtype=torch.int64)
        windows = table.unfold(0, length, 1)  # [table size - length + 1, length], a view
        parts = []
        for position in range(per_sequence):
            first, second = window_offsets_tensor(
                keys, self._multiplier(call, pass_, position), length
            )
            both = self._gathered(sequences, length)  # [2B, length], reused between reads
            torch.index_select(windows, 0, torch.cat([first, second]), out=both)
            parts.append(torch.add(both[:sequences], both[sequences:]))  # [B, length]
        if per_sequence == 1:
            return parts[0]
        return torch.stack(parts, dim=1).reshape(rows, length)  # [B·M, length], row b·M + m

    def table_array(self, scale: float = 1.0) -> np.ndarray:
        """`gaussian_table(scale)` as a numpy array, for `draw_one_row`."""
        return self._table(scale)[1]

    def draw_one_row(self, out: np.ndarray, call: int, table: np.ndarray, pass_: int = 0) -> bool:
        """`draw` of one row in a step of one sequence, from `table_array(scale)`, written
        into `out` (numpy float32 [length], length <= WINDOW_PAD): the same numbers, at
        numpy's per-call cost (a tensor slice and add cost several times the arithmetic on
        a few hundred values). False, with nothing written, in a step of several sequences."""
        key = self.streams.key
        if key is None:
            return False
        multiplier = self._multipliers.get((call, pass_, 0)) or self._multiplier(call, pass_, 0)
        h = (key * multiplier) & _MASK64  # `window_offsets` inline, for windows <= WINDOW_PAD
        first, second = (h >> 43) & _OFFSET_MASK, (h >> 22) & _OFFSET_MASK
        length = len(out)
        np.add(table[first : first + length], table[second : second + length], out)
        return True

    def _gathered(self, sequences: int, length: int) -> Tensor:
        """A scratch [2B, length] for the two windows of B rows (a fresh one per read would
        cost more than the gather)."""
        buffer = self._scratch.get((sequences, length))
        if buffer is None:
            if len(self._scratch) >= 4:
                self._scratch.clear()
            buffer = self._scratch[(sequences, length)] = torch.empty(2 * sequences, length)
        return buffer
