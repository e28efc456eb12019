"""The Grafana dashboard, checked without Grafana.

Structure: a small JSON schema of our own (Grafana 10+ fields the dashboard
relies on), unique ids, a non-overlapping 24-column grid, the datasource and
job/namespace/pod variables, and every public metric on some panel.

Queries: a real Prometheus (Debian package, loopback, 1 s scrape) scrapes the
real service while a small load runs (echo round trips, some resets, and
connections beyond --max-connections 2 so rejected{reason="limit"} moves).
The service also runs a TLS listener (a throwaway openssl certificate) and a
UDP listener; the load does a TLS round trip and a UDP datagram with every
connection, and every 10th TLS connection sends garbage instead of a
ClientHello (result="protocol"). Every panel query and every variable query, with the template variables
substituted (one pod selected, and "All"), must succeed and return data.

"All" is substituted the way Grafana does it: a variable's allValue when it has
one, else the regex of every value its own query finds, `(a|b)`. The same
Prometheus also scrapes itself and a stand-in for the kubelet's cAdvisor
(container_spec_memory_limit_bytes, which only a cluster has), so "All" is
checked to select echo-service targets and nothing else.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

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

JOB, NAMESPACE, POD, CLUSTER = "echo-service", "delivery", "echo-service-0", "local"
SELECTED = {"cluster": CLUSTER, "job": JOB, "namespace": NAMESPACE, "pod": POD}
ALL = "all"  # computed from the live variable queries, see grafana_all()
MEMORY_LIMIT = 128 * 1024 * 1024
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


def test_variables_datasource_cluster_job_namespace_pod():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "job", "namespace", "pod"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "job", "namespace", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["includeAll"] and variables[name]["multi"]
    # "All" must mean every echo-service target: the values the variable found,
    # not ".*" (which matches every target in Prometheus). Only the optional
    # cluster label may match anything (the job/namespace/pod filters still apply).
    for name in ("job", "namespace", "pod"):
        assert "allValue" not in variables[name], name
    assert variables["cluster"]["allValue"] == ".*"


def test_every_query_is_filtered_by_the_variables():
    for title, t in targets():
        for var in ("cluster", "job", "namespace", "pod"):
            assert f'{var}=~"${var}"' in t["expr"], f"{title}: {t['expr']}"


def test_dashboard_has_restart_and_alert_annotations():
    names = {a["name"]: a for a in DASHBOARD["annotations"]["list"]}
    assert "process_start_time_seconds" in names["Restarts"]["expr"]
    assert names["Alerts"]["expr"].startswith("ALERTS{") and 'alertname=~"EchoService.*"' in names["Alerts"]["expr"]
    for name in ("Restarts", "Alerts"):
        assert names[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize(
    "metric",
    [
        "echo_connections_active", "echo_connections_made_total", "echo_connections_lost_total",
        "echo_connections_rejected_total", "echo_received_bytes_total", "echo_sent_bytes_total",
        "echo_connection_duration_seconds_bucket", "echo_accept_errors_total", "echo_build_info",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
        "process_max_fds", "process_start_time_seconds", "up", "scrape_duration_seconds",
        "echo_connections_limit", "container_spec_memory_limit_bytes",
        "echo_tls_handshakes_total", "echo_tls_reloads_total", "echo_tls_certificate_expiry_timestamp_seconds",
        "echo_datagrams_received_total", "echo_datagrams_sent_total", "echo_datagrams_dropped_total",
    ],
)
def test_every_public_metric_has_a_panel(metric):
    assert any(re.search(rf"\b{metric}\{{", t["expr"]) for _, t in targets()), metric


# --- live queries ----------------------------------------------------------------


CERT_DAYS = 30


def throwaway_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA certificate for 127.0.0.1, valid CERT_DAYS days (openssl CLI)."""
    crt, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", str(CERT_DAYS), "-subj", "/CN=echo-service",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return crt, key


def tls_and_udp_round_trip(n: int, ports: dict, context: ssl.SSLContext) -> list[str]:
    """One TLS echo (or, every 10th time, garbage instead of a ClientHello) and one UDP datagram."""
    errors = []
    payload = bytes([97 + n % 26]) * (1 + n % 900)
    s = connect(ports["tls"])
    if n % 10 == 0:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS: the service counts result="protocol"
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.recv(1024)
        s.close()
    else:
        with context.wrap_socket(s, server_hostname="127.0.0.1") as t:
            if echo_round_trip(t, payload) != payload:
                errors.append(f"TLS connection {n}: echo mismatch")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    try:
        u.sendto(payload, ("127.0.0.1", ports["udp"]))
        if u.recvfrom(2048)[0] != payload:
            errors.append(f"datagram {n}: echo mismatch")
    finally:
        u.close()
    return errors


def load(ports: dict, stop: threading.Event, turn: threading.Lock, errors: list[str], context: ssl.SSLContext) -> None:
    """Sequential echo connections of mixed sizes; every 5th ends with a reset. With each one,
    a TLS round trip and a UDP datagram (tls_and_udp_round_trip).

    Each connection holds `turn`, so a burst holding it sees no load connection.
    """
    echo_port = ports["tcp"]
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
                errors.extend(tls_and_udp_round_trip(n, ports, context))
            except OSError as exc:
                errors.append(f"connection {n}: {exc!r}")
        time.sleep(0.05)


def wait_no_active_connection(admin_port: int, timeout: float = 10.0) -> None:
    """Wait until the service reports echo_connections_active == 0."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = parse_metrics(http_get(admin_port, "/metrics")[1].decode())
        active = metrics.get("echo_connections_active")
        if active == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"echo_connections_active still {active} after {timeout}s")
        time.sleep(0.02)


def over_the_limit(echo_port: int, limit: int) -> int:
    """Open limit+2 connections at once; returns how many the service refused."""
    conns = [connect(echo_port) for _ in range(limit + 2)]
    refused = 0
    for s in conns:
        s.settimeout(10)  # generous: the machine may be loaded; a hang still fails
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
    ports = {"tcp": echo_port, "tls": free_port(), "udp": free_port()}
    crt, key = throwaway_certificate(tmp)
    context = ssl.create_default_context(cafile=str(crt))
    args = [
        f"--listen=127.0.0.1:{echo_port}", f"--admin-listen=127.0.0.1:{admin_port}",
        "--max-connections=2", "--drain-delay=0s", "--shutdown-timeout=1s",
        f"--tls-listen=127.0.0.1:{ports['tls']}", f"--tls-cert={crt}", f"--tls-key={key}",
        f"--udp-listen=127.0.0.1:{ports['udp']}",
    ]
    with echo_service(args, tmp=tmp) as proc:
        wait_healthy(proc, admin_port)
        targets_ = [{"job": JOB, "targets": [f"127.0.0.1:{admin_port}"], "labels": {"namespace": NAMESPACE, "pod": POD, "cluster": CLUSTER}}]
        with fake_cadvisor() as cadvisor, prometheus(targets_ + [cadvisor], tmp=tmp, self_scrape=True) as prom_port:
            stop, turn, errors = threading.Event(), threading.Lock(), []
            worker = threading.Thread(target=load, args=(ports, stop, turn, errors, context), daemon=True)
            worker.start()
            try:
                # Refuse some connections once Prometheus has seen the counter at 0,
                # so increase()/rate() over it are non-zero.
                wait_until_samples(prom_port, 2)
                with turn:
                    # The last load connection is closed on our side, but the service may not
                    # have counted it gone yet: it would take one of the two slots.
                    wait_no_active_connection(admin_port)
                    refused = over_the_limit(echo_port, 2)
                assert refused == 2, f"4 connections at once with --max-connections=2: {refused} refused"
                metrics = parse_metrics(http_get(admin_port, "/metrics")[1].decode())
                assert metrics.get('echo_connections_rejected_total{listener="tcp",reason="limit"}', 0) >= 2, metrics
                wait_until_samples(prom_port, 5)
                yield prom_port, admin_port
            finally:
                stop.set()
                worker.join(10)
            assert errors == [], errors[:5]


class CadvisorStandIn(http.server.BaseHTTPRequestHandler):
    """The one kubelet/cAdvisor series the dashboard reads: the container memory limit.

    No kubelet here; this serves what a kubelet's /metrics/cadvisor serves for the
    chart's pod (job "kubelet", namespace/pod/container labels), plus the same
    series for a pod that is not echo-service, which "All" must not pick up.
    """

    body = (
        "# TYPE container_spec_memory_limit_bytes gauge\n"
        f'container_spec_memory_limit_bytes{{namespace="{NAMESPACE}",pod="{POD}",container="echo-service"}} {MEMORY_LIMIT}\n'
        'container_spec_memory_limit_bytes{namespace="kube-system",pod="coredns-0",container="echo-service"} 1e9\n'
    ).encode()

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_cadvisor():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CadvisorStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"job": "kubelet", "targets": [f"127.0.0.1:{server.server_address[1]}"], "labels": {"cluster": CLUSTER}}
    finally:
        server.shutdown()
        server.server_close()


def grafana_all(prom_port: int) -> dict[str, str]:
    """Each variable's "All" as Grafana sends it: allValue, else (v1|v2|...) of what its query finds.

    Variables are resolved in order, each query seeing the ones before it as "All".
    """
    resolved: dict[str, str] = {}
    for var in DASHBOARD["templating"]["list"][1:]:
        if "allValue" in var:
            resolved[var["name"]] = var["allValue"]
            continue
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"])
        res = prom_api(prom_port, f"/api/v1/label/{m.group(2)}/values", {"match[]": substitute(m.group(1), resolved)})
        assert res["status"] == "success" and res["data"], (var["name"], res)
        resolved[var["name"]] = "(" + "|".join(promql_regex_escape(v) for v in sorted(res["data"])) + ")"
    return resolved


def promql_regex_escape(value: str) -> str:
    """Grafana's escaping of a value in a multi-value regex: regex metacharacters get a
    backslash, doubled because the regex sits in a PromQL string literal."""
    return "".join("\\\\" + ch if ch in "\\^$.|?*+()[]{}" else ch for ch in value)


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
    if variables == ALL:
        variables = grafana_all(prom_port)
    exprs = {f"{title} [{t['refId']}]": substitute(t["expr"], variables) for title, t in targets()}
    assert len(exprs) >= 20
    assert run_until_non_empty(prom_port, exprs) == {}


def test_variable_queries_find_the_service(scraped_prometheus):
    """label_values(metric{sel}, label) as Grafana runs it: /api/v1/label/<label>/values?match[]=."""
    prom_port, _ = scraped_prometheus
    expected = {"cluster": CLUSTER, "job": JOB, "namespace": NAMESPACE, "pod": POD}
    all_values = grafana_all(prom_port)
    for var in DASHBOARD["templating"]["list"][1:]:
        assert var["definition"] == var["query"]
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1), all_values), m.group(2)
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
        "TLS handshakes ok": f'sum(increase(echo_tls_handshakes_total{{{sel}, result="ok"}}[1m])) > 0',
        "garbage counted as protocol": f'sum(increase(echo_tls_handshakes_total{{{sel}, result="protocol"}}[1m])) > 0',
        "certificate days left": f'min(echo_tls_certificate_expiry_timestamp_seconds{{{sel}}} - time()) / 86400 > {CERT_DAYS - 1} < {CERT_DAYS + 1}',
        "datagrams echoed": f'sum(increase(echo_datagrams_received_total{{{sel}}}[1m])) > 0 and sum(increase(echo_datagrams_sent_total{{{sel}}}[1m])) > 0',
    }
    problems = run_until_non_empty(prom_port, checks)
    assert problems == {}


def selectors(expr: str) -> list[str]:
    """The vector selectors of a PromQL expression that use template variables."""
    return [m.group(0) for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\$[^}]*\}", expr)]


def test_all_selects_only_echo_service_targets(scraped_prometheus):
    """With "All" everywhere, no selector of any panel returns another target's series.

    The same Prometheus scrapes itself (job="prometheus": up, process_*,
    scrape_*) and a cAdvisor stand-in with a kube-system pod; with allValue ".*"
    the up/CPU/memory/fd/scrape panels showed Prometheus itself as a "pod".
    """
    prom_port, _ = scraped_prometheus
    all_values = grafana_all(prom_port)
    assert all_values["job"] == f"({JOB})" and all_values["pod"] == f"({POD})", all_values
    checked = 0
    for title, t in targets():
        for selector in selectors(t["expr"]):
            res = prom_api(prom_port, "/api/v1/query", {"query": substitute(selector, all_values)})
            assert res["status"] == "success", (title, selector, res)
            for series in res["data"]["result"]:
                labels = series["metric"]
                assert labels.get("pod") == POD and labels.get("namespace") == NAMESPACE, (title, selector, labels)
                if "job=~" in selector:
                    assert labels.get("job") == JOB, (title, selector, labels)
            checked += 1
    assert checked >= 25


def test_annotation_queries_run(scraped_prometheus):
    """Restart and alert annotations are valid PromQL over the variables (empty here: no restarts, no rules)."""
    prom_port, _ = scraped_prometheus
    all_values = grafana_all(prom_port)
    for annotation in DASHBOARD["annotations"]["list"]:
        if "expr" not in annotation:
            continue
        for variables in (SELECTED, all_values):
            res = prom_api(prom_port, "/api/v1/query", {"query": substitute(annotation["expr"], variables)})
            assert res["status"] == "success", (annotation["name"], res)


def test_saturation_panels_show_active_against_the_limits(scraped_prometheus):
    """echo_connections_limit is the --max-connections the service runs with; memory / limit is a fraction."""
    prom_port, admin_port = scraped_prometheus
    metrics = parse_metrics(http_get(admin_port, "/metrics")[1].decode())
    assert metrics["echo_connections_limit"] == 2
    problems = run_until_non_empty(prom_port, {
        "limit": f'echo_connections_limit{{job="{JOB}", pod="{POD}"}} == 2',
        "memory fraction": f'max by (pod) (process_resident_memory_bytes{{job="{JOB}"}}) / max by (pod) '
                           f'(container_spec_memory_limit_bytes{{pod="{POD}", container="echo-service"}} > 0) < 1',
    })
    assert problems == {}


def test_duration_histogram_covers_the_longest_max_age(scraped_prometheus):
    """The chart allows max age + jitter up to 24 h; the top finite bucket must be above it."""
    _, admin_port = scraped_prometheus
    metrics = parse_metrics(http_get(admin_port, "/metrics")[1].decode())
    bounds = [float(m.group(1)) for k in metrics
              if (m := re.fullmatch(r'echo_connection_duration_seconds_bucket\{le="([^"]+)"\}', k)) and m.group(1) != "+Inf"]
    assert max(bounds) > 24 * 3600, sorted(bounds)


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
    for variables in (SELECTED, grafana_all(prom_port)):
        expr = substitute(a["expr"], variables)
        res = prom_api(prom_port, "/api/v1/query", {"query": expr})
        assert res.get("status") == "success", (expr, res)
        # The operand is there for every fault kind (the query is empty only because nothing
        # changed during the load).
        operand = expr.rsplit(" > ", 1)[0]
        res = prom_api(prom_port, "/api/v1/query", {"query": operand})
        assert len(res["data"]["result"]) == 7, (operand, res)
