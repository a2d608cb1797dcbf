"""Contract tests every architecture must pass: step/forward agreement, state handling,
training signal, input validation, and the registry's config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from models.architectures import (
    ARCHITECTURES,
    architecture_of,
    build_config,
    build_model,
    config_to_dict,
)
from models.base import State, StatefulModel

# Small but complete variants of every architecture, both input kinds.
CASES = {
    "lru-features": ("lru", {"d_model": 16, "d_state": 8, "n_layers": 2}),
    "lru-tokens": (
        "lru",
        {
            "input_kind": "tokens",
            "vocab_size": 11,
            "d_output": 11,
            "d_model": 16,
            "d_state": 8,
            "norm": "rmsnorm",
        },
    ),
    "selective-tokens": (
        "selective",
        {"vocab_size": 13, "d_output": 13, "d_model": 16, "n_layers": 2, "d_state": 4},
    ),
    "selective-features": (
        "selective",
        {
            "input_kind": "features",
            "d_output": 10,
            "d_model": 16,
            "d_state": 4,
            "tie_embeddings": False,
            "input_scale": 0.0625,
        },
    ),
    "selective-moe-tokens": (
        "selective",
        {
            "vocab_size": 13,
            "d_output": 13,
            "d_model": 16,
            "n_layers": 2,
            "d_state": 4,
            "mixer": "moe",
            "n_experts": 4,
            "top_k": 2,
            "d_expert": 24,
        },
    ),
    "snn-features": ("snn", {"d_model": 32}),
    "snn-tokens-2layers": (
        "snn",
        {
            "input_kind": "tokens",
            "vocab_size": 7,
            "d_output": 7,
            "d_model": 24,
            "n_layers": 2,
            "surrogate": "arctan",
        },
    ),
}
TOL = 1e-5


def make(case: str, seed: int = 0) -> StatefulModel:
    torch.manual_seed(seed)
    arch, cfg = CASES[case]
    return build_model(arch, cfg).eval()


def random_input(model: StatefulModel, batch: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.input_kind == "tokens":
        return torch.randint(0, model.config.vocab_size, (batch, T), generator=g)
    return 16.0 * torch.rand(batch, T, model.config.d_input, generator=g)  # digits-like 0..16


def warm_state(model: StatefulModel, batch: int) -> State:
    """A realistic non-zero state: the state after a few random steps."""
    with torch.no_grad():
        _, state = model(random_input(model, batch, 5, seed=99))
    return state


def run_steps(model: StatefulModel, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    logits = []
    for t in range(x.shape[1]):
        logits_t, state = model.step(x[:, t], state)
        logits.append(logits_t)
    return torch.stack(logits, dim=1), state


def max_state_diff(a: State, b: State) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 2, 7, 16])
def test_forward_equals_repeated_step_from_nonzero_state(case: str, T: int) -> None:
    model = make(case)
    state0 = warm_state(model, batch=3)
    assert max(float(v.abs().max()) for v in state0.values()) > 0.1  # really non-zero
    x = random_input(model, 3, T)
    with torch.no_grad():
        logits_fwd, state_fwd = model(x, state0)
        logits_step, state_step = run_steps(model, x, state0)
    assert logits_fwd.shape == (3, T, model.config.d_output)
    assert float((logits_fwd - logits_step).abs().max()) < TOL
    assert max_state_diff(state_fwd, state_step) < TOL


@pytest.mark.parametrize("case", CASES)
def test_forward_without_state_starts_from_init_state(case: str) -> None:
    model = make(case)
    x = random_input(model, 2, 5)
    with torch.no_grad():
        a, state_a = model(x)
        b, state_b = model(x, model.init_state(2))
    assert torch.equal(a, b)
    assert max_state_diff(state_a, state_b) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_init_state_matches_schema(case: str) -> None:
    model = make(case)
    schema = model.state_schema()
    state = model.init_state(4)
    assert state.keys() == schema.keys() and len(schema) > 0
    for name, tensor in state.items():
        shape, dtype = schema[name]
        assert list(tensor.shape) == [4, *shape]
        assert str(tensor.dtype) == f"torch.{dtype}"
        assert not tensor.any()
    assert all(t.dtype == torch.float64 for t in model.init_state(2, dtype=torch.float64).values())


@pytest.mark.parametrize("case", CASES)
def test_step_does_not_mutate_its_input_state(case: str) -> None:
    model = make(case)
    state = warm_state(model, batch=2)
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        _, new_state = model.step(random_input(model, 2, 1)[:, 0], state)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert max_state_diff(new_state, state) > 0  # the step did change the state it returned


@pytest.mark.parametrize("case", CASES)
def test_state_size_is_independent_of_sequence_length(case: str) -> None:
    model = make(case)
    sizes = set()
    with torch.no_grad():
        for T in (1, 9, 40):
            _, state = model(random_input(model, 2, T))
            sizes.add(tuple((k, tuple(v.shape)) for k, v in sorted(state.items())))
    expected = tuple((k, tuple(v.shape)) for k, v in sorted(model.init_state(2).items()))
    assert sizes == {expected}


@pytest.mark.parametrize("case", CASES)
def test_gradient_reaches_every_parameter(case: str) -> None:
    model = make(case).train()
    x = random_input(model, 4, 6)
    logits, state = model(x, warm_state(model, 4))
    loss = logits.logsumexp(-1).mean() - logits[..., 0].mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("case", CASES)
def test_float64_model_agrees_too(case: str) -> None:
    model = make(case).double()
    x = random_input(model, 2, 5)
    if x.dtype.is_floating_point:
        x = x.double()
    state0 = {k: v.double() for k, v in warm_state(make(case), 2).items()}
    with torch.no_grad():
        a, _ = model(x, state0)
        b, _ = run_steps(model, x, state0)
    assert a.dtype == torch.float64
    assert float((a - b).abs().max()) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_step_with_activity_and_macs(case: str) -> None:
    model = make(case)
    x_t = random_input(model, 3, 1)[:, 0]
    with torch.no_grad():
        logits, _, activity = model.step_with_activity(x_t, model.init_state(3))
    assert logits.shape == (3, model.config.d_output)
    macs = model.macs_per_step()
    assert isinstance(macs["dense_macs"], int) and macs["dense_macs"] > 0
    if CASES[case][0] == "snn":
        assert {"spikes", "neurons", "synaptic_ops"} <= activity.keys()
        assert all(v.shape == (3,) for v in activity.values())
        assert isinstance(macs["synaptic_ops_max"], int)
        assert bool((activity["synaptic_ops"] <= macs["synaptic_ops_max"]).all())
    else:
        assert activity == {}


# ---- input and state validation ----------------------------------------------------------


@pytest.mark.parametrize("case", ["lru-features", "selective-features", "snn-features"])
def test_feature_models_reject_bad_input(case: str) -> None:
    model = make(case)
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        model(torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        model.step(torch.zeros(2, 5, 8), model.init_state(2))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="length >= 1"):
        model(torch.zeros(2, 0, 8))


@pytest.mark.parametrize("case", ["lru-tokens", "selective-tokens", "snn-tokens-2layers"])
def test_token_models_reject_bad_input(case: str) -> None:
    model = make(case)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[0, " + str(vocab) + r"\)"):
        model(torch.full((2, 5), vocab))
    with pytest.raises(ValueError, match=r"\[0, "):
        model.step(torch.tensor([0, -1]), model.init_state(2))
    with pytest.raises(ValueError, match=r"\[B\]"):
        model.step(torch.zeros(2, 1, dtype=torch.long), model.init_state(2))


@pytest.mark.parametrize("case", CASES)
def test_bad_state_is_rejected(case: str) -> None:
    model = make(case)
    x_t = random_input(model, 2, 1)[:, 0]
    state = model.init_state(2)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        model.step(x_t, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unknown"):
        model.step(x_t, {**state, "bogus": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="expected"):
        model.step(x_t, model.init_state(3))
    with pytest.raises(ValueError, match="dict"):
        model.step(x_t, list(state.values()))


# ---- registry -----------------------------------------------------------------------------


def test_registry_names_and_defaults_build() -> None:
    assert set(ARCHITECTURES) == {"lru", "selective", "snn"}
    for name, (config_cls, model_cls) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = build_model(name, {})
        assert type(model) is model_cls and isinstance(model, StatefulModel)
        assert model.config == config_cls()
        assert architecture_of(model) == name
        assert model.input_kind == model.config.input_kind


@pytest.mark.parametrize("case", CASES)
def test_config_round_trips_through_json(case: str) -> None:
    arch, cfg = CASES[case]
    config = build_config(arch, cfg)
    as_json = json.dumps(config_to_dict(config))
    rebuilt = build_config(arch, json.loads(as_json))
    assert rebuilt == config
    torch.manual_seed(0)
    a = build_model(arch, json.loads(as_json))
    torch.manual_seed(0)
    b = build_model(arch, cfg)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_registry_rejects_bad_configs_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'gru'"):
        build_model("gru", {})
    with pytest.raises(ValueError, match=r"unknown lru config keys \['hidden'\]"):
        build_model("lru", {"hidden": 3})
    with pytest.raises(ValueError, match="LRUConfig.d_model must be an int"):
        build_model("lru", {"d_model": "64"})
    with pytest.raises(ValueError, match="SNNConfig.learn_decays must be a bool"):
        build_model("snn", {"learn_decays": 1})
    with pytest.raises(ValueError, match="d_model must be >= 1"):
        build_model("snn", {"d_model": 0})
    with pytest.raises(ValueError, match="input_kind must be one of"):
        build_model("lru", {"input_kind": "pixels"})
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_model("lru", {"input_kind": "tokens"})
    with pytest.raises(ValueError, match="must be a dict"):
        build_model("lru", [("d_model", 3)])
    with pytest.raises(ValueError, match="config dataclass"):
        config_to_dict({"d_model": 3})
    assert build_config("lru", {"input_scale": 1}).input_scale == 1.0  # JSON ints are fine
