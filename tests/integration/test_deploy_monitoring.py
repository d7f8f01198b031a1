"""The shipped Prometheus alert rules and Grafana dashboard: promtool checks the
rules and runs their unit tests, and every metric the rules and the
dashboard name is one the exporter really exposes (collected from a real
registry after the scripted run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import CollectorRegistry

from jobflow import JobFlow, UploadPolicy
from jobflow.adapters.localfs import LocalObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.metrics import JobflowMetrics, metrics_registry
from tests.conftest import QUIET_LOGGER
from tests.metrics_scenario import run_scenario
from tests.sqlstores import migrated_sqlite_file

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "jobflow-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "jobflow-alerts.test.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "jobflow.json"
METRIC = re.compile(r"\bjobflow_[a-zA-Z0-9_:]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which("promtool")
    if program is None:
        pytest.fail("promtool is not installed: run scripts/ensure-test-tools")
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=RULES.parent)


def test_promtool_checks_the_alert_rules() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


def test_each_alert_fires_on_a_failing_series_and_not_on_a_healthy_one() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    for alert in alerts:
        cases = [case for test in tests for case in test["alert_rule_test"]
                 if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in cases), f"{alert} never fires"
        assert any(not case["exp_alerts"] for case in cases), f"{alert} is never quiet"
        firing = [alert for case in cases for alert in case["exp_alerts"]]
        assert all(alert["exp_labels"].get("deployment") == "broken" for alert in firing)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The name of every sample a scrape shows after the scripted run (suffixes
    included: _total, _bucket, _sum, _count, _created)."""
    folder = tmp_path_factory.mktemp("exposed")
    engine = sa.create_engine(f"sqlite:///{migrated_sqlite_file(folder / 'jobs.sqlite3')}")
    registry = CollectorRegistry()
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(folder / "o"),
                   policy=UploadPolicy(backoff_seconds=0.01, backoff_max_seconds=0.01),
                   metrics=JobflowMetrics(registry), logger=QUIET_LOGGER)
    run_scenario(flow)
    yield {sample.name for family in metrics_registry(flow, registry=registry).collect()
           for sample in family.samples}
    engine.dispose()


def expressions(value: Any) -> Iterator[str]:
    """Every ``expr`` in a nested JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from expressions(item)


def test_the_grafana_dashboard_names_only_exported_metrics(exposed: set[str]) -> None:
    dashboard = json.loads(GRAFANA.read_text())
    found = list(expressions(dashboard["panels"]))
    assert len(found) >= 15
    named = {name for expr in found for name in METRIC.findall(expr)}
    assert named - exposed == set()
    # ...and shows each of them.
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exposed
                if name.startswith("jobflow_")}
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in named}
    assert families - shown == set()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]
            if panel["type"] != "row"} == {"${datasource}"}


def test_the_alert_rules_name_only_exported_metrics(exposed: set[str]) -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    named = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert named
    assert named - exposed == set()
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
