"""What generation reports is what it does, on the built-in `charlm-selective` served by uvicorn.

A token stream claims, per token, the distribution it was drawn from, a conformal set for the
next character and whether that answer is calibrated at its context length. These tests hold
the server to those claims from the outside, as a client sees them:

- every token message agrees with itself (membership, top token, positions, calibration) and
  the seed, a decimal string because seeds reach 2**63, reproduces the text exactly;
- the first token of many seeded generations of one prompt is distributed as reported: at
  temperature 1 as `probability`, at temperature 2 as p^(1/2) renormalised
  (`sampling_probability`);
- sets of sessions stepped on held-out text (the half the calibration never saw) cover the
  next character at 1 - alpha within each context-length bucket, with the default score;
- past the calibrated horizon (1024 characters of context) answers say they are uncalibrated
  and carry the raw softmax and no set.

The draws are seeded, so every test is deterministic; tolerances are the binomial and
split-conformal bands, not tuned.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch

from calibration import PositionBuckets
from calibration.position_report import coverage_interval
from models.repository import ModelRepository, default_repository_root
from service.dataplane.calibration_data import LM_BUCKET_EDGES, held_out_text, split_text
from service.dataplane.calibration_store import CalibrationStore
from service.settings import Settings

MODEL = "charlm-selective"
BUCKETS = PositionBuckets(LM_BUCKET_EDGES)
HORIZON = BUCKETS.horizon  # 1024
CONCURRENCY = 16
ALPHA = 0.1
BIG_SEED = "9007199254740993"  # 2**53 + 1: a JSON double would round it to 2**53
FIRST_TOKEN_PROMPT = "If the value is "  # a spread next-character distribution
FIRST_TOKEN_DRAWS = 400
MIN_EXPECTED = 10  # expected count from which a token is checked on its own (normal approx.)
WINDOWS_PER_BUCKET = 300
WINDOW_SEED = 7  # the calibration drew its windows with seed 0 (first half), its report seed 1

T = TypeVar("T")


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    return ModelRepository(default_repository_root())


@pytest.fixture(scope="module")
def unseen_text(repository: ModelRepository) -> str:
    """The held-out text's second half: the calibration fitted on the first half only."""
    card = repository.card(MODEL)
    _, test = split_text(held_out_text(card, None))
    vocabulary = card.config["vocabulary"]
    text = "".join(vocabulary[i] for i in test.ids.tolist())
    assert len(text) == test.ids.shape[0]  # one character per token: strings encode back
    return text


async def limited(
    calls: Iterable[Callable[[httpx.AsyncClient], Awaitable[T]]], url: str
) -> list[T]:
    """Run the calls over one client, CONCURRENCY at a time; results in order."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def one(call: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
            async with limit:
                return await call(http)

        return await asyncio.gather(*(one(call) for call in calls))


def generate(http: httpx.Client, **request: Any) -> dict[str, Any]:
    answer = http.post(f"/v1/models/{MODEL}/generate", json=request)
    assert answer.status_code == 200, answer.text
    return answer.json()


def answer_after(http: httpx.Client, context: str) -> dict[str, Any]:
    """A fresh session's step answer after reading `context` as one chunk."""
    created = http.post("/v1/sessions", json={"model": MODEL, "alpha": ALPHA})
    assert created.status_code == 201, created.text
    session_id = created.json()["session_id"]
    answer = http.post(f"/v1/sessions/{session_id}/step", json={"inputs": context}).json()
    http.delete(f"/v1/sessions/{session_id}")
    return answer


# ---- each message ---------------------------------------------------------------------------


def test_token_messages_are_internally_consistent(builtin_server_url: str) -> None:
    prompt = "Return the "
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        body = generate(http, prompt=prompt, max_tokens=60, seed=BIG_SEED)
    tokens = body["tokens"]
    assert body["seed"] == BIG_SEED and len(tokens) == 60
    assert body["calibrated"] and body["uncalibrated_tokens"] == 0 and body["warnings"] == []
    for index, token in enumerate(tokens):
        where = f"token {index}: {token}"
        assert token["index"] == index and token["position"] == len(prompt) + index, where
        assert token["calibrated"] is True, where  # every position is within the horizon
        assert token["set_size"] == len(token["prediction_set"]) >= 1, where
        assert token["in_set"] == (token["token"] in token["prediction_set"]), where
        assert 0.0 < token["probability"] <= token["top_probability"] <= 1.0, where
        assert token["sampling_probability"] == token["probability"], where  # temperature 1
        if token["set_size"] == 1:
            assert token["prediction_set"] == [token["top_token"]], where
        if token["token"] == token["top_token"]:
            assert token["probability"] == token["top_probability"], where
    assert any(t["set_size"] == 1 for t in tokens) and any(t["set_size"] > 1 for t in tokens)


def test_generation_keeps_the_sessions_set_choices(builtin_server_url: str) -> None:
    """A session's never_empty and online choices hold for the tokens generated in it: a plain
    session's first token gets the same (possibly empty) set its own step answer has, and an
    online session's tokens are served at its own level, which their labels then move."""
    prompt = "Return the "
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        plain = {"model": MODEL, "alpha": 0.7, "never_empty": False}
        stepped = http.post("/v1/sessions", json=plain).json()["session_id"]
        step = http.post(f"/v1/sessions/{stepped}/step", json={"inputs": prompt}).json()
        generating = http.post("/v1/sessions", json=plain).json()["session_id"]
        body = generate(http, prompt=prompt, max_tokens=1, session_id=generating, seed=1)
        assert body["tokens"][0]["prediction_set"] == step["prediction"]["prediction_set"]

        online = http.post("/v1/sessions", json={"model": MODEL, "online": True}).json()
        body = generate(http, prompt=prompt, max_tokens=3, session_id=online["session_id"])
        first = body["tokens"][0]
        label = http.post("/v1/feedback", json={"prediction_id": first["id"], "label": "x"})
        assert label.status_code == 200, label.text
        covered = label.json()["covered"]
        assert label.json()["aci_alpha"] == pytest.approx(0.1 + 0.005 * (0.1 - (not covered)))


def test_the_seed_round_trips_beyond_two_to_the_53(builtin_server_url: str) -> None:
    request = {"prompt": "Return the ", "max_tokens": 40}
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        texts = {
            name: generate(http, **request, seed=seed)["text"]
            for name, seed in [
                ("string", BIG_SEED),
                ("again", BIG_SEED),
                ("int", int(BIG_SEED)),  # exact in JSON text, whatever doubles can hold
                ("2**53", str(2**53)),
                ("7", 7),
                ("'7'", "7"),
            ]
        }
    assert texts["string"] == texts["again"] == texts["int"], texts
    assert texts["2**53"] != texts["string"], texts  # the last bit of the seed counts
    assert texts["7"] == texts["'7'"], texts


# ---- the distribution tokens are drawn from -------------------------------------------------


def check_frequencies(
    tokens: list[dict[str, Any]], expected: torch.Tensor, vocabulary: list[str], where: str
) -> None:
    """Observed token frequencies against `expected` [C], each within 4 binomial standard
    errors (a false failure ~1 in 15,000 per category). A token expected at least
    MIN_EXPECTED times is its own category, where the normal approximation holds; the rarer
    ones are pooled into one, so a token seen once at p = 1e-4 is judged with its peers."""
    draws = len(tokens)
    counts = Counter(t["token_id"] for t in tokens)
    own = [i for i in range(len(vocabulary)) if draws * float(expected[i]) >= MIN_EXPECTED]
    rare = [i for i in range(len(vocabulary)) if i not in own]
    categories = [([i], repr(vocabulary[i])) for i in own] + [(rare, "the rest")]
    report = []
    for members, name in categories:
        q = float(expected[members].sum())
        frequency = sum(counts[i] for i in members) / draws
        standard_error = math.sqrt(q * (1 - q) / draws)
        deviation = abs(frequency - q)
        z = deviation / standard_error if standard_error else (math.inf if deviation else 0.0)
        report.append((name, round(frequency, 4), round(q, 4), round(z, 2)))
    assert own, f"{where}: no token is frequent enough to check"
    assert all(z <= 4 for *_, z in report), (where, report)


def first_tokens(url: str, temperature: float, seeds: range) -> list[dict[str, Any]]:
    """The one token of a 1-token generation of FIRST_TOKEN_PROMPT, per seed."""

    def call(seed: int) -> Callable[[httpx.AsyncClient], Awaitable[dict[str, Any]]]:
        async def run(http: httpx.AsyncClient) -> dict[str, Any]:
            request = {
                "prompt": FIRST_TOKEN_PROMPT,
                "max_tokens": 1,
                "temperature": temperature,
                "seed": seed,
                "alpha": ALPHA,
            }
            answer = await http.post(f"/v1/models/{MODEL}/generate", json=request)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            await http.delete(f"/v1/sessions/{body['session_id']}")
            (token,) = body["tokens"]
            return token

        return run

    return asyncio.run(limited([call(seed) for seed in seeds], url))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_first_token_is_drawn_from_the_reported_distribution(
    builtin_server_url: str, repository: ModelRepository, temperature: float
) -> None:
    vocabulary = repository.card(MODEL).config["vocabulary"]
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        reported = answer_after(http, FIRST_TOKEN_PROMPT)["prediction"]
    probabilities = torch.tensor(reported["probabilities"], dtype=torch.float64)  # [C]
    sampling = probabilities ** (1.0 / temperature)  # [C] p^(1/T), renormalised
    sampling /= sampling.sum()
    offset = 0 if temperature == 1.0 else FIRST_TOKEN_DRAWS  # fresh seeds per temperature
    seeds = range(offset, offset + FIRST_TOKEN_DRAWS)
    tokens = first_tokens(builtin_server_url, temperature, seeds)
    # Every response reports the one distribution of this context (up to float32 rounding:
    # concurrent prompts are batched, and a batch's size changes the kernels' sums) ...
    for token in tokens:
        where = f"token {token}"
        assert token["position"] == len(FIRST_TOKEN_PROMPT) and token["calibrated"], where
        assert (token["top_token"], token["prediction_set"]) == (
            reported["label"],
            reported["prediction_set"],
        ), where
        assert token["top_probability"] == pytest.approx(reported["confidence"], rel=1e-5)
        assert token["probability"] == pytest.approx(
            float(probabilities[token["token_id"]]), rel=1e-5
        ), where
        assert token["sampling_probability"] == pytest.approx(
            float(sampling[token["token_id"]]), rel=1e-5
        ), where
    # ... and the tokens are drawn from it, tempered: p at T = 1, p^(1/2) renormalised at T = 2.
    check_frequencies(tokens, sampling, vocabulary, f"temperature {temperature}")


# ---- coverage per context length ------------------------------------------------------------


def bucket_windows(text_length: int, windows: int, seed: int) -> list[tuple[int, list[int]]]:
    """(start, context length per bucket) per window, drawn as
    `service.dataplane.calibration_data.language_examples` draws its calibration windows: a uniform
    start leaving room for the horizon, and per bucket a log-uniform length within it."""
    rng = np.random.default_rng(seed)
    bounds = [BUCKETS.bounds(k) for k in range(len(BUCKETS))]
    lengths = np.stack(
        [np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1), windows))) for lo, hi in bounds]
    ).astype(np.int64)  # [K, N]
    lengths = np.clip(lengths, [[lo] for lo, _ in bounds], [[hi] for _, hi in bounds])
    starts = (rng.uniform(size=windows) * (text_length - HORIZON - 1)).astype(np.int64)  # [N]
    return [(int(start), row) for start, row in zip(starts, lengths.T.tolist(), strict=True)]


def answers_along(url: str, text: str, windows: list[tuple[int, list[int]]]) -> list[list[Any]]:
    """Per window, a fresh plain-set session (alpha 0.1, the default score) reads the window
    once, as calibration does, in string chunks that end at each bucket's context length;
    the step answers, one per bucket."""

    def call(start: int, lengths: list[int]) -> Callable[[httpx.AsyncClient], Awaitable[Any]]:
        async def run(http: httpx.AsyncClient) -> list[Any]:
            body = {"model": MODEL, "alpha": ALPHA, "never_empty": False}
            created = await http.post("/v1/sessions", json=body)
            assert created.status_code == 201, created.text
            session = created.json()
            assert session["score"] == "lac", session  # the language-model default
            answers, read = [], 0
            for length in lengths:  # increasing: one per bucket
                chunk = text[start + read : start + length]
                step = await http.post(
                    f"/v1/sessions/{session['session_id']}/step", json={"inputs": chunk}
                )
                assert step.status_code == 200, step.text
                answers.append(step.json())
                read = length
            await http.delete(f"/v1/sessions/{session['session_id']}")
            return answers

        return run

    return asyncio.run(limited([call(start, lengths) for start, lengths in windows], url))


def test_sets_cover_the_next_character_in_every_context_bucket(
    builtin_server_url: str, unseen_text: str
) -> None:
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        info = http.get(f"/v1/models/{MODEL}").json()
    (torch_backend,) = [b for b in info["backends"] if b["name"] == "torch"]
    fitted = torch_backend["calibration"]["positions"]
    assert [(p["first"], p["last"]) for p in fitted] == [
        BUCKETS.bounds(k) for k in range(len(BUCKETS))
    ]
    windows = bucket_windows(len(unseen_text), WINDOWS_PER_BUCKET, WINDOW_SEED)
    answers = answers_along(builtin_server_url, unseen_text, windows)
    report, outside = [], []
    for k in range(len(BUCKETS)):
        sets, covered = [], 0
        for (start, lengths), window_answers in zip(windows, answers, strict=True):
            answer = window_answers[k]
            assert answer["score"] == "lac" and answer["calibrated"], answer
            assert answer["prediction"]["position"] == answer["step"] == lengths[k]
            sets.append(answer["prediction"]["prediction_set"])
            covered += unseen_text[start + lengths[k]] in sets[-1]
        coverage = covered / len(sets)
        low, high = coverage_interval(ALPHA, fitted[k]["n_conformal"], len(sets))
        row = (
            f"{BUCKETS.describe(k)}: coverage {coverage:.3f} in [{low:.3f}, {high:.3f}]?, "
            f"mean set size {sum(map(len, sets)) / len(sets):.2f}"
        )
        report.append(row)
        if not low <= coverage <= high:
            outside.append(row)
    assert not outside, "\n".join(report)


# ---- past the horizon -----------------------------------------------------------------------


def test_past_the_horizon_answers_say_they_are_uncalibrated(
    builtin_server_url: str, repository: ModelRepository, unseen_text: str
) -> None:
    assert Settings().max_sequence_length >= HORIZON + 2  # the server takes this prompt
    prompt = unseen_text[:HORIZON]
    with httpx.Client(base_url=builtin_server_url, timeout=60) as http:
        body = generate(http, prompt=prompt, max_tokens=2, seed=3)
    first, second = body["tokens"]
    assert first["position"] == HORIZON and first["calibrated"] is True
    assert first["prediction_set"] is not None and first["in_set"] is not None
    assert second["position"] == HORIZON + 1 and second["calibrated"] is False
    assert (second["prediction_set"], second["set_size"], second["in_set"]) == (None, None, None)
    assert second["sampling_probability"] == second["probability"]  # the raw softmax, T = 1
    assert body["calibrated"] is False and body["uncalibrated_tokens"] == 1
    assert any(f"past the {HORIZON} steps" in w for w in body["warnings"]), body["warnings"]
    # In process, as the server runs it (the prompt as one chunk, then one step): the first
    # answer is bucket 16-1024's calibration, the second the raw softmax.
    loaded = repository.load(MODEL)
    vocabulary = loaded.card.config["vocabulary"]
    stored = CalibrationStore(repository).get(MODEL, loaded.card.version, "torch")
    assert stored is not None and stored.at(HORIZON + 1) is None
    with torch.inference_mode():
        logits, state = loaded.model(torch.tensor([[vocabulary.index(c) for c in prompt]]))
        calibrated = stored.at(HORIZON).calibrate(logits[:, -1].double())[0]  # [C]
        logits, _ = loaded.model.step(torch.tensor([first["token_id"]]), state)
        raw = torch.softmax(logits.double(), dim=-1)[0]  # [C]
    for token, probs in ((first, calibrated), (second, raw)):
        assert token["probability"] == pytest.approx(float(probs[token["token_id"]]), rel=1e-5)
        assert token["top_probability"] == pytest.approx(float(probs.max()), rel=1e-5)
