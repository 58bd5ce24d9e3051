"""deploy/grafana and deploy/prometheus: the dashboard queries only metrics agentmesh.metrics defines,
and the Prometheus config (and every dashboard query, through promtool when installed) is valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentmesh.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "agentmesh-dashboard.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# Prometheus's own series the dashboard may use besides agentmesh's.
BUILTIN_SERIES = {"up"}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_HISTOGRAMS = {n for n in METRIC_NAMES if n.endswith("_seconds")}
ALLOWED = METRIC_NAMES | {h + s for h in _HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | BUILTIN_SERIES


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges, groupings and
    function names taken out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("("):  # a function call
            continue
        if m.group() not in _KEYWORDS:
            names.add(m.group())
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def test_series_names_parser() -> None:
    q = "histogram_quantile(0.95, sum by (role, le) "
    q += '(rate(agentmesh_step_duration_seconds_bucket{run=~"$run"}[5m])))'
    assert series_names(q) == {"agentmesh_step_duration_seconds_bucket"}
    assert series_names('sum(up{job="a"}) / sum(agentmesh_x_total) and on (run) foo') == {
        "up",
        "agentmesh_x_total",
        "foo",
    }


def test_dashboard_queries_only_defined_metrics() -> None:
    dash = dashboard()
    found = exprs(dash)
    assert len(found) >= 20
    used: set[str] = set()
    for title, expr in found:
        names = series_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= ALLOWED, f"panel {title!r} queries undefined {sorted(names - ALLOWED)}: {expr}"
        used |= names
    # Every family has a panel (histograms through their buckets or sums).
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert METRIC_NAMES - covered == set()


def test_dashboard_shape() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "run" in variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("queue", "steps in progress", "tasks per second", "tokens per second per model",
                   "tokens per second per role", "utilisation", "llm latency", "errors", "hop latency",
                   "sandbox pool"):  # fmt: skip
        assert wanted in titles, wanted
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["gridPos"]["w"] > 0 and p["gridPos"]["h"] > 0


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (deploy/install_prometheus.sh)"
)
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:expr_{i}",
                        # Grafana's variables become what they stand for.
                        "expr": expr.replace("$__rate_interval", "1m").replace("$run", ".*"),
                    }
                    for i, (_, expr) in enumerate(exprs(dashboard()))
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_parses() -> None:
    conf = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    agentmesh = jobs["agentmesh"]
    assert agentmesh["honor_labels"] is True
    assert agentmesh["file_sd_configs"][0]["files"]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (deploy/install_prometheus.sh)"
)
def test_promtool_accepts_the_config() -> None:
    out = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
