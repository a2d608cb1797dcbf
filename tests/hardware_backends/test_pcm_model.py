"""The simulated PCM conductances follow the published statistical model.

Every expectation below is the exact moment of the published law (rectified and folded normals
have closed forms), so the only slack is sampling error: a mean is checked to 5 standard errors
(σ/√N) and a variance to 5 standard errors of the sample variance (√((m4 − σ⁴)/N)).
With N = 200 000 devices per level both are well below "a few percent".
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from hardware_backends.pcm_model import (
    PCMConfig,
    drift_exponent_mean,
    drift_exponent_std,
    drifted_conductance,
    program_devices,
    programming_noise_std,
    read_conductance,
    read_noise_relative_std,
)

N_DEVICES = 200_000
HOUR, DAY, YEAR = 3600.0, 86_400.0, 365.0 * 86_400.0
LEVELS_US = [0.0, 2.5, 12.5, 25.0]


def _rectified_moments(mu: float, sigma: float) -> tuple[float, float]:
    """E[X], E[X²] of X = max(mu + sigma·Z, 0)."""
    if sigma == 0:
        return max(mu, 0.0), max(mu, 0.0) ** 2
    a = mu / sigma
    first = mu * norm.cdf(a) + sigma * norm.pdf(a)
    second = (mu**2 + sigma**2) * norm.cdf(a) + mu * sigma * norm.pdf(a)
    return first, second


def _folded_normal_mgf(u: float, m: float, s: float) -> float:
    """E[exp(u·|Y|)] for Y ~ N(m, s²)."""
    return math.exp(u * m + 0.5 * u**2 * s**2) * norm.cdf(m / s + u * s) + math.exp(
        -u * m + 0.5 * u**2 * s**2
    ) * norm.cdf(-m / s + u * s)


# The published laws, written out again here from the papers' constants so that the
# simulator is checked against the formulas rather than against itself.
def _sigma_prog(g_t: float, cfg: PCMConfig) -> float:
    g = g_t / cfg.g_max
    return max(0.26348 + 1.9650 * g - 1.1731 * g**2, 0.0) * cfg.g_max / 25.0


def _nu_mean_std(g_t: float, cfg: PCMConfig) -> tuple[float, float]:
    log_g = math.log(max(g_t / cfg.g_max, 1e-7))
    mean = min(max(-0.0155 * log_g + 0.0244, 0.049), 0.1)
    std = min(max(-0.0125 * log_g - 0.0059, 0.008), 0.045)
    return mean, std


def _sigma_read(g_t: float, t: float, cfg: PCMConfig) -> float:
    q_s = min(0.0088 / max((g_t / cfg.g_max) ** 0.65, 1e-3), 0.2)
    return q_s * math.sqrt(math.log((t + cfg.t0 + 250e-9) / (2 * 250e-9)))


def _expected_moments(g_t: float, t: float, cfg: PCMConfig, stage: str) -> tuple[float, float]:
    """Exact (mean, variance) of the conductance after 'program', 'drift' or 'read'."""
    first, second = _rectified_moments(g_t, _sigma_prog(g_t, cfg))
    if stage in ("drift", "read") and t > 0:
        m, s = _nu_mean_std(g_t, cfg)
        log_base = math.log((t + 20.0) / 20.0)  # t0 = 20 s
        first *= _folded_normal_mgf(-log_base, m, s)
        second *= _folded_normal_mgf(-2.0 * log_base, m, s)
    if stage == "read":
        r1, r2 = _rectified_moments(1.0, _sigma_read(g_t, t, cfg))
        first, second = first * r1, second * r2
    return first, second - first**2


def _sample(g_t: float, t: float, cfg: PCMConfig, stage: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.full((N_DEVICES,), g_t, dtype=torch.float64)
    devices = program_devices(target, cfg, gen)
    if stage == "program":
        return devices.g_programmed
    if stage == "drift":
        return drifted_conductance(devices, t, cfg)
    return read_conductance(devices, t, cfg, gen)


def _assert_moments(samples: torch.Tensor, mean: float, var: float) -> None:
    n = samples.numel()
    m_hat = float(samples.mean())
    centred = samples - m_hat
    v_hat = float((centred**2).mean())
    m4_hat = float((centred**4).mean())
    mean_tol = 5.0 * math.sqrt(v_hat / n)
    var_tol = 5.0 * math.sqrt(max(m4_hat - v_hat**2, 0.0) / n)
    assert abs(m_hat - mean) <= mean_tol, (m_hat, mean, mean_tol)
    assert abs(v_hat - var) <= var_tol, (v_hat, var, var_tol)
    # The sampling error above is itself small: the match is within a few percent.
    assert abs(m_hat - mean) <= 0.03 * mean + 1e-12
    assert abs(math.sqrt(v_hat) - math.sqrt(var)) <= 0.03 * math.sqrt(var)


@pytest.mark.parametrize("g_t", LEVELS_US)
def test_programmed_conductance_matches_published_programming_noise(g_t: float) -> None:
    cfg = PCMConfig()
    mean, var = _expected_moments(g_t, 0.0, cfg, "program")
    _assert_moments(_sample(g_t, 0.0, cfg, "program"), mean, var)


@pytest.mark.parametrize("t", [HOUR, DAY, YEAR], ids=["1h", "1day", "1year"])
@pytest.mark.parametrize("g_t", LEVELS_US)
def test_drifted_conductance_matches_power_law_with_device_exponents(g_t: float, t: float) -> None:
    cfg = PCMConfig()
    mean, var = _expected_moments(g_t, t, cfg, "drift")
    _assert_moments(_sample(g_t, t, cfg, "drift"), mean, var)


@pytest.mark.parametrize("t", [0.0, HOUR, DAY, YEAR], ids=["0s", "1h", "1day", "1year"])
@pytest.mark.parametrize("g_t", LEVELS_US)
def test_read_conductance_adds_accumulated_one_over_f_noise(g_t: float, t: float) -> None:
    cfg = PCMConfig()
    mean, var = _expected_moments(g_t, t, cfg, "read")
    _assert_moments(_sample(g_t, t, cfg, "read"), mean, var)


def test_published_constants_at_known_points() -> None:
    cfg = PCMConfig()
    g = torch.tensor([0.0, 2.5, 25.0], dtype=torch.float64)
    # σ_prog = c0 + c1·g/gmax + c2·(g/gmax)² µS.
    expected_prog = [0.26348, 0.26348 + 0.19650 - 0.011731, 0.26348 + 1.9650 - 1.1731]
    torch.testing.assert_close(programming_noise_std(g, cfg), torch.tensor(expected_prog).double())
    # μ_ν and σ_ν at g = 0.1·g_max lie inside their clip ranges; at g_max both are clipped.
    ln10 = math.log(10.0)
    torch.testing.assert_close(
        drift_exponent_mean(g[1:], cfg), torch.tensor([0.0155 * ln10 + 0.0244, 0.049]).double()
    )
    torch.testing.assert_close(
        drift_exponent_std(g[1:], cfg), torch.tensor([0.0125 * ln10 - 0.0059, 0.008]).double()
    )
    # Q_s saturates at 0.2 for the reset state; bandwidth term uses t_read = 250 ns.
    sigma_read = read_noise_relative_std(g[:1], 0.0, cfg)
    expected = 0.2 * math.sqrt(math.log((20.0 + 250e-9) / 500e-9))
    assert float(sigma_read) == pytest.approx(expected, rel=1e-9)


def test_programming_noise_scales_linearly_with_g_max() -> None:
    g_rel = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    at_25 = programming_noise_std(g_rel * 25.0, PCMConfig())
    at_50 = programming_noise_std(g_rel * 50.0, PCMConfig(g_max=50.0))
    torch.testing.assert_close(at_50, 2.0 * at_25)


def test_noise_scales_switch_sources_off() -> None:
    cfg = PCMConfig(prog_noise_scale=0.0, drift_scale=0.0, read_noise_scale=0.0)
    gen = torch.Generator().manual_seed(3)
    target = torch.linspace(0.0, 25.0, 101)
    devices = program_devices(target, cfg, gen)
    torch.testing.assert_close(devices.g_programmed, target)
    torch.testing.assert_close(read_conductance(devices, YEAR, cfg, gen), target)


def test_draws_are_reproducible_per_seed() -> None:
    cfg = PCMConfig()
    target = torch.linspace(0.0, 25.0, 1000)
    a = program_devices(target, cfg, torch.Generator().manual_seed(7))
    b = program_devices(target, cfg, torch.Generator().manual_seed(7))
    c = program_devices(target, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.g_programmed, b.g_programmed)
    assert torch.equal(a.drift_exponent, b.drift_exponent)
    assert not torch.equal(a.g_programmed, c.g_programmed)


def test_stuck_at_faults_hit_the_requested_fractions_and_do_not_drift() -> None:
    cfg = PCMConfig(stuck_at_zero_fraction=0.05, stuck_at_gmax_fraction=0.02)
    target = torch.full((N_DEVICES,), 10.0, dtype=torch.float64)
    devices = program_devices(target, cfg, torch.Generator().manual_seed(0))
    at_zero = devices.g_programmed == 0.0
    at_max = devices.g_programmed == cfg.g_max
    for mask, p in ((at_zero, 0.05), (at_max, 0.02)):
        tol = 5.0 * math.sqrt(p * (1 - p) / N_DEVICES)  # binomial standard error
        assert abs(float(mask.double().mean()) - p) <= tol
    drifted = drifted_conductance(devices, YEAR, cfg)
    assert torch.all(drifted[at_max] == cfg.g_max)
    assert torch.all(drifted[at_zero] == 0.0)


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = PCMConfig()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="target conductances"):
        program_devices(torch.tensor([-1.0]), cfg, gen)
    devices = program_devices(torch.tensor([1.0]), cfg, gen)
    with pytest.raises(ValueError, match="t_inference"):
        drifted_conductance(devices, -5.0, cfg)
    with pytest.raises(ValueError, match="g_max"):
        PCMConfig(g_max=0.0)
    with pytest.raises(ValueError, match="stuck-at"):
        PCMConfig(stuck_at_zero_fraction=0.7, stuck_at_gmax_fraction=0.6)
