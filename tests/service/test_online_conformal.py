"""Online conformal (ACI) as served: Gibbs and Candès' bound on the sets clients received.

A level starts at the request's alpha and moves by gamma * (alpha - err) per label, err being
whether the label fell outside the set served with its prediction. When every label arrives
after at most D other labels' updates, the served sets' miscoverage after T labels obeys, for
ANY sequence of labels, honest or not (`calibration.aci`):

    |missed / T - alpha| <= (max(alpha, 1 - alpha) + (D + 1) gamma) / (T gamma)

The bound is deterministic given the served errors, so it is asserted exactly; D follows from
how a test sends its labels (a batch of k predictions served at one level, then its k labels:
D = k - 1), never tuned. gamma = 0.05 keeps the bound informative at a few hundred labels.

- the bound itself, simulated over arbitrary errors and delays (what the server tests lean on);
- two API keys, one lying (a label outside its set whenever there is one): each key's level is
  the replay of its own errors only, the honest key's coverage is within the bound, the liar's
  level falls and its sets grow to every label;
- two replicas on one Redis, labels sent concurrently through both: no update is lost (steps
  and misses equal the labels and served misses) and the bound holds with the delay term;
- a session created with `online: true` answers at its own level, moved by its labels only;
- a new calibration restarts the levels and the live counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import AdaptiveConformal, PositionalCalibration
from models.datasets import SequenceDataset
from models.digits import load_digits_seq
from models.repository import ModelRepository
from service.api.auth import hash_key
from service.app import create_app
from service.dataplane.calibration_store import CalibrationStore, StoredCalibration
from tests.service.conftest import running_server
from tests.service.test_feedback import (
    ALPHA,
    GAMMA,
    LABELS,
    MODEL,
    REPLAY_AGREEMENT,
    calibration_status,
    copy_builtin,
    label_ok,
    online_settings,
    outside,
    predict,
    set_at,
    stored_calibration,
)

FLOAT_SLACK = 1e-12  # rate and bound are each a few float operations


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_builtin(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def test_digits() -> SequenceDataset:
    return load_digits_seq("test")


def gibbs_candes_bound(steps: int, max_delay: int, alpha: float = ALPHA) -> float:
    """The bound from the formula (not from the code under test)."""
    return (max(alpha, 1 - alpha) + (max_delay + 1) * GAMMA) / (steps * GAMMA)


def served_set_ok(stored: StoredCalibration, p: dict[str, Any]) -> bool:
    """The served set is the reference set at the level it says it was served at."""
    return set(p["prediction_set"]) == set_at(stored, p, "raps", p["aci_alpha"])


# ---- the bound itself ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    alpha=st.floats(0.01, 0.5),
    gamma=st.floats(0.005, 0.2),
    max_delay=st.integers(0, 8),
    labels=st.lists(st.tuples(st.booleans(), st.integers(0, 8)), min_size=1, max_size=500),
)
def test_the_bound_holds_for_any_errors_and_delays(
    alpha: float, gamma: float, max_delay: int, labels: list[tuple[bool, int]]
) -> None:
    """Label t's set was served `delay_t <= max_delay` updates before its own update; the
    adversary misses whenever it can: never when the served level was <= 0 (every label),
    always when it was >= 1 (the empty set), as it pleases in between."""
    level = AdaptiveConformal(alpha, gamma)
    history = [level.alpha_t]  # the level after 0, 1, 2, ... updates
    for t, (wants_a_miss, delay) in enumerate(labels):
        served = history[max(0, t - min(delay, max_delay))]
        missed = served >= 1.0 or (served > 0.0 and wants_a_miss)
        level.update(not missed)
        history.append(level.alpha_t)
    assert -(max_delay + 1) * gamma - FLOAT_SLACK <= min(history)
    assert max(history) <= 1 + (max_delay + 1) * gamma + FLOAT_SLACK
    gap = abs(level.miscoverage_rate - alpha)
    assert gap <= level.miscoverage_bound(max_delay) + FLOAT_SLACK


# ---- two keys, one lying ----------------------------------------------------------------------


def test_a_lying_key_moves_only_its_own_level(builtin_root: Path, test_digits) -> None:
    honest, liar = "honest-key", "liar-key"
    settings = online_settings(
        builtin_root, api_keys=[f"honest:{hash_key(honest)}", f"liar:{hash_key(liar)}"]
    )
    stored = stored_calibration(builtin_root)
    rounds, k = 30, 10  # 300 labels per key, each after at most k - 1 others
    truths = [str(int(y)) for y in test_digits.labels]
    replays = {honest: AdaptiveConformal(ALPHA, GAMMA), liar: AdaptiveConformal(ALPHA, GAMMA)}
    set_sizes: dict[str, list[int]] = {honest: [], liar: []}
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        for r in range(rounds):
            rows = range(r * k, (r + 1) * k)
            for key, replay in replays.items():
                served_level = replay.alpha_t
                batch = test_digits.inputs[rows.start : rows.stop]
                predictions = predict(client, batch, key, online=True, alpha=ALPHA)["predictions"]
                for p, index in zip(predictions, rows, strict=True):
                    assert p["aci_alpha"] == pytest.approx(served_level, abs=REPLAY_AGREEMENT)
                    assert served_set_ok(stored, p)
                    if served_level <= 0:
                        assert p["prediction_set"] == LABELS  # the level promises every label
                    set_sizes[key].append(p["set_size"])
                    label = truths[index] if key == honest else outside(p, truths[index])
                    result = label_ok(client, p["id"], label, key)
                    assert result["covered"] is (label in p["prediction_set"])
                    replay.update(result["covered"])
                    assert result["aci_alpha"] == pytest.approx(
                        replay.alpha_t, abs=REPLAY_AGREEMENT
                    )

        for key, replay in replays.items():
            (level,) = calibration_status(client, key)["live"]["online_levels"]  # its own only
            assert (level["steps"], level["miscovered"]) == (rounds * k, replay.miscovered)
            expected = AdaptiveConformal.from_counts(ALPHA, GAMMA, replay.steps, replay.miscovered)
            assert level["alpha"] == expected.alpha_t
            # Whatever labels a key sends, its own served sets obey the bound.
            bound = gibbs_candes_bound(replay.steps, max_delay=k - 1)
            assert abs(replay.miscoverage_rate - ALPHA) <= bound + FLOAT_SLACK, key

    # The liar misses exactly when its set is not every label, so the bound on its misses is
    # a floor on how often its sets held every label: its level fell until they did.
    full = set_sizes[liar].count(len(LABELS))
    assert rounds * k - full == replays[liar].miscovered
    assert full / (rounds * k) >= 1 - ALPHA - gibbs_candes_bound(rounds * k, k - 1) - FLOAT_SLACK
    assert replays[liar].alpha_t < ALPHA


# ---- two replicas, concurrent labels ----------------------------------------------------------


@pytest.mark.redis
def test_concurrent_labels_through_two_replicas_lose_no_update(
    builtin_root: Path,
    test_digits,
    redis_url: str,
    redis_prefix: str,
) -> None:
    settings = online_settings(builtin_root, redis_url=redis_url, state_store_prefix=redis_prefix)
    stored = stored_calibration(builtin_root)
    rounds, k = 20, 10  # per round: k predictions at one level, then k labels at once
    truths = [str(int(y)) for y in test_digits.labels]

    async def scenario(url_a: str, url_b: str) -> tuple[int, int]:
        steps = missed = 0
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=60) as a,
            httpx.AsyncClient(base_url=url_b, timeout=60) as b,
        ):
            for r in range(rounds):
                first = r * k
                half = k // 2
                answers = await asyncio.gather(
                    *(
                        replica.post(
                            f"/v1/models/{MODEL}/predict",
                            json={
                                "inputs": test_digits.inputs[start : start + half].tolist(),
                                "online": True,
                                "alpha": ALPHA,
                            },
                        )
                        for replica, start in ((a, first), (b, first + half))
                    )
                )
                predictions = [p for answer in answers for p in answer.json()["predictions"]]
                level = AdaptiveConformal.from_counts(ALPHA, GAMMA, steps, missed).alpha_t
                assert [p["aci_alpha"] for p in predictions] == [level] * k
                assert all(served_set_ok(stored, p) for p in predictions)
                labels = truths[first : first + k]
                results = await asyncio.gather(
                    *(
                        (a, b)[i % 2].post(
                            "/v1/feedback", json={"prediction_id": p["id"], "label": label}
                        )
                        for i, (p, label) in enumerate(zip(predictions, labels, strict=True))
                    )
                )
                bodies = [result.json() for result in results]
                served_misses = [
                    label not in p["prediction_set"]
                    for p, label in zip(predictions, labels, strict=True)
                ]
                assert [not body["covered"] for body in bodies] == served_misses
                # The live counter moved once per label, atomically: k distinct counts.
                counts = sorted(body["feedback_count"] for body in bodies)
                assert counts == list(range(steps + 1, steps + k + 1))
                steps, missed = steps + k, missed + sum(served_misses)
        return steps, missed

    with (
        running_server(create_app(settings)) as url_a,
        running_server(create_app(settings)) as url_b,
    ):
        steps, missed = asyncio.run(scenario(url_a, url_b))
        for url in (url_a, url_b):
            with httpx.Client(base_url=url, timeout=60) as client:
                live = calibration_status(client)["live"]
            (level,) = live["online_levels"]
            assert live["feedback"] == steps == rounds * k
            assert (level["steps"], level["miscovered"]) == (steps, missed)
            expected = AdaptiveConformal.from_counts(ALPHA, GAMMA, steps, missed)
            assert level["alpha"] == expected.alpha_t

    # A label's delay is the other labels of its round: at most k - 1 updates.
    assert abs(missed / steps - ALPHA) <= gibbs_candes_bound(steps, max_delay=k - 1) + FLOAT_SLACK


# ---- sessions ---------------------------------------------------------------------------------


def test_an_online_session_answers_at_its_own_level(builtin_root: Path, test_digits) -> None:
    stored = stored_calibration(builtin_root)
    image, truth = test_digits.inputs[0].tolist(), str(int(test_digits.labels[0]))  # [8, 8]
    with (
        running_server(create_app(online_settings(builtin_root))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):

        def new_session(**body: Any) -> str:
            created = client.post("/v1/sessions", json={"model": MODEL, "alpha": ALPHA, **body})
            assert created.status_code == 201, created.text
            assert created.json()["online"] is body.get("online", False)
            return created.json()["session_id"]

        def step(session_id: str, rows: list) -> list[dict[str, Any]]:
            response = client.post(
                f"/v1/sessions/{session_id}/step", json={"inputs": rows, "return_steps": True}
            )
            assert response.status_code == 200, response.text
            return [*response.json()["step_predictions"], response.json()["prediction"]]

        session, replay = new_session(online=True), AdaptiveConformal(ALPHA, GAMMA)
        key_replay = AdaptiveConformal(ALPHA, GAMMA)
        for chunk, positions in ((image[:4], [1, 2, 3, 4, 4]), (image[4:], [5, 6, 7, 8, 8])):
            predictions = step(session, chunk)
            assert [p["position"] for p in predictions] == positions
            served_level = replay.alpha_t
            for p in predictions:
                assert p["aci_alpha"] == pytest.approx(served_level, abs=REPLAY_AGREEMENT)
                assert served_set_ok(stored, p)
                label = outside(p, truth) if p["position"] % 2 else truth
                result = label_ok(client, p["id"], label)
                replay.update(result["covered"])
                assert result["aci_alpha"] == pytest.approx(replay.alpha_t, abs=REPLAY_AGREEMENT)
            # Between the chunks: the key's own level, at the same alpha and score, is served
            # at the target (the session's labels never touched it) and moves on its own.
            levels = calibration_status(client)["live"]["online_levels"]
            expected = [key_replay.steps] if key_replay.steps else []
            assert [level["steps"] for level in levels] == expected
            (p,) = predict(client, test_digits.inputs[1:2], online=True, alpha=ALPHA)["predictions"]
            assert p["aci_alpha"] == pytest.approx(key_replay.alpha_t, abs=REPLAY_AGREEMENT)
            key_replay.update(label_ok(client, p["id"], outside(p, truth))["covered"])

        (level,) = calibration_status(client)["live"]["online_levels"]
        assert (level["steps"], level["miscovered"]) == (key_replay.steps, key_replay.miscovered)
        assert replay.steps == 10 and replay.miscovered > 0
        # Another online session starts at the target; a plain session has no level.
        (first, *_) = step(new_session(online=True), image[:1])
        assert first["aci_alpha"] == ALPHA
        (plain, *_) = step(new_session(), image[:1])
        assert plain["aci_alpha"] is None
        assert label_ok(client, plain["id"], truth)["aci_alpha"] is None


# ---- a new calibration ------------------------------------------------------------------------


def refitted(positional: PositionalCalibration, created: str) -> PositionalCalibration:
    """The same calibration scores stamped with another fit time: to the server a new fit,
    as `neuroserve calibrate` writes one (which takes minutes on these 2 CPUs)."""
    artifacts = tuple(dataclasses.replace(a, created=created) for a in positional.artifacts)
    return PositionalCalibration(positional.buckets, artifacts)


def test_a_new_calibration_restarts_levels_and_live_counters(
    tmp_path: Path,
    test_digits,
) -> None:
    root = copy_builtin(tmp_path)
    store = CalibrationStore(ModelRepository(root))
    old = stored_calibration(root)
    truths = [str(int(y)) for y in test_digits.labels]
    with (
        running_server(create_app(online_settings(root))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        predictions = predict(client, test_digits.inputs[:11], online=True)["predictions"]
        for p, label in zip(predictions[:10], truths, strict=False):
            label_ok(client, p["id"], outside(p, label))
        late = predictions[10]  # served under the old calibration, labelled after the swap
        before = calibration_status(client)
        (level,) = before["live"]["online_levels"]
        assert level["steps"] == 10 and level["alpha"] < ALPHA
        assert before["fit"]["calibration_id"] == old.calibration_id

        new = refitted(old.positional, created="2099-01-01T00:00:00+00:00")
        assert new.calibration_id != old.calibration_id
        store.save(new, backend_options=old.backend_options, source=old.source)

        after = calibration_status(client)
        assert after["fit"]["calibration_id"] == new.calibration_id
        assert after["live"]["feedback"] == 0 and after["live"]["online_levels"] == []
        (fresh,) = predict(client, test_digits.inputs[11:12], online=True)["predictions"]
        assert fresh["aci_alpha"] == ALPHA

        # A late label of an old prediction counts for the old calibration, not the new one.
        assert label_ok(client, late["id"], truths[10])["feedback_count"] == 11
        assert calibration_status(client)["live"]["feedback"] == 0
        result = label_ok(client, fresh["id"], truths[11])
        err = 0.0 if result["covered"] else 1.0
        assert result["feedback_count"] == 1
        assert result["aci_alpha"] == pytest.approx(ALPHA + GAMMA * (ALPHA - err), abs=1e-15)
        (level,) = calibration_status(client)["live"]["online_levels"]
        assert level["steps"] == 1
