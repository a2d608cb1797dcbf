"""One 128x512 layer on the simulated PCM crossbar: error of both weight mappings against
drift, and the analog forward time against the float forward of the same layer.

The layer is `nn.Linear(512, 128)` with torch's default initialisation (seed 0), fed
standard-normal inputs. For each weight mapping ("rescaled": tiles normalised to max |w| = 1,
aihwkit weight_scaling_omega = 1; "raw": the weights' own units, aihwkit's default omega = 0),
inference time (0 s, 1 hour, 1 day, 1 year) and drift compensation (off / on) it programs
`--chips` chips and reports the relative output error ||y_analog - y_float|| / ||y_float||,
mean over chips.

Timing, in the same run and process, one thread, at each batch size: the float forward
`F.linear`; the analog forward as served (conductances read once per chip and inference
time; output noise per read from each sequence's own stream, the step's keys derived from
the batch's stream entries included in the timed call); the general path it is tested
against (`reference_forward`, tile by tile, noise from one generator); and the analog
forward as it was before the chip was read once (the conductances re-read with fresh 1/f
noise on every call). Fastest of `--repeats` interleaved rounds of ~2 ms blocks (the old forward
timed apart, after them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/analog_mapping.py [--chips 5] [--batches 1 64 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardware_backends.crossbar import (
    AnalogMatmul,
    CrossbarConfig,
    generator_noise,
    program_crossbar,
)
from hardware_backends.noise_streams import KeyedNoise, StepStreams
from hardware_backends.pcm_model import PCMConfig
from hardware_backends.routing import derived_generator

try:
    from bench._analog_before import RereadingMatmul
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from _analog_before import RereadingMatmul

TIMES = {"0 s": 0.0, "1 hour": 3600.0, "1 day": 86_400.0, "1 year": 365.0 * 86_400.0}
MAPPINGS = ("rescaled", "raw")
ERROR_ROWS = 256  # inputs the relative error is measured on
BLOCK_SECONDS = 2e-3  # the length of one timed block of calls
# aihwkit 1.2.0 on a 128x512 layer (../shared/FIELD_NOTES.md "Analog mapping"), for reference.
AIHWKIT = {
    ("rescaled", True): (0.087, 0.100, 0.116, 0.154),
    ("rescaled", False): (0.087, 0.242, 0.348, 0.509),
    ("raw", True): (0.357, 0.420, 0.483, 0.603),
}


def layer() -> tuple[Tensor, Tensor]:
    """The weight [128, 512] and ERROR_ROWS inputs [R, 512]."""
    torch.manual_seed(0)
    weight = nn.Linear(512, 128, bias=False).weight.detach()
    x = torch.randn(ERROR_ROWS, 512, generator=torch.Generator().manual_seed(1))
    return weight, x


def engine(
    weight: Tensor,
    mapping: str,
    t: float,
    compensation: bool,
    chip: int,
    streams: StepStreams | None = None,
) -> AnalogMatmul:
    config, pcm = CrossbarConfig(weight_mapping=mapping), PCMConfig()
    crossbar = program_crossbar(weight, config, pcm, derived_generator(chip, "program"))
    return AnalogMatmul(
        crossbar,
        config,
        pcm,
        t,
        compensation,
        derived_generator(chip, "output"),
        read_generator=derived_generator(chip, f"read:{t!r}"),
        noise=None if streams is None else KeyedNoise(streams, "layer"),
    )


def relative_error(y: Tensor, exact: Tensor) -> float:
    return float((y - exact).norm() / exact.norm())


def error_table(chips: int) -> dict[tuple[str, bool], list[float]]:
    weight, x = layer()
    exact = F.linear(x, weight)
    table: dict[tuple[str, bool], list[float]] = {}
    for mapping in MAPPINGS:
        for compensation in (False, True):
            table[(mapping, compensation)] = [
                statistics.mean(
                    relative_error(engine(weight, mapping, t, compensation, chip)(x), exact)
                    for chip in range(chips)
                )
                for t in TIMES.values()
            ]
    return table


def block_seconds(call: Callable[[], object], per_block: int) -> float:
    start = time.perf_counter()
    for _ in range(per_block):
        call()
    return (time.perf_counter() - start) / per_block


def timing_rows(batches: list[int], repeats: int) -> list[dict]:
    """Float, analog and reference forwards timed in interleaved rounds of blocks of about
    equal duration (so that load from elsewhere on the machine hits all alike), then the
    old forward on its own; the fastest block of each is reported, the figure least
    disturbed by other work on a shared machine."""
    weight, _ = layer()
    streams = StepStreams()
    matmul = engine(weight, "rescaled", 86_400.0, True, chip=0, streams=streams)
    before = RereadingMatmul(matmul)
    layout = matmul.crossbar.layout
    rows = []
    for batch in batches:
        x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(2))
        stream_entry = torch.stack(
            [torch.arange(batch, dtype=torch.int64), torch.full((batch,), 7, dtype=torch.int64)],
            dim=1,
        )  # [B, 2]: (stream id, steps taken), as a runner's state carries them
        shape = (batch, layout.row_tiles, layout.out_features)

        def served(x: Tensor = x, stream_entry: Tensor = stream_entry) -> Tensor:
            streams.begin(stream_entry)  # the step's keys, as the runner sets them
            try:
                return matmul(x)
            finally:
                streams.end()

        def reference(x: Tensor = x, shape: tuple[int, int, int] = shape) -> Tensor:
            draw = generator_noise(matmul.generator, shape, matmul.config)
            return matmul.reference_forward(x, draw)

        calls = {
            "float": lambda x=x: F.linear(x, weight),
            "analog": served,
            "reference": reference,
        }
        timings: dict[str, list[float]] = {name: [] for name in calls}
        with torch.inference_mode():
            # The warm-up round sizes each forward's block to about BLOCK_SECONDS, so that
            # every block is as likely to be interrupted by other work on the machine (a
            # slower forward in a longer block would be, and its fastest block would lose).
            for call in calls.values():  # first calls build caches (the noise table, ...)
                block_seconds(call, 5)
            per_block = {
                name: max(1, round(BLOCK_SECONDS / block_seconds(call, 20)))
                for name, call in calls.items()
            }
            for _ in range(repeats):
                for name, call in calls.items():
                    timings[name].append(block_seconds(call, per_block[name]))
            # The old forward churns through megabytes per call; timed apart, so that it
            # does not leave the others' blocks starting from cold caches.
            timings["before"] = [block_seconds(lambda x=x: before(x), 3) for _ in range(5)]
        rows.append({"batch": batch} | {k: min(v) for k, v in timings.items()})
    return rows


def print_error_table(table: dict[tuple[str, bool], list[float]], chips: int) -> None:
    print(f"relative output error ||y - y_float|| / ||y_float||, mean over {chips} chips")
    print("(aihwkit 1.2.0 on a 128x512 layer in brackets, from FIELD_NOTES)\n")
    print("| mapping | drift compensation | " + " | ".join(TIMES) + " |")
    print("|---|---|" + "---:|" * len(TIMES))
    for (mapping, compensation), errors in table.items():
        reference = AIHWKIT.get((mapping, compensation))
        cells = [
            f"{e:.3f}" + ("" if reference is None else f" ({reference[i]:.3f})")
            for i, e in enumerate(errors)
        ]
        print(f"| {mapping} | {'on' if compensation else 'off'} | " + " | ".join(cells) + " |")


def print_timing(rows: list[dict], repeats: int) -> None:
    print(
        f"\nforward time of the 128x512 layer, 1 thread, fastest of {repeats} interleaved "
        f"rounds of {BLOCK_SECONDS * 1e3:.0f} ms blocks"
    )
    print("(rescaled mapping, 1 day, drift compensation on)\n")
    columns = ["batch", "float µs", "analog µs", "analog / float"]
    columns += ["reference path µs", "reference / float", "before: re-read per call µs"]
    print("| " + " | ".join(columns) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['float'] * 1e6:.1f} | {r['analog'] * 1e6:.1f} "
            f"| {r['analog'] / r['float']:.2f}x | {r['reference'] * 1e6:.1f} "
            f"| {r['reference'] / r['float']:.2f}x | {r['before'] * 1e6:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=5, help="chips (noise seeds) per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=15, help="timing rounds per figure")
    parser.add_argument("--timing-only", action="store_true", help="skip the error table")
    args = parser.parse_args()
    if args.chips < 1 or args.repeats < 1 or min(args.batches) < 1:
        parser.error("--chips, --repeats and --batches must be positive")
    torch.set_num_threads(1)
    if not args.timing_only:
        print_error_table(error_table(args.chips), args.chips)
    print_timing(timing_rows(args.batches, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
