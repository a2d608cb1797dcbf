"""Bring your own SNN, end to end: snnTorch on digits -> NIR -> import -> calibrate -> sessions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/import_snntorch_digits.py

1. Trains a small spiking network in snnTorch on the digits training split (rows as time
   steps, pixels / 16): Linear(8, 128) -> Leaky (LIF) -> Linear(128, 10), whose per-step
   outputs are summed over the steps read so far (the class scores).
2. Exports it with snnTorch's `export_to_nir` and writes the .nir file.
3. `neuroserve import nir` (dt 1e-4 as snnTorch exports, readout sum, input scale 1/16 so the
   server takes raw pixels), then `neuroserve calibrate --data` on the calibration split with
   `--maps identity,temperature` (maps that keep the network's own decisions).
4. Serves it with `neuroserve serve` and runs every held-out test image through its own
   session (all eight rows in one step request), reading the label and the conformal set.

Prints the held-out accuracy of snnTorch's own simulation and of the served model, and the
coverage of the served sets at alpha 0.1 with the band [1-a-3SE, 1-a+1/(n+1)+3SE].
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nir
import numpy as np
import snntorch as snn
import torch
from snntorch import utils as snn_utils
from snntorch.export_nir import export_to_nir
from torch import Tensor, nn

from models.digits import PIXEL_MAX, load_digits_seq
from service.cli.main import main as neuroserve

HIDDEN = 128
EPOCHS = 60
INPUT_GAIN = 4.0  # the first layer's initial weights x4, so the LIF layer spikes from the start
ALPHA = 0.1
NAME = "snntorch-digits"
SNNTORCH_DT = 1e-4  # the step snnTorch's exporter writes time constants for


def build_network(seed: int = 0) -> nn.Sequential:
    """Linear -> LIF -> Linear; the LIF resets to zero at once, as NIR's LIF and snnTorch's
    own NIR importer define it, with per-neuron β and threshold (the exporter needs arrays)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(8, HIDDEN),
        snn.Leaky(
            beta=torch.full((HIDDEN,), 0.9),
            threshold=torch.ones(HIDDEN),
            reset_mechanism="zero",
            reset_delay=False,
            init_hidden=True,
        ),
        nn.Linear(HIDDEN, 10),
    )
    with torch.no_grad():
        net[0].weight.mul_(INPUT_GAIN)
    return net


def source_logits(net: nn.Sequential, pixels: Tensor) -> Tensor:
    """snnTorch's own simulation: pixels [N, T, 8] (0..16) -> running class scores [N, T, 10]."""
    snn_utils.reset(net)
    scores, running = [], 0.0
    for t in range(pixels.shape[1]):
        running = running + net(pixels[:, t] / PIXEL_MAX)  # [N, 10]
        scores.append(running)
    return torch.stack(scores, dim=1)


def train_network(seed: int = 0, epochs: int = EPOCHS) -> nn.Sequential:
    """Backprop through time with snnTorch's surrogate gradient; cross-entropy on the summed
    scores after every step, step t weighted by t (early answers count, the last most)."""
    net = build_network(seed)
    train = load_digits_seq("train")
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)
    weights = torch.arange(1, train.inputs.shape[1] + 1, dtype=torch.float32)
    weights = weights / weights.sum()  # [T]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            scores = source_logits(net, train.inputs[batch])  # [B, T, 10]
            steps = scores.shape[1]
            loss = sum(
                nn.functional.cross_entropy(scores[:, t], train.labels[batch]) for t in range(steps)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


def export_graph(net: nn.Sequential, path: Path) -> Path:
    """snnTorch's exporter with an unbatched sample (a batched one fails NIR's type check)."""
    with torch.no_grad():
        graph = export_to_nir(net, torch.rand(8))
    nir.write(str(path), graph)
    return path


def write_npz(split: str, path: Path) -> Path:
    data = load_digits_seq(split)
    np.savez(path, inputs=data.inputs.numpy(), labels=data.labels.numpy())
    return path


def import_and_calibrate(nir_path: Path, root: Path, calibration: Path, name: str = NAME) -> None:
    labels = ",".join(str(d) for d in range(10))
    common = ["--repository", str(root)]
    steps = [
        ["import", "nir", str(nir_path), "--name", name, "--dt", str(SNNTORCH_DT)]
        + ["--readout", "sum", "--input-scale", str(1 / PIXEL_MAX), "--labels", labels, *common],
        ["calibrate", name, "--data", str(calibration), "--maps", "identity,temperature"] + common,
    ]
    for argv in steps:
        with contextlib.redirect_stdout(sys.stderr):
            code = neuroserve(argv)
        if code != 0:
            raise RuntimeError(f"neuroserve {' '.join(argv[:2])} exited with {code}")


@dataclass
class ServedResult:
    labels: list[int]  # predicted class per image
    in_set: list[bool]  # whether the true class is in the conformal set
    set_sizes: list[int]


def serve_sessions(base_url: str, inputs: Tensor, labels: Tensor, name: str = NAME) -> ServedResult:
    """One session per image: open, one step with all its rows, read the prediction, close."""
    predicted, in_set, sizes = [], [], []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for image, label in zip(inputs.tolist(), labels.tolist(), strict=True):
            created = client.post("/v1/sessions", json={"model": name, "alpha": ALPHA})
            created.raise_for_status()
            session = created.json()["session_id"]
            answer = client.post(f"/v1/sessions/{session}/step", json={"inputs": image})
            answer.raise_for_status()
            body = answer.json()
            if not body["calibrated"]:
                raise RuntimeError(f"the served answer is not calibrated: {body['warnings']}")
            prediction = body["prediction"]
            predicted.append(int(prediction["label"]))
            in_set.append(str(label) in prediction["prediction_set"])
            sizes.append(prediction["set_size"])
            client.delete(f"/v1/sessions/{session}")
    return ServedResult(predicted, in_set, sizes)


def coverage_band(n: int, alpha: float = ALPHA) -> tuple[float, float]:
    se = math.sqrt(alpha * (1 - alpha) / n)
    return 1 - alpha - 3 * se, 1 - alpha + 1 / (n + 1) + 3 * se


@contextlib.contextmanager
def neuroserve_server(root: Path) -> Iterator[str]:
    """`neuroserve serve` on a free loopback port until the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        + ["--repository", str(root), "--log-level", "warning"],
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("neuroserve serve did not become ready")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Report:
    n: int
    source_accuracy: float  # snnTorch's own simulation
    served_accuracy: float  # the labels of the served, calibrated sessions
    same_label: float  # fraction of images where the two agree
    coverage: float  # of the served conformal sets at ALPHA
    mean_set_size: float

    def lines(self) -> list[str]:
        low, high = coverage_band(self.n)
        return [
            f"held-out test images: {self.n}; network 8-{HIDDEN}(LIF)-10, {EPOCHS} epochs",
            f"accuracy, snnTorch's simulation: {self.source_accuracy:.4f}",
            f"accuracy, served by neuroserve:  {self.served_accuracy:.4f} "
            f"(same label on {self.same_label:.4f} of the images)",
            f"coverage at alpha {ALPHA}: {self.coverage:.4f} (band [{low:.4f}, {high:.4f}]), "
            f"mean set size {self.mean_set_size:.2f}",
        ]


def compare(net: nn.Sequential, served: ServedResult) -> Report:
    test = load_digits_seq("test")
    with torch.no_grad():
        source = source_logits(net, test.inputs)[:, -1].argmax(-1).tolist()  # [N]
    truth = test.labels.tolist()
    n = len(truth)
    return Report(
        n=n,
        source_accuracy=sum(s == y for s, y in zip(source, truth, strict=True)) / n,
        served_accuracy=sum(p == y for p, y in zip(served.labels, truth, strict=True)) / n,
        same_label=sum(p == s for p, s in zip(served.labels, source, strict=True)) / n,
        coverage=sum(served.in_set) / n,
        mean_set_size=sum(served.set_sizes) / n,
    )


def main() -> None:
    started = time.monotonic()
    net = train_network()
    test = load_digits_seq("test")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        nir_path = export_graph(net, tmp_path / "digits.nir")
        calibration = write_npz("calibration", tmp_path / "calibration.npz")
        import_and_calibrate(nir_path, tmp_path / "repo", calibration)
        with neuroserve_server(tmp_path / "repo") as base_url:
            served = serve_sessions(base_url, test.inputs, test.labels)
    report = compare(net, served)
    print(f"snnTorch {snn.__version__}, nir {nir.version}, torch {torch.__version__}")
    print("\n".join(report.lines()))
    print(f"wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
