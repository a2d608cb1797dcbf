"""analog_imc through the real server: a session's answers do not depend on the sessions its
steps are batched with, a stateless row's not on the rows sent with it, and answers name the
weight mapping they were computed with."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import torch

from models.repository import default_repository_root
from service.app import create_app
from service.settings import Settings

STEPS = 4
OTHERS = 7


def _rows(seed: int) -> list[list[list[float]]]:
    """STEPS one-row chunks of digit features in [0, 16]."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 8, generator=generator) * 16).tolist() for _ in range(STEPS)]


def _create(client: httpx.Client) -> str:
    body = {"model": "digits-lru", "backend": "analog_imc"}
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def _step(client: httpx.Client, session_id: str, chunk: Any) -> dict[str, Any]:
    response = client.post(f"/v1/sessions/{session_id}/step", json={"inputs": chunk})
    assert response.status_code == 200, response.text
    return response.json()


def _sequence_step(client: httpx.Client, sequence_id: str, chunk: Any, start: bool) -> list:
    """One step of a V2 sequence (a session whose id the client names): its probabilities."""
    parameters = {"sequence_id": sequence_id, "backend": "analog_imc", "sequence_start": start}
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8], "data": chunk[0]}
    response = client.post(
        "/v2/models/digits-lru/infer", json={"inputs": [tensor], "parameters": parameters}
    )
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    return outputs["probabilities"]["data"]


def test_a_session_answers_the_same_alone_and_batched_with_others(server_factory) -> None:
    # A 50 ms batching window gathers the concurrent sessions' steps into shared batches.
    # The probe is a V2 sequence, a session named by the client: started again, it is the
    # same session with the same noise stream.
    settings = Settings(model_repository=default_repository_root(), batch_window_ms=50.0)
    probe_rows = _rows(seed=1)
    with server_factory(create_app(settings)) as base_url:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            alone = [
                _sequence_step(client, "probe", chunk, start=t == 0)
                for t, chunk in enumerate(probe_rows)
            ]
            others = [_create(client) for _ in range(OTHERS)]

        barrier = threading.Barrier(OTHERS + 1)
        batched: list[list] = []
        other_answers: list[dict[str, Any]] = []

        def feed_probe() -> None:
            with httpx.Client(base_url=base_url, timeout=60) as own:
                for t, chunk in enumerate(probe_rows):
                    barrier.wait(timeout=60)  # every session sends its step at once
                    batched.append(_sequence_step(own, "probe", chunk, start=t == 0))

        def feed(session_id: str, rows: list[Any]) -> None:
            with httpx.Client(base_url=base_url, timeout=60) as own:
                for chunk in rows:
                    barrier.wait(timeout=60)
                    other_answers.append(_step(own, session_id, chunk))

        threads = [threading.Thread(target=feed_probe)]
        threads += [
            threading.Thread(target=feed, args=(session_id, _rows(seed=10 + i)))
            for i, session_id in enumerate(others)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(batched) == STEPS and len(other_answers) == OTHERS * STEPS
    # A batch of all OTHERS + 1 sessions held the probe's step too.
    assert max(answer["usage"]["batch_size"] for answer in other_answers) == OTHERS + 1
    assert all(answer["usage"]["weight_mapping"] == "rescaled" for answer in other_answers)
    assert batched == alone
    # Another session fed the same inputs draws other noise: the stream is the session's.
    with (
        server_factory(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        other = [
            _sequence_step(client, "someone-else", chunk, start=t == 0)
            for t, chunk in enumerate(probe_rows)
        ]
    assert other != alone


def test_a_stateless_row_answers_the_same_alone_and_with_other_rows(builtin_server_url) -> None:
    generator = torch.Generator().manual_seed(3)
    rows = (torch.rand(5, 6, 8, generator=generator) * 16).tolist()
    with httpx.Client(base_url=builtin_server_url, timeout=60) as client:

        def predict(inputs: Any, **options: Any) -> dict[str, Any]:
            body = {"inputs": inputs, "backend": "analog_imc", **options}
            response = client.post("/v1/models/digits-lru/predict", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        together = predict(rows)
        assert together["usage"]["weight_mapping"] == "rescaled"
        for i in (0, 3):
            alone = predict(rows[i : i + 1])
            got, want = alone["predictions"][0], together["predictions"][i]
            assert got["probabilities"] == want["probabilities"]
        raw = predict(rows[:1], backend_options={"weight_mapping": "raw"})
        assert raw["usage"]["weight_mapping"] == "raw"
        info = client.get("/v1/models/digits-lru").json()
        analog = next(b for b in info["backends"] if b["name"] == "analog_imc")
        assert analog["defaults"] == {"weight_mapping": "rescaled"}
