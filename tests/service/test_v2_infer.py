"""Open Inference Protocol (KServe V2) over real HTTP: model metadata and readiness, stateless
inference agreeing with `/v1/.../predict`, the JSON tensor codec (flat and nested data, every
numeric datatype), the binary tensor data extension built by hand (framing, every datatype,
malformed binary bodies), output selection, the parameters (unknown ones refused), sets past
the calibrated horizon, and malformed requests that must each get a clean 400
`{"error": ...}` naming the problem."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from models.digits import load_digits_seq
from service.api.v2_codec import (
    BINARY_HEADER,
    V2BadRequestError,
    decode_raw_tensor,
    decode_tensor,
    encode_tensor,
    float32_list,
    json_tensor,
    listed_tensor,
    output_tensor,
    tensor_bytes,
)
from service.api.v2_infer import OUTPUTS, SET_OUTPUTS, prediction_outputs
from service.api.v2_parameters import KNOWN_PARAMETERS, parse_parameters
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
        "set_size": ("INT32", [-1]),
        "abstain": ("BOOL", [-1]),
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
    assert TEST_SETTINGS["allow_uncalibrated"] and set(outputs) == set(OUTPUTS) - set(SET_OUTPUTS)
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


def test_bool_features_are_zeros_and_ones(client: httpx.Client) -> None:
    spikes = np.random.default_rng(3).random((2, 5, 8)) < 0.3  # [2, 5, 8] spike trains
    request = {"outputs": [{"name": "probabilities"}]}
    as_bool = {"name": "input", "datatype": "BOOL", "shape": [2, 5, 8]}
    as_bool["data"] = spikes.reshape(-1).tolist()
    as_float = features_tensor(spikes.astype(np.float64))
    body = infer(client, "tiny-digits", {**request, "inputs": [as_bool]})
    assert (
        body["outputs"]
        == infer(client, "tiny-digits", {**request, "inputs": [as_float]})["outputs"]
    )


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
    assert "id" not in body
    # The only response parameter of a stateless answer: why it carries no guarantee.
    assert list(body["parameters"]) == ["warnings"]
    assert "is not calibrated" in body["parameters"]["warnings"]


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


def test_unknown_and_unsupported_parameters_are_refused_by_name(client: httpx.Client) -> None:
    tensor = features_tensor(digit_like(1))

    def refused(parameters: dict[str, Any]) -> str:
        return infer(client, "tiny-digits", {"inputs": [tensor], "parameters": parameters}, 400)[
            "error"
        ]

    misspelt = refused({"alpah": 0.1})
    assert misspelt.startswith("unknown parameter 'alpah' (did you mean 'alpha'?); known")
    assert "max_set_size" in misspelt and "class_conditional" in misspelt
    assert "unknown parameter 'x-custom'" in refused({"x-custom": "y"})
    assert "no request priorities" in refused({"priority": 3})
    assert "parameters.timeout is not supported" in refused({"timeout": 100})
    assert refused({"alpha": 1.5}) == (
        "parameters.alpha must be a number in the open interval (0, 1), got 1.5"
    )
    assert "apply to sequences only" in refused({"ttl_seconds": 5})
    assert "max_set_size must be an integer >= 0" in refused({"max_set_size": -1})
    assert "apply to sequences only" in refused({"return_steps": True})
    assert "backend_options must be an object" in refused({"backend_options": [1]})
    # JSON-encoded booleans and a null parameter are fine; binary_data_output is known.
    infer(client, "tiny-digits", {"inputs": [tensor], "parameters": {"seed": 3, "alpha": None}})


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


def test_invalid_json_is_400(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    bad = client.post("/v2/models/tiny-digits/infer", content=b'{"inputs": [', headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]


# ---- the binary tensor data extension, built by hand ----------------------------------------


def binary_request(
    body: dict[str, Any], tensors: list[bytes], header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(body).encode()
    length = len(head) if header_length is None else header_length
    # Labelled JSON as some clients do: the JSON fast path must leave framed bodies alone.
    headers = {BINARY_HEADER: str(length), "Content-Type": "application/json"}
    return head + b"".join(tensors), headers


def split_binary_answer(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON part of a binary answer and each binary output's bytes."""
    length = int(response.headers[BINARY_HEADER])
    head = json.loads(response.content[:length])
    raw, offset = {}, length
    for output in head["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw[output["name"]] = response.content[offset : offset + size]
            offset += size
    assert offset == len(response.content)
    return head, raw


def test_binary_inputs_of_every_numeric_datatype_agree_with_json(client: httpx.Client) -> None:
    values = digit_like(2, seed=7)  # small integers: exact in every datatype
    request = {"outputs": [{"name": "probabilities"}]}
    reference = infer(client, "tiny-digits", {**request, "inputs": [features_tensor(values)]})
    for datatype, dtype in (
        ("FP16", "<f2"),
        ("FP32", "<f4"),
        ("FP64", "<f8"),
        ("INT8", "i1"),
        ("INT16", "<i2"),
        ("INT32", "<i4"),
        ("INT64", "<i8"),
        ("UINT8", "u1"),
        ("UINT32", "<u4"),
        ("UINT64", "<u8"),
        ("BF16", None),
    ):
        if dtype is None:  # bfloat16: the top 16 bits of float32 (exact for small integers)
            raw = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            raw = values.astype(dtype).tobytes()
        tensor = {"name": "input", "datatype": datatype, "shape": list(values.shape)}
        tensor["parameters"] = {"binary_data_size": len(raw)}
        content, headers = binary_request({**request, "inputs": [tensor]}, [raw])
        response = client.post("/v2/models/tiny-digits/infer", content=content, headers=headers)
        assert response.status_code == 200, (datatype, response.text)
        assert BINARY_HEADER not in response.headers  # JSON outputs were asked for
        assert response.json()["outputs"] == reference["outputs"], datatype


def test_binary_outputs_carry_the_json_values_bit_for_bit(client: httpx.Client) -> None:
    values = digit_like(3, seed=8)
    names = ["label", "probabilities", "confidence", "entropy", "prediction_id"]
    as_json = infer(
        client,
        "tiny-digits",
        {"inputs": [features_tensor(values)], "outputs": [{"name": n} for n in names]},
    )
    # Mixed: every output binary by default, entropy asked for as JSON by name.
    outputs = [{"name": n} for n in names if n != "entropy"]
    outputs.append({"name": "entropy", "parameters": {"binary_data": False}})
    response = client.post(
        "/v2/models/tiny-digits/infer",
        json={
            "inputs": [features_tensor(values)],
            "parameters": {"binary_data_output": True},
            "outputs": outputs,
        },
    )
    assert response.status_code == 200 and response.headers["content-type"] == (
        "application/octet-stream"
    )
    head, raw = split_binary_answer(response)
    reference = outputs_by_name(as_json)
    assert outputs_by_name(head)["entropy"] == reference["entropy"]
    decoded = {
        name: decode_raw_tensor(name, reference[name]["datatype"], entry["shape"], raw[name], name)
        for name, entry in outputs_by_name(head).items()
        if name in raw
    }
    assert set(decoded) == {"label", "probabilities", "confidence", "prediction_id"}
    assert decoded["label"].values == reference["label"]["data"]
    probabilities = np.frombuffer(raw["probabilities"], "<f4")
    assert probabilities.tolist() == reference["probabilities"]["data"]  # float32 both ways
    assert np.frombuffer(raw["confidence"], "<f4").tolist() == reference["confidence"]["data"]
    assert len(set(decoded["prediction_id"].values)) == 3  # fresh ids, well framed


def test_binary_prompts_as_bytes_elements(client: httpx.Client) -> None:
    prompts = ["the cat", "a dog, then"]
    raw = b"".join(len(p).to_bytes(4, "little") + p.encode() for p in prompts)
    tensor = {"name": "prompt", "datatype": "BYTES", "shape": [2]}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    content, headers = binary_request({"inputs": [tensor], "outputs": [{"name": "label"}]}, [raw])
    response = client.post("/v2/models/tiny-charlm/infer", content=content, headers=headers)
    v1 = client.post("/v1/models/tiny-charlm/predict", json={"inputs": prompts}).json()
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [p["label"] for p in v1["predictions"]]


def _binary_input(raw: bytes, size: int | None = None, datatype: str = "FP32") -> dict:
    tensor = {"name": "input", "datatype": datatype, "shape": [1, 2, 8]}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    return tensor


_SIXTEEN = np.arange(16, dtype="<f4").tobytes()
MALFORMED_BINARY: list[tuple[str, dict[str, Any], list[bytes], int | None, str]] = [
    (
        "too few bytes",
        {"inputs": [_binary_input(_SIXTEEN[:-4])]},
        [_SIXTEEN[:-4]],
        None,
        "needs 64",
    ),
    ("size past the body", {"inputs": [_binary_input(_SIXTEEN, 80)]}, [_SIXTEEN], None, "only 64"),
    (
        "bytes nobody claims",
        {"inputs": [_binary_input(_SIXTEEN)]},
        [_SIXTEEN, b"xx"],
        None,
        "2 bytes of binary data that no input",
    ),
    ("header past the body", {"inputs": [_binary_input(_SIXTEEN)]}, [_SIXTEEN], 10**6, "between 0"),
    (
        "data and binary",
        {"inputs": [{**_binary_input(_SIXTEEN), "data": [0.0] * 16}]},
        [_SIXTEEN],
        None,
        "both data and parameters.binary_data_size",
    ),
    (
        "NaN",
        {"inputs": [_binary_input(np.full(16, np.nan, "<f4").tobytes())]},
        [np.full(16, np.nan, "<f4").tobytes()],
        None,
        "finite",
    ),
    (
        "BOOL byte 2",
        {"inputs": [_binary_input(bytes([2] * 16), datatype="BOOL")]},
        [bytes([2] * 16)],
        None,
        "BOOL bytes are 0 or 1",
    ),
    (
        "shared memory",
        {"inputs": [{**_binary_input(_SIXTEEN), "parameters": {"shared_memory_region": "r"}}]},
        [],
        None,
        "shared memory is not offered",
    ),
    (
        "classification output",
        {
            "inputs": [_binary_input(_SIXTEEN)],
            "outputs": [{"name": "label", "parameters": {"classification": 3}}],
        },
        [_SIXTEEN],
        None,
        "classification extension is not offered",
    ),
]


@pytest.mark.parametrize(
    ("body", "tensors", "header_length", "mentions"),
    [case[1:] for case in MALFORMED_BINARY],
    ids=[case[0] for case in MALFORMED_BINARY],
)
def test_malformed_binary_requests_are_400_with_a_message(
    client: httpx.Client,
    body: dict[str, Any],
    tensors: list[bytes],
    header_length: int | None,
    mentions: str,
) -> None:
    content, headers = binary_request(body, tensors, header_length)
    response = client.post("/v2/models/tiny-digits/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert mentions in response.json()["error"]


def test_binary_bytes_elements_are_checked() -> None:
    with pytest.raises(V2BadRequestError, match="claims 9 bytes"):
        decode_raw_tensor("p", "BYTES", [1], (9).to_bytes(4, "little") + b"abc", "t")
    with pytest.raises(V2BadRequestError, match="not UTF-8 text"):
        decode_raw_tensor("p", "BYTES", [1], (2).to_bytes(4, "little") + b"\xff\xfe", "t")
    with pytest.raises(V2BadRequestError, match="ends after 1 of 2"):
        decode_raw_tensor("p", "BYTES", [2], (1).to_bytes(4, "little") + b"a", "t")
    tensor = output_tensor("s", "BYTES", ["é", ""])
    assert decode_raw_tensor("s", "BYTES", [2], tensor_bytes(tensor), "t").values == ["é", ""]


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


def test_listed_tensors_carry_what_numpy_tensors_carry() -> None:
    rng = np.random.default_rng(0)
    floats = [*rng.normal(size=200).tolist(), 0.1, 1 / 3, 0.0, -0.0, 1e-45, 3.4e38]
    assert float32_list(floats) == np.asarray(floats, dtype=np.float32).tolist()
    cases = [
        ("FP32", [0.1, 0.25, 1 / 3, 0.7], (2, 2)),
        ("BOOL", [True, False, False, True], (2, 2)),
        ("INT32", [0, 3, -7], None),
        ("BYTES", ["a", "é"], None),
    ]
    for datatype, values, dims in cases:
        listed = listed_tensor("x", datatype, values, dims)
        array = np.asarray(values, dtype=object if datatype == "BYTES" else None)
        reference = output_tensor("x", datatype, array.reshape(dims) if dims else values)
        assert listed.shape == reference.shape
        assert json_tensor(listed) == json_tensor(reference)
        assert tensor_bytes(listed) == tensor_bytes(reference)
    with pytest.raises(ValueError, match="do not fill shape"):
        listed_tensor("x", "BOOL", [True] * 3, (2, 2))


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
    tensors = prediction_outputs(predictions, labels, ["prediction_set", "set_size"], True, str)
    mask, sizes = (json_tensor(tensor) for tensor in tensors)
    assert mask["shape"] == [2, 4]
    assert mask["data"] == [False, True, True, False, False, False, False, True]
    assert sizes == {"name": "set_size", "datatype": "INT32", "shape": [2], "data": [2, 1]}


def test_a_row_without_a_set_drops_the_default_set_output_and_refuses_an_explicit_one() -> None:
    """An uncalibrated row has no set: left out of a default response, 409 naming the reason
    when asked for by name."""
    labels = ["a", "b"]
    predictions = [
        _prediction("i0", "a", 0, [0.6, 0.4], ["a"]),
        _prediction("i1", "b", 1, [0.3, 0.7]),
    ]
    requested = ["label", "prediction_set", "abstain"]
    tensors = prediction_outputs(predictions, labels, requested, False, str)
    assert [tensor.name for tensor in tensors] == ["label"]
    for name in SET_OUTPUTS:
        with pytest.raises(NotCalibratedError, match="no prediction_set: position 8 lies past"):
            prediction_outputs(predictions, labels, [name], True, str)


def test_no_parameters_parse_as_the_full_check_of_empty_ones_does() -> None:
    checked = parse_parameters({"alpha": None, "sequence_id": 0})  # the whole check, all unset
    assert parse_parameters(None) == parse_parameters({}) == checked


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
    assert "is not calibrated" in chunked["parameters"].pop("warnings")  # test models
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


def test_the_v2_docs_list_every_parameter_and_output() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "V2_PROTOCOL.md").read_text()
    for name in KNOWN_PARAMETERS:
        assert f"| `{name}` |" in doc, name
    for name in OUTPUTS:
        assert f"| `{name}` |" in doc, name


def test_parameters_from_grpc_shaped_values() -> None:
    """gRPC's InferParameter holds bool, int, float or str: backend_options as JSON text."""
    parsed = parse_parameters(
        {"alpha": 0.2, "max_set_size": 2, "backend_options": '{"t_inference": 60}', "seed": "x"}
    )
    assert (parsed.alpha, parsed.max_set_size, parsed.backend_options, parsed.seed) == (
        0.2,
        2,
        {"t_inference": 60},
        "x",
    )
    with pytest.raises(V2BadRequestError, match="not a JSON object"):
        parse_parameters({"backend_options": "{t_inference"})


BINARY_TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "prompt"]),
        "datatype": st.sampled_from(["FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES"]),
        "shape": st.lists(st.integers(1, 9), min_size=1, max_size=3),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 300)}),
    }
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
@given(
    tensors=st.lists(BINARY_TENSORS, min_size=1, max_size=2),
    tail=st.binary(max_size=300),
    header_shift=st.integers(-3, 3),
    model=st.sampled_from(["tiny-digits", "tiny-charlm"]),
)
def test_any_binary_body_is_answered_or_a_clean_400(
    server_url: str, tensors: list[dict], tail: bytes, header_shift: int, model: str
) -> None:
    """Random binary tensors, tails and header lengths: 200, or 4xx in the V2 format."""
    head = json.dumps({"inputs": tensors}).encode()
    response = httpx.post(
        f"{server_url}/v2/models/{model}/infer",
        content=head + tail,
        headers={BINARY_HEADER: str(len(head) + header_shift)},
        timeout=60,
    )
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500 and isinstance(response.json()["error"], str)
