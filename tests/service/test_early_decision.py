"""Sequential early decisions in sessions, over real HTTP with sessions kept in a real Redis:
stream the digits test images row by row, stop each session at its first `stop`, and check
coverage at the stopping time and the steps saved; plus the refusals at create."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models import digits
from models.repository import ModelRepository, default_repository_root
from service.app import create_app
from service.calibration_store import CalibrationStore
from service.cli import main
from service.early_decision import EarlyDecisionStore
from service.settings import Settings
from tests.service.conftest import running_server
from tests.service.test_sessions_http import v1_error

ALPHA = 0.1
STREAMS_IN_FLIGHT = 16  # sessions stepped concurrently (the server micro-batches them)


@pytest.fixture(scope="module")
def redis_server_url(redis_url: str) -> Iterator[str]:
    """The committed built-in models, sessions in Redis."""
    settings = Settings(model_repository=default_repository_root(), redis_url=redis_url)
    with running_server(create_app(settings)) as base_url:
        yield base_url


async def _stream(
    client: httpx.AsyncClient, rows: list[list[float]], body: dict
) -> tuple[int, dict]:
    """Feed one image row by row until the first `stop`: (steps used, that decision)."""
    created = await client.post("/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["early_decision"] == body["early_decision"]
    try:
        for row in rows:
            answer = await client.post(
                f"/v1/sessions/{session['session_id']}/step", json={"inputs": [row]}
            )
            assert answer.status_code == 200, answer.text
            step = answer.json()
            decision = step["decision"]
            assert decision["checkpoint"] == step["step"]
            assert decision["guaranteed_coverage"] == pytest.approx(1 - ALPHA)
            if decision["stop"]:
                return step["step"], decision
        raise AssertionError("the last checkpoint must always stop")
    finally:
        await client.delete(f"/v1/sessions/{session['session_id']}")


async def _stream_test_split(base_url: str, body: dict) -> list[tuple[int, dict, str]]:
    test = digits.load_digits_seq("test", "rows")
    labels = [str(int(label)) for label in test.labels]
    slots = asyncio.Semaphore(STREAMS_IN_FLIGHT)

    async def one(i: int) -> tuple[int, dict, str]:
        async with slots:
            steps, decision = await _stream(client, test.inputs[i].tolist(), body)
            return steps, decision, labels[i]

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(*(one(i) for i in range(len(labels))))


def test_streaming_the_test_split_stops_early_with_coverage(redis_server_url: str) -> None:
    body = {
        "model": "digits-snn",
        "alpha": ALPHA,
        "score": "lac",
        "early_decision": {"max_set_size": 1},
    }
    results = asyncio.run(_stream_test_split(redis_server_url, body))
    n = len(results)
    covered = sum(label in decision["prediction_set"] for _, decision, label in results)
    coverage = covered / n
    standard_error = math.sqrt(ALPHA * (1 - ALPHA) / n)
    mean_steps = sum(steps for steps, _, _ in results) / n
    print(
        f"digits-snn torch alpha={ALPHA} lac: coverage at stopping {coverage:.4f} over {n} "
        f"streams, mean steps {mean_steps:.2f} of 8 (saved {8 - mean_steps:.2f})"
    )
    assert coverage >= 1 - ALPHA - 3 * standard_error
    assert mean_steps < 8
    # The served decisions are the rule's own: the same figures as evaluating it offline.
    report = EarlyDecisionStore(CalibrationStore(ModelRepository(default_repository_root())))
    stored = report.get("digits-snn", "1", "torch")
    assert stored is not None
    (row,) = [r for r in stored.report["rows"] if r["alpha"] == ALPHA and r["score"] == "lac"]
    assert coverage == pytest.approx(row["coverage"])
    assert mean_steps == pytest.approx(row["mean_stop_step"])


def test_decisions_only_at_checkpoints(redis_server_url: str) -> None:
    with httpx.Client(base_url=redis_server_url, timeout=60) as client:
        body = {"model": "digits-snn", "score": "lac", "early_decision": {"max_set_size": 3}}
        session = client.post("/v1/sessions", json=body).json()
        image = digits.load_digits_seq("test", "rows").inputs[0].tolist()
        url = f"/v1/sessions/{session['session_id']}/step"
        whole = client.post(url, json={"inputs": image}).json()
        assert whole["step"] == 8 and whole["decision"]["stop"] is True
        beyond = client.post(url, json={"inputs": image[:1]}).json()
        assert beyond["step"] == 9 and beyond["decision"] is None  # past the last checkpoint
        plain = client.post("/v1/sessions", json={"model": "digits-snn"}).json()
        assert plain["early_decision"] is None
        answer = client.post(f"/v1/sessions/{plain['session_id']}/step", json={"inputs": image})
        assert answer.json()["decision"] is None


def test_create_refusals(redis_server_url: str) -> None:
    with httpx.Client(base_url=redis_server_url, timeout=60) as client:
        lm = client.post(
            "/v1/sessions",
            json={"model": "charlm-selective", "early_decision": {"max_set_size": 1}},
        )
        assert "no early-decision rule" in v1_error(lm, 409)
        too_big = client.post(
            "/v1/sessions", json={"model": "digits-snn", "early_decision": {"max_set_size": 11}}
        )
        assert "1..10" in v1_error(too_big, 422)
        randomized = client.post(
            "/v1/sessions",
            json={
                "model": "digits-snn",
                "score": "aps_randomized",
                "early_decision": {"max_set_size": 1},
            },
        )
        assert "deterministic score" in v1_error(randomized, 422)
        zero = client.post(
            "/v1/sessions", json={"model": "digits-snn", "early_decision": {"max_set_size": 0}}
        )
        assert zero.status_code == 422


def test_rule_of_an_older_calibration_is_refused(tmp_path: Path) -> None:
    """A recalibrated backend whose early-decision file was not refitted: 409, not a rule
    fitted on probabilities from another calibration map."""
    root = tmp_path / "repository"
    shutil.copytree(default_repository_root() / "digits-snn", root / "digits-snn")
    calibration = root / "digits-snn" / "1" / "calibration" / "torch.json"
    calibration.write_text(calibration.read_text().replace('"created": "', '"created": "x'))
    with (
        running_server(create_app(Settings(model_repository=root))) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        body = {"model": "digits-snn", "early_decision": {"max_set_size": 1}}
        assert "older calibration" in v1_error(client.post("/v1/sessions", json=body), 409)
        body["backend"] = "onnxruntime"
        assert client.post("/v1/sessions", json=body).status_code == 201


def test_a_damaged_rule_file_is_a_503_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    shutil.copytree(default_repository_root() / "digits-snn", root / "digits-snn")
    tensors = root / "digits-snn" / "1" / "calibration" / "early" / "torch.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with (
        running_server(create_app(Settings(model_repository=root))) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        body = {"model": "digits-snn", "early_decision": {"max_set_size": 1}}
        message = v1_error(client.post("/v1/sessions", json=body), 503)
        assert "unusable early-decision file" in message and "torch.json" in message


def test_calibrate_fits_the_rule_and_prints_its_test_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(default_repository_root() / "digits-snn", root / "digits-snn")
    shutil.rmtree(root / "digits-snn" / "1" / "calibration")
    assert main(["calibrate", "digits-snn", "--repository", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "alpha=0.1 lac: coverage at stopping" in printed and "397 test streams" in printed
    stored = EarlyDecisionStore(CalibrationStore(ModelRepository(root))).get(
        "digits-snn", "1", "torch"
    )
    assert stored is not None and stored.checkpoint_steps == tuple(range(1, 9))
    assert stored.probs.shape == (200, 8, 10)  # the half held out from the map fit
    (row,) = [r for r in stored.report["rows"] if r["alpha"] == 0.1 and r["score"] == "lac"]
    assert f"coverage at stopping {row['coverage']:.4f}" in printed
    assert row["mean_stop_step"] < 8
