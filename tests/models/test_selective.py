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


# ---- mixer "moe": routed experts after the SSM ------------------------------------------------

MOE = {**SMALL, "mixer": "moe", "n_experts": 4, "top_k": 2, "d_expert": 8}


def test_routed_experts_agree_with_the_dense_reference() -> None:
    """Running only each expert's tokens gives what every expert on every token, weighted
    by the same sparse gates, gives."""
    torch.manual_seed(0)
    model = SelectiveModel(SelectiveConfig(**MOE)).eval()
    x = torch.randint(0, 12, (3, 17))
    with torch.no_grad():
        routed, state_routed = model(x)
        dense, state_dense = model(x, scan=_scan_sequential, dense_experts=True)
    assert float((routed - dense).abs().max()) < 1e-5
    assert all(float((state_routed[k] - state_dense[k]).abs().max()) < 1e-5 for k in state_routed)


@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_both_routed_paths_agree(tokens: int) -> None:
    """Per-expert passes and per-token gathered weights compute the same thing, whichever
    `forward` picks for this many tokens."""
    torch.manual_seed(0)
    experts = SelectiveModel(SelectiveConfig(**MOE)).layers[0].experts
    u = torch.randn(tokens, 16)
    with torch.no_grad():
        _, chosen, gates = experts.route(u)
        by_expert = experts._run_by_expert(u, chosen, gates)
        gathered = experts._run_gathered(u, chosen, gates)
        dense, _ = experts.forward_dense(u)
    assert float((by_expert - gathered).abs().max()) < 1e-6
    assert float((by_expert - dense).abs().max()) < 1e-6


def test_experts_use_the_top_k_of_the_router() -> None:
    """Each token's output is the gate-weighted sum of exactly its top_k experts."""
    torch.manual_seed(0)
    experts = SelectiveModel(SelectiveConfig(**MOE)).layers[0].experts
    u = torch.randn(5, 16)
    with torch.no_grad():
        out, probs = experts(u)
        for m in range(5):
            chosen = probs[m].topk(2).indices
            expected = sum(
                probs[m, e] * (F.gelu(u[m] @ experts.w_up[e].T) @ experts.w_down[e].T)
                for e in chosen.tolist()
            )
            assert torch.allclose(out[m], expected, atol=1e-6)


def test_moe_state_is_the_dense_models_state() -> None:
    """Experts hold no state: the recurrent state's schema does not change with the mixer."""
    dense = SelectiveModel(SelectiveConfig(**SMALL))
    moe = SelectiveModel(SelectiveConfig(**MOE))
    assert moe.state_schema() == dense.state_schema()


def test_the_default_mixer_builds_the_original_block() -> None:
    """A config saved before the option existed (no mixer keys) builds the same parameters,
    so committed dense artifacts keep loading."""
    names = {name for name, _ in SelectiveModel(SelectiveConfig(**SMALL)).named_parameters()}
    assert not any("experts" in name for name in names)
    assert SelectiveConfig(**SMALL).mixer == "ssm"
    assert SelectiveModel(SelectiveConfig(**SMALL)).pop_auxiliary_loss() is None


def test_load_balance_loss_is_one_when_balanced_and_n_when_collapsed() -> None:
    """Switch's n · Σ f_e P_e: a uniform router gives P_e = 1/n, hence exactly 1 whatever
    the dispatch; a router sending every token to one expert with probability -> 1 gives n."""
    torch.manual_seed(0)
    experts = SelectiveModel(SelectiveConfig(**{**MOE, "top_k": 1})).layers[0].experts
    u = torch.randn(64, 16)
    with torch.no_grad():
        experts.router.weight.zero_()
        _, probs = experts(u)
        assert float(experts.load_balance_loss(probs)) == pytest.approx(1.0, abs=1e-6)
        # Every token the same vector v, and a router that scores expert 0 at 50, the rest 0.
        v = F.normalize(torch.randn(16), dim=0)
        experts.router.weight[0] = 50.0 * v
        _, probs = experts(v.expand(64, 16))
        assert float(experts.load_balance_loss(probs)) == pytest.approx(4.0, rel=1e-6)


def test_training_forward_hands_over_the_load_balance_loss_once() -> None:
    torch.manual_seed(0)
    cfg = SelectiveConfig(**MOE, load_balance_weight=0.5)
    model = SelectiveModel(cfg).train()
    model(torch.randint(0, 12, (2, 9)))
    loss = model.pop_auxiliary_loss()
    assert loss is not None and float(loss.detach()) > 0.0
    loss.backward()  # the balance term alone moves the routers
    assert all(float(layer.experts.router.weight.grad.abs().sum()) > 0 for layer in model.layers)
    assert model.pop_auxiliary_loss() is None
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 12, (2, 9)))
    assert model.pop_auxiliary_loss() is None  # nothing is kept when not training


def test_moe_macs_count_the_router_and_top_k_experts_only() -> None:
    cfg = SelectiveConfig(**MOE)
    model = SelectiveModel(cfg)
    dense = SelectiveModel(SelectiveConfig(**SMALL)).macs_per_step()["dense_macs"]
    d, n, k, h = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert
    routed_per_block = d * n + k * (2 * d * h + d)  # router, k experts, k gate scalings
    counts = model.macs_per_step()
    assert counts["routed_macs"] == cfg.n_layers * routed_per_block
    assert counts["skipped_macs"] == cfg.n_layers * (n - k) * 2 * d * h
    assert counts["dense_macs"] == dense + counts["routed_macs"]
    assert "routed_macs" not in SelectiveModel(SelectiveConfig(**SMALL)).macs_per_step()


def test_moe_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="mixer must be one of"):
        SelectiveConfig(mixer="mlp")
    with pytest.raises(ValueError, match="top_k <= n_experts"):
        SelectiveConfig(mixer="moe", n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="d_expert"):
        SelectiveConfig(mixer="moe", d_expert=-1)
    with pytest.raises(ValueError, match="load_balance_weight"):
        SelectiveConfig(mixer="moe", load_balance_weight=-0.1)
