"""Sessions over real HTTP: create, step, inspect, delete, TTL, validation, and the errors of
a state that does not fit, a damaged state and an unreachable store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from sklearn.datasets import load_digits

from hardware_backends.registry import prepare_runner
from models.architectures import build_model
from models.repository import ModelRepository
from service.app import create_app
from service.batching import run_chunks
from service.dataplane.inputs import InputLimits
from service.dataplane.plane import CalibrationPolicy, DataPlane
from service.errors import BadInputError, ConflictError, NotFoundError, RateLimitedError
from service.sessions.answers import StepPredictions
from service.sessions.plane import SessionManager, SessionSettings
from service.settings import Settings
from service.state.memory_store import InMemoryStateStore
from tests.conftest import RedisProcesses
from tests.service.conftest import (
    CHAR_VOCABULARY,
    DIGIT_LABELS,
    TEST_SETTINGS,
    lru_config,
)

PREDICTION_FIELDS = {"id", "label", "confidence", "probabilities", "entropy", "prediction_set"}


# ---- helpers shared by the session tests ------------------------------------------------------


def v1_error(response: httpx.Response, status: int) -> str:
    """The message of a /v1 error with this status, checked for shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["message"]


def digit_chunks(lengths: list[int], seed: int) -> list[list[list[float]]]:
    """Chunks of random digit rows (8 features in [0, 16]), as JSON-ready lists."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(t, 8, generator=generator) * 16).tolist() for t in lengths]


def reference_logits(
    repository: ModelRepository,
    name: str,
    chunks: list[Any],
    version: str | None = None,
) -> list[torch.Tensor]:
    """Per chunk, the logits [T, C] after every step, from the model stepped locally chunk by
    chunk with batches of one (the uninterrupted run a session must reproduce)."""
    loaded = repository.load(name, version)
    key = f"reference:{repository.root}/{name}/{loaded.card.version}"
    runner = prepare_runner("torch", loaded.model, model_key=key)
    state = runner.init_state(1)
    out = []
    for chunk in chunks:
        if isinstance(chunk, str):
            vocabulary = loaded.card.config["vocabulary"]
            x = torch.tensor([vocabulary.index(c) for c in chunk], dtype=torch.long)  # [T]
        else:
            x = torch.tensor(chunk, dtype=torch.float32)  # [T, F]
        (result,) = run_chunks(runner, [state], [x])
        state = result.state
        out.append(result.logits)  # [T, C]
    return out


def reference_probabilities(
    repository: ModelRepository,
    name: str,
    chunks: list[Any],
    version: str | None = None,
) -> list[list[list[float]]]:
    """Per chunk, the softmax [T, C] after every step (see `reference_logits`)."""
    logits = reference_logits(repository, name, chunks, version)
    return [torch.softmax(chunk.double(), dim=-1).tolist() for chunk in logits]


def assert_probabilities_close(got: list[float], want: list[float]) -> None:
    # The server computes the same float32 logits (batch of one) and the same float64 softmax.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-9)


def raw_softmax_dataplane(repository: ModelRepository) -> DataPlane:
    """A dataplane over the (uncalibrated) test models that answers with the raw softmax."""
    policy = CalibrationPolicy(allow_uncalibrated=True)
    return DataPlane(repository, InputLimits(8, 32), policy=policy)


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sessions", json={"model": "tiny-digits", **body})
    assert response.status_code == 201, response.text
    return response.json()


def step(client: httpx.Client, session_id: str, inputs: Any, **extra: Any) -> httpx.Response:
    return client.post(f"/v1/sessions/{session_id}/step", json={"inputs": inputs, **extra})


# ---- lifecycle --------------------------------------------------------------------------------


def test_a_session_lives_from_create_to_delete(client: httpx.Client) -> None:
    before = time.time()
    created = create(client, alpha=0.2)
    assert created["model"] == "tiny-digits" and created["version"] == "2"
    assert created["backend"] == "torch" and created["alpha"] == 0.2 and created["step"] == 0
    assert before + 3600 - 5 <= created["expires_at"] <= time.time() + 3600 + 5
    assert len(created["session_id"]) >= 32  # token_urlsafe(24): 192 random bits
    session_id = created["session_id"]

    stepped = step(client, session_id, digit_chunks([3], seed=0)[0])
    assert stepped.status_code == 200, stepped.text
    body = stepped.json()
    assert body["session_id"] == session_id and body["step"] == 3
    assert set(body["prediction"]) >= PREDICTION_FIELDS
    assert body["prediction"]["label"] in DIGIT_LABELS
    assert body["step_predictions"] is None
    assert body["usage"]["steps"] == 3 and body["usage"]["sequences"] == 1
    # The test models have no calibration: raw softmax, no set, and a warning saying so.
    assert body["calibrated"] is False and body["prediction"]["prediction_set"] is None
    assert body["warnings"] and "not calibrated" in body["warnings"][0]

    info = client.get(f"/v1/sessions/{session_id}").json()
    assert info["step"] == 3 and info["session_id"] == session_id

    assert client.delete(f"/v1/sessions/{session_id}").status_code == 204
    assert "no session" in v1_error(client.get(f"/v1/sessions/{session_id}"), 404)
    v1_error(step(client, session_id, [[0.0] * 8]), 404)
    v1_error(client.delete(f"/v1/sessions/{session_id}"), 404)


def test_a_calibrated_session_answers_like_predict_on_the_same_sequence(
    builtin_server_url: str,
) -> None:
    """digits-lru is calibrated on torch: one chunk of a whole image gets the same calibrated
    answer, with its conformal set, as /predict on that image."""
    image = (load_digits().images[0]).tolist()  # 8 rows of 8 pixels in [0, 16]
    with httpx.Client(base_url=builtin_server_url, timeout=30) as client:
        session_id = create(client, model="digits-lru", alpha=0.2, score="lac")["session_id"]
        stepped = step(client, session_id, image).json()
        predicted = client.post(
            "/v1/models/digits-lru/predict",
            json={"inputs": [image], "alpha": 0.2, "score": "lac"},
        ).json()
    assert stepped["calibrated"] is True and predicted["calibrated"] is True
    assert stepped["alpha"] == predicted["alpha"] == 0.2 and stepped["score"] == "lac"
    session_answer, whole = stepped["prediction"], predicted["predictions"][0]
    assert session_answer["label"] == whole["label"] == "0"
    assert session_answer["prediction_set"] == whole["prediction_set"]
    assert session_answer["set_size"] == len(session_answer["prediction_set"]) >= 1
    assert_probabilities_close(session_answer["probabilities"], whole["probabilities"])


def test_steps_continue_the_sequence_exactly(
    client: httpx.Client, test_repository: ModelRepository
) -> None:
    chunks = digit_chunks([2, 1, 4, 3], seed=1)
    session_id = create(client, version=1)["session_id"]
    reference = reference_probabilities(test_repository, "tiny-digits", chunks, version="1")
    total = 0
    for chunk, want in zip(chunks, reference, strict=True):
        body = step(client, session_id, chunk, return_steps=True).json()
        total += len(chunk)
        assert body["step"] == total and body["version"] == "1"
        assert len(body["step_predictions"]) == len(chunk)
        for prediction, want_t in zip(body["step_predictions"], want, strict=True):
            assert_probabilities_close(prediction["probabilities"], want_t)
        assert_probabilities_close(body["prediction"]["probabilities"], want[-1])


def test_a_sampling_backend_session_reports_epistemic_uncertainty(client: httpx.Client) -> None:
    options = {"samples": 4, "relative_std": 0.2}
    created = create(client, backend="stochastic", options=options)
    assert created["backend"] == "stochastic" and created["options"] == options
    body = step(client, created["session_id"], digit_chunks([3], seed=2)[0], return_steps=True)
    answer = body.json()
    assert answer["step"] == 3 and len(answer["step_predictions"]) == 3
    for prediction in [answer["prediction"], *answer["step_predictions"]]:
        assert prediction["epistemic"] is not None and prediction["epistemic"] > 0
        assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-9)


def test_language_model_sessions_take_text_or_token_ids(
    client: httpx.Client, test_repository: ModelRepository
) -> None:
    session_id = create(client, model="tiny-charlm")["session_id"]
    reference = reference_probabilities(test_repository, "tiny-charlm", ["hello", " wor"])
    first = step(client, session_id, "hello").json()
    assert first["step"] == 5 and first["prediction"]["label"] in CHAR_VOCABULARY
    assert_probabilities_close(first["prediction"]["probabilities"], reference[0][-1])
    ids = [CHAR_VOCABULARY.index(c) for c in " wor"]
    second = step(client, session_id, ids).json()
    assert second["step"] == 9
    assert_probabilities_close(second["prediction"]["probabilities"], reference[1][-1])
    message = v1_error(step(client, session_id, "HELLO"), 422)
    assert "vocabulary" in message and "'H'" in message


def test_ttl_expires_idle_sessions_and_use_restarts_it(client: httpx.Client) -> None:
    idle = create(client, ttl_seconds=0.4)["session_id"]
    used = create(client, ttl_seconds=0.6)["session_id"]
    for _ in range(3):  # 0.9 s in all: past both TTLs, but `used` is used every 0.3 s
        time.sleep(0.3)
        assert step(client, used, [[1.0] * 8]).status_code == 200
    v1_error(client.get(f"/v1/sessions/{idle}"), 404)
    assert client.get(f"/v1/sessions/{used}").json()["step"] == 3


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": 0}, "alpha"),
        ({"score": "best"}, "score"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": 1e9}, "ttl_seconds"),
        ({"backend": "quantum"}, "unknown backend 'quantum'"),
        ({"backend": "stochastic", "options": {"samples": -1}}, "samples"),
        ({"options": {"colour": "blue"}}, "colour"),
        ({"sesion_ttl": 3}, "sesion_ttl"),
    ],
)
def test_bad_session_requests_are_refused_with_a_reason(
    client: httpx.Client, body: dict[str, Any], fragment: str
) -> None:
    response = client.post("/v1/sessions", json={"model": "tiny-digits", **body})
    assert fragment in v1_error(response, 422)


def test_an_uncalibrated_backend_is_refused_at_create_unless_allowed(
    test_repository: ModelRepository, server_factory: Callable[..., Any]
) -> None:
    settings = Settings(model_repository=test_repository.root, allow_uncalibrated=False)
    with server_factory(create_app(settings)) as url, httpx.Client(base_url=url) as strict:
        message = v1_error(strict.post("/v1/sessions", json={"model": "tiny-digits"}), 409)
        assert "not calibrated" in message and "neuroserve calibrate tiny-digits" in message


def test_unknown_models_and_versions_are_404(client: httpx.Client) -> None:
    assert "nope" in v1_error(client.post("/v1/sessions", json={"model": "nope"}), 404)
    response = client.post("/v1/sessions", json={"model": "tiny-digits", "version": "9"})
    assert "9" in v1_error(response, 404)


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ([[1.0] * 7], "inputs[0] has 7 features; the model expects 8"),
        ([], "empty"),
        ([[1.0] * 8] * 33, "33 steps; the limit is 32"),
        ([[True] + [1.0] * 7], "inputs[0][0]"),
        ([["1.5"] + [1.0] * 7], "inputs[0][0]"),
        ([[1e39] + [1.0] * 7], "inputs[0][0] is not a finite float32 number"),
        ("some text", "inputs must be a list of time steps"),
        ({"x": 1}, "inputs must be a list"),
    ],
)
def test_bad_chunks_are_refused_with_a_reason(
    client: httpx.Client, inputs: Any, fragment: str
) -> None:
    session_id = create(client)["session_id"]
    assert fragment in v1_error(step(client, session_id, inputs), 422)
    assert client.get(f"/v1/sessions/{session_id}").json()["step"] == 0  # nothing consumed


def test_non_finite_json_numbers_are_refused(client: httpx.Client) -> None:
    session_id = create(client)["session_id"]
    for text in ("NaN", "Infinity"):
        body = '{"inputs": [[' + text + ", 1, 1, 1, 1, 1, 1, 1]]}"
        response = client.post(
            f"/v1/sessions/{session_id}/step",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert "inputs[0][0]" in v1_error(response, 422)


def test_malformed_session_ids_are_simply_unknown(client: httpx.Client) -> None:
    for session_id in ("a%20b", "x" * 200):
        v1_error(client.get(f"/v1/sessions/{session_id}"), 404)


# ---- a state that does not fit, a damaged state, an unreachable store -------------------------


def publish_wide_digits(root: Path) -> ModelRepository:
    """A repository whose `tiny-digits` v1 has a larger state than the test repository's:
    the same name and version redeployed with another state shape."""
    repository = ModelRepository(root)
    config = lru_config("features", len(DIGIT_LABELS))
    config["d_state"] = 32
    torch.manual_seed(7)
    model = build_model("lru", config)
    repository.publish(
        "tiny-digits",
        {
            "architecture": "lru",
            "model_config": config,
            "task": "classification",
            "labels": DIGIT_LABELS,
            "input": {"kind": "features", "features": 8, "dtype": "float32"},
            "dataset": "none (untrained test model)",
            "provenance": {
                "data_sha256": None,
                "seed": 7,
                "command": "tests/service/test_sessions_http.py",
                "created": "1970-01-01T00:00:00Z",
                "torch_version": torch.__version__,
            },
            "metrics": {},
        },
        model.state_dict(),
    )
    return repository


def redis_settings(root: Path, redis_url: str, prefix: str, **extra: Any) -> Settings:
    return Settings(
        model_repository=root,
        redis_url=redis_url,
        state_store_prefix=prefix,
        **{**TEST_SETTINGS, **extra},
    )


def test_a_state_written_by_another_model_shape_is_refused_with_409(
    test_repository: ModelRepository,
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    server_factory: Callable[..., Any],
) -> None:
    wide = publish_wide_digits(tmp_path / "wide")
    old_app = create_app(redis_settings(test_repository.root, redis_url, redis_prefix))
    new_app = create_app(redis_settings(wide.root, redis_url, redis_prefix))
    with (
        server_factory(old_app) as old_url,
        server_factory(new_app) as new_url,
        httpx.Client(base_url=old_url, timeout=30) as old,
        httpx.Client(base_url=new_url, timeout=30) as new,
    ):
        session_id = create(old, version=1)["session_id"]
        assert step(old, session_id, [[1.0] * 8]).status_code == 200
        message = v1_error(step(new, session_id, [[1.0] * 8]), 409)
        assert session_id in message and "schema_hash" in message
        # The session is left as it was for the replicas that still serve its shape.
        assert step(old, session_id, [[1.0] * 8]).json()["step"] == 2


def test_a_damaged_state_is_409_naming_the_session_and_is_deleted(
    test_repository: ModelRepository,
    redis_url: str,
    redis_prefix: str,
    server_factory: Callable[..., Any],
) -> None:
    # A replica that reads the state back (here: one that keeps none of its own writes; a
    # replica stepping from its own last write never reads the damaged bytes, and replaces them).
    settings = redis_settings(test_repository.root, redis_url, redis_prefix, session_cache_mb=0)
    with (
        server_factory(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        session_id = create(client)["session_id"]
        raw = redis.Redis.from_url(redis_url)
        key = f"{redis_prefix}:session:{session_id}"
        blob = raw.hget(key, "blob")
        raw.hset(key, "blob", blob[:-1] + bytes([blob[-1] ^ 1]))  # one flipped bit
        raw.close()
        message = v1_error(step(client, session_id, [[1.0] * 8]), 409)
        assert session_id in message and "damaged" in message
        v1_error(client.get(f"/v1/sessions/{session_id}"), 404)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[RedisProcesses, str]]:
    servers = RedisProcesses(tmp_path)
    try:
        yield servers, f"redis://127.0.0.1:{servers.start()}/0"
    finally:
        servers.stop_all()


def test_an_unreachable_store_is_503_and_not_ready(
    test_repository: ModelRepository,
    private_redis: tuple[RedisProcesses, str],
    server_factory: Callable[..., Any],
) -> None:
    servers, url = private_redis
    settings = redis_settings(test_repository.root, url, "nstest", store_check_seconds=0.1)
    with server_factory(create_app(settings)) as base, httpx.Client(base_url=base) as client:
        session_id = create(client)["session_id"]
        servers.stop_all()
        response = step(client, session_id, [[1.0] * 8])
        assert v1_error(response, 503).startswith("state store unavailable")
        v1_error(client.post("/v1/sessions", json={"model": "tiny-digits"}), 503)
        deadline = time.monotonic() + 5
        while client.get("/v2/health/ready").status_code == 200:
            assert time.monotonic() < deadline, "readiness did not notice the store is down"
            time.sleep(0.05)
        assert client.get("/v2/health/ready").json() == {"ready": False}


# ---- metrics ------------------------------------------------------------------------------


def test_session_metrics_are_exported(client: httpx.Client) -> None:
    session_id = create(client)["session_id"]
    step(client, session_id, [[1.0] * 8])
    text = client.get("/metrics").text
    assert 'neuroserve_batch_size_count{backend="torch",model="tiny-digits"}' in text
    assert 'neuroserve_active_sessions{model="tiny-digits"}' in text
    # The step started from the state this replica wrote at create: no get_many.
    for operation in ("create", "cas_many"):
        series = (
            "neuroserve_state_store_operation_duration_seconds_count"
            f'{{operation="{operation}",store="memory"}}'
        )
        assert series in text


# ---- the manager API (what the V2 and websocket routes use) -----------------------------------


def test_owners_namespace_given_session_ids(test_repository: ModelRepository) -> None:
    async def scenario() -> None:
        manager = SessionManager(InMemoryStateStore(), raw_softmax_dataplane(test_repository))
        alice = await manager.create(model="tiny-digits", owner="alice", session_id="seq-7")
        assert alice.session_id == "seq-7"
        await manager.create(model="tiny-digits", owner="bob", session_id="seq-7")
        await manager.step("seq-7", torch.ones(2, 8), owner="bob")
        assert (await manager.get("seq-7", owner="alice")).step == 0
        assert (await manager.get("seq-7", owner="bob")).step == 2
        with pytest.raises(NotFoundError):
            await manager.get("seq-7")  # without an owner it is another namespace
        with pytest.raises(ConflictError, match="already exists"):
            await manager.create(model="tiny-digits", owner="alice", session_id="seq-7")
        with pytest.raises(BadInputError, match="session_id"):
            await manager.create(model="tiny-digits", session_id="a/b")
        assert await manager.delete("seq-7", owner="alice")
        with pytest.raises(NotFoundError):
            await manager.delete("seq-7", owner="alice")
        await manager.close()

    asyncio.run(scenario())


def test_a_step_whose_prediction_is_refused_is_not_written(
    test_repository: ModelRepository,
) -> None:
    async def scenario() -> None:
        dataplane = raw_softmax_dataplane(test_repository)
        answers = StepPredictions(dataplane)

        def refuse_odd_steps(outcomes):
            built = answers(outcomes)
            return [
                ConflictError("refused") if outcome.info.step % 2 else answer
                for outcome, answer in zip(outcomes, built, strict=True)
            ]

        manager = SessionManager(InMemoryStateStore(), dataplane, answers=refuse_odd_steps)
        session_id = (await manager.create(model="tiny-digits")).session_id
        outcome = await manager.step(session_id, torch.ones(2, 8))
        last, _ = outcome.answer
        assert last.predictions[0].position == 2 and outcome.info.step == 2
        with pytest.raises(ConflictError, match="refused"):
            await manager.step(session_id, torch.ones(1, 8))
        assert (await manager.get(session_id)).step == 2  # the refused step left no trace
        await manager.close()

    asyncio.run(scenario())


def test_a_replica_refuses_sessions_beyond_its_limit(test_repository: ModelRepository) -> None:
    async def scenario() -> None:
        settings = SessionSettings(max_sessions=2)
        manager = SessionManager(
            InMemoryStateStore(), raw_softmax_dataplane(test_repository), settings
        )
        first = await manager.create(model="tiny-digits")
        await manager.create(model="tiny-digits")
        with pytest.raises(RateLimitedError, match="limit of 2 live sessions"):
            await manager.create(model="tiny-digits")
        await manager.delete(first.session_id)
        await manager.create(model="tiny-digits")  # a slot came free
        await manager.close()

    asyncio.run(scenario())


def test_step_tensors_are_checked_against_the_model(test_repository: ModelRepository) -> None:
    async def scenario() -> None:
        manager = SessionManager(InMemoryStateStore(), raw_softmax_dataplane(test_repository))
        digits = (await manager.create(model="tiny-digits")).session_id
        charlm = (await manager.create(model="tiny-charlm")).session_id
        bad = [
            (digits, torch.ones(2, 7), "shape [T, 8]"),
            (digits, torch.ones(2, 8, dtype=torch.long), "float features"),
            (digits, torch.full((1, 8), float("nan")), "not a finite"),
            (digits, torch.ones(0, 8), "empty"),
            (charlm, torch.tensor([0, 99]), "token ids must lie in [0, 29)"),
            (charlm, torch.ones(3), "integer token ids"),
        ]
        for session_id, inputs, fragment in bad:
            with pytest.raises(BadInputError) as caught:
                await manager.step(session_id, inputs)
            assert fragment in caught.value.message
        outcome = await manager.step(charlm, torch.tensor([1, 2, 3]), per_step=True)
        assert outcome.info.step == 3 and outcome.step_logits.shape == (3, 29)
        assert outcome.logits.shape == (29,)
        await manager.close()

    asyncio.run(scenario())
