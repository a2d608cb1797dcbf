"""Selective SSM specifics: parallel scan vs reference, causality, initialisation, tied
embeddings, and that a small character LM actually learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.selective import SelectiveConfig, SelectiveModel, _scan_parallel, _scan_sequential

SMALL = {"vocab_size": 12, "d_output": 12, "d_model": 16, "d_state": 4, "n_layers": 2}


def random_scan_inputs(T: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, T, 3, 4, generator=g, dtype=dtype)  # decays in (0, 1)
    b = torch.randn(2, T, 3, 4, generator=g, dtype=dtype)
    h0 = torch.randn(2, 3, 4, generator=g, dtype=dtype)
    return a, b, h0


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 31, 128])
def test_parallel_scan_matches_sequential_reference(T: int) -> None:
    a, b, h0 = random_scan_inputs(T)
    exact = _scan_sequential(a, b, h0)
    assert float((_scan_parallel(a, b, h0) - exact).abs().max()) < 1e-12
    a32, b32, h32 = a.float(), b.float(), h0.float()
    assert float((_scan_parallel(a32, b32, h32) - exact).abs().max()) < 1e-5


def test_scan_gradients_match_the_reference() -> None:
    a, b, h0 = random_scan_inputs(13)
    weights = torch.randn(2, 13, 3, 4, dtype=torch.float64)
    grads = []
    for scan in (_scan_parallel, _scan_sequential):
        leaves = [t.clone().requires_grad_() for t in (a, b, h0)]
        (scan(*leaves) * weights).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for g_par, g_seq in zip(*grads, strict=True):
        assert torch.allclose(g_par, g_seq, atol=1e-10)


def test_model_forward_with_either_scan_agrees() -> None:
    torch.manual_seed(0)
    model = SelectiveModel(SelectiveConfig(**SMALL)).eval()
    x = torch.randint(0, 12, (3, 19))
    with torch.no_grad():
        a, state_a = model(x)
        b, state_b = model(x, scan=_scan_sequential)
    assert float((a - b).abs().max()) < 1e-5
    assert all(float((state_a[k] - state_b[k]).abs().max()) < 1e-5 for k in state_a)


def test_outputs_are_causal() -> None:
    """Changing the token at t leaves every earlier logit unchanged and moves later ones."""
    torch.manual_seed(0)
    model = SelectiveModel(SelectiveConfig(**SMALL)).eval()
    x = torch.randint(0, 12, (1, 16))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 12
    with torch.no_grad():
        lx, _ = model(x)
        ly, _ = model(y)
    assert torch.equal(lx[:, :9], ly[:, :9])
    assert float((lx[:, 9:] - ly[:, 9:]).abs().max()) > 1e-4


def test_initialisation_follows_mamba() -> None:
    torch.manual_seed(0)
    cfg = SelectiveConfig(**SMALL, dt_min=0.002, dt_max=0.05)
    mixer = SelectiveModel(cfg).layers[0].mixer
    # S4D-real: A = -(1, 2, ..., N) in every channel.
    expected_A = -torch.arange(1, cfg.d_state + 1, dtype=torch.float32).expand(cfg.d_inner, -1)
    assert torch.allclose(-torch.exp(mixer.A_log), expected_A)
    # softplus(bias) is the initial Δ and lies in [dt_min, dt_max].
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert float(dt.min()) >= 0.002 * (1 - 1e-4) and float(dt.max()) <= 0.05 * (1 + 1e-4)
    assert mixer.dt_proj.in_features == math.ceil(cfg.d_model / 16)


def test_tied_and_untied_heads() -> None:
    tied = SelectiveModel(SelectiveConfig(**SMALL))
    assert tied.head.weight is tied.encoder.embed.weight
    untied = SelectiveModel(SelectiveConfig(**SMALL, tie_embeddings=False))
    assert untied.head.weight is not untied.encoder.embed.weight
    with pytest.raises(ValueError, match="tie_embeddings needs d_output == vocab_size"):
        SelectiveConfig(vocab_size=12, d_output=10)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="d_conv must be >= 2"):
        SelectiveConfig(d_conv=1)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        SelectiveConfig(dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="expand"):
        SelectiveConfig(expand=0)
    with pytest.raises(ValueError, match="dt_rank"):
        SelectiveConfig(dt_rank=-1)


def test_char_lm_learns_a_repeating_text() -> None:
    """A periodic text is fully predictable after one period, so the loss must fall from
    about ln(vocab) to near zero."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 12
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    V, L = len(chars), 40
    model = SelectiveModel(
        SelectiveConfig(vocab_size=V, d_output=V, d_model=24, n_layers=1, d_state=8)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    starts = torch.arange(0, len(ids) - L - 1, 20)
    x = torch.stack([ids[s : s + L] for s in starts])  # [B, L]
    y = torch.stack([ids[s + 1 : s + L + 1] for s in starts])
    losses = []
    for _ in range(50):
        logits, _ = model(x)
        loss = F.cross_entropy(logits[:, L // 2 :].reshape(-1, V), y[:, L // 2 :].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.5
    assert losses[-1] < 0.1
