"""docker-compose.yml: compose-spec schema, `docker compose config` where it runs, and wiring."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest

from tests.deploy.helpers import (
    COMPOSE_FILE,
    DEPLOY,
    PROMETHEUS,
    REPO_ROOT,
    app_route_paths,
    dockerfile_exec_form,
    load_yaml,
    settings_env_names,
)

SERVICES = {"redis", "neuroserve", "worker", "lb", "prometheus", "grafana"}
REDIS_URL = "redis://redis:6379/0"


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


# ---- schema --------------------------------------------------------------------------------


def compose_schema_validator():
    """A validator for the compose specification's JSON schema, as vendored by check-jsonschema."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (vendors the compose schema)")
    import importlib.resources

    import jsonschema

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    errors = [error.message for error in compose_schema_validator().iter_errors(compose)]
    assert errors == []


def test_the_schema_check_catches_a_misspelt_key(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert list(compose_schema_validator().iter_errors(broken))


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(
    not docker_compose_available(), reason="the docker compose plugin is not installed here"
)
def test_docker_compose_config_accepts_the_file() -> None:
    # `config` only parses and interpolates: it needs no Docker engine.
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr


# ---- wiring --------------------------------------------------------------------------------


def test_all_services_are_there(compose: dict) -> None:
    assert set(services(compose)) == SERVICES


def test_two_server_replicas_run_the_image_command_behind_one_port(compose: dict) -> None:
    server = services(compose)["neuroserve"]
    assert server["deploy"]["replicas"] == 2
    assert server["command"] == dockerfile_exec_form("CMD")
    assert "ports" not in server  # replicas cannot share a host port; the balancer has it
    assert services(compose)["lb"]["ports"] == ["8000:8000", "8001:8001"]  # HTTP, gRPC
    assert services(compose)["worker"]["command"] == ["worker"]


def test_every_service_has_a_healthcheck_and_dependencies_wait_for_health(compose: dict) -> None:
    for name, service in services(compose).items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service.get("image"), name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            assert condition["condition"] in {"service_healthy", "service_started"}
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services(compose)[dependency]
    assert services(compose)["neuroserve"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services(compose)["lb"]["depends_on"]["neuroserve"]["condition"] == "service_healthy"


def test_images_are_pinned(compose: dict) -> None:
    for name, service in services(compose).items():
        repository, _, tag = service["image"].rpartition(":")
        assert repository and tag and tag != "latest", name


def test_server_healthcheck_probes_a_real_route(compose: dict) -> None:
    test = " ".join(services(compose)["neuroserve"]["healthcheck"]["test"])
    (path,) = re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", test)
    assert path in app_route_paths()


def test_server_and_worker_share_redis_models_and_multiprocess_metrics(compose: dict) -> None:
    for name in ("neuroserve", "worker"):
        service = services(compose)[name]
        environment = service["environment"]
        assert environment["NEUROSERVE_REDIS_URL"] == REDIS_URL
        assert environment["PROMETHEUS_MULTIPROC_DIR"]
        assert f"models:{environment['NEUROSERVE_MODEL_REPOSITORY']}" in service["volumes"]
    assert "models" in compose["volumes"]


def test_environment_names_are_real_settings(compose: dict) -> None:
    known = settings_env_names()
    for name, service in services(compose).items():
        for variable in service.get("environment", {}):
            if variable.startswith("NEUROSERVE_"):
                assert variable in known, (name, variable)


def test_bind_mounts_exist_in_the_repository(compose: dict) -> None:
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), (name, source)


def test_prometheus_scrapes_the_compose_services_on_their_ports(compose: dict) -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    targets = {
        job["job_name"]: (discovery["names"], discovery["port"])
        for job in config["scrape_configs"]
        for discovery in job.get("dns_sd_configs", [])
    }
    assert targets["neuroserve"] == (["neuroserve"], 8000)
    assert targets["neuroserve-worker"] == (["worker"], 9100)
    assert "8000" in services(compose)["neuroserve"]["expose"]
    assert "8001" in services(compose)["neuroserve"]["expose"]  # gRPC, behind the balancer
    assert "9100" in services(compose)["worker"]["expose"]


def test_load_balancer_proxies_to_the_server_service(compose: dict) -> None:
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"set \$\w+ http://neuroserve:8000;", nginx)
    assert re.search(r"^\s*listen 8000;", nginx, re.MULTILINE)
    assert re.search(r"set \$(\w+) grpc://neuroserve:8001;\s*grpc_pass \$\1;", nginx)
    assert re.search(r"^\s*listen 8001;\s*http2 on;", nginx, re.MULTILINE)
    assert "resolver 127.0.0.11" in nginx  # re-resolve replicas through Docker's DNS
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx  # websockets (/v1/generate)
    assert (
        "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in services(compose)["lb"]["volumes"]
    )
