"""Helpers for the delivery tests: rendering the chart with Helm's own engine,
finding the tools the tests need (and failing, never skipping, when one is
missing), and running the real echo-service binary and a real Prometheus on
loopback ports.

Every process started here is tracked by PID and ended by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "echo-service"
DASHBOARDS = REPO / "dashboards"
EVERYTHING_VALUES = CHART / "ci" / "everything-values.yaml"
# The PodMonitor variant (it excludes the ServiceMonitor, so not in "everything").
PODMONITOR_VALUES = CHART / "ci" / "podmonitor-values.yaml"
CERT_MANAGER_VALUES = CHART / "ci" / "cert-manager-values.yaml"
# Files shipped by the chart that are copies of dashboards/ (`make dashboards-sync`).
SHIPPED_FILES = ("echo-service-dashboard.json", "echo-service-alerts.yaml")
KUBE_VERSION = "1.30.0"
RELEASE = "echo"
NAMESPACE = "apps"

APT_PROMETHEUS = (
    "install it with: apt-get install -y --no-install-recommends prometheus "
    "(Debian; .ci/run does this)"
)
APT_BUSYBOX = (
    "install it with: apt-get install -y --no-install-recommends busybox "
    "(Debian; .ci/run does this)"
)


# --- tools -------------------------------------------------------------------


def require_executable(name: str, how: str) -> str:
    """Path of a tool the tests need; fails the test (not skip) when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: {how}", pytrace=False)
    return path


def echo_service_binary() -> Path:
    """The debug build of the service (override with ECHO_SERVICE_BIN)."""
    path = Path(os.environ.get("ECHO_SERVICE_BIN", REPO / "target" / "debug" / "echo-service"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"echo-service binary not found at {path}: build it with `cargo build` "
            "(`make test-delivery` builds it first)",
            pytrace=False,
        )
    return path


def venv_tool(name: str) -> str:
    """A console script installed next to this Python (the .venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return require_executable(name, "pip install -r tests/delivery/requirements.txt (`make venv`)")


# --- Helm --------------------------------------------------------------------


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Render the chart offline with Helm v4's engine: {template path: text}.

    Helm returns disabled templates as blank text; they are dropped here.
    NOTES.txt is kept under its own key.
    """
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace)
    return {path: text for path, text in out.items() if text.strip()}


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """All Kubernetes objects in a render (NOTES.txt excluded)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__source__", path)
                docs.append(doc)
    return docs


def strip_source(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__source__"}


def one(docs: list[dict[str, Any]], kind: str, *, hook: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (optionally only helm hooks of that type)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (hook is None or d["metadata"].get("annotations", {}).get("helm.sh/hook") == hook)
        and (hook is not None or "helm.sh/hook" not in d["metadata"].get("annotations", {}))
    ]
    assert len(found) == 1, f"expected one {kind} (hook={hook}), got {[d['metadata']['name'] for d in found]}"
    return found[0]


def services(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the echo Service, the admin Service or None): told apart by app.kubernetes.io/component."""
    svcs = [d for d in docs if d["kind"] == "Service"]
    admin = [d for d in svcs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "admin"]
    echo = [d for d in svcs if d not in admin]
    assert len(echo) == 1 and len(admin) <= 1, [d["metadata"]["name"] for d in svcs]
    return echo[0], (admin[0] if admin else None)


def write_manifests(docs: list[dict[str, Any]], directory: Path) -> list[Path]:
    """One file per object, for tools that take files (kubernetes-validate, checkov)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = directory / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(strip_source(doc), sort_keys=False))
        paths.append(path)
    return paths


# --- sockets and HTTP --------------------------------------------------------


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, *, timeout: float = 2.0, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET http://host:port/path; returns (status, body). Raises OSError on connect/timeout."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "delivery-tests", "Accept": "*/*"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read n bytes (the echo may arrive in pieces); b'' prefix on early EOF."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def echo_round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def connect(port: int, timeout: float = 3.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (labels as written).

    Connection metrics carry a `listener` label (tcp, identity, ...); each such sample is also
    summed under its key without that label, so `echo_connections_made_total` is the total.
    """
    samples: dict[str, float] = {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        key = key.strip()
        samples[key] = float(value)
        without = re.sub(r'listener="[^"]*",?', "", key).replace(",}", "}").replace("{}", "")
        if without != key:
            totals[without] = totals.get(without, 0.0) + float(value)
    for key, value in totals.items():
        samples.setdefault(key, value)
    return samples


# --- processes -----------------------------------------------------------------


class Process:
    """A child process we started; output goes to a log file; ended by PID only."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; always reaps."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait(10) is None:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll predicate() until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polled conditions may raise until ready
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


@contextlib.contextmanager
def echo_service(args: list[str], env: dict[str, str] | None = None, *, tmp: Path) -> Iterator[Process]:
    """Run the real binary with args and env (plus PATH only); stopped on exit.

    Callers wait for readiness themselves (wait_healthy or a probe loop).
    """
    binary = echo_service_binary()
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    full_env.update(env or {})
    proc = Process([str(binary), *args], full_env, tmp / f"echo-service-{time.monotonic_ns()}.log")
    try:
        yield proc
    finally:
        proc.stop()


def wait_healthy(proc: Process, admin_port: int, timeout: float = 20.0) -> None:
    def ok():
        if proc.proc.poll() is not None:
            raise AssertionError(f"echo-service exited with {proc.proc.returncode}:\n{proc.log()}")
        return http_get(admin_port, "/healthz", timeout=1.0)[0] == 200

    try:
        wait_until(ok, timeout, interval=0.1, what="echo-service /healthz")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- echo-service log ---\n{proc.log()}") from None


@contextlib.contextmanager
def prometheus(scrape_targets: list[dict[str, Any]], *, tmp: Path, self_scrape: bool = False) -> Iterator[int]:
    """A real Prometheus (Debian package) on a loopback port, scraping every 1 s.

    scrape_targets: [{"job": ..., "targets": [...], "labels": {...}}]. Yields its port.
    self_scrape adds job "prometheus" scraping Prometheus itself: other targets,
    as in any real Prometheus, that dashboards must not pick up.
    """
    binary = require_executable("prometheus", APT_PROMETHEUS)
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": t["job"],
                "static_configs": [{"targets": t["targets"], "labels": t.get("labels", {})}],
            }
            for t in scrape_targets
        ],
    }
    if self_scrape:
        config["scrape_configs"].append(
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        )
    workdir = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp))
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = Process(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        workdir / "prometheus.log",
    )
    try:
        def ready():
            if proc.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{proc.log()}")
            return http_get(port, "/-/ready", timeout=1.0)[0] == 200

        wait_until(ready, 30, interval=0.2, what="prometheus /-/ready")
        yield port
    finally:
        proc.stop()


def prom_api(port: int, path: str, params: dict[str, str]) -> dict[str, Any]:
    """GET a Prometheus HTTP API path; returns the decoded JSON (status checked by caller)."""
    from urllib.parse import urlencode

    status, body = http_get(port, f"{path}?{urlencode(params)}", timeout=10.0)
    payload = json.loads(body)
    payload["_http_status"] = status
    return payload
