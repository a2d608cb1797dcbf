"""The PromQL name scanner the dashboard and rule tests rely on."""

from tests.deploy.helpers import promql_names


def test_finds_metrics_and_recording_rules_but_not_labels_functions_or_strings() -> None:
    expr = (
        'sum by (route, le) (rate(neuroserve_request_duration_seconds_bucket{route=~"/v1/.*",'
        ' model="neuroserve_fake_total"}[$__rate_interval]))'
        " / on (route) route:neuroserve_requests:error_ratio_rate5m"
        ' and up{job="a:b"} > 0 and rate(x[5m:1m]) > 0'
    )
    metrics, recorded = promql_names(expr)
    assert metrics == {"neuroserve_request_duration_seconds_bucket"}
    assert recorded == {"route:neuroserve_requests:error_ratio_rate5m"}


def test_grafana_variables_are_not_names() -> None:
    expr = "rate(neuroserve_predictions_total[$__range]) * $__interval_ms"
    metrics, recorded = promql_names(expr)
    assert metrics == {"neuroserve_predictions_total"}
    assert recorded == set()
