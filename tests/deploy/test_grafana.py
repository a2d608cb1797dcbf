"""The provisioned Grafana dashboard: valid JSON, real series only, unique ids, wired datasource."""

from __future__ import annotations

import pytest

from service.metrics import series_names
from tests.deploy.helpers import (
    COMPOSE_FILE,
    DASHBOARD,
    GRAFANA_PROVISIONING,
    dashboard_panels,
    load_dashboard,
    load_yaml,
    promql_names,
    recording_rule_names,
    rules,
)

# What the observability issue asks the dashboard to show, as words each panel title carries.
REQUIRED_PANEL_TOPICS = [
    "latency",
    "throughput",
    "error ratio",
    "active sessions",
    "coverage",
    "mean prediction set size",
    "prediction set sizes",
    "reliability diagram",
    "ece",
    "aci alpha",
    "energy per prediction",
    "spike sparsity",
    "micro-batch",
    "state-store latency",
    "state-store errors",
    "fine-tuning jobs",
]


def query_panels() -> list[dict]:
    return [panel for panel in dashboard_panels() if panel.get("targets")]


def expressions() -> list[str]:
    return [target["expr"] for panel in query_panels() for target in panel["targets"]]


def test_dashboard_is_json_with_an_id_and_a_schema_version() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap() -> None:
    boxes = [panel["gridPos"] for panel in dashboard_panels()]
    for i, a in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["w"] <= 24
        for b in boxes[i + 1 :]:
            overlap = (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            )
            assert not overlap, (a, b)


def family(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        series = series.removesuffix(suffix)
    return series


def test_every_query_refers_only_to_defined_metrics_and_recording_rules() -> None:
    defined, recorded = set(series_names()), recording_rule_names()
    rule_expressions = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    shown: set[str] = set()
    for expr in expressions():
        metrics, used_rules = promql_names(expr)
        assert metrics <= defined, (expr, metrics - defined)
        assert used_rules <= recorded, (expr, used_rules - recorded)
        shown |= metrics
        for name in used_rules:  # a recording rule shows the series it is computed from
            shown |= promql_names(rule_expressions[name])[0]
    # The dashboard shows every neuroserve series family, directly or through a rule.
    missing = {family(name) for name in defined} - {family(name) for name in shown}
    assert not missing, missing


def test_template_variables_query_defined_metrics() -> None:
    for variable in load_dashboard()["templating"]["list"]:
        metrics, _ = promql_names(variable["query"]["query"])
        assert metrics and metrics <= set(series_names())


@pytest.mark.parametrize("topic", REQUIRED_PANEL_TOPICS)
def test_the_issue_s_panels_are_there(topic: str) -> None:
    titles = [panel["title"].lower() for panel in query_panels()]
    assert any(topic in title for title in titles), topic


def test_every_query_panel_has_a_description_and_unique_ref_ids() -> None:
    for panel in query_panels():
        assert panel.get("description"), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_reliability_diagram_plots_accuracy_and_confidence_per_bin() -> None:
    panel = next(p for p in query_panels() if p["title"] == "Reliability diagram")
    assert panel["type"] == "barchart" and panel["options"]["xField"] == "bin"
    used = set().union(*(promql_names(t["expr"])[0] for t in panel["targets"]))
    assert used == {
        "neuroserve_reliability_correct_total",
        "neuroserve_reliability_confidence_sum_total",
        "neuroserve_reliability_predictions_total",
    }
    assert all("sum by (bin)" in target["expr"] for target in panel["targets"])


def test_panels_use_the_provisioned_datasource() -> None:
    datasources = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    for panel in query_panels():
        for item in [panel, *panel["targets"]]:
            assert item["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}
    # Inside the compose network Prometheus is the service of that name.
    assert prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in load_yaml(COMPOSE_FILE)["services"]


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "neuroserve.yml")["providers"]
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    mounts = dict(
        volume.rsplit(":", 2)[:2] for volume in grafana["volumes"] if volume.startswith("./")
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert DASHBOARD.parent.name == "dashboards"
