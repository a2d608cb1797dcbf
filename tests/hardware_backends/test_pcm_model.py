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


def _sigma_read(g_device: torch.Tensor, t: float, cfg: PCMConfig) -> torch.Tensor:
    """Relative read-noise std of devices holding g_device µS (their actual conductance)."""
    q_s = (0.0088 / ((g_device / cfg.g_max) ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
    return q_s * math.sqrt(math.log((t + cfg.t0 + 250e-9) / (2 * 250e-9)))


def _expected_moments(g_t: float, t: float, cfg: PCMConfig, stage: str) -> tuple[float, float]:
    """Exact (mean, variance) of the conductance after 'program' or 'drift'."""
    first, second = _rectified_moments(g_t, _sigma_prog(g_t, cfg))
    if stage == "drift" and t > 0:
        m, s = _nu_mean_std(g_t, cfg)
        log_base = math.log((t + 20.0) / 20.0)  # t0 = 20 s
        first *= _folded_normal_mgf(-log_base, m, s)
        second *= _folded_normal_mgf(-2.0 * log_base, m, s)
    return first, second - first**2


def _sample(g_t: float, t: float, cfg: PCMConfig, stage: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.full((N_DEVICES,), g_t, dtype=torch.float64)
    devices = program_devices(target, cfg, gen)
    if stage == "program":
        return devices.g_programmed
    return drifted_conductance(devices, t, cfg)


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


def _read_residuals(devices, t: float, cfg: PCMConfig, seed: int) -> tuple[float, float]:
    """Read the array once and return, in units of their standard errors, how far the sum of
    (read - E[read | device]) and the sum of its squares minus Var[read | device] fall from 0.

    Given a device's programmed conductance g_p and drifted conductance g_d, the closed form
    is read = max(g_d · (1 + σ(g_p)·Z), 0): a rectified normal with exact conditional moments.
    """
    g_read = read_conductance(devices, t, cfg, torch.Generator().manual_seed(seed))
    g_drift = drifted_conductance(devices, t, cfg)
    # E[X], E[X²] of X = max(1 + σ·Z, 0), elementwise (as `_rectified_moments`).
    sigma = _sigma_read(devices.g_programmed, t, cfg)
    a = 1.0 / sigma
    cdf, pdf = torch.special.ndtr(a), torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    r1_t = cdf + sigma * pdf
    r2_t = (1.0 + sigma**2) * cdf + sigma * pdf
    mean = g_drift * r1_t
    var = g_drift**2 * (r2_t - r1_t**2)
    residual = g_read - mean
    z_mean = float(residual.sum()) / math.sqrt(float(var.sum()))
    squares = residual**2 - var
    z_var = float(squares.sum()) / math.sqrt(float((squares**2).sum()))  # empirical SE
    return z_mean, z_var


@pytest.mark.parametrize("t", [0.0, HOUR, DAY, YEAR], ids=["0s", "1h", "1day", "1year"])
@pytest.mark.parametrize("g_t", LEVELS_US)
def test_read_noise_follows_the_closed_form_at_the_actual_conductance(g_t: float, t: float) -> None:
    # Programming noise spreads g_p around the target, so every device has its own σ_read:
    # the sums are checked against the exact conditional moments, to 5 standard errors.
    cfg = PCMConfig()
    target = torch.full((N_DEVICES // 4,), g_t, dtype=torch.float64)
    devices = program_devices(target, cfg, torch.Generator().manual_seed(1))
    z_mean, z_var = _read_residuals(devices, t, cfg, seed=2)
    assert abs(z_mean) <= 5.0 and abs(z_var) <= 5.0, (z_mean, z_var)


@pytest.mark.parametrize("t", [0.0, YEAR], ids=["0s", "1year"])
def test_a_stuck_at_gmax_device_reads_with_the_spread_of_a_device_programmed_to_gmax(
    t: float,
) -> None:
    # Targets 0 (the idle side of a pair) but every device stuck at g_max, against devices
    # programmed exactly to g_max (no programming noise, no drift: stuck devices do not drift).
    cfg = PCMConfig(stuck_at_gmax_fraction=1.0)
    stuck = program_devices(
        torch.zeros(N_DEVICES, dtype=torch.float64), cfg, torch.Generator().manual_seed(3)
    )
    exact_cfg = PCMConfig(prog_noise_scale=0.0, drift_scale=0.0)
    programmed = program_devices(
        torch.full((N_DEVICES,), 25.0, dtype=torch.float64),
        exact_cfg,
        torch.Generator().manual_seed(4),
    )
    expected_std = 25.0 * float(_sigma_read(torch.tensor(25.0), t, cfg))  # 0.92 µS at 0 s
    for devices, config, seed in ((stuck, cfg, 5), (programmed, exact_cfg, 6)):
        g = read_conductance(devices, t, config, torch.Generator().manual_seed(seed))
        # At σ ≈ 4-5 % the clamp at 0 never acts: a normal sample, whose mean has standard
        # error σ/√N and whose std has standard error σ/√(2N).
        assert abs(float(g.mean()) - 25.0) <= 5.0 * expected_std / math.sqrt(N_DEVICES)
        se_std = expected_std / math.sqrt(2 * N_DEVICES)
        assert abs(float(g.std()) - expected_std) <= 5.0 * se_std, (float(g.std()), expected_std)
    assert expected_std < 1.3  # the 0.2 cap of the reset state would give about 19-24 µS


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
