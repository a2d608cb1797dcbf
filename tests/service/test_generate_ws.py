"""Token generation over a real websocket (`websockets` client against a real uvicorn server)
and its REST twin: the stream's messages, agreement with an in-process reference of honest
sampling (each token drawn from the very distribution the server reports, calibrated at its
own context length), resuming a session, stop strings, the abstain guard on the conformal set,
bad first messages, and a client that disconnects mid-stream.

The server here serves a character LRU calibrated per context-length bucket on the torch
backend (1, 2-3, 4-7, 8-15, 16-32: the horizon is 32, so a long enough generation walks past
it into uncalibrated answers) with a 5 ms batching window, which makes every step take a few
milliseconds: long enough for a disconnect to land mid-stream.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from calibration import PositionalCalibration, PositionBuckets, fit_positional_calibration
from models.repository import ModelRepository
from service.app import create_app
from service.dataplane.calibration_store import CalibrationStore
from service.sessions.generation import (
    sample_token,
    sampling_probabilities,
    stop_reached,
    sum_usage,
)
from service.settings import Settings
from tests.service.conftest import CHAR_VOCABULARY, publish_lru, running_server

MODEL = "tiny-charlm"
MAX_STEPS = 256  # max_sequence_length of this server: the longest prompt and max_tokens
BUCKETS = PositionBuckets.doubling(32)  # context lengths 1, 2-3, 4-7, 8-15, 16-32
HORIZON = BUCKETS.horizon


def calibrate_on_random_text(repository: ModelRepository, name: str, seed: int = 0) -> None:
    """Fit and store a torch calibration per context-length bucket from the model's next-token
    logits on random text (an untrained model: any labelled data calibrates it): each of 300
    random sequences gives one example per bucket, read at a random length within it."""
    model = repository.load(name).model
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, len(CHAR_VOCABULARY), (300, HORIZON + 1), generator=generator)
    with torch.inference_mode():
        logits, _ = model(tokens[:, :-1])  # [300, 32, C]: context length p reads [:, p - 1]
    rows = torch.arange(tokens.shape[0])
    lengths = [
        torch.randint(low, high + 1, rows.shape, generator=generator)  # [300]
        for low, high in (BUCKETS.bounds(k) for k in range(len(BUCKETS)))
    ]
    positional = fit_positional_calibration(
        [logits[rows, at - 1] for at in lengths],
        [tokens[rows, at] for at in lengths],
        BUCKETS,
        name,
        "1",
        "torch",
    )
    CalibrationStore(repository).save(positional, source={"data": "random text (test)"})


@pytest.fixture(scope="module")
def lm_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("lm-repository"))
    publish_lru(repository, MODEL, seed=3, task="language-model")
    publish_lru(repository, "tiny-digits", seed=1)
    calibrate_on_random_text(repository, MODEL)
    return repository


@pytest.fixture(scope="module")
def lm_url(lm_repository: ModelRepository) -> Iterator[str]:
    settings = Settings(
        model_repository=lm_repository.root,
        max_sequence_length=MAX_STEPS,
        allow_uncalibrated=False,
        batch_window_ms=5.0,
    )
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture
def http(lm_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lm_url, timeout=30) as client:
        yield client


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1) + "/v1/generate"


def stream(base_url: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message of one generation, in order (the last is `done` or `error`)."""
    with connect(ws_url(base_url)) as websocket:
        websocket.send(json.dumps(request))
        return [json.loads(message) for message in websocket]


def generated(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    *tokens, done = messages
    assert done["type"] == "done", done
    assert all(m["type"] == "token" for m in tokens)
    return tokens, done


def reference_tokens(
    repository: ModelRepository, prompt: str, n: int, temperature: float, seed: int, alpha: float
) -> list[dict[str, Any]]:
    """Honest sampling in process: the model is stepped one token at a time; at context length
    p the last logits are calibrated with bucket p's calibration (the raw softmax past the
    horizon, and no set), the LAC set is built at `alpha`, and the token is drawn with
    `sample_token` from a generator seeded like the server's."""
    model = repository.load(MODEL).model
    stored = CalibrationStore(repository).get(MODEL, "1", "torch")
    assert stored is not None
    positional: PositionalCalibration = stored.positional
    generator = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    tokens = []
    with torch.inference_mode():
        for char in prompt:
            logits, state = model.step(torch.tensor([CHAR_VOCABULARY.index(char)]), state)
        for position in range(len(prompt), len(prompt) + n):
            artifact = positional.at(position)
            last = logits.double()  # [1, C]
            if artifact is None:
                probs, members = torch.softmax(last, dim=-1)[0], None  # [C]
            else:
                probs = artifact.calibrate(last)[0]  # [C]
                members = artifact.predict(last, alpha, "lac", never_empty=True)[1][0]  # [C]
            token_id, sampling_probability = sample_token(probs.tolist(), temperature, generator)
            tokens.append(
                {
                    "token": CHAR_VOCABULARY[token_id],
                    "probability": float(probs[token_id]),
                    "sampling_probability": sampling_probability,
                    "in_set": None if members is None else bool(members[token_id]),
                    "calibrated": artifact is not None,
                    "position": position,
                }
            )
            logits, state = model.step(torch.tensor([token_id]), state)
    return tokens


# ---- the stream -----------------------------------------------------------------------------


def test_stream_sends_one_message_per_token_then_done(lm_url: str, http: httpx.Client) -> None:
    prompt = "the cat sat"
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "seed": 5, "alpha": 0.2}
    tokens, done = generated(stream(lm_url, request))
    assert [t["index"] for t in tokens] == list(range(12))
    assert done["finish_reason"] == "length" and done["tokens"] == 12
    assert done["text"] == "".join(t["token"] for t in tokens)
    assert (done["model"], done["version"], done["backend"], done["seed"]) == (
        MODEL,
        "1",
        "torch",
        "5",
    )
    assert done["step"] == len(prompt) + 12  # the prompt and every generated token
    assert done["usage"]["steps"] == len(prompt) + 12
    assert done["calibrated"] and done["uncalibrated_tokens"] == 0 and done["warnings"] == []
    assert http.get(f"/v1/sessions/{done['session_id']}").json()["step"] == done["step"]
    max_entropy = math.log(len(CHAR_VOCABULARY))
    for index, token in enumerate(tokens):
        assert CHAR_VOCABULARY[token["token_id"]] == token["token"]
        assert 0.0 < token["probability"] <= token["top_probability"] <= 1.0
        assert 0.0 < token["entropy"] <= max_entropy + 1e-9
        assert token["set_size"] == len(token["prediction_set"]) >= 1
        assert set(token["prediction_set"]) <= set(CHAR_VOCABULARY)
        assert token["in_set"] == (token["token"] in token["prediction_set"])
        assert token["calibrated"] and token["position"] == len(prompt) + index
        assert len(token["id"]) == 32


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_tokens_equal_an_in_process_reference_of_honest_sampling(
    lm_url: str, lm_repository: ModelRepository, temperature: float
) -> None:
    prompt = "a quick brown fox"  # 17 characters: 20 tokens are answered at positions 17-36
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": temperature}
    tokens, done = generated(stream(lm_url, {**request, "seed": 11, "alpha": 0.2}))
    expected = reference_tokens(lm_repository, prompt, 20, temperature, seed=11, alpha=0.2)
    assert done["text"] == "".join(t["token"] for t in expected)
    for served, reference in zip(tokens, expected, strict=True):
        where = f"token {served['index']} at position {reference['position']}"
        assert served["position"] == reference["position"], where
        assert served["calibrated"] == reference["calibrated"], where
        assert served["in_set"] == reference["in_set"], where
        # The prompt is one chunk on the server and single steps here: float32 rounding only.
        for key in ("probability", "sampling_probability"):
            assert served[key] == pytest.approx(reference[key], rel=1e-5), (where, key)
    past_horizon = len(prompt) + 20 - 1 - HORIZON  # positions 33-36
    assert done["uncalibrated_tokens"] == past_horizon and not done["calibrated"]
    assert sum(not t["calibrated"] for t in tokens) == past_horizon
    assert any(f"past the {HORIZON} steps" in warning for warning in done["warnings"])


def test_a_second_prompt_in_the_same_session_continues_the_first(
    lm_url: str, http: httpx.Client
) -> None:
    first, second = "the dog", ", then the"
    _, done_a = generated(
        stream(lm_url, {"model": MODEL, "prompt": first, "max_tokens": 9, "seed": 1})
    )
    resumed = {"model": MODEL, "prompt": second, "max_tokens": 9, "seed": 2}
    _, done_b = generated(stream(lm_url, {**resumed, "session_id": done_a["session_id"]}))
    assert done_b["session_id"] == done_a["session_id"]
    one_run = {**resumed, "prompt": first + done_a["text"] + second}
    _, done_once = generated(stream(lm_url, one_run))
    assert done_b["text"] == done_once["text"]
    assert done_b["step"] == done_once["step"] == len(one_run["prompt"]) + 9


def test_rest_twin_returns_what_the_stream_sends(lm_url: str, http: httpx.Client) -> None:
    request = {"prompt": "it was", "max_tokens": 7, "seed": 9, "temperature": 0.9}
    tokens, done = generated(stream(lm_url, {"model": MODEL, **request}))
    body = http.post(f"/v1/models/{MODEL}/generate", json=request).json()
    assert body["text"] == done["text"] and body["finish_reason"] == "length"

    def without_id(token: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in token.items() if key != "id"}

    assert [without_id(t) for t in body["tokens"]] == [without_id(t) for t in tokens]
    assert body["step"] == done["step"] and body["session_id"] != done["session_id"]
    assert (body["seed"], body["calibrated"], body["usage"]["steps"]) == (
        done["seed"],
        done["calibrated"],
        done["usage"]["steps"],
    )


def test_unseeded_requests_report_the_seed_that_reproduces_them(lm_url: str) -> None:
    request = {"model": MODEL, "prompt": "so", "max_tokens": 10}
    _, done = generated(stream(lm_url, request))
    assert isinstance(done["seed"], str) and 0 <= int(done["seed"]) < 2**63
    _, again = generated(stream(lm_url, {**request, "seed": done["seed"]}))
    assert again["text"] == done["text"]


# ---- finishing early ------------------------------------------------------------------------


def test_stop_string_ends_generation_once_produced(lm_url: str) -> None:
    request = {"model": MODEL, "prompt": "we had", "max_tokens": 30, "seed": 4}
    _, full = generated(stream(lm_url, request))
    stop = full["text"][4:6]
    expected = full["text"][: full["text"].index(stop) + len(stop)]
    tokens, done = generated(stream(lm_url, {**request, "stop": [stop, "never there"]}))
    assert done["finish_reason"] == "stop"
    assert done["text"] == expected and done["tokens"] == len(expected) == len(tokens)
    assert done["step"] == len("we had") + len(expected)


def test_abstains_when_the_next_token_set_outgrows_max_set_size(lm_url: str) -> None:
    prompt = "it is"  # 25 tokens stay within the calibrated horizon: every answer has a set
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 25, "seed": 1, "alpha": 0.3}
    tokens, _ = generated(stream(lm_url, request))
    sizes = [t["set_size"] for t in tokens]
    # The first token whose set is larger than every set before it (this prompt and seed
    # have one, a few tokens in); a limit of the largest earlier size lets exactly the
    # tokens before it through.
    growth = [k for k in range(1, len(sizes)) if sizes[k] > max(sizes[:k])]
    assert growth, f"the test needs a set that outgrows the earlier ones, got sizes {sizes}"
    k, limit = growth[0], max(sizes[: growth[0]])
    limited, done = generated(stream(lm_url, {**request, "max_set_size": limit}))
    assert done["finish_reason"] == "abstain" and done["tokens"] == k
    assert [t["token"] for t in limited] == [t["token"] for t in tokens[:k]]
    assert done["step"] == len(prompt) + k  # the abstained token was never sampled


# ---- refusals -------------------------------------------------------------------------------


def _refusal(base_url: str, first_message: str) -> tuple[dict[str, Any], int]:
    with connect(ws_url(base_url)) as websocket:
        websocket.send(first_message)
        error = json.loads(websocket.recv())
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv()
    assert closed.value.rcvd is not None
    return error, closed.value.rcvd.code


@pytest.mark.parametrize(
    ("first_message", "mentions"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "a", "max_tokens": 3}), "model"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "", "max_tokens": 3}), "prompt"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "alpah": 0.1}), "alpah"),
        (
            json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "temperature": -1}),
            "temperature",
        ),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "seed": str(2**63)}), "seed"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "seed": -1}), "seed"),
        (json.dumps({"model": MODEL, "prompt": "ABC", "max_tokens": 3}), "vocabulary"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": MAX_STEPS + 1}), "limit"),
        (json.dumps({"model": "tiny-digits", "prompt": "a", "max_tokens": 3}), "language model"),
        (json.dumps({"model": "nope", "prompt": "a", "max_tokens": 3}), "nope"),
        (
            json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, "session_id": "gone"}),
            "gone",
        ),
    ],
)
def test_a_bad_first_message_gets_an_error_and_a_policy_close(
    lm_url: str, first_message: str, mentions: str
) -> None:
    error, code = _refusal(lm_url, first_message)
    assert error["type"] == "error" and mentions in error["message"]
    assert code == 1008


def test_an_uncalibrated_backend_is_refused_before_a_session_exists(lm_url: str) -> None:
    request = {"model": MODEL, "prompt": "a", "max_tokens": 3, "backend": "onnxruntime"}
    error, code = _refusal(lm_url, json.dumps(request))
    assert error["code"] == "not_calibrated" and "neuroserve calibrate" in error["message"]
    assert code == 1008


# ---- disconnecting --------------------------------------------------------------------------


def _settled_step(http: httpx.Client, session_id: str) -> int:
    """The session's step count once it stops changing (the server finishes the token it is
    committing when it notices the disconnect)."""
    previous = -1
    for _ in range(100):
        step = http.get(f"/v1/sessions/{session_id}").json()["step"]
        if step == previous:
            return step
        previous = step
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} kept stepping after the client left")


def test_a_client_that_disconnects_leaves_its_session_consistent(
    lm_url: str, http: httpx.Client
) -> None:
    prompt, received = "once upon", 3
    session_id = http.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "seed": 21, "temperature": 0.8}
    websocket: ClientConnection
    with connect(ws_url(lm_url)) as websocket:
        websocket.send(json.dumps({**request, "session_id": session_id}))
        tokens = [json.loads(websocket.recv()) for _ in range(received)]
    consumed = _settled_step(http, session_id) - len(prompt)
    assert received <= consumed < 200  # every token sent was committed; the rest never ran
    # The same seeded request, uninterrupted, shows which tokens those were ...
    _, full = generated(stream(lm_url, request))
    committed = full["text"][:consumed]
    assert "".join(t["token"] for t in tokens) == committed[:received]
    # ... and the session holds exactly them: continuing it equals one run on everything.
    more = {"model": MODEL, "prompt": " and", "max_tokens": 6, "seed": 3}
    _, resumed = generated(stream(lm_url, {**more, "session_id": session_id}))
    _, one_run = generated(stream(lm_url, {**more, "prompt": prompt + committed + " and"}))
    assert resumed["text"] == one_run["text"]
    assert resumed["step"] == one_run["step"]


# ---- sampling units -------------------------------------------------------------------------


def tempered(probabilities: list[float], temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised, written out (float64 [C])."""
    powered = torch.tensor(probabilities, dtype=torch.float64) ** (1.0 / temperature)
    return powered / powered.sum()


def test_the_sampling_distribution_is_the_reported_one_tempered() -> None:
    probabilities = [0.5, 0.3, 0.2, 0.0]
    torch.testing.assert_close(
        sampling_probabilities(probabilities, 1.0),
        torch.tensor(probabilities, dtype=torch.float64),
    )
    for temperature in (0.25, 0.5, 2.0, 10.0):
        torch.testing.assert_close(
            sampling_probabilities(probabilities, temperature), tempered(probabilities, temperature)
        )
    assert sampling_probabilities(probabilities, 10.0)[3] == 0.0  # impossible stays impossible
    sharp = sampling_probabilities(probabilities, 0.01)  # towards greedy: (0.3/0.5)^100 ~ 1e-22
    assert sharp[0] == pytest.approx(1.0) and sharp[1:].sum() < 1e-20


def test_greedy_takes_the_most_probable_token() -> None:
    generator = torch.Generator().manual_seed(0)
    assert sample_token([0.2, 0.5, 0.3], 0.0, generator) == (1, 1.0)
    assert sample_token([0.0, 0.1, 0.05, 0.85], 0.0, generator) == (3, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_frequencies_follow_the_tempered_distribution(temperature: float) -> None:
    probabilities, draws = [0.5, 0.3, 0.15, 0.05], 4000
    target = tempered(probabilities, temperature)
    generator = torch.Generator().manual_seed(0)
    samples = [sample_token(probabilities, temperature, generator) for _ in range(draws)]
    # Each draw reports its token's probability under the distribution it was drawn from ...
    assert all(p == pytest.approx(float(target[token])) for token, p in samples)
    # ... and each count is binomial: 4 standard errors make a false failure ~1 in 15,000.
    counts = torch.bincount(torch.tensor([token for token, _ in samples]), minlength=4)
    standard_error = torch.sqrt(target * (1 - target) / draws)
    assert ((counts / draws - target).abs() < 4 * standard_error).all(), (counts, target)


def test_stop_strings_are_found_across_token_boundaries() -> None:
    assert stop_reached("the end", "nd", ["end"])  # completed by a two-character token
    assert not stop_reached("the end.", ".", ["end"])  # found earlier, not by this token
    assert stop_reached("a\n\n", "\n", ["\n\n"])


def test_usage_of_several_steps_adds_up() -> None:
    chunks = [
        {"macs": 10, "spikes": 1, "neuron_steps": 4, "steps": 2, "batch_size": 8, "sparsity": 0.25},
        {"macs": 5, "spikes": 3, "neuron_steps": 4, "steps": 1, "batch_size": 1, "sparsity": 0.75},
    ]
    total = sum_usage(chunks)
    assert total["macs"] == 15 and total["steps"] == 3 and total["sparsity"] == 0.5
    assert "batch_size" not in total
    routed = [
        {"macs": 30, "routed_macs": 10, "skipped_macs": 70, "active_fraction": 0.3},
        {"macs": 10, "routed_macs": 4, "skipped_macs": 10, "active_fraction": 0.5},
    ]
    total = sum_usage(routed)
    assert (total["routed_macs"], total["skipped_macs"]) == (14, 80)
    assert total["active_fraction"] == 40 / 120  # recomputed from the sums, not averaged
