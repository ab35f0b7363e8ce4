"""deploy/prometheus and deploy/grafana: valid for the real tools, in step with the metrics the
worker exports, and every alert with its runbook page in the docs.

promtool checks the rules, the scrape config and every dashboard query; promtool's unit tests
(alerts_test.yml) show each alert firing on the series it is meant for; a real Prometheus loads
the rules and evaluates them over a real worker metrics endpoint.
"""

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.observability.health import Health
from consumer.observability.server import ObservabilityServer
from consumer.observability.settings import HttpServerSettings
from consumer.telemetry import Metrics, exported_names, render_table
from schemas.events import ErrorCode
from tests.fixtures.prometheus import JOB, PrometheusServer, PrometheusTools, StartPrometheus
from tests.schemas.samples import CREATED, full_audio_ready, full_failed, full_request

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "voiceclone-worker.json"
DOCS = ROOT / "docs"
METRICS_PAGE = DOCS / "operations" / "metrics.md"
ALERTS_PAGE = DOCS / "operations" / "alerts.md"
MKDOCS_CONFIG = ROOT / "mkdocs.yml"
METRIC_NAME = re.compile(r"\bvoiceclone_[a-z0-9_]+\b")
# Grafana's template variables, replaced by values that make each query concrete PromQL.
TEMPLATE_VALUES = {"$__rate_interval": "1m", "$model": ".*"}


def alert_rules() -> list[dict[str, Any]]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    return group["rules"]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> dict[str, str]:
    """refId-qualified panel title → PromQL, for every target of every panel."""
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", ())
    }


def concrete(expr: str) -> str:
    for variable, value in TEMPLATE_VALUES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown template variable in {expr!r}"
    return expr


def load_builder() -> ModuleType:
    """build_dashboard.py is a script, not a package module: load it by path."""
    path = GRAFANA_DIR / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("grafana_build_dashboard", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def check(tools: PrometheusTools, *args: str) -> None:
    result = tools.promtool_run(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool(prometheus_tools: PrometheusTools) -> None:
    check(prometheus_tools, "check", "rules", str(ALERTS))


def test_alerts_fire_in_promtool_unit_tests(prometheus_tools: PrometheusTools) -> None:
    check(prometheus_tools, "test", "rules", str(ALERT_TESTS))


def test_scrape_config_passes_promtool(prometheus_tools: PrometheusTools) -> None:
    check(prometheus_tools, "check", "config", str(SCRAPE_CONFIG))
    assert f"job_name: {JOB}\n" in SCRAPE_CONFIG.read_text()


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))

    assert len(alert_names()) == 9
    assert set(alert_names()) == tested


def test_every_dashboard_query_passes_promtool(
    prometheus_tools: PrometheusTools, tmp_path: Path
) -> None:
    queries = dashboard_queries()
    rules = [
        {"record": f"dashboard:query_{index}", "expr": concrete(expr)}
        for index, expr in enumerate(queries.values())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))

    check(prometheus_tools, "check", "rules", str(path))
    assert len(queries) >= 20


def test_queries_name_only_metrics_the_worker_exports() -> None:
    exported = exported_names(Metrics(CollectorRegistry()).registry)
    variables = json.dumps(dashboard()["templating"])
    sources = {
        "alerts.yml": ALERTS.read_text(),
        "dashboard variables": variables,
        **dashboard_queries(),
    }

    unknown = {
        where: sorted(set(METRIC_NAME.findall(text)) - exported)
        for where, text in sources.items()
        if set(METRIC_NAME.findall(text)) - exported
    }
    assert unknown == {}
    assert set(METRIC_NAME.findall(variables)) == {"voiceclone_requests_total"}


def test_the_dashboard_shows_every_worker_metric() -> None:
    used = {name for expr in dashboard_queries().values() for name in METRIC_NAME.findall(expr)}
    families = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}

    missing = {family for family in families if not any(name.startswith(family) for name in used)}
    assert missing == set()


def test_dashboard_is_what_its_builder_writes() -> None:
    assert DASHBOARD.read_text() == load_builder().render(), (
        "run `python3 deploy/grafana/build_dashboard.py`"
    )


def test_dashboard_rows_model_selector_and_layout() -> None:
    board = dashboard()
    panels = board["panels"]
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}

    assert rows == [
        "Throughput and outcomes",
        "Latency",
        "Cold starts",
        "Lag and in-flight",
        "Errors and DLQ",
    ]
    assert variables["model"]["multi"] is True
    assert variables["model"]["includeAll"] is True
    assert variables["datasource"]["query"] == "prometheus"
    assert board["schemaVersion"] >= 38  # Grafana 10
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = [
        (x, y)
        for panel in panels
        for x in range(panel["gridPos"]["x"], panel["gridPos"]["x"] + panel["gridPos"]["w"])
        for y in range(panel["gridPos"]["y"], panel["gridPos"]["y"] + panel["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(x < 24 for x, _ in cells)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            exprs = [target["expr"] for target in panel["targets"]]
            assert all('model=~"$model"' in expr or "model" not in expr for expr in exprs)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    provisioning = GRAFANA_DIR / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    dashboards = yaml.safe_load((provisioning / "dashboards" / "voiceclone.yaml").read_text())

    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True  # what the dashboard's datasource variable picks
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/voiceclone"
    assert datasources["apiVersion"] == dashboards["apiVersion"] == 1


def test_every_alert_says_what_happened_and_how_bad() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys()
        assert f'job="{JOB}"' in rule["expr"] or "voiceclone_" in rule["expr"]


def test_every_alert_links_its_runbook_page_in_the_docs() -> None:
    runbooks = {rule["alert"]: rule["annotations"]["runbook_url"] for rule in alert_rules()}
    nav = MKDOCS_CONFIG.read_text()
    alerts_page = ALERTS_PAGE.read_text()

    assert set(runbooks) == set(alert_names())
    for alert, url in runbooks.items():
        assert url == f"docs/operations/runbooks/{alert}.md"
        page = ROOT / url
        assert page.read_text().startswith(f"# {alert}\n"), url
        assert f"- {page.relative_to(DOCS).as_posix()}\n" in nav, f"{url} not in mkdocs.yml"
        assert f"[`{alert}`](runbooks/{alert}.md)" in alerts_page
    runbook_pages = {path.stem for path in (DOCS / "operations" / "runbooks").glob("*.md")}
    assert runbook_pages == set(alert_names())


def test_docs_metric_table_is_current() -> None:
    assert render_table() in METRICS_PAGE.read_text(), (
        "paste `python -m consumer.telemetry` into docs/operations/metrics.md"
    )


async def test_prometheus_loads_the_rules_and_alerts_on_worker_metrics(
    start_prometheus: StartPrometheus,
) -> None:
    metrics = Metrics(CollectorRegistry())
    server = ObservabilityServer(
        HttpServerSettings(host="127.0.0.1", port=0), metrics, Health(60, 1)
    )
    await server.start()
    instance = f"127.0.0.1:{server.port}"
    try:
        prometheus = await start_prometheus([instance], rule_files=[ALERTS])
        await prometheus.wait_for(
            f'up{{job="{JOB}"}}', lambda r: len(r) == 1 and r[0]["value"][1] == "1"
        )
        await _until_rules_evaluated(prometheus)

        request = full_request()  # model 0.6B
        failed = full_failed().model_copy(update={"error_code": ErrorCode.INFERENCE_FAILED})
        for _ in range(3):
            metrics.outcome_published(request, failed, now=CREATED)
        metrics.outcome_published(request, full_audio_ready(), now=CREATED)
        metrics.dead_lettered("corrupt")

        alerts = await _until_alerts(
            prometheus, {"VoicecloneHighErrorRatio", "VoicecloneDeadLetters"}
        )
        assert alerts["VoicecloneHighErrorRatio"]["labels"]["model"] == "0.6B"
        assert alerts["VoicecloneHighErrorRatio"]["state"] == "pending"  # for: 10m
        assert float(alerts["VoicecloneHighErrorRatio"]["value"]) == pytest.approx(0.75)
        assert alerts["VoicecloneDeadLetters"]["labels"]["reason"] == "corrupt"
        assert alerts["VoicecloneDeadLetters"]["state"] == "firing"  # no `for`: at once
    finally:
        await server.stop()

    alerts = await _until_alerts(prometheus, {"VoicecloneWorkerDown"})
    assert alerts["VoicecloneWorkerDown"]["labels"]["instance"] == instance
    assert alerts["VoicecloneWorkerDown"]["state"] == "pending"  # for: 5m


async def _until_rules_evaluated(prometheus: PrometheusServer) -> None:
    """Every alert rule loaded, evaluated at least once, without errors."""
    async with asyncio.timeout(30):
        while True:
            groups = (await prometheus.api("rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if len(rules) == len(alert_names()) and all(rule["health"] == "ok" for rule in rules):
                assert {rule["name"] for rule in rules} == set(alert_names())
                return
            assert all(rule["health"] != "err" for rule in rules), rules
            await asyncio.sleep(0.25)


async def _until_alerts(prometheus: PrometheusServer, names: set[str]) -> dict[str, dict[str, Any]]:
    """The active alerts by name, once all of `names` are among them."""
    async with asyncio.timeout(30):
        while True:
            alerts = (await prometheus.api("alerts"))["alerts"]
            active = {alert["labels"]["alertname"]: alert for alert in alerts}
            if names <= active.keys():
                return active
            await asyncio.sleep(0.25)
