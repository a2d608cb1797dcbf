"""The `neuroserve` command: help, bad settings, and `serve` answering readiness."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from models.repository import ModelRepository
from service.cli.common import parse_key_value, settings_from_flags
from tests.conftest import free_tcp_port

START_TIMEOUT_S = 60.0
# The installed console script beside this interpreter; `python -m service.cli` otherwise.
SCRIPT = Path(sys.executable).with_name("neuroserve")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "service.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    # A free gRPC port unless a test names one: servers run side by side, and 8001 may be taken.
    return {**env, "OMP_NUM_THREADS": "1", "NEUROSERVE_GRPC_PORT": "0", **extra}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, env=cli_env(**env)
    )


def test_help_lists_the_sub_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "train", "evaluate"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), result.stdout
    assert "run the HTTP and gRPC server" in result.stdout


def test_serve_help_documents_its_options() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    options = ("--host", "--port", "--grpc-port", "--no-grpc", "--repository", "--redis-url")
    for option in (*options, "--log-level"):
        assert option in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: neuroserve" in result.stderr


def test_invalid_setting_from_the_environment_is_named() -> None:
    result = run_cli("serve", NEUROSERVE_PORT="not-a-port")
    assert result.returncode == 2
    assert "invalid settings: port" in result.stderr


def test_serve_starts_and_answers_readiness(test_repository: ModelRepository) -> None:
    # --port 0 lets the OS pick a free port; uvicorn logs the one it bound.
    process = subprocess.Popen(
        [*COMMAND, "serve", "--port", "0", "--repository", str(test_repository.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    log: list[str] = []
    try:
        base_url = _wait_for_listening(process, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
        models = httpx.get(f"{base_url}/v1/models", timeout=5).json()["models"]
        assert {model["name"] for model in models} == {"broken", "tiny-charlm", "tiny-digits"}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            remaining, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            remaining, _ = process.communicate()
        log.append(remaining)
    assert process.returncode == 0, "".join(log)
    text = "".join(log)
    assert f"serving models from {test_repository.root.resolve()}" in text
    assert "embedded in-process store" in text


def _wait_for_listening(process: subprocess.Popen[str], log: list[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail("neuroserve serve exited early:\n" + "".join(log))
        log.append(line)
        match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if match:
            return match.group(1)
    pytest.fail("neuroserve serve did not start listening:\n" + "".join(log))


def test_serve_refuses_several_workers_without_redis() -> None:
    result = run_cli("serve", "--workers", "2")
    assert result.returncode == 2
    assert "set NEUROSERVE_REDIS_URL" in result.stderr


@pytest.mark.redis
def test_several_workers_continue_one_session_and_merge_their_metrics(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    port, grpc_port = free_tcp_port(), free_tcp_port()
    process = subprocess.Popen(
        [
            *COMMAND,
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--grpc-port",
            str(grpc_port),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(
            NEUROSERVE_STATE_STORE_PREFIX=redis_prefix,
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        ),
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{base_url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        created = httpx.post(f"{base_url}/v1/sessions", json={"model": "digits-lru"}, timeout=30)
        session = created.json()["session_id"]
        steps = 24
        for expected_step in range(1, steps + 1):
            # A new connection per request: the kernel spreads them over both workers.
            answer = httpx.post(
                f"{base_url}/v1/sessions/{session}/step",
                json={"inputs": [[float(expected_step % 16)] * 8]},
                timeout=30,
                headers={"Connection": "close"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["step"] == expected_step  # no worker lost another's step
        # gRPC on the same port in both workers: a Triton sequence continued over a new
        # connection per request, so the kernel spreads it over both, loses no step either.
        chunk = np.full((1, 1, 8), 3.0, dtype=np.float32)
        for i in range(8):
            with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as grpc_client:
                tensor = triton_grpc.InferInput("input", [1, 1, 8], "FP32")
                tensor.set_data_from_numpy(chunk)
                result = grpc_client.infer(
                    "digits-lru", [tensor], sequence_id=31, sequence_start=i == 0
                )
            assert result.get_response().parameters["sequence_step"].int64_param == i + 1
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
        served = re.search(
            r'neuroserve_requests_total\{[^}]*route="/v1/sessions/\{session_id\}/step"[^}]*'
            r'status="200"[^}]*\} (\S+)',
            metrics,
        )
        assert served is not None and float(served.group(1)) == steps
        pids = {p.name for p in (tmp_path / "metrics").glob("*.db")}
        assert len({name.rsplit("_", 1)[-1] for name in pids}) >= 2  # files from two workers
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# ---- what the commands share (service.cli.common) ----------------------------------------------


def test_key_value_arguments_parse_json_values_and_keep_other_text() -> None:
    assert parse_key_value("d_model=64") == ("d_model", 64)
    assert parse_key_value("t_inference=3.5e3") == ("t_inference", 3500.0)
    assert parse_key_value("norm=rmsnorm") == ("norm", "rmsnorm")
    assert parse_key_value("a=b=c") == ("a", "b=c")
    for bad in ("d_model", "=64"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            parse_key_value(bad)


def test_settings_from_flags_put_given_flags_over_the_environment(monkeypatch, capsys) -> None:
    monkeypatch.setenv("NEUROSERVE_PORT", "9000")
    monkeypatch.setenv("NEUROSERVE_LOG_LEVEL", "debug")
    settings = settings_from_flags("serve", port=8123, log_level=None)
    assert settings is not None and settings.port == 8123 and settings.log_level == "debug"
    assert settings_from_flags("worker", port="not-a-port") is None
    assert "neuroserve worker: invalid settings: port" in capsys.readouterr().err
