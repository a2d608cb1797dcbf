"""Energy per operation, documented in one place, and the functions that turn counts into Usage.

Figures and sources
-------------------
Digital FP32, 45 nm CMOS at 0.9 V -- M. Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014, Figure 1.1.9:
    FP32 multiply 3.7 pJ, FP32 add 0.9 pJ
    -> multiply-accumulate 4.6 pJ; a spike-driven accumulate (an add only) 0.9 pJ.

Analog in-memory computing, phase-change memory -- M. Le Gallo et al., "A 64-core
mixed-signal in-memory compute chip based on phase-change memory for deep neural network
inference" (the HERMES chip, 14 nm), Nature Electronics 6, 680-693 (2023),
doi:10.1038/s41928-023-01010-1. For 8-bit input/output matrix-vector multiplications it
reports 2.48 TOPS/W in the four-phase (high-precision) read mode and 9.76 TOPS/W in the
one-phase (low-precision) mode. One multiply-accumulate is two operations, so
    J per MAC = 2 / (TOPS/W * 1e12)  ->  0.806 pJ (four-phase), 0.205 pJ (one-phase).
We default to the four-phase figure: it is the mode the chip uses for near-float accuracy,
and it is the conservative one. A binary spike on a crossbar row still reads that row, so a
spike-driven synaptic operation costs one analog MAC there.

Stochastic computing (bitstreams) -- no per-operation figure is cited here. A bipolar
stochastic multiply is one XNOR gate per bit of the stream (N = 1024 bits by default), and
the stream generators (a comparator and a random or Sobol source per stream) cost more than
the gates; the total depends on N and on the circuit. Until a measured figure is cited, the
stochastic backend's bitstream mode prices a MAC with the FP32 figure above as a
**placeholder** (`STOCHASTIC_BITSTREAM_PLACEHOLDER`): it is neither an upper nor a lower
bound, only a number of the right kind so that usage reports stay comparable.

Event-driven accounting
-----------------------
A layer whose inputs are spikes only does work for the inputs that spiked: each spike adds
one weight into each of the neurons it fans out to, so synaptic operations = spikes x
fan-out, counted as accumulates. A layer fed dense (analog) values stays a dense
matrix-vector product counted as MACs. The dense-equivalent figure counts every layer as
dense MACs on the same hardware, and is always reported beside the event-driven one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from hardware_backends.base import Usage

HOROWITZ_ISSCC_2014 = "M. Horowitz, Computing's energy problem, ISSCC 2014 (45 nm)"
LE_GALLO_NATELECTRON_2023 = (
    "M. Le Gallo et al., A 64-core mixed-signal in-memory compute chip based on "
    "phase-change memory, Nature Electronics 6, 680-693 (2023)"
)

FP32_MULTIPLY_JOULES = 3.7e-12
FP32_ADD_JOULES = 0.9e-12
FP32_MAC_JOULES = FP32_MULTIPLY_JOULES + FP32_ADD_JOULES  # 4.6 pJ
FP32_ACCUMULATE_JOULES = FP32_ADD_JOULES  # 0.9 pJ

OPS_PER_MAC = 2  # chip papers count a multiply-accumulate as two operations
HERMES_TOPS_PER_WATT_FOUR_PHASE = 2.48  # 8-bit I/O MVM, high-precision read mode
HERMES_TOPS_PER_WATT_ONE_PHASE = 9.76  # 8-bit I/O MVM, low-precision read mode


def joules_per_mac(tops_per_watt: float) -> float:
    """Energy per multiply-accumulate from a chip's TOPS/W figure (2 operations per MAC)."""
    if tops_per_watt <= 0:
        raise ValueError(f"tops_per_watt must be positive, got {tops_per_watt}")
    return OPS_PER_MAC / (tops_per_watt * 1e12)


@dataclass(frozen=True)
class EnergyModel:
    """What one dense MAC and one spike-driven accumulate cost on a kind of hardware."""

    name: str
    mac_joules: float
    accumulate_joules: float
    source: str


DIGITAL_FP32 = EnergyModel(
    name="digital_fp32_45nm",
    mac_joules=FP32_MAC_JOULES,
    accumulate_joules=FP32_ACCUMULATE_JOULES,
    source=HOROWITZ_ISSCC_2014,
)

ANALOG_PCM = EnergyModel(
    name="analog_pcm_hermes_four_phase",
    mac_joules=joules_per_mac(HERMES_TOPS_PER_WATT_FOUR_PHASE),
    accumulate_joules=joules_per_mac(HERMES_TOPS_PER_WATT_FOUR_PHASE),
    source=LE_GALLO_NATELECTRON_2023,
)

ANALOG_PCM_ONE_PHASE = EnergyModel(
    name="analog_pcm_hermes_one_phase",
    mac_joules=joules_per_mac(HERMES_TOPS_PER_WATT_ONE_PHASE),
    accumulate_joules=joules_per_mac(HERMES_TOPS_PER_WATT_ONE_PHASE),
    source=LE_GALLO_NATELECTRON_2023,
)


STOCHASTIC_BITSTREAM_PLACEHOLDER = EnergyModel(
    name="placeholder_fp32_mac_for_stochastic_bitstreams",
    mac_joules=FP32_MAC_JOULES,
    accumulate_joules=FP32_ACCUMULATE_JOULES,
    source=(
        "placeholder, no cited per-operation figure for a stochastic-computing MAC: the FP32 "
        f"MAC figure of {HOROWITZ_ISSCC_2014}"
    ),
)


def spike_driven_accumulates(spikes: int, fan_out: int) -> int:
    """Synaptic operations of a layer fed by spikes: each spike updates `fan_out` neurons."""
    if spikes < 0 or fan_out < 0:
        raise ValueError(f"spikes and fan_out must be non-negative, got {spikes}, {fan_out}")
    return spikes * fan_out


def usage_from_counts(
    *,
    macs: int,
    accumulates: int = 0,
    dense_equivalent_macs: int | None = None,
    spikes: int = 0,
    neuron_steps: int = 0,
    routed_macs: int = 0,
    skipped_macs: int = 0,
    energy: EnergyModel = DIGITAL_FP32,
) -> Usage:
    """Usage of `macs` dense MACs plus `accumulates` spike-driven adds on `energy`'s hardware.

    `dense_equivalent_macs` is the MAC count had every layer been dense (defaults to `macs`
    when nothing is event-driven). Models with routed experts say which part of `macs` ran
    in routers and chosen experts (`routed_macs`) and what the experts not chosen would
    have cost (`skipped_macs`): work not done, so it is priced nowhere, not even in the
    dense equivalent (which prices the work done as dense MACs).
    """
    if dense_equivalent_macs is None:
        dense_equivalent_macs = macs
    counts = {"macs": macs, "accumulates": accumulates, "spikes": spikes}
    counts |= {"neuron_steps": neuron_steps, "dense_equivalent_macs": dense_equivalent_macs}
    counts |= {"routed_macs": routed_macs, "skipped_macs": skipped_macs}
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative:
        raise ValueError(f"operation counts must be non-negative, got {negative}")
    return Usage(
        macs=int(macs),
        accumulates=int(accumulates),
        spikes=int(spikes),
        neuron_steps=int(neuron_steps),
        routed_macs=int(routed_macs),
        skipped_macs=int(skipped_macs),
        energy_joules=macs * energy.mac_joules + accumulates * energy.accumulate_joules,
        dense_equivalent_energy_joules=dense_equivalent_macs * energy.mac_joules,
    )


def usage_of_steps(
    op_counts: Mapping[str, int],
    batch: int,
    steps: int,
    activity: Mapping[str, Tensor],
    energy: EnergyModel = DIGITAL_FP32,
) -> Usage:
    """Usage of `steps` steps of `batch` sequences from a model's `macs_per_step()` counts.

    `op_counts["dense_macs"]` is the dense work of one sample's step, run as MACs. Spiking
    models add `op_counts["synaptic_ops_max"]`, the synaptic operations if every neuron
    spiked, and report one step's per-sample counters in `activity`: "spikes" and "neurons"
    [B], and optionally "synaptic_ops" [B] (spikes x fan-out summed over layers). The
    spike-driven work is those synaptic operations, counted as accumulates; without
    "synaptic_ops" it is synaptic_ops_max * spikes / neurons (exact for a common fan-out).
    The dense-equivalent figure prices dense_macs + synaptic_ops_max per step as MACs.
    Models with routed experts count only the routed work in dense_macs and add
    "routed_macs" (its routers and chosen experts) and "skipped_macs" (the experts not
    chosen) per step: fixed per step, since every token runs the same number of experts.
    """
    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got {batch}, {steps}")
    dense_macs = int(op_counts["dense_macs"]) * batch * steps
    routing = {
        name: int(op_counts.get(name, 0)) * batch * steps
        for name in ("routed_macs", "skipped_macs")
    }
    spike_driven_max = int(op_counts.get("synaptic_ops_max", 0))
    if not activity:
        if spike_driven_max:
            raise ValueError("a spiking model's usage needs its per-step activity counters")
        return usage_from_counts(macs=dense_macs, energy=energy, **routing)
    if steps != 1:
        raise ValueError("activity counters describe one step; sum the usage of each step")
    counters = {name: activity[name].detach().double().cpu() for name in activity}  # [B] each
    for name in ("spikes", "neurons"):
        if name not in counters:
            raise ValueError(f"activity must report {name!r}, got {sorted(counters)}")
    for name, counter in counters.items():
        if counter.shape != (batch,):
            raise ValueError(
                f"activity {name!r} must be [batch={batch}], got {list(counter.shape)}"
            )
    spikes, neurons = counters["spikes"], counters["neurons"]
    if bool((neurons <= 0).any()) or bool((spikes < 0).any()) or bool((spikes > neurons).any()):
        raise ValueError("activity counters need 0 <= spikes <= neurons and neurons > 0")
    if "synaptic_ops" in counters:
        synaptic_ops = counters["synaptic_ops"]
    else:
        synaptic_ops = spike_driven_max * spikes / neurons
    return usage_from_counts(
        macs=dense_macs,
        accumulates=round(float(synaptic_ops.sum())),
        dense_equivalent_macs=dense_macs + spike_driven_max * batch,
        spikes=round(float(spikes.sum())),
        neuron_steps=round(float(neurons.sum())),
        energy=energy,
        **routing,
    )
