"""Per-sequence noise streams: the integer arithmetic twice (Python ints and int64 tensors)
agrees bit for bit, a row's noise depends on its own sequence only, and it is standard normal."""

from __future__ import annotations

import math

import numpy as np
import torch

from hardware_backends.noise_streams import (
    MAX_WINDOW,
    WINDOW_PAD,
    KeyedNoise,
    StepStreams,
    mix64,
    mix64_tensor,
    step_key,
    step_keys,
    stream_of,
    window_offsets,
    window_offsets_tensor,
)

_INT64 = (1 << 64) - 1


def _as_unsigned(values: torch.Tensor) -> list[int]:
    return [v & _INT64 for v in values.tolist()]


def test_python_and_tensor_arithmetic_agree_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**63), 2**63 - 1, (500,), dtype=torch.int64, generator=generator)
    assert _as_unsigned(mix64_tensor(values)) == [mix64(v) for v in _as_unsigned(values)]
    streams = torch.stack([values, torch.arange(500, dtype=torch.int64) * 7919], dim=1)
    keys = step_keys(streams)
    assert keys.tolist() == [step_key(s, t) for s, t in streams.tolist()]
    for length in (1, 128, WINDOW_PAD + 5, MAX_WINDOW):
        for multiplier in (3, -(2**61) + 1):
            first, second = window_offsets_tensor(keys, multiplier, length)
            expected = [window_offsets(key, multiplier, length) for key in keys.tolist()]
            assert list(zip(first.tolist(), second.tolist(), strict=True)) == expected


def _draw(streams: StepStreams, entry: torch.Tensor, rows: int, call: int = 0) -> torch.Tensor:
    streams.begin(entry)
    try:
        return KeyedNoise(streams, "layer").draw(rows, 128, call).reshape(rows, 128)
    finally:
        streams.end()


def test_a_rows_noise_depends_on_its_own_stream_and_step_only() -> None:
    streams = StepStreams()
    entry = torch.tensor([[stream_of(f"session-{i}"), 3 + i] for i in range(6)])
    batch = _draw(streams, entry, 6)
    alone = torch.cat([_draw(streams, entry[i : i + 1], 1) for i in range(6)])
    assert torch.equal(batch, alone)
    reordered = _draw(streams, entry.flip(0), 6)
    assert torch.equal(reordered, batch.flip(0))
    # Several rows per sequence (positions) come in the sequence's order and differ.
    two = _draw(streams, entry[:2], 4)
    assert not torch.equal(two[0], two[1])
    assert torch.equal(_draw(streams, entry[:1], 2), two[:2])
    # Another step, another call of the same matrix: other numbers.
    later = entry + torch.tensor([0, 1])
    assert not torch.equal(_draw(streams, later, 6), batch)
    assert not torch.equal(_draw(streams, entry, 6, call=1), batch)


def test_keyed_noise_is_standard_normal_and_uncorrelated_between_reads() -> None:
    streams = StepStreams()
    reads = 2000
    entry = torch.stack(
        [torch.arange(reads, dtype=torch.int64), torch.zeros(reads, dtype=torch.int64)], dim=1
    )
    noise = _draw(streams, entry, reads)  # [reads, 128]
    n = noise.numel()
    # Windows may overlap (a pair of reads shares values with probability ~ 4·128 / 2^21),
    # so the draws are close to, not exactly, independent: 6 standard errors of slack.
    assert abs(float(noise.mean())) < 6.0 / math.sqrt(n)
    assert abs(float(noise.var()) - 1.0) < 6.0 * math.sqrt(2.0 / n)
    # Neighbouring sequences' reads are uncorrelated: correlation of row pairs ~ N(0, 1/128).
    a, b = noise[0::2], noise[1::2]
    correlation = ((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).mean(1)
    correlation = correlation / (a.std(1) * b.std(1))
    assert abs(float(correlation.mean())) < 6.0 / math.sqrt(128 * correlation.numel())
    # Normal tails: the fraction beyond 3 sigma is 0.27%.
    beyond = float((noise.abs() > 3.0).float().mean())
    assert abs(beyond - 0.0027) < 6.0 * math.sqrt(0.0027 / n)


def test_one_row_draw_into_numpy_equals_the_tensor_draw() -> None:
    streams = StepStreams()
    noise = KeyedNoise(streams, "layer")
    out = np.empty(128, dtype=np.float32)
    streams.begin(torch.tensor([[stream_of("session-1"), 5]]))
    try:
        for call, pass_ in ((0, 0), (1, 0), (0, 2)):
            assert noise.draw_one_row(out, call, noise.table_array(), pass_)
            assert torch.equal(torch.from_numpy(out), noise.draw(1, 128, call, pass_))
    finally:
        streams.end()
    streams.begin(torch.tensor([[1, 0], [2, 0]]))  # several sequences: not a one-row draw
    try:
        assert not noise.draw_one_row(out, 0, noise.table_array())
    finally:
        streams.end()


def test_scaled_draws_are_the_same_windows_of_the_scaled_table() -> None:
    # Noise drawn in another unit (ADC steps, say) comes from the table scaled once: the
    # same windows, each value rounded once after scaling, so equal to the scaled standard
    # draw up to float32 rounding.
    streams = StepStreams()
    noise = KeyedNoise(streams, "layer")
    entry = torch.tensor([[stream_of(f"session-{i}"), 2] for i in range(5)])
    streams.begin(entry)
    try:
        standard = noise.draw(5, 128, 0)
        scaled = noise.draw(5, 128, 0, scale=1.2748)
    finally:
        streams.end()
    torch.testing.assert_close(scaled, standard * 1.2748, rtol=1e-6, atol=1e-6)
    assert not torch.equal(scaled, standard)


def test_a_few_sequences_draw_on_python_ints_what_many_draw_on_tensors() -> None:
    # A step of a few sequences keeps its keys as Python ints; a larger one as int64 tensors.
    # Both give the same numbers, for one row per sequence and for several (4 per sequence:
    # more rows than a few, gathered as a large step's are).
    streams = StepStreams()
    noise = KeyedNoise(streams, "layer")
    entry = torch.tensor([[stream_of(f"session-{i}"), 3 * i] for i in range(5)])
    for per_sequence, length in ((1, 128), (3, 40), (4, 40), (1, WINDOW_PAD + 7)):
        rows = 5 * per_sequence
        streams.begin(entry)
        assert streams.key_list is not None and streams.keys is None
        try:
            few = noise.draw(rows, length, 1, 2, scale=0.5)
        finally:
            streams.end()
        streams.begin(entry)
        streams.key_list, streams.keys = None, step_keys(entry)  # as a large step holds them
        try:
            many = noise.draw(rows, length, 1, 2, scale=0.5)
        finally:
            streams.end()
        assert torch.equal(few, many)
