"""`/v1/finetune/jobs` over real HTTP in the embedded mode (no Redis): the server runs jobs in
its own local worker process. Validation (422 naming the field), 404s, the active-job limit
(429), .npz uploads, cancellation, and a job end to end: the new version is listed and serves
sessions and predictions at once.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from models.digits import load_digits_seq
from models.repository import ModelRepository
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import running_server
from tests.service.test_jobs import (
    JOB_TIMEOUT_S,
    assert_repository_intact,
    is_tuning,
    long_spec,
    publish_test_models,
    quick_spec,
    wait_for,
)

MAX_UPLOAD_BYTES = 64 * 1024
FINISHED = ("succeeded", "failed", "cancelled")


def shifted_subset_spec(model: str, n: int = 300, **overrides: Any) -> dict[str, Any]:
    """A quick job on a tiny shifted subset sent inline: the first `n` translated training
    digits (split 40/20/20/20 into tune, validation, calibration and test)."""
    digits = load_digits_seq("train", shift="translated")
    data = {
        "kind": "inline",
        "inputs": digits.inputs[:n].tolist(),  # [n, 8, 8]
        "labels": digits.labels[:n].tolist(),
    }
    return {**quick_spec(model), "data": data, **overrides}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def wait_for_job(client: httpx.Client, job_id: str, done: Any) -> dict[str, Any]:
    return wait_for(lambda: client.get(f"/v1/finetune/jobs/{job_id}").json(), done)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in FINISHED


def wait_until_finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return wait_for_job(client, job_id, finished)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("finetune-http"))
    publish_test_models(repository)
    return repository


@pytest.fixture(scope="module")
def client(repository: ModelRepository) -> Iterator[httpx.Client]:
    settings = Settings(
        model_repository=repository.root,
        allow_uncalibrated=True,  # the untrained base model has no calibration
        max_active_jobs=2,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_request_bytes=4 * 1024 * 1024,
    )
    with (
        running_server(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=JOB_TIMEOUT_S) as http,
    ):
        yield http


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"eps": 5.0}, "eps"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_perturbations": 1000}, "n_perturbations"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"parameters": "head"}, "parameters"),
        ({"alpha": 1.5}, "alpha"),
        ({"version": "latest"}, "version"),
        ({"backend": "onnxruntime"}, "backend"),
        ({"backend": {"name": "analog_imc"}}, "backend"),
        ({"backend": ["analog_imc"]}, "backend"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"data": {"kind": "csv"}}, "data"),
        ({"data": {"kind": "builtin", "shift": "rotated"}}, "data.builtin.shift"),
        ({"data": {"kind": "inline", "inputs": [[[1.0]]], "labels": [0, 1]}}, "data.inline"),
        ({"validation_fraction": 0.5, "test_fraction": 0.4}, "validation_fraction"),
    ],
)
def test_an_invalid_hyper_parameter_is_422_naming_the_field(
    client: httpx.Client, change: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/finetune/jobs", json={**quick_spec(), **change})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_input"
    assert error["message"].startswith("invalid request: ")
    assert field in error["message"]


def test_data_that_does_not_fit_the_model_is_422(client: httpx.Client) -> None:
    wrong_width = {"kind": "inline", "inputs": [[[0.0] * 3] * 8] * 50, "labels": [0] * 50}
    response = client.post("/v1/finetune/jobs", json=quick_spec(data=wrong_width))
    assert response.status_code == 422
    assert "data: the model reads 8 features per step, the data has 3" in response.text


def test_a_body_that_is_not_an_object_is_422(client: httpx.Client) -> None:
    response = client.post("/v1/finetune/jobs", json=[quick_spec()])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "bad_input"


@pytest.mark.parametrize(
    ("spec", "status"),
    [(quick_spec("no-such-model"), 404), (quick_spec(version="9"), 404)],
)
def test_an_unknown_model_or_version_is_404(
    client: httpx.Client, spec: dict[str, Any], status: int
) -> None:
    response = client.post("/v1/finetune/jobs", json=spec)
    assert response.status_code == status
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("job_id", ["0" * 32, "nope"])
def test_an_unknown_job_is_404(client: httpx.Client, method: str, job_id: str) -> None:
    response = client.request(method.upper(), f"/v1/finetune/jobs/{job_id}")
    assert response.status_code == 404
    assert "no fine-tuning job" in response.json()["error"]["message"]


# ---- .npz uploads -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "npz", "path": "/etc/data.npz"}, "data.npz: Value error, naming a file on"),
        ({"kind": "npz"}, "data.npz.base64: Field required"),
        ({"kind": "npz", "base64": "not base64!"}, "data.base64: not valid base64"),
        (
            {"kind": "npz", "base64": base64.b64encode(b"x" * (MAX_UPLOAD_BYTES + 1)).decode()},
            f"over the upload limit of {MAX_UPLOAD_BYTES}",
        ),
        (
            {"kind": "npz", "base64": base64.b64encode(b"plain text").decode()},
            "data.base64: not an .npz file",
        ),
        (
            {
                "kind": "npz",
                "base64": base64.b64encode(npz_bytes(inputs=np.zeros((20, 8, 8)))).decode(),
            },
            "missing array(s) ['labels']",
        ),
    ],
)
def test_a_bad_npz_upload_is_422_and_names_no_server_path(
    client: httpx.Client, data: dict[str, Any], message: str
) -> None:
    response = client.post("/v1/finetune/jobs", json=quick_spec(data=data))
    assert response.status_code == 422, response.text
    text = response.json()["error"]["message"]
    assert message in text
    assert "neuroserve-upload" not in text  # the server's scratch path stays private


def test_an_uploaded_npz_is_tuned_on(client: httpx.Client, repository: ModelRepository) -> None:
    digits = load_digits_seq("train", shift="gaussian_noise")
    upload = npz_bytes(
        inputs=digits.inputs[:150].numpy(),  # [150, 8, 8]
        labels=digits.labels[:150].numpy(),
        label_names=np.array([str(d) for d in range(10)]),
    )
    data = {"kind": "npz", "base64": base64.b64encode(upload).decode()}
    response = client.post("/v1/finetune/jobs", json=quick_spec(data=data, steps=50))
    assert response.status_code == 202, response.text

    job = wait_until_finished(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["split_sizes"] == {"tune": 60, "validation": 30, "calibration": 30,
                                            "test": 30}  # fmt: skip
    assert job["result"]["version"] in repository.versions("tiny")


# ---- jobs end to end --------------------------------------------------------------------------


def test_a_job_end_to_end_publishes_a_version_that_serves_at_once(
    client: httpx.Client, repository: ModelRepository
) -> None:
    before = client.get("/v1/models/tiny").json()
    versions_before = before["versions"]
    response = client.post("/v1/finetune/jobs", json=shifted_subset_spec("tiny"))
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["status"] == "queued" and submitted["model"] == "tiny"
    assert response.headers["location"] == f"/v1/finetune/jobs/{submitted['job_id']}"

    job = wait_until_finished(client, submitted["job_id"])
    assert job["status"] == "succeeded", job["error"]
    new_version = job["result"]["version"]
    assert job["result"]["base_version"] == before["latest_version"]
    assert job["progress"]["stage"] == "done" and job["progress"]["step"] == 200
    for when in ("before", "after"):
        assert 0.0 <= job["result"][when]["accuracy"] <= 1.0

    info = client.get("/v1/models/tiny").json()
    assert info["versions"] == [*versions_before, new_version]
    promotion = job["result"]["promotion"]
    # latest moved to the new version exactly when the guard let it (the reason says why)
    assert info["latest_version"] == promotion["latest"]
    assert (promotion["latest"] == new_version) == promotion["promoted"], promotion
    assert promotion["reason"] and promotion["n"] == job["result"]["after"]["n"]
    session = client.post("/v1/sessions", json={"model": "tiny", "version": new_version})
    assert session.status_code == 201, session.text
    assert session.json()["version"] == new_version
    sequence = load_digits_seq("test", shift="translated").inputs[0].tolist()  # [8, 8]
    step = client.post(
        f"/v1/sessions/{session.json()['session_id']}/step", json={"inputs": sequence}
    )
    assert step.status_code == 200, step.text
    assert step.json()["step"] == 8 and step.json()["version"] == new_version
    predict = client.post(
        "/v1/models/tiny/predict", json={"inputs": [sequence], "version": new_version}
    )
    assert predict.status_code == 200, predict.text
    assert predict.json()["version"] == new_version
    # Same weights through both routes: the session's final step is the whole-sequence answer.
    probabilities = predict.json()["predictions"][0]["probabilities"]
    assert np.allclose(step.json()["prediction"]["probabilities"], probabilities, atol=1e-5)


def test_output_name_of_a_model_of_another_lineage_is_409(client: httpx.Client) -> None:
    response = client.post(
        "/v1/finetune/jobs", json=shifted_subset_spec("tiny", output_name="corrupt")
    )
    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert "'corrupt'" in message and "another lineage" in message and "output_name" in message


def test_cancelling_a_running_job_publishes_nothing(
    client: httpx.Client, repository: ModelRepository
) -> None:
    versions = repository.versions("tiny")
    job_id = client.post("/v1/finetune/jobs", json=long_spec()).json()["job_id"]
    wait_for_job(client, job_id, lambda job: is_tuning(job["progress"]))

    response = client.delete(f"/v1/finetune/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"]
    job = wait_until_finished(client, job_id)
    assert job["status"] == "cancelled" and job["result"]["version"] is None
    assert_repository_intact(repository, "tiny", versions)
    again = client.delete(f"/v1/finetune/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_the_active_job_limit_is_429_and_a_queued_job_cancels_at_once(
    client: httpx.Client,
) -> None:
    running = client.post("/v1/finetune/jobs", json=long_spec()).json()
    queued = client.post("/v1/finetune/jobs", json=long_spec()).json()
    refused = client.post("/v1/finetune/jobs", json=quick_spec())
    assert refused.status_code == 429
    assert "NEUROSERVE_MAX_ACTIVE_JOBS" in refused.json()["error"]["message"]

    response = client.delete(f"/v1/finetune/jobs/{queued['job_id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["attempts"] == 0
    client.delete(f"/v1/finetune/jobs/{running['job_id']}")
    assert wait_until_finished(client, running["job_id"])["status"] == "cancelled"


def test_the_routes_are_in_the_openapi_schema(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    submit = paths["/v1/finetune/jobs"]["post"]
    assert {"202", "404", "422", "429"} <= set(submit["responses"])
    assert {"get", "delete"} <= set(paths["/v1/finetune/jobs/{job_id}"])


def test_an_unreachable_job_queue_is_503(
    repository: ModelRepository, unused_redis_url: str
) -> None:
    settings = Settings(model_repository=repository.root, job_queue_url=unused_redis_url)
    with running_server(create_app(settings)) as base_url:
        response = httpx.post(f"{base_url}/v1/finetune/jobs", json=quick_spec(), timeout=30)
        status = httpx.get(f"{base_url}/v1/finetune/jobs/{'0' * 32}", timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "job_queue_unavailable"
    assert "cannot be reached" in response.json()["error"]["message"]
    assert status.status_code == 503
