"""Open Inference Protocol (KServe V2) over real HTTP: model metadata and readiness, stateless
inference agreeing with `/v1/.../predict`, the JSON tensor codec (flat and nested data, every
numeric datatype), output selection, the `never_empty` parameter and sets past the calibrated
horizon, and malformed requests that must each get a clean 400 `{"error": ...}` naming the
problem."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from models.digits import load_digits_seq
from service.api.v2_codec import V2BadRequestError, decode_tensor, encode_tensor
from service.api.v2_infer import OUTPUTS, encode_predictions, parse_parameters
from service.dataplane.predictions import ClassPrediction
from service.errors import NotCalibratedError
from tests.service.conftest import CHAR_VOCABULARY, DIGIT_LABELS, TEST_SETTINGS

# Probabilities travel as FP32: a float64 probability rounded to float32 moves by at most
# half an ulp, 2**-24 relative.
FP32_ROUNDING = 2.0**-24


def digit_like(n: int, steps: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, steps, 8)).astype(np.float64)


def features_tensor(values: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict:
    data = values.tolist() if nested else values.reshape(-1).tolist()
    return {"name": "input", "datatype": datatype, "shape": list(values.shape), "data": data}


def infer(client: httpx.Client, model: str, body: dict[str, Any], status: int = 200) -> dict:
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == status, response.text
    return response.json()


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in body["outputs"]}


@pytest.fixture(scope="module")
def builtin(builtin_server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=builtin_server_url, timeout=120) as http:
        yield http


# ---- metadata and readiness -----------------------------------------------------------------


def test_feature_model_metadata_lists_inputs_and_outputs_with_free_dims(
    client: httpx.Client,
) -> None:
    body = client.get("/v2/models/tiny-digits").json()
    assert body["name"] == "tiny-digits"
    assert body["versions"] == ["1", "2"]
    assert body["platform"] == "neuroserve_lru"
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 8]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in body["outputs"]}
    assert outputs == {
        "label": ("BYTES", [-1]),
        "confidence": ("FP32", [-1]),
        "probabilities": ("FP32", [-1, len(DIGIT_LABELS)]),
        "prediction_set": ("BOOL", [-1, len(DIGIT_LABELS)]),
        "entropy": ("FP32", [-1]),
        "prediction_id": ("BYTES", [-1]),
    }


def test_language_model_metadata_takes_bytes_prompts(client: httpx.Client) -> None:
    body = client.get("/v2/models/tiny-charlm/versions/1").json()
    assert body["inputs"] == [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}]
    shapes = {o["name"]: o["shape"] for o in body["outputs"]}
    assert shapes["probabilities"] == [-1, len(CHAR_VOCABULARY)]


def test_model_readiness(client: httpx.Client) -> None:
    assert client.get("/v2/models/tiny-digits/ready").json() == {
        "name": "tiny-digits",
        "version": "2",
        "ready": True,
    }
    assert client.get("/v2/models/tiny-digits/versions/1/ready").status_code == 200
    broken = client.get("/v2/models/broken/ready")
    assert broken.status_code == 503 and broken.json()["ready"] is False
    missing = client.get("/v2/models/nope/ready")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/tiny-digits/versions/9"])
def test_unknown_model_or_version_is_404_in_the_v2_format(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert isinstance(response.json()["error"], str)


# ---- stateless inference --------------------------------------------------------------------


def test_infer_agrees_with_v1_predict(client: httpx.Client) -> None:
    values = digit_like(5, seed=1)
    body = infer(client, "tiny-digits", {"id": "req-7", "inputs": [features_tensor(values)]})
    v1 = client.post("/v1/models/tiny-digits/predict", json={"inputs": values.tolist()}).json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny-digits", "2", "req-7")
    outputs = outputs_by_name(body)
    # Served without calibration (TEST_SETTINGS), so there is no set to encode.
    assert TEST_SETTINGS["allow_uncalibrated"] and set(outputs) == set(OUTPUTS) - {"prediction_set"}
    expected = v1["predictions"]
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [5],
        "data": [p["label"] for p in expected],
    }
    probabilities = outputs["probabilities"]
    assert (probabilities["datatype"], probabilities["shape"]) == ("FP32", [5, len(DIGIT_LABELS)])
    np.testing.assert_allclose(
        np.reshape(probabilities["data"], (5, -1)),
        [p["probabilities"] for p in expected],
        rtol=FP32_ROUNDING,
        atol=1e-7,  # generous beside float32 rounding: two runs of the same batch
    )
    np.testing.assert_allclose(
        outputs["confidence"]["data"], [p["confidence"] for p in expected], rtol=1e-6
    )
    np.testing.assert_allclose(
        outputs["entropy"]["data"], [p["entropy"] for p in expected], rtol=1e-6
    )
    ids = outputs["prediction_id"]["data"]
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)


def test_flat_and_nested_data_and_every_numeric_datatype_give_the_same_answer(
    client: httpx.Client,
) -> None:
    values = digit_like(3, seed=2)  # small integers: exact in every datatype below
    request = {"outputs": [{"name": "probabilities"}]}
    reference = infer(client, "tiny-digits", {**request, "inputs": [features_tensor(values)]})
    for datatype in ("FP16", "FP64", "INT8", "INT32", "INT64", "UINT8", "UINT64"):
        for nested in (False, True):
            tensor = features_tensor(values.astype(np.int64), datatype, nested)
            if datatype.startswith("FP"):
                tensor = features_tensor(values, datatype, nested)
            body = infer(client, "tiny-digits", {**request, "inputs": [tensor]})
            assert body["outputs"] == reference["outputs"], (datatype, nested)


def test_outputs_selection_is_honoured_in_request_order(client: httpx.Client) -> None:
    request = {
        "inputs": [features_tensor(digit_like(2))],
        "outputs": [
            {"name": "entropy", "parameters": {"binary_data": False}},
            {"name": "label"},
            {"name": "entropy"},
        ],
    }
    body = infer(client, "tiny-digits", request)
    assert [o["name"] for o in body["outputs"]] == ["entropy", "label"]
    assert "id" not in body and "parameters" not in body


def test_explicitly_requested_prediction_set_without_calibration_is_409(
    client: httpx.Client,
) -> None:
    request = {"inputs": [features_tensor(digit_like(1))], "outputs": [{"name": "prediction_set"}]}
    body = infer(client, "tiny-digits", request, status=409)
    assert "neuroserve calibrate tiny-digits" in body["error"]


def test_versioned_infer_runs_that_version(client: httpx.Client) -> None:
    tensor = features_tensor(digit_like(2, seed=3))
    request = {"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
    v1 = client.post("/v2/models/tiny-digits/versions/1/infer", json=request).json()
    v2 = client.post("/v2/models/tiny-digits/versions/2/infer", json=request).json()
    assert (v1["model_version"], v2["model_version"]) == ("1", "2")
    assert v1["outputs"] != v2["outputs"]  # differently seeded weights


def test_language_model_prompts_as_bytes(client: httpx.Client) -> None:
    prompts = ["the cat", "a dog, then"]
    for shape in ([2], [2, 1]):
        tensor = {"name": "prompt", "datatype": "BYTES", "shape": shape, "data": prompts}
        body = infer(client, "tiny-charlm", {"inputs": [tensor], "outputs": [{"name": "label"}]})
        v1 = client.post("/v1/models/tiny-charlm/predict", json={"inputs": prompts}).json()
        assert body["outputs"][0]["data"] == [p["label"] for p in v1["predictions"]]


def test_unknown_parameters_are_ignored_and_known_ones_checked(client: httpx.Client) -> None:
    tensor = features_tensor(digit_like(1))
    parameters = {"priority": 3, "timeout": 100, "binary_data_output": True, "x-custom": "y"}
    infer(client, "tiny-digits", {"inputs": [tensor], "parameters": parameters})
    body = infer(client, "tiny-digits", {"inputs": [tensor], "parameters": {"alpha": 1.5}}, 400)
    assert body["error"] == "parameters.alpha must be a number in the open interval (0, 1), got 1.5"


# ---- malformed requests ---------------------------------------------------------------------


def _tensor(**changes: Any) -> dict[str, Any]:
    tensor = features_tensor(digit_like(1, steps=2))
    tensor.update(changes)
    return tensor


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("wrong datatype", {"inputs": [_tensor(datatype="BYTES", data=["a"] * 16)]}, "datatype BYTES"),
    ("unknown datatype", {"inputs": [_tensor(datatype="FLOAT")]}, "not a V2 datatype"),
    ("data shorter than shape", {"inputs": [_tensor(data=[1.0] * 15)]}, "has 15 elements"),
    ("data longer than shape", {"inputs": [_tensor(shape=[1, 1, 8])]}, "has 16 elements"),
    (
        "nesting off the shape",
        {"inputs": [_tensor(data=[[[1.0] * 8, [2.0] * 7]])]},
        "dimension 2 should have 8",
    ),
    ("too deep", {"inputs": [_tensor(shape=[16], data=[[1.0]] * 16)]}, "nests deeper"),
    ("missing input", {"inputs": []}, "non-empty list"),
    (
        "never_empty not a bool",
        {"inputs": [_tensor()], "parameters": {"never_empty": "yes"}},
        "never_empty must be true or false",
    ),
    ("no inputs key", {"outputs": [{"name": "label"}]}, "inputs"),
    ("wrong input name", {"inputs": [_tensor(name="features")]}, "one input named 'input'"),
    ("two inputs", {"inputs": [_tensor(), _tensor()]}, "exactly one input"),
    ("string element", {"inputs": [_tensor(data=["1"] + [1.0] * 15)]}, "element 0 is '1'"),
    ("bool element", {"inputs": [_tensor(data=[True] + [1.0] * 15)]}, "element 0 is True"),
    ("float in INT", {"inputs": [_tensor(datatype="INT32", data=[1.5] * 16)]}, "integers"),
    ("INT8 overflow", {"inputs": [_tensor(datatype="INT8", data=[128] * 16)]}, "does not fit INT8"),
    ("FP32 overflow", {"inputs": [_tensor(data=[1e39] + [0.0] * 15)]}, "outside the FP32 range"),
    ("zero dimension", {"inputs": [_tensor(shape=[0, 2, 8], data=[])]}, "positive integers"),
    ("free dimension", {"inputs": [_tensor(shape=[-1, 2, 8])]}, "positive integers"),
    ("2-D features", {"inputs": [_tensor(shape=[2, 8])]}, "takes [N, T, 8]"),
    ("wrong feature count", {"inputs": [_tensor(shape=[1, 4, 4])]}, "takes [N, T, 8]"),
    ("data not a list", {"inputs": [_tensor(data=3.0)]}, "data"),
    ("unknown output", {"inputs": [_tensor()], "outputs": [{"name": "logits"}]}, "'logits'"),
    ("too many sequences", {"inputs": [features_tensor(digit_like(9))]}, "limit is 8"),
    (
        "sequence end without id",
        {"inputs": [_tensor()], "parameters": {"sequence_end": True}},
        "sequence_id",
    ),
    (
        "bool sequence id",
        {"inputs": [_tensor()], "parameters": {"sequence_id": True}},
        "integer or a string",
    ),
]


@pytest.mark.parametrize(
    ("body", "mentions"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_requests_are_400_with_a_message(
    client: httpx.Client, body: dict[str, Any], mentions: str
) -> None:
    response = client.post("/v2/models/tiny-digits/infer", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and mentions in error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(client: httpx.Client, literal: str) -> None:
    data = ", ".join([literal] + ["1.0"] * 15)
    tensor = f'{{"name": "input", "datatype": "FP32", "shape": [1, 2, 8], "data": [{data}]}}'
    raw = f'{{"inputs": [{tensor}]}}'
    response = client.post(
        "/v2/models/tiny-digits/infer", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "finite" in response.json()["error"]


def test_invalid_json_and_binary_extension_are_400(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    bad = client.post("/v2/models/tiny-digits/infer", content=b'{"inputs": [', headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    body = json.dumps({"inputs": [_tensor()]}).encode()
    binary = client.post(
        "/v2/models/tiny-digits/infer",
        content=body,
        headers={**headers, "Inference-Header-Content-Length": str(len(body))},
    )
    assert binary.status_code == 400 and "binary_data=False" in binary.json()["error"]


def test_prompt_with_characters_outside_the_vocabulary_is_400(client: httpx.Client) -> None:
    tensor = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["ABC"]}
    body = infer(client, "tiny-charlm", {"inputs": [tensor]}, status=400)
    assert "outside the model's vocabulary" in body["error"]


def test_unknown_model_in_infer_is_404(client: httpx.Client) -> None:
    body = infer(client, "nope", {"inputs": [_tensor()]}, status=404)
    assert "nope" in body["error"]


# ---- codec and encoder units ----------------------------------------------------------------


def test_decoding_checks_integer_ranges_at_both_ends() -> None:
    top = decode_tensor({"name": "x", "datatype": "UINT64", "shape": [1], "data": [2**64 - 1]}, "t")
    assert int(top.values[0]) == 2**64 - 1
    for value in (-1, 2**64):
        with pytest.raises(V2BadRequestError, match="does not fit UINT64"):
            decode_tensor({"name": "x", "datatype": "UINT64", "shape": [1], "data": [value]}, "t")
    with pytest.raises(V2BadRequestError, match="outside the FP16 range"):
        decode_tensor({"name": "x", "datatype": "FP16", "shape": [1], "data": [70000.0]}, "t")


def test_bool_and_bytes_round_trip_through_the_codec() -> None:
    mask = np.array([[True, False, True], [False, False, True]])
    encoded = encode_tensor("m", "BOOL", mask)
    assert encoded == {
        "name": "m",
        "datatype": "BOOL",
        "shape": [2, 3],
        "data": [True, False, True, False, False, True],
    }
    decoded = decode_tensor(encoded, "t")
    np.testing.assert_array_equal(decoded.values, mask)
    text = decode_tensor(encode_tensor("s", "BYTES", ["a", "bc"]), "t")
    assert text.values == ["a", "bc"] and text.shape == (2,)


def test_fp32_encoding_carries_the_float32_value() -> None:
    value = 0.1  # not representable: the wire carries float32(0.1) exactly
    (sent,) = encode_tensor("p", "FP32", [value])["data"]
    assert sent == float(np.float32(value)) and sent != value


def _prediction(id: str, label: str, index: int, probabilities: list[float], members=None):
    """A prediction with a set (calibrated) or, when `members` is None, without one."""
    return ClassPrediction(
        id=id,
        label=label,
        index=index,
        confidence=max(probabilities),
        probabilities=probabilities,
        entropy=1.0,
        calibrated=members is not None,
        position=8,
        prediction_set=members,
        set_size=None if members is None else len(members),
        note=None if members is not None else "position 8 lies past the calibration",
    )


def test_prediction_sets_encode_as_label_membership_masks() -> None:
    labels = ["a", "b", "c", "d"]
    predictions = [
        _prediction("i0", "b", 1, [0.1, 0.5, 0.3, 0.1], ["b", "c"]),
        _prediction("i1", "d", 3, [0.0, 0.05, 0.05, 0.9], ["d"]),
    ]
    (tensor,) = encode_predictions(predictions, labels, ["prediction_set"], True, str)
    assert tensor["shape"] == [2, 4]
    assert tensor["data"] == [False, True, True, False, False, False, False, True]


def test_a_row_without_a_set_drops_the_default_set_output_and_refuses_an_explicit_one() -> None:
    """An uncalibrated row has no set: left out of a default response, 409 naming the reason
    when asked for by name."""
    labels = ["a", "b"]
    predictions = [
        _prediction("i0", "a", 0, [0.6, 0.4], ["a"]),
        _prediction("i1", "b", 1, [0.3, 0.7]),
    ]
    tensors = encode_predictions(predictions, labels, ["label", "prediction_set"], False, str)
    assert [tensor["name"] for tensor in tensors] == ["label"]
    with pytest.raises(NotCalibratedError, match="no prediction_set: position 8 lies past"):
        encode_predictions(predictions, labels, ["prediction_set"], True, str)


def test_sequence_parameters_follow_tritons_conventions() -> None:
    assert parse_parameters({"sequence_id": 0}).sequence_id is None
    assert parse_parameters({"sequence_id": ""}).sequence_id is None
    started = parse_parameters({"sequence_id": "abc", "sequence_start": True})
    assert (started.sequence_id, started.sequence_start, started.sequence_end) == (
        "abc",
        True,
        False,
    )
    for bad in ({"sequence_id": "a b"}, {"sequence_id": -1}, {"sequence_start": "yes"}):
        with pytest.raises(V2BadRequestError):
            parse_parameters(bad)


def test_backend_and_score_parameters_are_checked(client: httpx.Client) -> None:
    tensor = features_tensor(digit_like(1))
    unknown = infer(
        client, "tiny-digits", {"inputs": [tensor], "parameters": {"backend": "gpu9"}}, 400
    )
    assert "gpu9" in unknown["error"]
    score = infer(client, "tiny-digits", {"inputs": [tensor], "parameters": {"score": "best"}}, 400)
    assert "best" in score["error"]


def test_a_language_model_sequence_continues_its_prompt(client: httpx.Client) -> None:
    def prompt(text: str, **parameters: Any) -> dict[str, Any]:
        tensor = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [text]}
        request = {"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
        return infer(client, "tiny-charlm", {**request, "parameters": parameters})

    prompt("the ", sequence_id="lm-1", sequence_start=True)
    chunked = prompt("cat", sequence_id="lm-1", sequence_end=True)
    whole = prompt("the cat")
    assert chunked["parameters"] == {"sequence_id": "lm-1", "sequence_step": 7}
    np.testing.assert_allclose(
        chunked["outputs"][0]["data"], whole["outputs"][0]["data"], rtol=0, atol=1e-6
    )


# ---- calibrated sets of the built-in models -------------------------------------------------


def test_never_empty_parameter_and_sets_past_the_horizon(builtin: httpx.Client) -> None:
    """V2 sets are never empty unless `never_empty: false`; nine rows lie past the calibrated
    eight, so no set is served for them (409 when asked for by name)."""
    images = load_digits_seq("test").inputs[:64].numpy().astype(np.float64)  # [64, 8, 8]
    outputs = [{"name": "label"}, {"name": "prediction_set"}]

    def label_and_sets(values: np.ndarray, status: int = 200, **parameters: Any):
        request = {
            "inputs": [features_tensor(values)],
            "parameters": {"score": "lac", "alpha": 0.2, **parameters},
            "outputs": outputs,
        }
        body = infer(builtin, "digits-lru", request, status)
        if status != 200:
            return body
        named = outputs_by_name(body)
        masks = np.reshape(named["prediction_set"]["data"], (len(values), len(DIGIT_LABELS)))
        return named["label"]["data"], [[str(d) for d in np.flatnonzero(row)] for row in masks]

    labels, plain = label_and_sets(images, never_empty=False)
    assert any(members == [] for members in plain)  # a 98%-accurate model at alpha 0.2
    _, default = label_and_sets(images)
    assert default == [members or [label] for label, members in zip(labels, plain, strict=True)]

    nine = np.concatenate([images[:2], images[:2, -1:]], axis=1)  # [2, 9, 8]
    refused = label_and_sets(nine, status=409)
    assert "no prediction_set: position 9 lies past the 8 steps" in refused["error"]
    unasked = infer(builtin, "digits-lru", {"inputs": [features_tensor(nine)]})
    assert "prediction_set" not in outputs_by_name(unasked)
