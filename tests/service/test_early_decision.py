"""Sequential early decisions in sessions, over real HTTP with sessions kept in a real Redis.

Every digits test image is streamed row by row through a session of its own that asked for
early decisions; the stopping step is the first `stop`. Checked: coverage at the stopping step
is at least 1 - alpha - 3 SE and steps are saved (on digits-lru and digits-snn); the served
decision at every step equals the library's rule (`EarlyDecisionRule.from_calibration`, `run`
and `decide`) on the probabilities the same steps served; a decision at every step 1..8 and
none past the calibrated horizon; the refusals at create; a damaged calibration file (503
naming it); and `neuroserve calibrate` printing and storing the early-decision report.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from calibration import EarlyDecisionRule
from models import digits
from models.repository import CONFIG_FILE, WEIGHTS_FILE, ModelRepository, default_repository_root
from service.api.schemas.sessions import SessionStepResponse
from service.app import create_app
from service.cli import main
from service.dataplane.calibration_store import CalibrationStore
from service.settings import Settings
from tests.service.conftest import running_server
from tests.service.test_sessions_http import v1_error

pytestmark = pytest.mark.redis

ALPHA = 0.1
STEPS = 8  # rows per digit image: the calibrated horizon
STREAMS_IN_FLIGHT = 16  # sessions stepped concurrently (the server micro-batches them)
TEST = digits.load_digits_seq("test", "rows")
IMAGES = TEST.inputs.tolist()  # [397][8][8]
LABELS = [str(int(label)) for label in TEST.labels]
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The fits and runs here are small: a second torch thread only contends for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def redis_server_url(redis_url: str) -> Iterator[str]:
    """The committed built-in models, sessions in Redis."""
    settings = Settings(
        model_repository=default_repository_root(),
        redis_url=redis_url,
        state_store_prefix=f"early-{secrets.token_hex(4)}",
    )
    with running_server(create_app(settings)) as base_url:
        yield base_url


def copy_version(model: str, root: Path, calibrations: tuple[str, ...] = ("torch",)) -> Path:
    """A repository at `root` with a built-in model's weights and some of its calibrations."""
    source = default_repository_root() / model / "1"
    target = root / model / "1"
    (target / "calibration").mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(source / name, target / name)
    for backend in calibrations:
        for suffix in (".json", ".safetensors"):
            name = f"calibration/{backend}{suffix}"
            shutil.copy(source / name, target / name)
    return root


# ---- the whole test split through a server ---------------------------------------------------


async def _stream(client: httpx.AsyncClient, image: list[list[float]], body: dict) -> list[dict]:
    """Feed one image row by row through a new session until the first `stop`: the answers."""
    created = await client.post("/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["early_decision"] == body["early_decision"]
    url = f"/v1/sessions/{session['session_id']}/step"
    answers = []
    try:
        for row in image:
            answer = await client.post(url, json={"inputs": [row]})
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
            if answers[-1]["decision"]["stop"]:
                return answers
        raise AssertionError("the last checkpoint must always stop")
    finally:
        await client.delete(f"/v1/sessions/{session['session_id']}")


async def _stream_test_split(base_url: str, body: dict) -> list[list[dict]]:
    slots = asyncio.Semaphore(STREAMS_IN_FLIGHT)

    async def one(client: httpx.AsyncClient, image: list[list[float]]) -> list[dict]:
        async with slots:
            return await _stream(client, image, body)

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return await asyncio.gather(*(one(client, image) for image in IMAGES))


def members(mask: torch.Tensor) -> list[str]:
    return [DIGITS[i] for i in mask.nonzero().flatten().tolist()]


@pytest.mark.parametrize("model", ["digits-lru", "digits-snn"])
def test_streaming_the_test_split_stops_early_with_coverage(
    redis_server_url: str, model: str
) -> None:
    body = {"model": model, "alpha": ALPHA, "score": "lac", "early_decision": {"max_set_size": 1}}
    streams = asyncio.run(_stream_test_split(redis_server_url, body))
    for answers in streams:
        assert [a["step"] for a in answers] == list(range(1, len(answers) + 1))
        for answer in answers:
            assert answer["calibrated"] and answer["prediction"]["position"] == answer["step"]
            assert answer["decision"]["checkpoint"] == answer["step"]
            assert answer["decision"]["guaranteed_coverage"] == pytest.approx(1 - ALPHA)
            # Written without the models (SessionStepResponse.json_of), exactly as they would.
            assert SessionStepResponse.model_validate(answer).model_dump(mode="json") == answer
    stops = [answers[-1] for answers in streams]
    n = len(stops)
    final_sets = [a["decision"]["prediction_set"] for a in stops]
    coverage = sum(label in s for s, label in zip(final_sets, LABELS, strict=True)) / n
    mean_steps = sum(a["step"] for a in stops) / n
    print(
        f"{model} torch alpha={ALPHA} lac: coverage at stopping {coverage:.4f} over {n} "
        f"streams, mean steps {mean_steps:.2f} of {STEPS} (saved {STEPS - mean_steps:.2f})"
    )
    assert coverage >= 1 - ALPHA - 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)
    assert mean_steps < STEPS

    # The served decisions are the library rule's on the probabilities the steps served. Where
    # a stream stops depends only on the steps up to its first stop: a stop too early or too
    # late shows whatever stands in for the steps it did not read (uniform here).
    stored = CalibrationStore(ModelRepository(default_repository_root())).get(model, "1", "torch")
    rule = EarlyDecisionRule.from_calibration(stored.positional, ALPHA, "lac", max_set_size=1)
    probs = torch.full((n, STEPS, len(DIGITS)), 1 / len(DIGITS), dtype=torch.float64)
    for i, answers in enumerate(streams):  # [N, K, C], each step by its own position's map
        served = [a["prediction"]["probabilities"] for a in answers]
        probs[i, : len(answers)] = torch.tensor(served, dtype=torch.float64)
    stop_at, sets = rule.run(probs)
    assert [a["step"] for a in stops] == (stop_at + 1).tolist()
    assert final_sets == [members(row) for row in sets]
    for i, answers in enumerate(streams):  # and every decision on the way
        for k, answer in enumerate(answers):
            stop, step_sets = rule.decide(probs[i, k][None], k)
            assert answer["decision"]["stop"] == bool(stop[0])
            assert answer["decision"]["prediction_set"] == members(step_sets[0])
    # ... which are the figures `neuroserve calibrate` measured when it stored the calibration.
    (row,) = [
        r for r in stored.report["early_decisions"] if r["alpha"] == ALPHA and r["score"] == "lac"
    ]
    assert coverage == pytest.approx(row["coverage"])
    assert mean_steps == pytest.approx(row["mean_stop_step"])


# ---- decisions within the horizon only -----------------------------------------------------


def test_a_decision_at_every_step_and_none_past_the_horizon(redis_server_url: str) -> None:
    image = IMAGES[0]
    with httpx.Client(base_url=redis_server_url, timeout=60) as client:
        body = {"model": "digits-lru", "score": "lac", "early_decision": {"max_set_size": 3}}
        session = client.post("/v1/sessions", json=body).json()
        url = f"/v1/sessions/{session['session_id']}/step"
        for step, row in enumerate(image, start=1):
            answer = client.post(url, json={"inputs": [row]}).json()
            decision = answer["decision"]
            assert answer["step"] == step and decision["checkpoint"] == step
            assert decision["guaranteed_coverage"] == pytest.approx(0.9)
            assert decision["stop"] == (len(decision["prediction_set"]) <= 3 or step == STEPS)
        beyond = client.post(url, json={"inputs": image[:1]}).json()
        assert beyond["step"] == STEPS + 1 and beyond["decision"] is None
        assert beyond["calibrated"] is False and beyond["prediction"]["prediction_set"] is None
        assert any("past the 8 steps" in warning for warning in beyond["warnings"])

        # A chunk is decided at the step it ends on.
        chunked = client.post("/v1/sessions", json=body).json()
        url = f"/v1/sessions/{chunked['session_id']}/step"
        assert client.post(url, json={"inputs": image[:3]}).json()["decision"]["checkpoint"] == 3
        assert client.post(url, json={"inputs": image[3:]}).json()["decision"]["stop"] is True

        plain = client.post("/v1/sessions", json={"model": "digits-lru"}).json()
        assert plain["early_decision"] is None
        answer = client.post(f"/v1/sessions/{plain['session_id']}/step", json={"inputs": image})
        assert answer.json()["decision"] is None


# ---- refusals ---------------------------------------------------------------------------------


def test_create_refusals(redis_server_url: str) -> None:
    def create(**body) -> httpx.Response:
        return client.post("/v1/sessions", json={"early_decision": {"max_set_size": 1}} | body)

    with httpx.Client(base_url=redis_server_url, timeout=60) as client:
        randomized = create(model="digits-lru", score="aps_randomized")
        assert "deterministic score" in v1_error(randomized, 422)
        assert "sequence classifiers" in v1_error(create(model="charlm-selective"), 409)
        too_big = create(model="digits-lru", early_decision={"max_set_size": 11})
        assert "1..10" in v1_error(too_big, 422)
        assert create(model="digits-lru", early_decision={"max_set_size": 0}).status_code == 422


def test_backend_options_without_a_calibration_have_no_rule(redis_server_url: str) -> None:
    body = {
        "model": "digits-lru",
        "backend": "analog_imc",
        "options": {"t_inference": 86400},  # calibrated with no options only
        "early_decision": {"max_set_size": 1},
    }
    with httpx.Client(base_url=redis_server_url, timeout=60) as client:
        message = v1_error(client.post("/v1/sessions", json=body), 409)
    assert "t_inference" in message and "neuroserve calibrate digits-lru" in message


def test_an_uncalibrated_backend_has_no_rule(tmp_path: Path, redis_url: str) -> None:
    root = copy_version("digits-lru", tmp_path / "repository")  # torch calibrated only
    settings = Settings(model_repository=root, redis_url=redis_url, allow_uncalibrated=True)
    with (
        running_server(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        body = {"model": "digits-lru", "backend": "onnxruntime"}
        assert client.post("/v1/sessions", json=body).status_code == 201  # raw answers
        body["early_decision"] = {"max_set_size": 1}
        message = v1_error(client.post("/v1/sessions", json=body), 409)
        assert "early decisions need a calibration" in message
        assert "neuroserve calibrate digits-lru --version 1 --backend onnxruntime" in message


@pytest.mark.parametrize("damaged", ["torch.json", "torch.safetensors"])
def test_a_damaged_calibration_file_is_a_503_naming_it(
    tmp_path: Path, redis_url: str, damaged: str
) -> None:
    root = copy_version("digits-lru", tmp_path / "repository")
    path = root / "digits-lru" / "1" / "calibration" / damaged
    path.write_bytes(path.read_bytes()[:-8])
    settings = Settings(model_repository=root, redis_url=redis_url)
    with (
        running_server(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        body = {"model": "digits-lru", "early_decision": {"max_set_size": 1}}
        message = v1_error(client.post("/v1/sessions", json=body), 503)
        assert str(path) in message  # the damaged file, whichever of the two it is


# ---- the command that fits it -------------------------------------------------------------------


def test_calibrate_prints_and_stores_the_early_decision_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_version("digits-lru", tmp_path / "repository", calibrations=())
    assert main(["calibrate", "digits-lru", "--repository", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "early decisions (max_set_size 1, stop at the first small set):" in printed
    stored = CalibrationStore(ModelRepository(root)).get("digits-lru", "1", "torch")
    assert stored is not None and stored.positional.horizon == STEPS
    rows = stored.report["early_decisions"]
    assert {(r["score"], r["alpha"]) for r in rows} == {
        (score, alpha) for score in ("lac", "raps") for alpha in (0.05, 0.1, 0.2)
    }
    for row in rows:
        assert row["n"] == len(IMAGES) and row["max_set_size"] == 1
        assert (
            f"alpha={row['alpha']:g} {row['score']}: coverage at stopping {row['coverage']:.4f} "
            f"(>= {1 - row['alpha']:g} guaranteed), mean stop step {row['mean_stop_step']:.2f}"
        ) in printed
    (lac,) = [r for r in rows if r["alpha"] == ALPHA and r["score"] == "lac"]
    assert lac["mean_stop_step"] < STEPS
    assert lac["coverage"] >= 1 - ALPHA - 3 * math.sqrt(ALPHA * (1 - ALPHA) / lac["n"])
