"""Shared helpers for the deployment tests: file locations, YAML loading, PromQL name scanning."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES_FILE = PROMETHEUS / "rules" / "neuroserve.rules.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
PROMETHEUS_CONFIGS = [PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus-k8s.yml"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "neuroserve.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![\w:$.])[a-zA-Z_:][\w:]*")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(neuroserve_* metric names, recording-rule names) an expression refers to.

    Quoted strings (label values, regexes) are dropped first, so only selectors remain;
    recording-rule names are the identifiers with a colon (level:metric:operations).
    """
    bare = _QUOTED.sub('""', expr)
    identifiers = set(_IDENTIFIER.findall(bare))
    metrics = {name for name in identifiers if name.startswith("neuroserve_") and ":" not in name}
    recorded = {name for name in identifiers if ":" in name.strip(":")}
    return metrics, recorded


def rules() -> list[dict]:
    """Every rule of every group in the rules file."""
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alert_names() -> set[str]:
    return {rule["alert"] for rule in rules() if "alert" in rule}


def dashboard_panels() -> list[dict]:
    """All panels, including those nested in collapsed rows."""
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def settings_env_names() -> set[str]:
    """The NEUROSERVE_* variables the server reads: one per Settings field."""
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def app_route_paths() -> set[str]:
    """Path templates the real app serves, from its OpenAPI document (full paths, prefixes
    included); the app is only built, nothing is loaded or served."""
    from service.app import create_app
    from service.settings import Settings

    return set(create_app(Settings(preload_models=False)).openapi()["paths"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON (exec form) arguments of the last `instruction` of the final stage."""
    (arguments,) = [args for keyword, args in dockerfile_instructions() if keyword == instruction][
        -1:
    ]
    return json.loads(arguments)
