"""LRU specifics: the parallel scan against its sequential reference, the eigenvalue
parameterisation and its ring initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from models.lru import LRU, LRUConfig, LRUModel, _scan_parallel, _scan_sequential


def random_scan_inputs(T: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    modulus = 0.3 + 0.69 * torch.rand(6, generator=g, dtype=real)  # stable, some slow
    lam = torch.polar(modulus, 2 * math.pi * torch.rand(6, generator=g, dtype=real))  # [N]
    bu = torch.randn(3, T, 6, generator=g, dtype=dtype)  # [B, T, N]
    h0 = torch.randn(3, 6, generator=g, dtype=dtype)  # [B, N]
    return lam, bu, h0


@pytest.mark.parametrize("T", [1, 2, 3, 8, 13, 64, 100])
def test_parallel_scan_matches_sequential_reference(T: int) -> None:
    lam, bu, h0 = random_scan_inputs(T, torch.complex128)
    exact = _scan_sequential(lam, bu, h0)
    assert float((_scan_parallel(lam, bu, h0) - exact).abs().max()) < 1e-12
    lam32, bu32, h032 = lam.to(torch.complex64), bu.to(torch.complex64), h0.to(torch.complex64)
    assert float((_scan_parallel(lam32, bu32, h032) - exact).abs().max()) < 1e-5


def test_scan_gradients_match_the_reference() -> None:
    lam, bu, h0 = random_scan_inputs(11, torch.complex128)
    grads = []
    for scan in (_scan_parallel, _scan_sequential):
        leaves = [t.clone().requires_grad_() for t in (lam, bu, h0)]
        out = scan(*leaves)
        (out.real.sum() + (out.imag**2).sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_model_forward_with_either_scan_agrees() -> None:
    torch.manual_seed(0)
    model = LRUModel(LRUConfig(d_model=16, d_state=8)).eval()
    x = 16 * torch.rand(4, 21, 8)
    with torch.no_grad():
        a, state_a = model(x)
        b, state_b = model(x, scan=_scan_sequential)
    assert float((a - b).abs().max()) < 1e-5
    assert all(float((state_a[k] - state_b[k]).abs().max()) < 1e-5 for k in state_a)


def test_eigenvalues_follow_the_parameterisation() -> None:
    torch.manual_seed(0)
    lru = LRU(d_model=4, d_state=32, r_min=0.5, r_max=0.9, max_phase=1.0)
    lam_re, lam_im, gamma = lru.eigenvalues()
    expected = torch.exp(torch.complex(-torch.exp(lru.nu_log), torch.exp(lru.theta_log)))
    assert torch.allclose(torch.complex(lam_re, lam_im), expected, atol=1e-6)
    # γ = sqrt(1 - |Λ|²) makes a unit-variance white drive give a unit-variance state.
    modulus_sq = lam_re**2 + lam_im**2
    assert torch.allclose(gamma**2, 1 - modulus_sq, atol=1e-6)
    # Stability holds for any parameter value, not only at initialisation.
    with torch.no_grad():
        lru.nu_log.copy_(torch.linspace(-9.0, 3.0, 32))
        lam_re, lam_im, gamma = lru.eigenvalues()
    assert bool((torch.hypot(lam_re, lam_im) < 1).all()) and bool((gamma > 0).all())


def test_ring_initialisation_is_uniform_on_the_ring() -> None:
    torch.manual_seed(0)
    r_min, r_max, max_phase, N = 0.4, 0.95, 2.0, 20000
    lru = LRU(d_model=1, d_state=N, r_min=r_min, r_max=r_max, max_phase=max_phase)
    with torch.no_grad():
        lam_re, lam_im, _ = lru.eigenvalues()
    modulus_sq = (lam_re**2 + lam_im**2).double()
    phase = torch.exp(lru.theta_log.detach()).double()
    assert float(modulus_sq.min()) >= r_min**2 - 1e-5 and float(modulus_sq.max()) <= r_max**2 + 1e-5
    assert float(phase.min()) >= 0 and float(phase.max()) <= max_phase + 1e-5
    # Uniform area on the ring: |Λ|² ~ U[r_min², r_max²] and phase ~ U[0, max_phase]. The
    # sample means lie within 5 standard errors ((b - a) / sqrt(12 N)) of the true means.
    a, b = r_min**2, r_max**2
    assert abs(float(modulus_sq.mean()) - (a + b) / 2) < 5 * (b - a) / math.sqrt(12 * N)
    assert abs(float(phase.mean()) - max_phase / 2) < 5 * max_phase / math.sqrt(12 * N)


def test_state_decays_to_zero_without_input_drive() -> None:
    """With the drive removed the state must shrink by exactly |Λ| per step."""
    torch.manual_seed(0)
    lru = LRU(d_model=4, d_state=8, r_min=0.5, r_max=0.9, max_phase=math.pi)
    with torch.no_grad():
        lru.B_re.zero_()
        lru.B_im.zero_()
        h_re, h_im = torch.randn(2, 8), torch.randn(2, 8)
        _, new_re, new_im = lru.step(torch.randn(2, 4), h_re, h_im)
        lam_re, lam_im, _ = lru.eigenvalues()
    ratio = torch.sqrt(new_re**2 + new_im**2) / torch.sqrt(h_re**2 + h_im**2)
    assert torch.allclose(ratio, torch.sqrt(lam_re**2 + lam_im**2).expand(2, 8), atol=1e-6)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="r_min < r_max < 1"):
        LRUConfig(r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="r_min < r_max < 1"):
        LRUConfig(r_max=1.0)
    with pytest.raises(ValueError, match="max_phase"):
        LRUConfig(max_phase=0.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        LRUConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="dropout"):
        LRUConfig(dropout=1.0)
    with pytest.raises(ValueError, match="d_state"):
        LRUConfig(d_state=0)


def test_eigenvalues_reused_without_autograd_follow_every_parameter_change() -> None:
    torch.manual_seed(0)
    lru = LRU(d_model=4, d_state=6, r_min=0.5, r_max=0.9, max_phase=3.14)
    with torch.inference_mode():
        first = lru.eigenvalues()
        assert lru.eigenvalues() is first  # reused, not recomputed
    for cached, fresh in zip(first, lru.compute_eigenvalues(), strict=True):
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    with torch.no_grad():
        lru.nu_log.add_(0.1)  # what fine-tuning does in place
    with torch.inference_mode():
        moved = lru.eigenvalues()
    assert not torch.equal(moved[0], first[0])
    for cached, fresh in zip(moved, lru.compute_eigenvalues(), strict=True):
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    lru.load_state_dict({**lru.state_dict(), "theta_log": lru.theta_log.detach() * 0.5})
    with torch.no_grad():
        reloaded = lru.eigenvalues()
    torch.testing.assert_close(reloaded[1], lru.compute_eigenvalues()[1], rtol=0, atol=0)
    # With autograd on, every call builds the graph afresh: gradients reach ν and θ.
    lam_re, lam_im, gamma = lru.eigenvalues()
    (lam_re.sum() + lam_im.sum() + gamma.sum()).backward()
    assert lru.nu_log.grad is not None and lru.theta_log.grad is not None
