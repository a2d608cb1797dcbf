"""Admin routes over a model's versions over real HTTP: promote, roll back, delete; what
unpinned requests get; refusals (409) with their reasons; atomicity under concurrent
requests to two servers sharing one repository."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from models.repository import ModelRepository
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, publish_lru, running_server

SEQUENCE = [[float(i % 17)] * 8 for i in range(4)]  # [4, 8]


@pytest.fixture
def repository(tmp_path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "repository")
    for seed in (1, 2, 3):
        publish_lru(repository, "tiny", seed=seed)
    return repository


@pytest.fixture
def urls(repository: ModelRepository) -> Iterator[tuple[str, str]]:
    """Two servers (replicas) over the same repository."""
    settings = Settings(model_repository=repository.root, **TEST_SETTINGS)
    with (
        running_server(create_app(settings)) as first,
        running_server(create_app(settings)) as second,
    ):
        yield first, second


def latest(url: str) -> dict:
    response = httpx.get(f"{url}/v1/models/tiny/latest", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def unpinned_version(url: str) -> str:
    response = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": [SEQUENCE]}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_promote_roll_back_and_delete_move_what_unpinned_requests_get(urls) -> None:
    url, other = urls
    assert latest(url)["latest"] == "3" and unpinned_version(url) == "3"

    promoted = httpx.post(f"{url}/v1/models/tiny/versions/1/promote", timeout=30)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["latest"] == "1" and promoted.json()["history"][-1] == "1"
    assert unpinned_version(url) == "1" and unpinned_version(other) == "1"
    assert httpx.get(f"{other}/v1/models/tiny", timeout=30).json()["latest_version"] == "1"

    rolled = httpx.post(f"{other}/v1/models/tiny/rollback", timeout=30)
    assert rolled.status_code == 200 and rolled.json()["latest"] == "3"
    assert unpinned_version(url) == "3"

    deleted = httpx.delete(f"{url}/v1/models/tiny/versions/2", timeout=30)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["versions"] == ["1", "3"] and deleted.json()["deleted"] == ["2"]
    gone = httpx.post(
        f"{other}/v1/models/tiny/predict", json={"inputs": [SEQUENCE], "version": "2"}, timeout=30
    )
    assert gone.status_code == 404


def test_refusals_say_why(urls) -> None:
    url, _ = urls
    latest_delete = httpx.delete(f"{url}/v1/models/tiny/versions/3", timeout=30)
    assert latest_delete.status_code == 409 and "latest" in latest_delete.json()["error"]["message"]
    unknown = httpx.post(f"{url}/v1/models/tiny/versions/9/promote", timeout=30)
    assert unknown.status_code == 404 and "no version '9'" in unknown.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/models/nope/rollback", timeout=30).status_code == 404
    for _ in range(2):  # history 1, 2, 3: back to 2, then to 1, then nothing earlier
        assert httpx.post(f"{url}/v1/models/tiny/rollback", timeout=30).status_code == 200
    last = httpx.post(f"{url}/v1/models/tiny/rollback", timeout=30)
    assert last.status_code == 409 and "no earlier" in last.json()["error"]["message"]


def test_a_version_serving_a_live_session_is_not_deleted(urls) -> None:
    url, _ = urls
    opened = httpx.post(f"{url}/v1/sessions", json={"model": "tiny", "version": "2"}, timeout=30)
    assert opened.status_code == 201, opened.text
    refused = httpx.delete(f"{url}/v1/models/tiny/versions/2", timeout=30)
    assert refused.status_code == 409
    assert "serves 1 live session" in refused.json()["error"]["message"]
    session_id = opened.json()["session_id"]
    assert httpx.delete(f"{url}/v1/sessions/{session_id}", timeout=30).status_code in (200, 204)
    assert httpx.delete(f"{url}/v1/models/tiny/versions/2", timeout=30).status_code == 200


def test_concurrent_promotions_on_two_replicas_lose_no_update(repository, urls) -> None:
    for seed in range(4, 12):
        publish_lru(repository, "tiny", seed=seed)  # versions 4..11; latest 11
    versions = [str(v) for v in range(1, 11)]  # every version but the latest
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(
            pool.map(
                lambda pair: httpx.post(
                    f"{urls[pair[0] % 2]}/v1/models/tiny/versions/{pair[1]}/promote", timeout=60
                ),
                enumerate(versions),
            )
        )
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    pointer = latest(urls[0])
    # Each promotion appended itself exactly once: no read-modify-write was lost.
    assert sorted(pointer["history"][-10:], key=int) == versions
    assert pointer["latest"] == pointer["history"][-1]


def test_racing_delete_and_promote_never_leave_latest_on_a_deleted_version(
    repository, urls
) -> None:
    url, other = urls
    for round_ in range(6):
        publish_lru(repository, "tiny", seed=100 + round_, promote=False)
        candidate = repository.versions("tiny")[-1]
        with ThreadPoolExecutor(max_workers=4) as pool:
            promote = pool.submit(
                httpx.post, f"{url}/v1/models/tiny/versions/{candidate}/promote", timeout=60
            )
            deletes = [
                pool.submit(
                    httpx.delete, f"{other}/v1/models/tiny/versions/{candidate}", timeout=60
                )
                for _ in range(3)
            ]
            codes = sorted(d.result().status_code for d in deletes)
            promoted = promote.result().status_code
        pointer = latest(url)
        assert pointer["latest"] in pointer["versions"]
        if promoted == 200 and pointer["latest"] == candidate:
            assert codes == [409, 409, 409]  # promoted first: the latest is not deleted
        else:
            assert promoted == 404 and codes.count(200) == 1  # deleted once, then unknown
        assert unpinned_version(other) == pointer["latest"]
        if pointer["latest"] == candidate:  # back to a version that stays
            httpx.post(f"{url}/v1/models/tiny/rollback", timeout=30).raise_for_status()


def test_under_load_a_promotion_is_seen_by_the_next_request_to_the_other_replica(urls) -> None:
    """Each replica looks up a request's card once per pass of its event loop
    (`service.dataplane.loop_memo`). With the other replica busy answering unpinned predicts,
    a request sent once a promotion (by the first replica, a writer the other knows nothing
    of) has returned still gets the promoted version: no request is answered from a lookup
    made before it arrived."""
    url, other = urls
    stop = threading.Event()

    def keep_busy() -> int:
        answered = 0
        with httpx.Client(base_url=other, timeout=30) as http:
            while not stop.is_set():
                answer = http.post("/v1/models/tiny/predict", json={"inputs": [SEQUENCE]})
                assert answer.status_code == 200, answer.text
                answered += 1
        return answered

    with ThreadPoolExecutor(max_workers=4) as pool:
        load = [pool.submit(keep_busy) for _ in range(4)]
        try:
            for round_ in range(30):
                version = str(round_ % 3 + 1)
                promoted = httpx.post(f"{url}/v1/models/tiny/versions/{version}/promote")
                assert promoted.status_code == 200, promoted.text
                assert unpinned_version(other) == version, f"round {round_}"
        finally:
            stop.set()
        assert sum(busy.result() for busy in load) > 30  # the other replica was under load
