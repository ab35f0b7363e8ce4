"""Writes dashboards/voiceclone-worker.json, the Grafana (10+) dashboard of the workers.

The panels are data below; the JSON is generated so every panel gets the same datasource,
model filter and layout. After editing: `python3 deploy/grafana/build_dashboard.py` (stdlib
only); a test fails while the committed JSON differs from what this writes.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "voiceclone-worker.json"
UID = "voiceclone-worker"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'  # the model selector; series without a model label are not filtered
RATE = "$__rate_interval"
WIDTH = 24  # Grafana's grid width


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    stack: bool = False
    kind: str = "timeseries"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def quantiles(metric: str, selector: str = MODEL) -> tuple[Query, ...]:
    """p50, p95 and p99 of a histogram, per model."""
    buckets = f"rate({metric}_bucket{{{selector}}}[{RATE}])"
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (model, le) ({buckets}))",
            f"p{q * 100:g} {{{{model}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    )


ROWS = (
    Row(
        "Throughput and outcomes",
        (
            Panel(
                "Requests by outcome",
                "reqps",
                (
                    Query(
                        f"sum by (outcome) (rate(voiceclone_requests_total{{{MODEL}}}[{RATE}]))",
                        "{{outcome}}",
                    ),
                ),
                "Clone requests finished per second: audio-ready, clone-failed, dead-lettered.",
                stack=True,
            ),
            Panel(
                "Requests by model",
                "reqps",
                (
                    Query(
                        f"sum by (model) (rate(voiceclone_requests_total{{{MODEL}}}[{RATE}]))",
                        "{{model}}",
                    ),
                ),
                stack=True,
            ),
            Panel(
                "Audio generated",
                "s",
                (
                    Query(
                        "sum by (model) "
                        f"(rate(voiceclone_audio_generated_seconds_total{{{MODEL}}}[{RATE}]))",
                        "{{model}}",
                    ),
                ),
                "Seconds of audio generated per second of wall time.",
                stack=True,
            ),
            Panel(
                "Workers up",
                "short",
                (
                    Query('sum(up{job="voiceclone-worker"})', "up"),
                    Query("count by (version) (voiceclone_build_info)", "version {{version}}"),
                ),
                kind="stat",
            ),
        ),
    ),
    Row(
        "Latency",
        (
            Panel(
                "End-to-end latency (created_at → audio-ready)",
                "s",
                quantiles(
                    "voiceclone_end_to_end_latency_seconds", f'outcome="audio_ready", {MODEL}'
                ),
            ),
            Panel(
                "p95 per stage",
                "s",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (stage, le) "
                        f"(rate(voiceclone_stage_duration_seconds_bucket{{{MODEL}}}[{RATE}])))",
                        "{{stage}}",
                    ),
                ),
                "Where the time goes: fetch_reference, inference, encode, upload, publish.",
            ),
            Panel(
                "Busy seconds per stage",
                "s",
                (
                    Query(
                        "sum by (stage) "
                        f"(rate(voiceclone_stage_duration_seconds_sum{{{MODEL}}}[{RATE}]))",
                        "{{stage}}",
                    ),
                ),
                "Seconds spent per second of wall time in each stage, all requests together.",
                stack=True,
            ),
            Panel(
                "Real-time factor",
                "short",
                quantiles("voiceclone_real_time_factor"),
                "Inference seconds per second of audio; below 1 is faster than real time.",
            ),
        ),
    ),
    Row(
        "Cold starts",
        (
            Panel(
                "Cold starts",
                "short",
                (
                    Query(
                        "sum by (backend, model) "
                        f"(increase(voiceclone_cold_starts_total{{{MODEL}}}[{RATE}]))",
                        "{{backend}} {{model}}",
                    ),
                ),
            ),
            Panel(
                "Cold-start share of backend calls",
                "percentunit",
                (
                    Query(
                        "sum by (backend, model) "
                        f"(rate(voiceclone_cold_starts_total{{{MODEL}}}[{RATE}])) / "
                        "sum by (backend, model) "
                        f"(rate(voiceclone_backend_call_duration_seconds_count{{{MODEL}}}[{RATE}]))",
                        "{{backend}} {{model}}",
                    ),
                ),
            ),
            Panel(
                "Model load time",
                "s",
                quantiles("voiceclone_model_load_seconds"),
            ),
            Panel(
                "Backend call p95, cold vs warm",
                "s",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (backend, cold_start, le) (rate("
                        f"voiceclone_backend_call_duration_seconds_bucket{{{MODEL}}}[{RATE}])))",
                        "{{backend}} cold_start={{cold_start}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Lag and in-flight",
        (
            Panel(
                "Consumer lag per partition",
                "short",
                (
                    Query(
                        "sum by (topic, partition) (voiceclone_consumer_lag_records)",
                        "{{topic}}:{{partition}}",
                    ),
                ),
                "Requests waiting per partition of the requests topic.",
                stack=True,
            ),
            Panel(
                "In flight per worker",
                "short",
                (Query("sum by (instance) (voiceclone_requests_in_flight)", "{{instance}}"),),
                stack=True,
            ),
            Panel(
                "Rebalances",
                "short",
                (
                    Query(
                        f"sum by (event) (increase(voiceclone_rebalances_total[{RATE}]))",
                        "{{event}}",
                    ),
                ),
            ),
            Panel(
                "Commit failures",
                "short",
                (
                    Query(
                        f"sum by (instance) (increase(voiceclone_commit_failures_total[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Errors and DLQ",
        (
            Panel(
                "Failures by error code",
                "reqps",
                (
                    Query(
                        "sum by (error_code) "
                        f"(rate(voiceclone_failures_total{{{MODEL}}}[{RATE}])) > 0",
                        "{{error_code}}",
                    ),
                ),
                stack=True,
            ),
            Panel(
                "Error ratio",
                "percentunit",
                (
                    Query(
                        "sum by (model) (rate(voiceclone_requests_total"
                        f'{{outcome="failed", {MODEL}}}[{RATE}])) / '
                        "sum by (model) (rate(voiceclone_requests_total"
                        f'{{outcome=~"audio_ready|failed", {MODEL}}}[{RATE}]))',
                        "{{model}}",
                    ),
                ),
                "Share of outcomes that are clone-failed, cancellations and client errors "
                "included (the alert counts server-side failures only).",
            ),
            Panel(
                "Dead letters by reason",
                "short",
                (
                    Query(
                        f"sum by (reason) (increase(voiceclone_dead_letters_total[{RATE}])) > 0",
                        "{{reason}}",
                    ),
                ),
                stack=True,
            ),
            Panel(
                "Generations cut at their frame cap",
                "short",
                (
                    Query(
                        "sum by (backend, model) "
                        f"(increase(voiceclone_generation_capped_total{{{MODEL}}}[{RATE}]))",
                        "{{backend}} {{model}}",
                    ),
                ),
                "Results whose audio the engine cut at a chunk's frame cap: the model never "
                "said its end token (runaway generation; their audio may end mid-word).",
            ),
            Panel(
                "Retries by reason",
                "short",
                (
                    Query(
                        f"sum by (reason) (increase(voiceclone_retries_total[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                stack=True,
            ),
        ),
    ),
)


def panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, object]:
    defaults: dict[str, object] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        stacking = {"mode": "normal" if panel.stack else "none"}
        defaults["custom"] = {"stacking": stacking, "fillOpacity": 10}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
            }
            for index, query in enumerate(panel.queries)
        ],
    }


def panels_json() -> list[dict[str, object]]:
    """Rows laid out top to bottom, each row's panels side by side in equal widths."""
    panels: list[dict[str, object]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        width = WIDTH // len(row.panels)
        for index, panel in enumerate(row.panels):
            panels.append(panel_json(panel, len(panels) + 1, index * width, y, width))
        y += 8
    return panels


def templating() -> dict[str, object]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            },
            {
                "name": "model",
                "label": "Model",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {
                    "query": "label_values(voiceclone_requests_total, model)",
                    "refId": "models",
                },
                "definition": "label_values(voiceclone_requests_total, model)",
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "sort": 1,
                "hide": 0,
            },
        ]
    }


def dashboard() -> dict[str, object]:
    return {
        "uid": UID,
        "title": "Voiceclone worker",
        "description": "Throughput, latency, cold starts, lag and errors of the voiceclone worker.",
        "tags": ["voiceclone", "kafka", "tts"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": panels_json(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUTPUT}\n")
