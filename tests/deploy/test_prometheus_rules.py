"""The rules refer only to real series, and every rule has promtool unit tests both ways."""

from __future__ import annotations

import pytest

from service.metrics import series_names
from tests.deploy.helpers import (
    PROMETHEUS_CONFIGS,
    RULE_TESTS,
    alert_names,
    load_yaml,
    promql_names,
    recording_rule_names,
    rules,
)

ALERTS_REQUIRED_BY_THE_ISSUE = {
    "NeuroserveCoverageBelowTarget",
    "NeuroserveCalibrationErrorHigh",
    "NeuroserveStateStoreErrors",
    "NeuroserveHighLatency",
    "NeuroserveAllServersDown",
}


def unit_tests() -> list[dict]:
    return [case for path in RULE_TESTS for case in load_yaml(path)["tests"]]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("record") or r.get("alert"))
def test_rule_expressions_use_defined_metrics_and_rules(rule: dict) -> None:
    metrics, recorded = promql_names(rule["expr"])
    assert metrics <= set(series_names()), metrics - set(series_names())
    assert recorded <= recording_rule_names(), recorded - recording_rule_names()


def test_the_issue_s_alerts_exist_with_a_severity_and_a_summary() -> None:
    assert alert_names() >= ALERTS_REQUIRED_BY_THE_ISSUE
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_every_recording_rule_has_an_expected_value_in_a_unit_test() -> None:
    tested = {
        name
        for case in unit_tests()
        for expr_test in case.get("promql_expr_test", [])
        if expr_test.get("exp_samples")
        for name in promql_names(expr_test["expr"])[1]
    }
    assert recording_rule_names() <= tested, recording_rule_names() - tested


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing, silent = set(), set()
    for case in unit_tests():
        for alert_test in case.get("alert_rule_test", []):
            (firing if alert_test.get("exp_alerts") else silent).add(alert_test["alertname"])
    assert alert_names() <= firing, alert_names() - firing
    assert alert_names() <= silent, alert_names() - silent


def test_alerts_wait_before_firing() -> None:
    # "for" turns a blip into a pending alert; the issue asks 10m for coverage, 15m for ECE.
    durations = {rule["alert"]: rule.get("for") for rule in rules() if "alert" in rule}
    assert durations["NeuroserveCoverageBelowTarget"] == "10m"
    assert durations["NeuroserveCalibrationErrorHigh"] == "15m"
    assert all(durations.values())


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_scrape_jobs_are_the_ones_the_alerts_name(config) -> None:
    jobs = {job["job_name"] for job in load_yaml(config)["scrape_configs"]}
    assert {"neuroserve", "neuroserve-worker"} <= jobs
    assert load_yaml(config)["rule_files"] == ["rules/*.yml"]
