"""SNN specifics: the surrogate spike, the LIF equations against a plain-Python reference,
and the activity counters used for sparsity and synaptic-operation reports."""

from __future__ import annotations

import math

import pytest
import torch

from models.snn import SNNConfig, SNNModel, SurrogateSpike, spike


@pytest.mark.parametrize("arctan", [False, True])
def test_surrogate_spike_is_heaviside_forward_and_smooth_backward(arctan: bool) -> None:
    k = 3.0
    v = torch.linspace(-2, 2, 41, dtype=torch.float64).requires_grad_()
    out = SurrogateSpike.apply(v, k, arctan)
    assert torch.equal(out, (v > 0).double())
    (grad,) = torch.autograd.grad(out.sum(), v)
    # The pseudo-derivative is the true derivative of a smooth step-like function.
    w = v.detach().clone().requires_grad_()
    smooth = torch.atan(math.pi / 2 * k * w) / math.pi if arctan else w / (1 + k * w.abs())
    (expected,) = torch.autograd.grad(smooth.sum(), w)
    assert torch.allclose(grad, expected, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(spike(v, k, arctan), out)  # the no-grad path spikes identically


def reference_input(model: SNNModel, x_t: torch.Tensor) -> tuple[list[float], float]:
    """Layer 0's input current for one sample's step, and the input spikes it took."""
    cfg = model.config
    w, b = model.encoder.proj.weight, model.encoder.proj.bias
    if cfg.input_encoding == "analog":
        return (w @ (x_t * cfg.input_scale) + b).tolist(), 0.0
    channels = [  # feature-major thermometer code: level j of feature i fires above j - 1/2
        1.0 if float(x_t[i]) * cfg.input_scale > level - 0.5 else 0.0
        for i in range(cfg.d_input)
        for level in range(1, cfg.input_levels + 1)
    ]
    current = [
        sum(w[j, c].item() * channels[c] for c in range(len(channels))) + b[j].item()
        for j in range(cfg.d_model)
    ]
    return current, sum(channels)


def reference_run(
    model: SNNModel, x: torch.Tensor
) -> tuple[list[list[list[float]]], list[list[float]]]:
    """The LIF equations written out neuron by neuron in plain Python floats, for one sample.
    Returns the spike trains per layer (one entry per substep) and the readout membrane
    after each input step."""
    cfg = model.config
    n, L, theta = cfg.d_model, cfg.n_layers, cfg.threshold

    def sig(t: torch.Tensor) -> list[float]:
        return torch.sigmoid(t).tolist()

    syn = [[0.0] * n for _ in range(L)]
    mem = [[0.0] * n for _ in range(L)]
    spk = [[0.0] * n for _ in range(L)]
    out = [0.0] * cfg.d_output
    trains: list[list[list[float]]] = [[] for _ in range(L)]
    readout = []
    for x_t in x:
        drive, _ = reference_input(model, x_t)
        for _ in range(cfg.substeps):
            inp = drive
            for i, layer in enumerate(model.layers):
                if i > 0:
                    ff = model.feedforward[i - 1]
                    inp = [
                        sum(ff.weight[j, m].item() * spk[i - 1][m] for m in range(n))
                        + ff.bias[j].item()
                        for j in range(n)
                    ]
                alpha, beta = sig(layer.alpha_logit), sig(layer.beta_logit)
                V = layer.recurrent.weight
                rec = [sum(V[j, m].item() * spk[i][m] for m in range(n)) for j in range(n)]
                new_spk = []
                for j in range(n):
                    syn[i][j] = alpha[j] * syn[i][j] + inp[j] + rec[j]
                    mem[i][j] = beta[j] * mem[i][j] + syn[i][j] - theta * spk[i][j]
                    new_spk.append(1.0 if mem[i][j] > theta else 0.0)
                spk[i] = new_spk
                trains[i].append(new_spk)
            w, b, beta_out = (
                model.readout.proj.weight,
                model.readout.proj.bias,
                sig(model.readout.beta_logit),
            )
            out = [
                beta_out[c] * out[c]
                + sum(w[c, m].item() * spk[L - 1][m] for m in range(n))
                + b[c].item()
                for c in range(cfg.d_output)
            ]
        readout.append(out)
    return trains, readout


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"input_encoding": "thermometer", "input_levels": 3},
        {"substeps": 3},
        {"input_encoding": "thermometer", "substeps": 2},
    ],
    ids=["analog", "thermometer", "substeps", "thermometer+substeps"],
)
def test_lif_dynamics_match_a_plain_python_reference(options: dict) -> None:
    torch.manual_seed(0)
    model = SNNModel(SNNConfig(d_model=6, n_layers=2, d_output=3, **options)).double().eval()
    with torch.no_grad():  # distinct per-neuron decays, so an index mix-up cannot hide
        for layer in model.layers:
            layer.alpha_logit.uniform_(-2, 2)
            layer.beta_logit.uniform_(-2, 2)
    x = 16 * torch.rand(12, 8, dtype=torch.float64)  # one digits-like sample, 12 steps
    trains, readout = reference_run(model, x)
    K = model.config.substeps
    state = model.init_state(1, dtype=torch.float64)
    with torch.no_grad():
        for t in range(12):
            logits, state = model.step(x[t : t + 1], state)
            for i in range(2):  # the state holds the spikes of the step's last substep
                assert state[f"layers.{i}.spk"][0].tolist() == trains[i][(t + 1) * K - 1]
            assert torch.allclose(
                logits[0], torch.tensor(readout[t], dtype=torch.float64), atol=1e-9
            )
    total = sum(sum(map(sum, layer)) for layer in trains)
    assert 0 < total < 12 * K * 12  # some but not all neurons spiked: the reset path ran


def test_reset_subtracts_the_threshold() -> None:
    """A neuron above threshold loses exactly θ on the next step (not reset to zero)."""
    model = SNNModel(SNNConfig(d_model=1, d_input=1, learn_decays=False, threshold=1.0)).eval()
    layer = model.layers[0]
    with torch.no_grad():
        layer.recurrent.weight.zero_()
        syn, mem, spk = layer(
            torch.tensor([[0.0]]),
            torch.tensor([[0.0]]),
            torch.tensor([[2.5]]),
            torch.tensor([[1.0]]),
        )
    beta = torch.sigmoid(layer.beta_logit)
    assert torch.allclose(mem, beta * 2.5 - 1.0)
    assert float(spk) == (1.0 if float(mem) > 1.0 else 0.0)


def test_activity_counts_spikes_and_synaptic_operations() -> None:
    torch.manual_seed(0)
    cfg = SNNConfig(d_model=20, n_layers=2)
    model = SNNModel(cfg).eval()
    state = model.init_state(5)
    x = 16 * torch.rand(5, 6, 8)
    seen_spikes = 0.0
    with torch.no_grad():
        for t in range(6):
            _, state, activity = model.step_with_activity(x[:, t], state)
            s0, s1 = state["layers.0.spk"].sum(-1), state["layers.1.spk"].sum(-1)
            assert torch.equal(activity["spikes"], s0 + s1)
            assert torch.equal(activity["neurons"], torch.full((5,), 40.0))
            # layer 0 drives its recurrence and layer 1; layer 1 its recurrence and the readout
            assert torch.equal(activity["synaptic_ops"], s0 * (20 + 20) + s1 * (20 + 10))
            seen_spikes += float(activity["spikes"].sum())
    assert seen_spikes > 0
    macs = model.macs_per_step()
    assert macs["synaptic_ops_max"] == 20 * 40 + 20 * 30
    assert macs["dense_macs"] == 8 * 20 + 2 * 40 + 10


def test_spike_encoded_input_is_counted_as_accumulates_not_macs() -> None:
    """With thermometer inputs and substeps the layer-0 projection costs one accumulate per
    input spike and neuron (once per input step), the hidden spikes their fan-out on every
    substep; only the decays remain dense MACs. Checked against the plain-Python reference."""
    torch.manual_seed(0)
    cfg = SNNConfig(d_model=7, n_layers=1, d_output=3, input_encoding="thermometer", substeps=2)
    model = SNNModel(cfg).double().eval()
    x = 16 * torch.rand(5, 8, dtype=torch.float64)  # one sample, 5 steps
    trains, _ = reference_run(model, x)
    state = model.init_state(1, dtype=torch.float64)
    with torch.no_grad():
        for t in range(5):
            _, state, activity = model.step_with_activity(x[t : t + 1], state)
            _, input_spikes = reference_input(model, x[t])
            hidden = sum(sum(trains[0][2 * t + k]) for k in range(2))
            assert float(activity["spikes"]) == hidden
            assert float(activity["neurons"]) == 7 * 2
            assert float(activity["synaptic_ops"]) == input_spikes * 7 + hidden * (7 + 3)
    macs = model.macs_per_step()
    assert macs["dense_macs"] == 2 * (2 * 7 + 3)  # decays only, per substep
    assert macs["synaptic_ops_max"] == 8 * 4 * 7 + 2 * 7 * (7 + 3)


def test_forward_with_activity_sums_the_steps_activity() -> None:
    torch.manual_seed(0)
    model = SNNModel(SNNConfig(d_model=9, input_encoding="thermometer", substeps=2)).eval()
    x = 16 * torch.rand(3, 5, 8)
    with torch.no_grad():
        logits, final, totals = model.forward_with_activity(x)
        state, stepped, summed = model.init_state(3), [], {}
        for t in range(5):
            logits_t, state, activity = model.step_reference_with_activity(x[:, t], state)
            stepped.append(logits_t)
            summed = {k: summed.get(k, 0) + v for k, v in activity.items()}
    assert torch.equal(logits, torch.stack(stepped, dim=1))
    assert all(torch.equal(final[k], state[k]) for k in state)
    assert totals.keys() == summed.keys()
    assert all(torch.equal(totals[k], summed[k]) for k in totals)


def test_decays_can_be_frozen() -> None:
    model = SNNModel(SNNConfig(d_model=4, learn_decays=False))
    names = {name for name, _ in model.named_parameters()}
    assert not any("logit" in name for name in names)
    assert {"layers.0.alpha_logit", "readout.beta_logit"} <= {
        name for name, _ in model.named_buffers()
    }


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="threshold"):
        SNNConfig(threshold=0.0)
    with pytest.raises(ValueError, match="beta_init"):
        SNNConfig(beta_init=1.0)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        SNNConfig(surrogate="relu")
    with pytest.raises(ValueError, match="surrogate_slope"):
        SNNConfig(surrogate_slope=-1.0)
    with pytest.raises(ValueError, match="dropout"):
        SNNConfig(dropout=1.0)
    with pytest.raises(ValueError, match="input_encoding must be one of"):
        SNNConfig(input_encoding="delta")
    with pytest.raises(ValueError, match="needs input_kind 'features'"):
        SNNConfig(input_encoding="thermometer", input_kind="tokens", vocab_size=5)
    with pytest.raises(ValueError, match="input_levels"):
        SNNConfig(input_levels=0)
    with pytest.raises(ValueError, match="substeps"):
        SNNConfig(substeps=0)
