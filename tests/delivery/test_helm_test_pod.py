"""The chart's `helm test` pod script, run for real.

There is no cluster here, so the rendered pod's own command (`sh -c SCRIPT`)
runs under busybox (the applets the busybox image provides, and nothing
else on PATH) against the real binary, with the Service host/ports from the
pod's env remapped to loopback. It must pass against the service, and must
fail when the counter does not move or the echo is wrong.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest

from support import (
    APT_BUSYBOX,
    echo_service,
    free_port,
    http_get,
    manifests,
    one,
    parse_metrics,
    render,
    require_executable,
    services,
    wait_healthy,
)

APPLETS = ("sh", "nc", "wget", "awk", "timeout", "sleep", "cat", "printf", "echo", "[")


@pytest.fixture(scope="module")
def test_pod():
    docs = manifests(render())
    pod = one(docs, "Pod", hook="test")
    return pod, services(docs)


@pytest.fixture(scope="module")
def busybox_path(tmp_path_factory):
    """A PATH holding only busybox applets, like the busybox image's /bin."""
    busybox = require_executable("busybox", APT_BUSYBOX)
    bindir = tmp_path_factory.mktemp("busybox-bin")
    for applet in APPLETS:
        (bindir / applet).symlink_to(busybox)
    return bindir


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("helm-test")
    echo_port, admin_port = free_port(), free_port()
    args = [f"--listen=127.0.0.1:{echo_port}", f"--admin-listen=127.0.0.1:{admin_port}", "--drain-delay=0s"]
    with echo_service(args, tmp=tmp) as proc:
        wait_healthy(proc, admin_port)
        yield echo_port, admin_port


def run_test_pod(pod, bindir: Path, echo_port: int, admin_port: int) -> subprocess.CompletedProcess:
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    env = {e["name"]: e["value"] for e in c["env"]}
    env.update({"ECHO_HOST": "127.0.0.1", "ADMIN_HOST": "127.0.0.1", "ECHO_PORT": str(echo_port),
                "ADMIN_PORT": str(admin_port), "PATH": str(bindir)})
    return subprocess.run([str(bindir / "sh"), "-c", c["command"][2]], env=env, capture_output=True, text=True, timeout=150)


def test_test_pod_targets_the_release_service(test_pod):
    pod, (svc, admin) = test_pod
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"ECHO_HOST": svc["metadata"]["name"], "ECHO_PORT": str(svc["spec"]["ports"][0]["port"]),
                   "ADMIN_HOST": admin["metadata"]["name"], "ADMIN_PORT": str(admin["spec"]["ports"][0]["port"])}
    assert c["image"] == "docker.io/library/busybox:1.36.1"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_helm_test_passes_against_the_service(test_pod, busybox_path, service):
    echo_port, admin_port = service
    before = parse_metrics(http_get(admin_port, "/metrics")[1].decode())["echo_connections_made_total"]
    result = run_test_pod(test_pod[0], busybox_path, echo_port, admin_port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "echo round trip ok" in result.stdout and "PASS: echo_connections_made_total went from" in result.stdout
    after = parse_metrics(http_get(admin_port, "/metrics")[1].decode())["echo_connections_made_total"]
    assert after > before


class StaticMetrics(http.server.BaseHTTPRequestHandler):
    """An admin port whose counter never moves."""

    body = b"# TYPE echo_connections_made_total counter\necho_connections_made_total{listener=\"tcp\"} 7\nprocess_start_time_seconds 1764000000\n"

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_helm_test_fails_when_the_counter_does_not_move(test_pod, busybox_path, service):
    echo_port, _ = service
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StaticMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_test_pod(test_pod[0], busybox_path, echo_port, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode != 0
    assert "FAIL: echo_connections_made_total did not go up" in result.stdout


def test_helm_test_fails_when_the_echo_is_wrong(test_pod, busybox_path, service):
    _, admin_port = service
    # The admin port speaks HTTP, so it does not echo.
    result = run_test_pod(test_pod[0], busybox_path, admin_port, admin_port)
    assert result.returncode != 0
    assert "FAIL: sent 'echo-service helm test 1" in result.stdout
