"""The Grafana dashboard, checked without Grafana.

Structure: a small JSON schema of our own (Grafana 10+ fields the dashboard
relies on), unique ids, a non-overlapping 24-column grid, the datasource and
job/namespace/pod variables, and every public metric on some panel.

Queries: a real Prometheus (Debian package, loopback, 1 s scrape) scrapes the
real service while a small load runs (echo round trips, some resets, and
connections beyond --max-connections 2 so rejected{reason="limit"} moves).
Every panel query and every variable query, with the template variables
substituted (one pod selected, and "All"), must succeed and return data.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import jsonschema
import pytest

from support import (
    DASHBOARDS,
    connect,
    echo_round_trip,
    echo_service,
    free_port,
    http_get,
    parse_metrics,
    prom_api,
    prometheus,
    wait_healthy,
)

DASHBOARD = json.loads((DASHBOARDS / "echo-service-dashboard.json").read_text())

# The Grafana 10+ dashboard model fields this dashboard depends on.
DASHBOARD_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "editable"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {"$ref": "#/definitions/variable"}}},
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/panel"}},
    },
    "definitions": {
        "variable": {
            "type": "object",
            "required": ["name", "type"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                "type": {"enum": ["datasource", "query", "custom", "constant", "interval", "textbox"]},
            },
        },
        "gridPos": {
            "type": "object",
            "required": ["h", "w", "x", "y"],
            "properties": {k: {"type": "integer", "minimum": 0} for k in "hwxy"},
        },
        "datasource": {
            "type": "object",
            "required": ["type", "uid"],
            "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
        },
        "panel": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"$ref": "#/definitions/gridPos"},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["panels", "collapsed"]},
            "else": {
                "required": ["datasource", "targets", "description"],
                "properties": {
                    "datasource": {"$ref": "#/definitions/datasource"},
                    "description": {"type": "string", "minLength": 1},
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["expr", "refId", "datasource"],
                            "properties": {
                                "expr": {"type": "string", "minLength": 1},
                                "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                "datasource": {"$ref": "#/definitions/datasource"},
                            },
                        },
                    },
                },
            },
        },
    },
}

JOB, NAMESPACE, POD = "echo-service", "delivery", "echo-service-0"
SELECTED = {"job": JOB, "namespace": NAMESPACE, "pod": POD}
ALL = {"job": ".*", "namespace": ".*", "pod": ".*"}
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def all_panels(panels):
    """Panels including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def targets():
    return [
        (p["title"], t) for p in all_panels(DASHBOARD["panels"]) if p["type"] != "row" for t in p["targets"]
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's template syntax: $var, ${var}, ${var:fmt}, [[var]]; unknown variables fail."""
    values = {**BUILTINS, **variables}

    def sub(m):
        name = m.group("a") or m.group("b") or m.group("c")
        if name not in values:
            raise AssertionError(f"unknown template variable ${name} in {expr}")
        return values[name]

    out = re.sub(r"\$\{(?P<a>\w+)(?::\w+)?\}|\[\[(?P<b>\w+)\]\]|\$(?P<c>\w+)", sub, expr)
    assert "$" not in out, out
    return out


# --- structure ---------------------------------------------------------------


def test_dashboard_matches_the_schema():
    jsonschema.Draft7Validator.check_schema(DASHBOARD_SCHEMA)
    jsonschema.Draft7Validator(DASHBOARD_SCHEMA).validate(DASHBOARD)


def test_panel_ids_unique_and_grid_does_not_overlap():
    panels = list(all_panels(DASHBOARD["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_variables_datasource_job_namespace_pod():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "namespace", "pod"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "namespace", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_query_is_filtered_by_the_variables():
    for title, t in targets():
        for var in ("job", "namespace", "pod"):
            assert f'{var}=~"${var}"' in t["expr"], f"{title}: {t['expr']}"


@pytest.mark.parametrize(
    "metric",
    [
        "echo_connections_active", "echo_connections_made_total", "echo_connections_lost_total",
        "echo_connections_rejected_total", "echo_received_bytes_total", "echo_sent_bytes_total",
        "echo_connection_duration_seconds_bucket", "echo_accept_errors_total", "echo_build_info",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
        "process_max_fds", "process_start_time_seconds", "up", "scrape_duration_seconds",
    ],
)
def test_every_public_metric_has_a_panel(metric):
    assert any(re.search(rf"\b{metric}\{{", t["expr"]) for _, t in targets()), metric


# --- live queries ----------------------------------------------------------------


def load(echo_port: int, stop: threading.Event, turn: threading.Lock, errors: list[str]) -> None:
    """Sequential echo connections of mixed sizes; every 5th ends with a reset.

    Each connection holds `turn`, so a burst holding it sees no load connection.
    """
    n = 0
    while not stop.is_set() and n < 2000:
        n += 1
        with turn:
            try:
                s = connect(echo_port)
                for size in (1, 700, 4096):
                    payload = bytes([65 + n % 26]) * size
                    if echo_round_trip(s, payload) != payload:
                        errors.append(f"connection {n}: echo mismatch")
                if n % 5 == 0:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError as exc:
                errors.append(f"connection {n}: {exc!r}")
        time.sleep(0.05)


def over_the_limit(echo_port: int, limit: int) -> int:
    """Open limit+2 connections at once; returns how many the service refused."""
    conns = [connect(echo_port) for _ in range(limit + 2)]
    refused = 0
    for s in conns:
        s.settimeout(2)
        try:
            s.sendall(b"x")
            if s.recv(1) != b"x":
                refused += 1
        except OSError:
            refused += 1
    for s in conns:
        s.close()
    return refused


@pytest.fixture(scope="module")
def scraped_prometheus(tmp_path_factory):
    """The service under load, scraped by a real Prometheus; yields (prom_port, admin_port)."""
    tmp = tmp_path_factory.mktemp("dashboards")
    echo_port, admin_port = free_port(), free_port()
    args = [
        f"--listen=127.0.0.1:{echo_port}", f"--admin-listen=127.0.0.1:{admin_port}",
        "--max-connections=2", "--drain-delay=0s", "--shutdown-timeout=1s",
    ]
    with echo_service(args, tmp=tmp) as proc:
        wait_healthy(proc, admin_port)
        targets_ = [{"job": JOB, "targets": [f"127.0.0.1:{admin_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}]
        with prometheus(targets_, tmp=tmp) as prom_port:
            stop, turn, errors = threading.Event(), threading.Lock(), []
            worker = threading.Thread(target=load, args=(echo_port, stop, turn, errors), daemon=True)
            worker.start()
            try:
                # Refuse some connections once Prometheus has seen the counter at 0,
                # so increase()/rate() over it are non-zero.
                wait_until_samples(prom_port, 2)
                with turn:
                    refused = over_the_limit(echo_port, 2)
                assert refused == 2, f"4 connections at once with --max-connections=2: {refused} refused"
                metrics = parse_metrics(http_get(admin_port, "/metrics")[1].decode())
                assert metrics.get('echo_connections_rejected_total{reason="limit"}', 0) >= 2, metrics
                wait_until_samples(prom_port, 5)
                yield prom_port, admin_port
            finally:
                stop.set()
                worker.join(10)
            assert errors == [], errors[:5]


def wait_until_samples(prom_port: int, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    query = f'count_over_time(echo_build_info{{job="{JOB}"}}[1m])'
    while time.monotonic() < deadline:
        res = prom_api(prom_port, "/api/v1/query", {"query": query})
        if res.get("status") == "success" and res["data"]["result"] and float(res["data"]["result"][0]["value"][1]) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not collect {n} scrapes of the service in {timeout}s")


def run_until_non_empty(prom_port: int, exprs: dict[str, str], timeout: float = 20.0) -> dict[str, str]:
    """Query each expr (instant and over the last 30 s, as Grafana does) until it has data.

    Returns {name: problem} for the ones that errored or stayed empty.
    """
    pending = dict(exprs)
    problems: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, expr in list(pending.items()):
            now = time.time()
            instant = prom_api(prom_port, "/api/v1/query", {"query": expr})
            ranged = prom_api(prom_port, "/api/v1/query_range",
                              {"query": expr, "start": str(now - 30), "end": str(now), "step": "1"})
            for res in (instant, ranged):
                if res.get("status") != "success":
                    problems[name] = f"{expr}: {res.get('errorType')}: {res.get('error')}"
                    pending.pop(name, None)
                    break
            else:
                if instant["data"]["result"] and ranged["data"]["result"]:
                    pending.pop(name)
        time.sleep(0.5)
    for name, expr in pending.items():
        problems[name] = f"{expr}: empty result"
    return problems


@pytest.mark.parametrize("variables", [SELECTED, ALL], ids=["one-pod", "all"])
def test_every_panel_query_returns_data(scraped_prometheus, variables):
    prom_port, _ = scraped_prometheus
    exprs = {f"{title} [{t['refId']}]": substitute(t["expr"], variables) for title, t in targets()}
    assert len(exprs) >= 20
    assert run_until_non_empty(prom_port, exprs) == {}


def test_variable_queries_find_the_service(scraped_prometheus):
    """label_values(metric{sel}, label) as Grafana runs it: /api/v1/label/<label>/values?match[]=."""
    prom_port, _ = scraped_prometheus
    expected = {"job": JOB, "namespace": NAMESPACE, "pod": POD}
    for var in DASHBOARD["templating"]["list"][1:]:
        assert var["definition"] == var["query"]
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1), ALL), m.group(2)
        res = prom_api(prom_port, f"/api/v1/label/{label}/values", {"match[]": selector})
        assert res["status"] == "success", res
        assert expected[var["name"]] in res["data"], (var["name"], res["data"])


def test_panels_show_the_traffic_that_happened(scraped_prometheus):
    """Spot checks that the data is the load's, not just any data."""
    prom_port, _ = scraped_prometheus
    sel = f'job="{JOB}"'
    checks = {
        "rejections at the limit": f'sum(increase(echo_connections_rejected_total{{{sel}, reason="limit"}}[1m])) > 0',
        "clean closes": f'sum(increase(echo_connections_lost_total{{{sel}, reason="peer_closed"}}[1m])) > 0',
        "resets": f'sum(increase(echo_connections_lost_total{{{sel}, reason="reset"}}[1m])) > 0',
        "bytes received and echoed": f'sum(rate(echo_received_bytes_total{{{sel}}}[1m])) > 0 and sum(rate(echo_sent_bytes_total{{{sel}}}[1m])) > 0',
        "durations observed": f'sum(increase(echo_connection_duration_seconds_count{{{sel}}}[1m])) > 0',
        "target up": f'up{{{sel}}} == 1',
    }
    problems = run_until_non_empty(prom_port, checks)
    assert problems == {}


# --- faults (issue 10) -------------------------------------------------------


@pytest.mark.parametrize("metric", ["echo_faults_enabled", "echo_faults_injected_total"])
def test_fault_metrics_have_a_panel_in_the_faults_row(metric):
    panels = list(all_panels(DASHBOARD["panels"]))
    rows = [p for p in panels if p["type"] == "row" and p["title"] == "Faults"]
    assert len(rows) == 1
    below = [p for p in panels if p["type"] != "row" and p["gridPos"]["y"] == rows[0]["gridPos"]["y"] + 1]
    assert any(re.search(rf"\b{metric}\{{", t["expr"]) for p in below for t in p["targets"]), metric


def test_fault_changes_annotation_query_runs(scraped_prometheus):
    prom_port, _ = scraped_prometheus
    annotations = [a for a in DASHBOARD["annotations"]["list"] if a.get("name") == "Fault changes"]
    assert len(annotations) == 1
    a = annotations[0]
    assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert "echo_faults_enabled{" in a["expr"]
    for variables in (SELECTED, ALL):
        expr = substitute(a["expr"], variables)
        res = prom_api(prom_port, "/api/v1/query", {"query": expr})
        assert res.get("status") == "success", (expr, res)
        # The operand is there for every fault kind (the query is empty only because nothing
        # changed during the load).
        operand = expr.rsplit(" > ", 1)[0]
        res = prom_api(prom_port, "/api/v1/query", {"query": operand})
        assert len(res["data"]["result"]) == 7, (operand, res)
