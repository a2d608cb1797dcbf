"""Real servers for the service tests: uvicorn on loopback, in a thread, on a free port.

`test_repository` publishes small models into a temporary repository:
- `tiny-digits` v1 and v2: two differently seeded, untrained digits LRUs (versions differ)
- `tiny-charlm`: an untrained character LRU over a small vocabulary (prompts)
- `broken`: a valid config whose weights file was corrupted after publishing

`server_url` serves that repository with TEST_SETTINGS;
`builtin_server_url` serves the committed built-in models (`models/artifacts`).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from models.architectures import build_model
from models.repository import WEIGHTS_FILE, ModelRepository, default_repository_root
from models.training import TrainingRecipe, train_and_publish
from service.app import create_app
from service.settings import Settings

# Small limits keep the limit tests cheap; the test models have no calibration artifacts.
TEST_SETTINGS: dict[str, Any] = {
    "max_batch_size": 8,
    "max_sequence_length": 32,
    "max_request_bytes": 64 * 1024,
    "allow_uncalibrated": True,
}
CHAR_VOCABULARY = list("abcdefghijklmnopqrstuvwxyz .,")
DIGIT_LABELS = [str(d) for d in range(10)]
SERVER_START_TIMEOUT_S = 30.0


def lru_config(input_kind: str, n_out: int, vocab_size: int = 0) -> dict[str, Any]:
    return {
        "d_input": 8 if input_kind == "features" else 0,
        "vocab_size": vocab_size,
        "input_kind": input_kind,
        "d_output": n_out,
        "d_model": 16,
        "d_state": 16,
        "n_layers": 1,
        "dropout": 0.0,
    }


def publish_lru(
    repository: ModelRepository,
    name: str,
    seed: int,
    *,
    task: str = "classification",
    promote: bool = True,
) -> None:
    """Publish a freshly initialised LRU, seeded with `seed`, under `name` (as its latest
    version unless `promote` is False)."""
    if task == "classification":
        model_config = lru_config("features", len(DIGIT_LABELS))
        extra = {
            "labels": DIGIT_LABELS,
            "input": {
                "kind": "features",
                "features": 8,
                "dtype": "float32",
                "value_range": [0, 16],
            },
        }
    else:
        model_config = lru_config("tokens", len(CHAR_VOCABULARY), len(CHAR_VOCABULARY))
        extra = {
            "vocabulary": CHAR_VOCABULARY,
            "input": {"kind": "tokens", "vocab_size": len(CHAR_VOCABULARY)},
        }
    torch.manual_seed(seed)
    model = build_model("lru", model_config)
    config = {
        "architecture": "lru",
        "model_config": model_config,
        "task": task,
        **extra,
        "dataset": "none (untrained test model)",
        "provenance": {
            "data_sha256": None,
            "seed": seed,
            "command": "tests/service/conftest.py",
            "created": "1970-01-01T00:00:00Z",
            "torch_version": torch.__version__,
        },
        "metrics": {},
    }
    repository.publish(name, config, model.state_dict(), promote=promote)


# The fine-tuning tests' base: a small LRU trained on clean digits in ~3 s (78% test
# accuracy, 30% when translated), published as "tiny".
TINY_LRU_RECIPE = TrainingRecipe(
    architecture="lru",
    dataset="digits-seq:rows",
    model_config={"d_model": 16, "d_state": 8, "n_layers": 1, "dropout": 0.0},
    epochs=6,
    lr=1e-2,
    seed=0,
)


def publish_tiny_lru(repository: ModelRepository) -> None:
    train_and_publish(TINY_LRU_RECIPE, repository, "tiny", "test fixture", progress=False)


@pytest.fixture(scope="session")
def tiny_lru_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding the tiny LRU alone; copy it (`copied_repository`) to change it."""
    root = tmp_path_factory.mktemp("tiny-lru")
    publish_tiny_lru(ModelRepository(root))
    return root


def copied_repository(root: Path, tmp_path: Path) -> ModelRepository:
    shutil.copytree(root, tmp_path / "repo")
    return ModelRepository(tmp_path / "repo")


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("repository"))
    publish_lru(repository, "tiny-digits", seed=1)
    publish_lru(repository, "tiny-digits", seed=2)
    publish_lru(repository, "tiny-charlm", seed=3, task="language-model")
    publish_lru(repository, "broken", seed=4)
    weights = repository.version_path("broken", "1") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    return repository


def _wait_until_ready(base_url: str, server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the test server exited during start-up; see the log above")
        if server.started:
            try:
                if httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"the test server at {base_url} was not ready in {SERVER_START_TIMEOUT_S}s")


@contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) until the block ends."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        _wait_until_ready(base_url, server, thread)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@pytest.fixture(scope="session")
def server_url(test_repository: ModelRepository) -> Iterator[str]:
    settings = Settings(model_repository=test_repository.root, **TEST_SETTINGS)
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def builtin_server_url() -> Iterator[str]:
    """The committed built-in models (`models/artifacts`) served with default settings."""
    root = default_repository_root()
    with running_server(create_app(Settings(model_repository=root))) as base_url:
        yield base_url


@pytest.fixture
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=30) as http:
        yield http


@pytest.fixture
def server_factory() -> Callable[[FastAPI], Any]:
    """`running_server` for tests that need an app of their own."""
    return running_server
