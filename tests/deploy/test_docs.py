"""docs/OBSERVABILITY.md and docs/DEPLOYMENT.md describe what is actually deployed."""

from __future__ import annotations

import re

from service.metrics import ALL_METRICS
from tests.deploy.helpers import (
    COMPOSE_FILE,
    K8S,
    REPO_ROOT,
    alert_names,
    dashboard_panels,
    load_yaml,
    recording_rule_names,
    settings_env_names,
)

OBSERVABILITY = (REPO_ROOT / "docs" / "OBSERVABILITY.md").read_text()
DEPLOYMENT = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text()


def test_every_metric_is_documented_with_its_exported_name() -> None:
    for metric in ALL_METRICS:
        name = f"{metric._name}_total" if metric._type == "counter" else metric._name
        assert f"`{name}`" in OBSERVABILITY, name


def test_every_rule_and_alert_is_documented() -> None:
    for name in recording_rule_names() | alert_names():
        assert f"`{name}`" in OBSERVABILITY, name


def test_every_dashboard_panel_is_documented() -> None:
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert f"**{panel['title']}**" in OBSERVABILITY, panel["title"]


def test_deployment_documents_every_setting_the_deployments_use_and_only_real_ones() -> None:
    compose = load_yaml(COMPOSE_FILE)
    used = {
        name
        for service in compose["services"].values()
        for name in service.get("environment", {})
        if name.startswith("NEUROSERVE_")
    }
    used |= set(load_yaml(K8S / "configmap.yaml")["data"])
    documented = set(re.findall(r"`(NEUROSERVE_[A-Z_]+)`", DEPLOYMENT))
    assert used <= documented, used - documented
    assert documented <= settings_env_names(), documented - settings_env_names()
