"""NIR import: graphs written by snnTorch and Norse step exactly as those libraries run them.

Each test builds a small network in the real library, exports it with the library's own NIR
exporter, writes and reads the file with `nir`, imports it, and compares neuroserve's
step-by-step outputs and states with the library's own simulation on the same inputs:
spikes must be equal and membranes within 1e-5 (float32 rounding of τ = dt/(1 − β) and back).

Exporter paths used (see docs/BRING_YOUR_OWN_MODEL.md): snnTorch `export_to_nir` with
per-neuron β and threshold tensors and an unbatched sample (its type inference fails on
scalars and on a batched sample); Norse `to_nir`, whose scalar parameters and batched Input type are
normalised to arrays before `nir.write` (h5py refuses scalar datasets with compression).
snnTorch neurons are configured as snnTorch's own NIR importer builds them: reset to zero
at once (`reset_mechanism="zero", reset_delay=False`), the reset NIR's LIF describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from models.nir_graph import NIRGraphModel
from models.nir_import import NIRImportError, build_nir_model, import_nir
from models.repository import ModelRepository

snn = pytest.importorskip("snntorch")
norse = pytest.importorskip("norse.torch")
from snntorch.export_nir import export_to_nir  # noqa: E402  (after the skip above)

ATOL = 1e-5
STEPS = 12


def _roundtrip(graph: nir.NIRGraph, path: Path) -> nir.NIRGraph:
    nir.write(str(path), graph)
    return nir.read(str(path))


def _leaky(n: int, beta: float, threshold: float = 1.0):
    return snn.Leaky(
        beta=torch.full((n,), beta),
        threshold=torch.full((n,), threshold),
        reset_mechanism="zero",
        reset_delay=False,
    )


def _inputs(batch: int = 5, features: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, STEPS, features, generator=generator) * 2.0  # [B, T, F]


class FeedForward(torch.nn.Module):
    """Linear → Leaky (LIF) → Linear → Synaptic (CubaLIF)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.lif1 = _leaky(6, 0.8, threshold=0.7)
        self.fc2 = torch.nn.Linear(6, 3)
        self.lif2 = snn.Synaptic(
            alpha=torch.full((3,), 0.6),
            beta=torch.full((3,), 0.85),
            threshold=torch.full((3,), 0.5),
            reset_mechanism="zero",
            reset_delay=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem1 = self.lif1.init_leaky()
        syn2, mem2 = self.lif2.init_synaptic()
        spk1, mem1 = self.lif1(self.fc1(x), mem1)
        spk2, syn2, mem2 = self.lif2(self.fc2(spk1), syn2, mem2)
        return spk2


class Recurrent(torch.nn.Module):
    """Linear → RLeaky (all-to-all recurrence, exported as a lif ↔ w_rec cycle) → Linear → Leaky."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.lif1 = snn.RLeaky(
            beta=torch.full((6,), 0.8),
            threshold=torch.full((6,), 0.6),
            linear_features=6,
            reset_mechanism="zero",
            reset_delay=False,
        )
        self.fc2 = torch.nn.Linear(6, 3)
        self.lif2 = _leaky(3, 0.9, threshold=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spk1, mem1 = self.lif1.init_rleaky()
        mem2 = self.lif2.init_leaky()
        spk1, mem1 = self.lif1(self.fc1(x), spk1, mem1)
        spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
        return spk2


def _strengthen(net: torch.nn.Module) -> torch.nn.Module:
    """Larger weights than the default init, so that every layer spikes in a few steps."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3.0)
    return net


def test_snntorch_feed_forward_graph_steps_like_snntorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _strengthen(FeedForward()).eval()
    graph = _roundtrip(export_to_nir(net, torch.rand(4)), tmp_path / "ff.nir")
    model = build_nir_model(graph, dt=1e-4)
    assert {spec["type"] for spec in model.config.graph["nodes"]} >= {"Affine", "LIF", "CubaLIF"}
    x = _inputs()
    state = model.init_state(x.shape[0])
    mem1 = net.lif1.init_leaky()
    syn2, mem2 = net.lif2.init_synaptic()
    spikes_seen = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            spk1, mem1 = net.lif1(net.fc1(x[:, t]), mem1)
            spk2, syn2, mem2 = net.lif2(net.fc2(spk1), syn2, mem2)
            logits, state = model.step(x[:, t], state)
            assert torch.equal(logits, spk2), f"output spikes differ at step {t}"
            torch.testing.assert_close(state["lif1.v"], mem1, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["lif2.i_syn"], syn2, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["lif2.v"], mem2, atol=ATOL, rtol=0)
            spikes_seen += float(spk1.sum() + spk2.sum())
    assert spikes_seen > 0, "the comparison must exercise spikes and resets"


def test_snntorch_recurrent_graph_carries_state_across_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _strengthen(Recurrent()).eval()
    graph = _roundtrip(export_to_nir(net, torch.rand(4)), tmp_path / "rec.nir")
    model = build_nir_model(graph, dt=1e-4)
    assert model.config.graph["delayed"] == [["lif1.lif", "lif1.w_rec"]]
    x = _inputs()
    state = model.init_state(x.shape[0])
    spk1, mem1 = net.lif1.init_rleaky()
    mem2 = net.lif2.init_leaky()
    recurrent_drive = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            spk1, mem1 = net.lif1(net.fc1(x[:, t]), spk1, mem1)
            spk2, mem2 = net.lif2(net.fc2(spk1), mem2)
            logits, state = model.step(x[:, t], state)
            assert torch.equal(logits, spk2), f"output spikes differ at step {t}"
            assert torch.equal(state["lif1.lif.out"], spk1), f"hidden spikes differ at step {t}"
            torch.testing.assert_close(state["lif1.lif.v"], mem1, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["lif2.v"], mem2, atol=ATOL, rtol=0)
            recurrent_drive += float(spk1[:, :].sum())
        # The whole sequence at once agrees with the steps.
        all_logits, final = model(x)
    assert recurrent_drive > 0, "the recurrence must carry spikes"
    assert torch.equal(all_logits[:, -1], logits)
    torch.testing.assert_close(final["lif1.lif.v"], state["lif1.lif.v"])


def _normalised_norse_graph(graph: nir.NIRGraph, features: int) -> nir.NIRGraph:
    """Norse writes scalar neuron parameters and a batched Input type, which nir.write
    refuses; rebuild those nodes with per-neuron arrays (values unchanged)."""
    sizes = {
        dst: np.shape(graph.nodes[src].weight)[0]
        for src, dst in graph.edges
        if isinstance(graph.nodes[src], nir.Affine)
    }
    nodes = {}
    for name, node in graph.nodes.items():
        if isinstance(node, nir.Input):
            nodes[name] = nir.Input(input_type={"input": np.array([features])})
        elif isinstance(node, nir.Output):
            nodes[name] = nir.Output(output_type={"output": np.array([3])})
        elif isinstance(node, (nir.LIF, nir.LI)):
            fields = {
                key: np.full(sizes[name], float(np.asarray(value)), dtype=np.float32)
                for key, value in vars(node).items()
                if key not in ("input_type", "output_type", "metadata")
            }
            nodes[name] = type(node)(**fields)
        else:
            nodes[name] = type(node)(weight=np.asarray(node.weight), bias=np.asarray(node.bias))
    return nir.NIRGraph(nodes=nodes, edges=list(graph.edges))


def test_norse_lif_li_graph_steps_like_norse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = norse.SequentialState(
        torch.nn.Linear(4, 5), norse.LIFBoxCell(), torch.nn.Linear(5, 3), norse.LIBoxCell()
    )
    with torch.no_grad():
        net[0].weight.mul_(20.0)  # Norse's dt/τ = 0.1: a strong drive so the LIF layer spikes
    graph = _normalised_norse_graph(norse.to_nir(net, torch.rand(1, 4)), features=4)
    graph = _roundtrip(graph, tmp_path / "norse.nir")
    # Norse 1.1.0 writes τ = dt / τ_inv (dt·τ in seconds, not τ), so its graphs step as Norse
    # ran them (dt/τ = dt·τ_inv = 0.1) with dt = 1e-3² = 1e-6. Newer Norse writes τ = 1/τ_inv,
    # to be imported with Norse's own dt = 1e-3.
    assert np.allclose(graph.nodes["1"].tau, 1e-3 / 100.0)
    model = build_nir_model(graph, dt=1e-6)
    x = _inputs()
    state = model.init_state(x.shape[0])
    norse_state = None
    spikes = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            out, norse_state = net(x[:, t], norse_state)
            logits, state = model.step(x[:, t], state)
            torch.testing.assert_close(logits, out, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["1.v"], norse_state[1].v, atol=ATOL, rtol=0)
            spikes += float(model._cell(x[:, t], state)[2]["spikes"].sum())
    assert spikes > 0


# ---- hand-built graphs: shapes, scalars, readout, errors ---------------------------------------


def _lif_graph(
    extra_nodes: dict | None = None, extra_edges: list | None = None, shape: tuple = (1,)
) -> nir.NIRGraph:
    """input(3) → fc(2) → lif(2) → output; the LIF's parameters have `shape`, () or (1,)."""

    def param(value: float) -> np.ndarray:
        return np.full(shape, value, dtype=np.float32)

    nodes = {
        "input": nir.Input(input_type={"input": np.array([3])}),
        "fc": nir.Affine(weight=np.eye(2, 3, dtype=np.float32) * 2, bias=np.zeros(2)),
        # One value for the population, as some exporters write it: broadcast.
        "lif": nir.LIF(
            tau=param(1e-3),
            r=param(10.0),
            v_leak=param(0.0),
            v_threshold=param(1.0),
            v_reset=param(0.0),
        ),
        "output": nir.Output(output_type={"output": np.array([2])}),
    }
    edges = [("input", "fc"), ("fc", "lif"), ("lif", "output")]
    nodes.update(extra_nodes or {})
    edges.extend(extra_edges or [])
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)


def test_scalar_parameters_broadcast_and_sum_readout_counts_spikes() -> None:
    model = build_nir_model(_lif_graph(shape=()), dt=1e-4, readout="sum")
    assert model.state_schema()["lif.v"] == ([2], "float32")
    x = torch.tensor([[[1.0, 0.0, 0.0]] * 6])  # [1, 6, 3]: drives neuron 0 only
    logits, _ = model(x)
    # dt/τ = 0.1, R = 10: v ← 0.9 v + 2 x; neuron 0 crosses 1 on the first step and each step.
    assert logits[0, :, 1].abs().sum() == 0
    assert logits[0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    usage = model.macs_per_step()
    assert usage["dense_macs"] > 0 and usage["synaptic_ops_max"] == 2  # lif -> output: 1 each


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (
            _lif_graph(
                {
                    "pool": nir.SumPool2d(
                        kernel_size=np.array([2, 2]),
                        stride=np.array([2, 2]),
                        padding=np.array([0, 0]),
                    )
                },
                [("lif", "pool")],
            ),
            "node 'pool': unsupported NIR node type SumPool2d",
        ),
        (
            _lif_graph(
                {"a": nir.Linear(weight=np.eye(2)), "b": nir.Scale(scale=np.ones(2))},
                [("fc", "a"), ("a", "b"), ("b", "a"), ("b", "lif")],
            ),
            "form a cycle without a neuron",
        ),
        (
            _lif_graph({"lost": nir.Scale(scale=np.ones(2))}),
            "nodes ['lost'] cannot be reached from the Input node",
        ),
        (
            _lif_graph({"bad": nir.Linear(weight=np.ones((2, 5)))}, [("lif", "bad")]),
            "node 'bad': Linear weight [2, 5] does not take input of shape [2]",
        ),
    ],
    ids=["unsupported-node", "algebraic-loop", "unreachable", "shape-mismatch"],
)
def test_graphs_that_cannot_be_stepped_are_refused_and_nothing_is_published(
    tmp_path: Path, graph: nir.NIRGraph, message: str
) -> None:
    path = tmp_path / "bad.nir"
    nir.write(str(path), graph)
    repository = ModelRepository(tmp_path / "repo")
    with pytest.raises(NIRImportError, match=message.replace("[", r"\[").replace("]", r"\]")):
        import_nir(repository, path, "bad", dt=1e-4)
    assert repository.list_models() == []
    model_dir = tmp_path / "repo" / "bad"
    assert not model_dir.exists() or not any(model_dir.iterdir())


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.nir"
    nir.write(str(path), _lif_graph())
    path.write_bytes(path.read_bytes()[:200])  # truncated
    repository = ModelRepository(tmp_path / "repo")
    with pytest.raises(NIRImportError, match="not a readable NIR file"):
        import_nir(repository, path, "broken")
    assert repository.list_models() == []


def test_published_import_loads_back_identical_with_its_origin(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _strengthen(Recurrent()).eval()
    path = tmp_path / "rec.nir"
    nir.write(str(path), export_to_nir(net, torch.rand(4)))
    repository = ModelRepository(tmp_path / "repo")
    card = import_nir(repository, path, "rec", dt=1e-4, labels=["a", "b", "c"], command="test")
    assert card.config["architecture"] == "nir"
    assert card.config["imported"]["format"] == "nir"
    assert len(card.config["imported"]["sha256"]) == 64
    loaded = repository.load("rec").model
    assert isinstance(loaded, NIRGraphModel)
    fresh = build_nir_model(nir.read(str(path)), dt=1e-4)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], fresh(x)[0])
    json.dumps(card.config)  # the whole graph description is plain JSON


def test_norse_integrate_and_fire_graph_steps_like_norse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = norse.SequentialState(
        torch.nn.Linear(4, 5), norse.IAFCell(), torch.nn.Linear(5, 3), norse.LIBoxCell()
    )
    graph = norse.to_nir(net, torch.rand(1, 4))
    nodes = dict(graph.nodes)
    nodes["input"] = nir.Input(input_type={"input": np.array([4])})
    nodes["output"] = nir.Output(output_type={"output": np.array([3])})
    nodes["1"] = nir.IF(
        r=np.ones(5, dtype=np.float32),
        v_threshold=np.full(5, float(np.asarray(graph.nodes["1"].v_threshold).max())),
        v_reset=np.zeros(5, dtype=np.float32),
    )
    nodes["3"] = nir.LI(
        **{
            key: np.full(3, float(np.asarray(getattr(graph.nodes["3"], key))), dtype=np.float32)
            for key in ("tau", "r", "v_leak")
        }
    )
    graph = _roundtrip(nir.NIRGraph(nodes=nodes, edges=list(graph.edges)), tmp_path / "iaf.nir")
    model = build_nir_model(graph, dt=1e-6)  # Norse 1.1.0's τ convention, as above
    x = _inputs()
    state, norse_state = model.init_state(x.shape[0]), None
    spikes = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            out, norse_state = net(x[:, t], norse_state)
            logits, state = model.step(x[:, t], state)
            torch.testing.assert_close(logits, out, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["1.v"], norse_state[1].v, atol=ATOL, rtol=0)
            spikes += float((state["1.v"] == 0).sum())
    assert spikes > 0, "the IF layer must fire and reset"


def test_conv2d_flatten_graph_steps_like_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 1, 3, 3, generator=generator)
    bias = torch.randn(2, generator=generator)
    dense = torch.randn(3, 2 * 4 * 4, generator=generator) * 0.5
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([1, 4, 4])}),
            "conv": nir.Conv2d(
                input_shape=(4, 4),
                weight=weight.numpy(),
                stride=1,
                padding=1,
                dilation=1,
                groups=1,
                bias=bias.numpy(),
            ),
            "flat": nir.Flatten(input_type={"input": np.array([2, 4, 4])}, start_dim=0),
            "fc": nir.Linear(weight=dense.numpy()),
            "li": nir.LI(tau=np.full(3, 1e-3), r=np.ones(3), v_leak=np.zeros(3)),
            "output": nir.Output(output_type={"output": np.array([3])}),
        },
        edges=[("input", "conv"), ("conv", "flat"), ("flat", "fc"), ("fc", "li"), ("li", "output")],
        type_check=False,
    )
    model = build_nir_model(graph, dt=1e-4)
    assert model.config.d_input == 16
    x = _inputs(batch=2, features=16)
    logits, _ = model(x)
    v = torch.zeros(2, 3)
    for t in range(STEPS):
        image = x[:, t].reshape(2, 1, 4, 4)
        current = torch.nn.functional.conv2d(image, weight, bias, padding=1).flatten(1) @ dense.T
        v = v + 0.1 * (current - v)  # dt/τ = 0.1, R = 1
        torch.testing.assert_close(logits[:, t], v, atol=ATOL, rtol=0)


def test_norse_cuba_lif_graph_steps_like_norse_once_w_in_is_written_as_norse_runs_it(
    tmp_path: Path,
) -> None:
    """Norse 1.1.0 writes its LIFCell as CubaLIF with w_in = 1 but adds its input to the
    current unscaled, which NIR's τ_syn dI/dt = −I + w_in x does with w_in = τ_syn/dt. With
    that w_in written, the graph steps as Norse ran it (snnTorch's Synaptic exports so)."""
    dt = 1e-6  # Norse 1.1.0's τ convention, as above
    torch.manual_seed(0)
    net = norse.SequentialState(
        torch.nn.Linear(4, 5), norse.LIFCell(), torch.nn.Linear(5, 3), norse.LIBoxCell()
    )
    with torch.no_grad():
        net[0].weight.mul_(5.0)
    graph = norse.to_nir(net, torch.rand(1, 4))
    cuba, li = graph.nodes["1"], graph.nodes["3"]
    assert float(np.asarray(cuba.w_in)) == 1.0

    def per_neuron(value, n: int) -> np.ndarray:
        return np.full(n, float(np.asarray(value)), dtype=np.float32)

    nodes = dict(graph.nodes)
    nodes["input"] = nir.Input(input_type={"input": np.array([4])})
    nodes["output"] = nir.Output(output_type={"output": np.array([3])})
    fields = ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset")
    nodes["1"] = nir.CubaLIF(
        **{key: per_neuron(getattr(cuba, key), 5) for key in fields},
        w_in=per_neuron(float(np.asarray(cuba.tau_syn)) / dt, 5),
    )
    nodes["3"] = nir.LI(**{key: per_neuron(getattr(li, key), 3) for key in ("tau", "r", "v_leak")})
    graph = _roundtrip(nir.NIRGraph(nodes=nodes, edges=list(graph.edges)), tmp_path / "cuba.nir")
    model = build_nir_model(graph, dt=dt)
    x = _inputs()
    state, norse_state = model.init_state(x.shape[0]), None
    resets = 0
    with torch.no_grad():
        for t in range(STEPS):
            out, norse_state = net(x[:, t], norse_state)
            logits, state = model.step(x[:, t], state)
            torch.testing.assert_close(logits, out, atol=ATOL, rtol=0)
            torch.testing.assert_close(state["1.v"], norse_state[1].v, atol=ATOL, rtol=0)
            resets += int((state["1.v"] == 0).sum())
    assert resets > 0, "the CubaLIF layer must fire and reset"
