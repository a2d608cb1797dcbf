"""deploy/k8s: strict schema validation where available, kustomize rendering, and wiring."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from service.settings import Settings
from tests.deploy.helpers import (
    K8S,
    PROMETHEUS,
    app_route_paths,
    dockerfile_exec_form,
    load_yaml,
    load_yaml_documents,
    settings_env_names,
)

KUBERNETES_VERSION = "1.30.0"  # oldest release still widely run that has every API used here
REQUIRED_KINDS = {
    "Namespace",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "StatefulSet",
}


GRPC_PORT_DEFAULT = Settings.model_fields["grpc_port"].default


def manifest_files() -> list:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def resources() -> list[dict]:
    return [doc for path in manifest_files() for doc in load_yaml_documents(path)]


def find(kind: str, name: str) -> dict:
    (match,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return match


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    (main,) = pod_spec(workload)["containers"]
    return main


# ---- schema --------------------------------------------------------------------------------


def strict_validate(resource: dict) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (offline Kubernetes JSON schemas)"
    )
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "resource", resources(), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}"
)
def test_manifest_matches_the_kubernetes_schema(resource: dict) -> None:
    strict_validate(resource)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(find("Deployment", "neuroserve-server"))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    with pytest.raises(kubernetes_validate.ValidationError):
        strict_validate(broken)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_kustomize_renders_every_manifest_into_the_namespace() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(resources())
    for resource in rendered:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "neuroserve", resource["metadata"]


# ---- wiring --------------------------------------------------------------------------------


def test_required_kinds_and_an_autoscaling_v2_hpa() -> None:
    assert {r["kind"] for r in resources()} >= REQUIRED_KINDS
    hpa = find("HorizontalPodAutoscaler", "neuroserve-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "neuroserve-server",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


def test_selectors_match_pod_labels_and_services_find_pods() -> None:
    workloads = [r for r in resources() if r["kind"] in {"Deployment", "StatefulSet"}]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (r for r in resources() if r["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            # A named targetPort must be a port name of a selected container.
            names = {p.get("name") for w in selected for p in container(w)["ports"]}
            assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_server_probes_hit_real_routes_on_the_served_port() -> None:
    server = container(find("Deployment", "neuroserve-server"))
    routes = app_route_paths()
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] in routes
        assert server[probe]["httpGet"]["port"] == "http"
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    args = server["args"]
    assert args == dockerfile_exec_form("CMD")
    assert ports["http"] == int(args[args.index("--port") + 1])
    config = find("ConfigMap", "neuroserve-config")["data"]
    assert ports["grpc"] == int(config["NEUROSERVE_GRPC_PORT"]) == GRPC_PORT_DEFAULT


def test_server_has_resources_for_the_autoscaler() -> None:
    for name in ("neuroserve-server", "neuroserve-worker"):
        resources_ = container(find("Deployment", name))["resources"]
        assert resources_["requests"]["cpu"] and resources_["requests"]["memory"], name
        assert resources_["limits"]["memory"], name


def test_configmap_holds_only_real_settings_and_points_at_redis() -> None:
    data = find("ConfigMap", "neuroserve-config")["data"]
    assert set(data) <= settings_env_names(), set(data) - settings_env_names()
    redis = find("Service", "redis")
    assert data["NEUROSERVE_REDIS_URL"] == (
        f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    )
    assert all(isinstance(value, str) for value in data.values())


def test_server_and_worker_mount_the_model_repository_claim_where_settings_say() -> None:
    repository = find("ConfigMap", "neuroserve-config")["data"]["NEUROSERVE_MODEL_REPOSITORY"]
    claim = find("PersistentVolumeClaim", "neuroserve-models")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name in ("neuroserve-server", "neuroserve-worker"):
        workload = find("Deployment", name)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["mountPath"] == repository]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "neuroserve-models"
        assert container(workload)["envFrom"] == [{"configMapRef": {"name": "neuroserve-config"}}]
        env = {e["name"]: e["value"] for e in container(workload)["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")  # on the emptyDir


def test_seed_init_container_fills_the_claim_from_the_image() -> None:
    spec = pod_spec(find("Deployment", "neuroserve-server"))
    (seed,) = spec["initContainers"]
    assert seed["image"] == container(find("Deployment", "neuroserve-server"))["image"]
    (mount,) = seed["volumeMounts"]
    assert mount["mountPath"] != "/models"  # the image's /models stays visible as the source
    script = seed["command"][-1]
    assert f"{mount['mountPath']}/$version" in script and "mv -T" in script


def test_containers_run_as_non_root_without_privilege_escalation() -> None:
    for workload in (r for r in resources() if r["kind"] in {"Deployment", "StatefulSet"}):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_worker_runs_the_worker_command_and_exposes_metrics_for_prometheus() -> None:
    worker = find("Deployment", "neuroserve-worker")
    assert container(worker)["args"] == ["worker"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    (metrics_port,) = container(worker)["ports"]
    assert int(annotations["prometheus.io/port"]) == metrics_port["containerPort"] == 9100


def test_prometheus_k8s_config_scrapes_the_headless_services() -> None:
    config = load_yaml(PROMETHEUS / "prometheus-k8s.yml")
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    for job in config["scrape_configs"]:
        for discovery in job.get("dns_sd_configs", []):
            (name,) = discovery["names"]
            service_name, service_namespace = re.match(r"([\w-]+)\.([\w-]+)\.svc\.", name).groups()
            service = find("Service", service_name)
            assert service_namespace == namespace
            assert service["spec"]["clusterIP"] == "None"  # one A record per pod
            assert discovery["port"] in {p["port"] for p in service["spec"]["ports"]}
