"""The stock Triton HTTP client (`tritonclient.http`, JSON tensors: `binary_data=False`) against
a real server: health and metadata calls, stateless inference agreeing with `/v1/predict`,
and Triton sequences (`sequence_id` / `sequence_start` / `sequence_end`) agreeing with the
same chunks stepped through `/v1/sessions`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

MODEL = "tiny-digits"
# Probabilities travel as FP32: the float64 answer rounded to float32, 2**-24 relative, and
# the same chunk run in separate processes of the same code path agrees to float32 rounding.
FP32_AGREEMENT = 1e-6


@pytest.fixture
def client(server_url: str) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(url=server_url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


def chunks(n: int, steps: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 17, size=(steps, 8)).astype(np.float32) for _ in range(n)]


def triton_infer(
    client: triton.InferenceServerClient, batch: np.ndarray, **kwargs: object
) -> triton.InferResult:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=False)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=False)
        for name in ("label", "probabilities", "confidence")
    ]
    return client.infer(MODEL, [tensor], outputs=outputs, **kwargs)


def test_health_and_metadata_through_the_stock_client(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("broken")
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 8]}]
    assert client.get_server_metadata()["name"] == "neuroserve"


def test_stateless_infer_agrees_with_v1_predict(
    client: triton.InferenceServerClient, server_url: str
) -> None:
    batch = np.stack(chunks(3, steps=6, seed=1))  # [3, 6, 8]
    result = triton_infer(client, batch, request_id="r1")
    v1 = httpx.post(
        f"{server_url}/v1/models/{MODEL}/predict", json={"inputs": batch.tolist()}
    ).json()
    expected = v1["predictions"]
    assert result.get_response()["id"] == "r1"
    assert result.as_numpy("label").tolist() == [p["label"] for p in expected]  # JSON: str
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 10)
    np.testing.assert_allclose(
        probabilities, [p["probabilities"] for p in expected], rtol=0, atol=FP32_AGREEMENT
    )


@pytest.mark.parametrize("sequence_id", [4242, "trial-7"])
def test_a_triton_sequence_equals_the_same_chunks_through_v1_sessions(
    client: triton.InferenceServerClient, server_url: str, sequence_id: int | str
) -> None:
    pieces = chunks(4, seed=2)
    through_triton = []
    for i, piece in enumerate(pieces):
        result = triton_infer(
            client,
            piece[None],  # [1, T, 8]: one sequence per request
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        parameters = result.get_response()["parameters"]
        assert parameters == {"sequence_id": sequence_id, "sequence_step": 4 * (i + 1)}
        through_triton.append(result.as_numpy("probabilities")[0])

    with httpx.Client(base_url=server_url, timeout=30) as http:
        session = http.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
        through_sessions = [
            http.post(f"/v1/sessions/{session}/step", json={"inputs": piece.tolist()}).json()
            for piece in pieces
        ]
    assert [r["step"] for r in through_sessions] == [4, 8, 12, 16]
    np.testing.assert_allclose(
        np.stack(through_triton),
        [r["prediction"]["probabilities"] for r in through_sessions],
        rtol=0,
        atol=FP32_AGREEMENT,
    )
    # The sequence ended with its last request: continuing it is an error.
    with pytest.raises(InferenceServerException, match="no open sequence"):
        triton_infer(client, pieces[0][None], sequence_id=sequence_id)


def test_starting_an_open_sequence_again_is_refused(client: triton.InferenceServerClient) -> None:
    piece = chunks(1, seed=3)[0][None]
    triton_infer(client, piece, sequence_id=77, sequence_start=True)
    with pytest.raises(InferenceServerException) as refused:
        triton_infer(client, piece, sequence_id=77, sequence_start=True)
    assert refused.value.status() == "409"
    triton_infer(client, piece, sequence_id=77, sequence_end=True)  # closes it


def test_a_sequence_request_carries_one_sequence(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="one sequence"):
        triton_infer(client, np.stack(chunks(2)), sequence_id=5, sequence_start=True)
    # Refused before anything was created: the id is free to start.
    triton_infer(client, chunks(1)[0][None], sequence_id=5, sequence_start=True, sequence_end=True)
