"""Dockerfile and .dockerignore: static checks (no Docker engine here), and the image's command
and health check run for real in this virtualenv, as the container would run them."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.deploy.helpers import (
    DOCKERFILE,
    REPO_ROOT,
    dockerfile_exec_form,
    dockerfile_instructions,
    settings_env_names,
)

VENV_BIN = Path(sys.executable).parent
STARTUP_SECONDS = 120  # importing torch and the app on a busy 2-core machine


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def env_of_final_stage() -> dict[str, str]:
    """ENV key=value pairs of the final stage (continuation lines already joined)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    return env


# ---- static checks (what hadolint would flag) ----------------------------------------------


def test_base_image_is_a_pinned_slim_python_3_11() -> None:
    (default,) = [a for k, a in dockerfile_instructions() if k == "ARG" and "PYTHON_IMAGE" in a]
    image = default.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    froms = [a for k, a in dockerfile_instructions() if k == "FROM"]
    assert all(a.startswith("${PYTHON_IMAGE}") for a in froms)


def test_final_stage_runs_as_a_non_root_user() -> None:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_entrypoint_cmd_and_healthcheck() -> None:
    assert dockerfile_exec_form("ENTRYPOINT") == ["neuroserve"]
    assert dockerfile_exec_form("CMD") == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert healthcheck_command()[0] == "python"
    assert "/v2/health/live" in " ".join(healthcheck_command())
    exposed = " ".join(a for k, a in final_stage() if k == "EXPOSE").split()
    assert "8000" in exposed
    assert str(Settings.model_fields["grpc_port"].default) in exposed  # gRPC, on by default


def test_model_repository_is_a_volume_named_by_the_setting() -> None:
    env = env_of_final_stage()
    volumes = [a for k, a in final_stage() if k == "VOLUME"]
    assert f'["{env["NEUROSERVE_MODEL_REPOSITORY"]}"]' in volumes
    assert {name for name in env if name.startswith("NEUROSERVE_")} <= settings_env_names()
    # The health check reads the port from the same setting the command line overrides.
    assert env["NEUROSERVE_PORT"] == dockerfile_exec_form("CMD")[-1]


def test_torch_comes_from_the_cpu_index_under_the_repository_constraint() -> None:
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    installs = [a for k, a in dockerfile_instructions() if k == "RUN" and "pip install" in a]
    assert installs and all("-c constraints-cpu.txt" in a for a in installs)
    assert "torch==" in (REPO_ROOT / "constraints-cpu.txt").read_text()


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path (or a parent folder) decides."""
    excluded = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_the_sources() -> None:
    sent = ["pyproject.toml", "README.md", "constraints-cpu.txt", "service/metrics.py"]
    sent += ["models/repository.py", "calibration/__init__.py", "hardware_backends/base.py"]
    kept_out = [".git/HEAD", ".venv/bin/python", "tests/deploy/test_k8s.py", "deploy/k8s/x.yaml"]
    kept_out += ["service/__pycache__/metrics.cpython-311.pyc", "neuroserve.egg-info/PKG-INFO"]
    assert [p for p in sent if dockerignore_excludes(p)] == []
    assert [p for p in kept_out if not dockerignore_excludes(p)] == []


def test_every_copied_source_exists_and_is_sent() -> None:
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in arguments:
            *sources, _destination = arguments.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), source
                assert not dockerignore_excludes(source), source


# ---- the image's command and health check, run in this virtualenv --------------------------


def healthcheck_command() -> list[str]:
    (arguments,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    _options, exec_form = arguments.split(" CMD ", 1)
    return json.loads(exec_form)


def seed_command() -> str:
    """The RUN step that copies the built-in models into /models."""
    (run,) = [a for k, a in dockerfile_instructions() if k == "RUN" and "'/models'" in a]
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_healthcheck(port: int) -> int:
    program, *arguments = healthcheck_command()
    assert program == "python"
    env = dict(os.environ, NEUROSERVE_PORT=str(port))
    return subprocess.run(
        [sys.executable, *arguments], env=env, capture_output=True, timeout=30
    ).returncode


@pytest.fixture
def image_like_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """`neuroserve serve ...` exactly as ENTRYPOINT + CMD say, bound to loopback on a free port."""
    if shutil.which("neuroserve", path=str(VENV_BIN)) is None:
        pytest.fail("the `neuroserve` console script is not installed in this virtualenv")
    # The image's model repository: the Dockerfile's own seeding step, run into a temp folder.
    repository = tmp_path / "models"
    seed = seed_command().replace("'/models'", repr(str(repository)))
    subprocess.run(seed.replace("python", sys.executable, 1), shell=True, check=True, timeout=120)

    port = free_port()
    command = [str(VENV_BIN / dockerfile_exec_form("ENTRYPOINT")[0])]
    command += dockerfile_exec_form("CMD")
    command[command.index("--host") + 1] = "127.0.0.1"  # 0.0.0.0 inside a container only
    command[command.index("--port") + 1] = str(port)
    env = dict(os.environ, **env_of_final_stage())
    env.update(
        NEUROSERVE_MODEL_REPOSITORY=str(repository),
        NEUROSERVE_PORT=str(port),
        NEUROSERVE_PRELOAD_MODELS="false",  # liveness is the point here, not model loading
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("NEUROSERVE_REDIS_URL", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def wait_until_live(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server not live after {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


def test_the_image_command_serves_and_the_healthcheck_sees_it(image_like_server, tmp_path) -> None:
    port, server = image_like_server
    wait_until_live(port, server, tmp_path / "server.log")
    assert run_healthcheck(port) == 0
    ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
    assert ready.status_code == 200

    server.terminate()
    server.wait(timeout=30)
    # Nothing listens any more: the same health check now reports unhealthy.
    assert run_healthcheck(port) != 0
