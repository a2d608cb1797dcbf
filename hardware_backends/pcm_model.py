"""Statistical model of phase-change-memory (PCM) devices for analog inference.

The model is the one fitted on a million-device IBM PCM array (Nandakumar et al., ICECS 2019;
Joshi et al., Nature Communications 2020) in the form used by IBM aihwkit's ``PCMLikeNoiseModel``.
All conductances are in microsiemens (µS); ``g_T`` is the target conductance of one device.

1. Programming (once, when the chip is written by iterative write-verify):
       g_prog = max(g_T + N(0, σ_prog(g_T)), 0)
       σ_prog = max(c0 + c1·(g_T/g_max) + c2·(g_T/g_max)², 0) · g_max/g_ref     (µS)
2. Drift (structural relaxation of the amorphous phase), with one exponent ν per device:
       g_drift(t) = g_prog · ((t + t0)/t0)^(−ν),   ν = |N(μ_ν(g_T), σ_ν(g_T))|
       μ_ν = clip(−0.0155·ln(g_T/g_max) + 0.0244, 0.049, 0.1)
       σ_ν = clip(−0.0125·ln(g_T/g_max) − 0.0059, 0.008, 0.045)
3. Read noise (1/f noise integrated from programming up to the read):
       g(t) = max(g_drift(t) · (1 + σ_read·N(0, 1)), 0)
       σ_read = Q_s(g_prog) · sqrt(ln((t + t0 + t_read)/(2·t_read))),
       Q_s = min(0.0088 / max((g_prog/g_max)^0.65, 1e-3), 0.2)

``t`` is the time since programming finished (aihwkit's ``t_inference``). Q_s belongs to the
device as it is: it is evaluated at the conductance the device actually holds after
programming (``g_prog``, as aihwkit's ``PCMLikeNoiseModel`` does), not at the target. The
difference matters for stuck devices: a device stuck at g_max whose target was 0 holds g_max
and reads with the small relative noise of g_max, not with the 0.2 cap of the reset state.

The accumulated 1/f noise is one draw per (chip, t): it integrates the noise from programming
up to the read, so repeated reads at the same inference time see the same value
(`read_conductance` with the chip's read stream at that time; aihwkit's
``drift_analog_weights(t)`` likewise draws it once per drift time).
Optional stuck-at faults pin a random fraction of devices at 0 or at g_max; stuck devices
neither follow programming nor drift, but are still read with noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Smallest relative conductance used in the logarithms of the drift laws (as in aihwkit).
_MIN_RELATIVE_CONDUCTANCE = 1e-7


@dataclass(frozen=True)
class PCMConfig:
    """Device parameters with the published defaults (conductances in µS, times in s)."""

    g_max: float = 25.0  # largest reliably programmable conductance
    prog_coeff: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)  # µS at g_ref
    prog_coeff_g_max_reference: float = 25.0  # g_ref: the g_max the coefficients were fitted at
    prog_noise_scale: float = 1.0
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    t0: float = 20.0  # first read after programming; drift is measured relative to it
    t_read: float = 250e-9  # read pulse width, lower limit of the 1/f noise band
    stuck_at_zero_fraction: float = 0.0
    stuck_at_gmax_fraction: float = 0.0

    def __post_init__(self) -> None:
        positive = ("g_max", "prog_coeff_g_max_reference", "t0", "t_read")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"PCMConfig.{name} must be a positive number, got {value!r}")
        scales = ("prog_noise_scale", "drift_scale", "read_noise_scale")
        for name in scales:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"PCMConfig.{name} must be a number >= 0, got {value!r}")
        if len(self.prog_coeff) != 3:
            raise ValueError(f"PCMConfig.prog_coeff needs 3 coefficients, got {self.prog_coeff}")
        for name in ("stuck_at_zero_fraction", "stuck_at_gmax_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"PCMConfig.{name} must lie in [0, 1], got {value!r}")
        if self.stuck_at_zero_fraction + self.stuck_at_gmax_fraction > 1.0:
            raise ValueError("PCMConfig stuck-at fractions add up to more than 1")


# --- the published laws, as functions of a device's conductance -------------------------------


def programming_noise_std(g_target: Tensor, config: PCMConfig) -> Tensor:
    """σ_prog in µS for each target conductance."""
    c0, c1, c2 = config.prog_coeff
    g_rel = g_target / config.g_max
    sigma = (c0 + c1 * g_rel + c2 * g_rel**2).clamp(min=0.0)
    return sigma * (config.g_max / config.prog_coeff_g_max_reference) * config.prog_noise_scale


def drift_exponent_mean(g_target: Tensor, config: PCMConfig) -> Tensor:
    """μ_ν: mean drift exponent (before the absolute value) for each target conductance."""
    log_g = (g_target / config.g_max).abs().clamp(min=_MIN_RELATIVE_CONDUCTANCE).log()
    return (-0.0155 * log_g + 0.0244).clamp(min=0.049, max=0.1)


def drift_exponent_std(g_target: Tensor, config: PCMConfig) -> Tensor:
    """σ_ν: device-to-device spread of the drift exponent for each target conductance."""
    log_g = (g_target / config.g_max).abs().clamp(min=_MIN_RELATIVE_CONDUCTANCE).log()
    return (-0.0125 * log_g - 0.0059).clamp(min=0.008, max=0.045)


def drift_factor_base(t_inference: float, config: PCMConfig) -> float:
    """(t + t0)/t0, the base raised to −ν."""
    return (t_inference + config.t0) / config.t0


def read_noise_relative_std(g_device: Tensor, t_inference: float, config: PCMConfig) -> Tensor:
    """σ_read: relative std of the accumulated 1/f read noise at ``t_inference`` for devices
    that hold ``g_device`` µS after programming (their actual conductance, stuck or not)."""
    g_rel_pow = ((g_device / config.g_max).abs() ** 0.65).clamp(min=1e-3)
    q_s = (0.0088 / g_rel_pow).clamp(max=0.2)
    t = t_inference + config.t0
    bandwidth = math.log((t + config.t_read) / (2.0 * config.t_read))
    return q_s * math.sqrt(bandwidth) * config.read_noise_scale


# --- programmed devices and their reads --------------------------------------------------------


@dataclass(frozen=True)
class ProgrammedDevices:
    """A programmed conductance array: what the chip holds right after write-verify."""

    g_target: Tensor  # µS, what we asked for
    g_programmed: Tensor  # µS, what write-verify achieved
    drift_exponent: Tensor  # ν per device (0 for stuck devices)


def program_devices(
    g_target: Tensor, config: PCMConfig, generator: torch.Generator
) -> ProgrammedDevices:
    """Program ``g_target`` (µS, any shape): draw programming noise, ν and stuck-at faults once."""
    if torch.any(g_target < 0) or torch.any(g_target > config.g_max * (1 + 1e-6)):
        raise ValueError(f"target conductances must lie in [0, g_max={config.g_max}] µS")
    noise = torch.randn(g_target.shape, generator=generator, dtype=g_target.dtype)
    g_programmed = (g_target + programming_noise_std(g_target, config) * noise).clamp(min=0.0)

    z_nu = torch.randn(g_target.shape, generator=generator, dtype=g_target.dtype)
    mu, sigma = drift_exponent_mean(g_target, config), drift_exponent_std(g_target, config)
    drift_exponent = (mu + sigma * z_nu).abs() * config.drift_scale

    if config.stuck_at_zero_fraction > 0 or config.stuck_at_gmax_fraction > 0:
        u = torch.rand(g_target.shape, generator=generator, dtype=g_target.dtype)
        stuck_zero = u < config.stuck_at_zero_fraction
        stuck_max = (u >= config.stuck_at_zero_fraction) & (
            u < config.stuck_at_zero_fraction + config.stuck_at_gmax_fraction
        )
        g_programmed = torch.where(stuck_zero, torch.zeros_like(g_programmed), g_programmed)
        g_programmed = torch.where(
            stuck_max, torch.full_like(g_programmed, config.g_max), g_programmed
        )
        drift_exponent = torch.where(stuck_zero | stuck_max, 0.0, drift_exponent)
    return ProgrammedDevices(g_target, g_programmed, drift_exponent)


def drifted_conductance(
    devices: ProgrammedDevices, t_inference: float, config: PCMConfig
) -> Tensor:
    """Noise-free drifted conductance g_drift(t) (µS) at ``t_inference`` seconds."""
    _check_time(t_inference)
    if t_inference == 0:
        return devices.g_programmed
    base = drift_factor_base(t_inference, config)
    return devices.g_programmed * torch.exp(-devices.drift_exponent * math.log(base))


def read_conductance(
    devices: ProgrammedDevices,
    t_inference: float,
    config: PCMConfig,
    generator: torch.Generator,
) -> Tensor:
    """The array as read at ``t_inference``: drift plus one draw of the accumulated 1/f noise
    (µS), whose std follows each device's actual (programmed or stuck) conductance."""
    g_drift = drifted_conductance(devices, t_inference, config)
    sigma = read_noise_relative_std(devices.g_programmed, t_inference, config)
    noise = torch.randn(g_drift.shape, generator=generator, dtype=g_drift.dtype)
    return (g_drift * (1.0 + sigma * noise)).clamp(min=0.0)


def _check_time(t_inference: float) -> None:
    if not (isinstance(t_inference, (int, float)) and math.isfinite(t_inference)):
        raise ValueError(f"t_inference must be a finite number of seconds, got {t_inference!r}")
    if t_inference < 0:
        raise ValueError(f"t_inference must be >= 0 seconds since programming, got {t_inference}")
