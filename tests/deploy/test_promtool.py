"""Prometheus configuration, rules and rule unit tests, checked by promtool itself.

promtool comes with Debian's `prometheus` package (the Makefile's test apt packages). These
tests run promtool only; they never start or need a Prometheus server.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import PROMETHEUS_CONFIGS, RULE_TESTS, RULES_FILE

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus provides it)"
)


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_rules_file_is_valid() -> None:
    result = promtool("check", "rules", RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_prometheus_config_is_valid_and_loads_the_rules(config: Path) -> None:
    result = promtool("check", "config", config.name, cwd=config.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The config's rule_files glob really reaches the rules file.
    assert f"Checking {RULES_FILE.relative_to(config.parent)}" in output
    assert "rules found" in output


@pytest.mark.parametrize("unit_test", RULE_TESTS, ids=lambda path: path.name)
def test_rule_unit_tests_pass(unit_test: Path) -> None:
    result = promtool("test", "rules", unit_test.name, cwd=unit_test.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_makes_promtool_fail(tmp_path: Path) -> None:
    """The unit tests are real: the same file with one expected value changed fails."""
    source = next(path for path in RULE_TESTS if path.name == "recording.test.yml")
    spec = yaml.safe_load(source.read_text())
    spec["rule_files"] = [str(RULES_FILE)]
    case = spec["tests"][0]["promql_expr_test"][0]
    case["exp_samples"][0]["value"] += 0.01
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = promtool("test", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
