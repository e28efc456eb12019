"""Kubelet simulation: run the real binary the way the rendered Deployment says.

From the rendered pod template we take the container's args, its env (with
the downward API filled in and $(VAR) references expanded as kubelet does)
and its named ports. Each containerPort is remapped to a free loopback port:
ECHO_LISTEN/ECHO_ADMIN_LISTEN must name exactly the containerPorts, which is
checked, then rewritten (likewise ECHO_TLS_LISTEN/ECHO_UDP_LISTEN for tls-echo and
udp-echo). Secret and ConfigMap volumes are written to local directories from
a stand-in for the cluster's objects in kubelet's atomic-writer layout (`..data`
symlink), and env values under a mountPath point there; updating an object swaps
the symlink as kubelet does, so a Secret rotation reaches the running binary. The probes run as kubelet runs them: HTTP GET on the
probe's path, the port resolved by name, the probe's timeoutSeconds, success
when 200 <= status < 400; the startup probe every periodSeconds up to
failureThreshold. Liveness/readiness are sampled a few times rather than
waited out over their full periods.

Termination is kubelet's: the preStop sleep (the service is not signalled
yet), then SIGTERM; the process must report not-ready at once, keep liveness
passing, keep accepting through the drain delay, then refuse new connections,
let open ones finish, and exit 0 within terminationGracePeriodSeconds counted
from the start of preStop.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import (
    EVERYTHING_VALUES,
    Process,
    connect,
    echo_round_trip,
    echo_service_binary,
    free_port,
    http_get,
    load_values,
    manifests,
    one,
    parse_metrics,
    render,
    wait_until,
)

FAST_SHUTDOWN = {"preStopSleepSeconds": 1, "drainDelaySeconds": 2, "timeoutSeconds": 3, "graceMarginSeconds": 2}

FAKE_POD = {
    "metadata.name": "echo-echo-service-7d9c8b7f5-x2x9q",
    "metadata.namespace": "apps",
    "spec.nodeName": "node-1",
    "status.podIP": "127.0.0.1",
}


@dataclass
class SimulatedPod:
    """The container of a rendered Deployment, run as a local process."""

    deployment: dict
    tmp: object
    # containerPort -> free loopback port
    port_map: dict[int, int] = field(default_factory=dict)
    proc: Process | None = None
    # The cluster's Secrets and ConfigMaps: {("secret"|"configMap", name): {key: bytes}}
    objects: dict = field(default_factory=dict)

    def __post_init__(self):
        spec = self.deployment["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        self.grace = spec["terminationGracePeriodSeconds"]
        self.named_ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.port_map = {port: free_port() for port in self.named_ports.values()}
        self.mounts = self._mount_volumes(spec.get("volumes", []))
        self.env = self._resolve_env()

    # -- volumes, as kubelet projects them ---------------------------------------------

    def _mount_volumes(self, volumes: list[dict]) -> dict[str, Path]:
        """Secret/ConfigMap volumes projected into local directories: {mountPath: directory}.

        Laid out as kubelet's atomic writer does it: the files live in a timestamped
        `..<ts>` directory, `..data` is a symlink to it, and each key is a symlink
        `<path> -> ..data/<path>`; an update writes a new `..<ts>` and renames a new
        `..data` symlink over the old one (update_object). A missing object or key is
        what kubelet would leave the pod ContainerCreating for.
        """
        by_name = {v["name"]: v for v in volumes}
        mounts: dict[str, Path] = {}
        self.projections: list[tuple[Path, str, str, list[dict]]] = []
        for m in self.container.get("volumeMounts", []):
            assert "subPath" not in m, f"{m}: a subPath mount never sees a Secret/ConfigMap update"
            assert m.get("readOnly"), f"{m}: not read-only"
            volume = by_name[m["name"]]
            kind = "secret" if "secret" in volume else "configMap"
            source = volume[kind]
            name = source["secretName"] if kind == "secret" else source["name"]
            data = self.objects.get((kind, name))
            assert data is not None, f"volume {m['name']}: no {kind} {name} in the cluster"
            directory = self.tmp / f"volume-{m['name']}-{time.monotonic_ns()}"
            directory.mkdir()
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            self.projections.append((directory, kind, name, items))
            self._project(directory, kind, name, items)
            for item in items:
                (directory / item["path"]).symlink_to(Path("..data") / item["path"])
            mounts[m["mountPath"]] = directory
        return mounts

    def _project(self, directory: Path, kind: str, name: str, items: list[dict]) -> None:
        data = self.objects[(kind, name)]
        version = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        version.mkdir()
        for item in items:
            assert item["key"] in data, f"{kind} {name} has no key {item['key']}"
            (version / item["path"]).write_bytes(data[item["key"]])
        old = (directory / "..data").resolve() if (directory / "..data").is_symlink() else None
        (directory / "..data_tmp").symlink_to(version.name)
        (directory / "..data_tmp").rename(directory / "..data")
        if old:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def update_object(self, kind: str, name: str, data: dict[str, bytes]) -> None:
        """The Secret/ConfigMap changed in the cluster: kubelet re-projects every volume of it."""
        self.objects[(kind, name)] = data
        for directory, k, n, items in self.projections:
            if (k, n) == (kind, name):
                self._project(directory, kind, name, items)

    # -- env, as kubelet builds it ------------------------------------------------

    def _resolve_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in self.container.get("env", []):
            if "value" in var:
                value = self._expand(var["value"], env)
            elif "fieldRef" in var.get("valueFrom", {}):
                value = FAKE_POD[var["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in var.get("valueFrom", {}):
                value = "authorization=Bearer test-token"
            else:
                raise AssertionError(f"env var source not simulated: {var}")
            for mount_path, directory in self.mounts.items():
                if value.startswith(mount_path + "/"):
                    value = str(directory) + value[len(mount_path):]
            env[var["name"]] = value
        for name, port_name in (("ECHO_LISTEN", "tcp-echo"), ("ECHO_ADMIN_LISTEN", "admin"),
                                ("ECHO_TLS_LISTEN", "tls-echo"), ("ECHO_UDP_LISTEN", "udp-echo")):
            if name not in env:
                assert port_name not in self.named_ports, f"container port {port_name} but no {name}"
                continue
            m = re.fullmatch(r"\[::\]:(\d+)", env[name])
            assert m, f"{name}={env[name]!r}: expected [::]:PORT"
            assert int(m.group(1)) == self.named_ports[port_name], (
                f"{name} binds {m.group(1)} but the container port named {port_name} is {self.named_ports[port_name]}"
            )
            env[name] = f"127.0.0.1:{self.port_map[int(m.group(1))]}"
        return env

    @staticmethod
    def _expand(value: str, env: dict[str, str]) -> str:
        """Kubernetes $(VAR) expansion: defined earlier -> value; $$ escapes; else left as is."""
        def sub(m):
            if m.group(0).startswith("$$"):
                return m.group(0)[1:]
            return env.get(m.group(1), m.group(0))

        return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)

    def local_port(self, port) -> int:
        container_port = self.named_ports[port] if isinstance(port, str) else port
        return self.port_map[container_port]

    @property
    def echo_port(self) -> int:
        return self.local_port("tcp-echo")

    # -- process ------------------------------------------------------------------------

    def start(self, env_overrides: dict[str, str] | None = None) -> None:
        import os

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env, **(env_overrides or {})}
        argv = [str(echo_service_binary()), *self.container.get("args", [])]
        self.proc = Process(argv, env, self.tmp / f"pod-{time.monotonic_ns()}.log")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    # -- probes -------------------------------------------------------------------------

    def probe(self, kind: str) -> tuple[bool, str]:
        """One probe attempt, as kubelet's HTTP prober does it."""
        spec = self.container[kind]
        get = spec["httpGet"]
        assert get.get("scheme", "HTTP") == "HTTP"
        try:
            status, body = http_get(self.local_port(get["port"]), get["path"], timeout=spec.get("timeoutSeconds", 1))
        except OSError as exc:
            return False, f"{kind}: {exc!r}"
        return 200 <= status < 400, f"{kind}: {status} {body[:200]!r}"

    def run_startup_probe(self) -> int:
        """Probe every periodSeconds until success; fail after failureThreshold failures."""
        spec = self.container["startupProbe"]
        time.sleep(spec.get("initialDelaySeconds", 0))
        last = ""
        for attempt in range(1, spec.get("failureThreshold", 3) + 1):
            started = time.monotonic()
            ok, last = self.probe("startupProbe")
            if ok:
                return attempt
            if self.proc.proc.poll() is not None:
                break
            time.sleep(max(0.0, spec.get("periodSeconds", 10) - (time.monotonic() - started)))
        raise AssertionError(f"startup probe never passed (kubelet would restart the container): {last}\n{self.proc.log()}")

    def assert_probes_pass(self, times: int = 3) -> None:
        """Kubelet acts (restart, unready) only after failureThreshold failures in a row:
        a single slow answer on a loaded machine is retried, as kubelet would at periodSeconds."""
        for _ in range(times):
            for kind in ("livenessProbe", "readinessProbe"):
                failures = []
                for _attempt in range(self.container[kind].get("failureThreshold", 3)):
                    ok, detail = self.probe(kind)
                    if ok:
                        break
                    failures.append(detail)
                    time.sleep(0.5)
                else:
                    raise AssertionError(f"{kind} failed {len(failures)} times in a row (kubelet would act): "
                                         f"{failures}\n{self.proc.log()}")
            time.sleep(0.1)


def deployment_for(values: dict) -> dict:
    return one(manifests(render(values)), "Deployment")


@pytest.fixture
def pod_factory(tmp_path):
    pods: list[SimulatedPod] = []

    def make(values: dict, objects: dict | None = None) -> SimulatedPod:
        pod = SimulatedPod(deployment_for(values), tmp_path, objects=objects or {})
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        pod.stop()


def refused(port: int) -> bool:
    # Only a refusal counts: on a loaded machine a connect can be slow, and a slow connect to
    # a listener that is still open must not pass for a closed one.
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    s.close()
    return False


@pytest.mark.parametrize(
    "values, stubborn",
    [({}, False), ({"shutdown": FAST_SHUTDOWN}, True)],
    ids=["default-values-clients-close", "fast-shutdown-client-never-closes"],
)
def test_probes_and_graceful_termination(pod_factory, values, stubborn):
    pod = pod_factory(values)
    env = pod.env
    drain = float(env["ECHO_DRAIN_DELAY"].removesuffix("s"))
    timeout = float(env["ECHO_SHUTDOWN_TIMEOUT"].removesuffix("s"))
    pre_stop = pod.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)

    pod.start()
    attempts = pod.run_startup_probe()
    assert attempts <= pod.container["startupProbe"]["failureThreshold"]
    pod.assert_probes_pass()

    steady = [connect(pod.echo_port) for _ in range(2)]
    for i, s in enumerate(steady):
        assert echo_round_trip(s, b"before-%d\n" % i) == b"before-%d\n" % i
    holdout = connect(pod.echo_port) if stubborn else None
    if holdout:
        assert echo_round_trip(holdout, b"hold\n") == b"hold\n"

    # Kubelet: preStop hook first (endpoints are being removed meanwhile) ...
    t0 = time.monotonic()
    if pre_stop:
        time.sleep(pre_stop)
        ok, detail = pod.probe("readinessProbe")
        assert ok, f"not signalled yet, should still be ready: {detail}"
    # ... then SIGTERM.
    pod.proc.signal(signal.SIGTERM)
    t_term = time.monotonic()

    wait_until(lambda: not pod.probe("readinessProbe")[0], 2.0, what="readiness to fail after SIGTERM")
    status, body = http_get(pod.local_port("admin"), "/readyz")
    assert status == 503 and json.loads(body) == {"ready": False, "reason": "draining"}
    ok, detail = pod.probe("livenessProbe")
    assert ok, f"liveness must keep passing while draining, or kubelet restarts the pod: {detail}"

    if drain >= 1:
        # Still accepting during the drain delay.
        late = connect(pod.echo_port)
        assert echo_round_trip(late, b"during-drain\n") == b"during-drain\n"
        steady.append(late)

    # After the drain delay the listener closes; open connections keep echoing.
    wait_until(lambda: refused(pod.echo_port), drain + 2, interval=0.1, what="the echo listener to close")
    assert time.monotonic() - t_term >= drain - 0.2, "listener closed before the drain delay ended"
    for i, s in enumerate(steady):
        assert echo_round_trip(s, b"after-close-%d\n" % i) == b"after-close-%d\n" % i
    ok, detail = pod.probe("livenessProbe")
    assert ok, detail

    for s in steady:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == b"", "server should close after our FIN"
        s.close()
    t_closed = time.monotonic()

    code = pod.proc.wait(timeout=pod.grace + 5)
    t_exit = time.monotonic()
    assert code == 0, f"exit code {code}\n{pod.proc.log()}"
    assert t_exit - t0 < pod.grace, (
        f"exited {t_exit - t0:.1f}s after preStop began; terminationGracePeriodSeconds is {pod.grace}"
    )
    if holdout:
        # The held connection is cut at the shutdown timeout, not before.
        assert t_exit - t_term >= drain + timeout - 0.3, f"exited after {t_exit - t_term:.1f}s"
        holdout.settimeout(2)
        try:
            assert holdout.recv(16) == b""
        except ConnectionResetError:
            pass
        holdout.close()
    else:
        assert t_exit - t_closed < 2.0, f"took {t_exit - t_closed:.1f}s to exit after the last connection closed"

    if env.get("ECHO_LOG_FORMAT") == "json":
        lines = [line for line in pod.proc.log(tail=1_000_000).splitlines() if line.strip()]
        assert lines, "no log output"
        not_json = [line for line in lines if not is_json_object(line)]
        assert not_json == [], "ECHO_LOG_FORMAT=json, but these output lines are not JSON objects"


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_readiness_fails_at_the_connection_limit(pod_factory):
    """config.limits.maxConnections reaches the binary: at the limit /readyz is 503 at_capacity."""
    pod = pod_factory({"config": {"limits": {"maxConnections": 2}}, "shutdown": {"drainDelaySeconds": 0}})
    assert pod.env["ECHO_MAX_CONNECTIONS"] == "2"
    pod.start()
    pod.run_startup_probe()
    pod.assert_probes_pass(1)
    conns = [connect(pod.echo_port) for _ in range(2)]
    for s in conns:
        assert echo_round_trip(s, b"x\n") == b"x\n"
    wait_until(lambda: not pod.probe("readinessProbe")[0], 2.0, what="readiness to fail at capacity")
    status, body = http_get(pod.local_port("admin"), "/readyz")
    assert status == 503 and json.loads(body)["reason"] == "at_capacity"
    ok, detail = pod.probe("livenessProbe")
    assert ok, detail
    for s in conns:
        s.close()
    wait_until(lambda: pod.probe("readinessProbe")[0], 2.0, what="readiness to recover below the limit")


def self_signed(tmp: Path, name: str, days: int = 30) -> tuple[bytes, bytes]:
    """A throwaway ECDSA certificate and key (PEM) from the openssl CLI."""
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", str(days), "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True, timeout=60,
    )
    return crt.read_bytes(), key.read_bytes()


def test_binary_accepts_every_setting_the_chart_renders(pod_factory, tmp_path):
    """The everything-on render (limits, durations, OTEL_*, extra args, TLS from a Secret with a
    client CA from a ConfigMap, UDP) starts and serves on every port it names."""
    values = load_values(EVERYTHING_VALUES)
    crt, key = self_signed(tmp_path, "echo.apps.svc")
    ca, _ = self_signed(tmp_path, "client-ca")
    objects = {
        ("secret", values["tls"]["secretName"]): {"tls.crt": crt, "tls.key": key},
        ("configMap", values["tls"]["clientCA"]["configMapName"]): {values["tls"]["clientCA"]["key"]: ca},
    }
    pod = pod_factory(values, objects)
    rendered = {e["name"] for e in pod.container["env"]}
    assert {"ECHO_IDLE_TIMEOUT", "ECHO_MAX_CONNECTION_AGE_JITTER", "ECHO_MAX_CONNECTION_AGE_GRACE",
            "OTEL_TRACES_SAMPLER"} <= rendered
    closed = free_port()  # nothing listens: exports fail fast and stay on loopback
    pod.start({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}"})
    pod.run_startup_probe()
    pod.assert_probes_pass(2)
    s = connect(pod.echo_port)
    assert echo_round_trip(s, b"all settings\n") == b"all settings\n"
    s.close()
    # TLS on tls-echo with the mounted certificate and the rendered ALPN list.
    context = ssl.create_default_context(cadata=crt.decode())
    context.set_alpn_protocols(["echo"])
    with context.wrap_socket(connect(pod.local_port("tls-echo")), server_hostname="echo.apps.svc") as t:
        assert t.selected_alpn_protocol() == "echo"
        assert echo_round_trip(t, b"tls settings\n") == b"tls settings\n"
    # UDP on udp-echo (the same container port number as tcp-echo, another protocol).
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(b"udp settings", ("127.0.0.1", pod.local_port("udp-echo")))
    assert u.recvfrom(2048)[0] == b"udp settings"
    u.close()
    assert "k8s.pod.name=echo-echo-service-7d9c8b7f5-x2x9q" in pod.env["OTEL_RESOURCE_ATTRIBUTES"]


def served_certificate(port: int) -> bytes:
    """The DER leaf certificate a new TLS connection gets (not verified: we compare bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(connect(port), server_hostname="echo.apps.svc") as t:
        return t.getpeercert(binary_form=True)


def test_secret_rotation_reaches_the_running_pod(pod_factory, tmp_path):
    """Kubelet swaps the Secret volume's ..data symlink; the chart mounts the directory (no
    subPath), so the service sees the new files: new connections get the new certificate,
    an open one keeps echoing, the expiry gauge moves, no restart."""
    values = {"tls": {"enabled": True, "secretName": "echo-tls", "reloadInterval": "1s"}}
    old_crt, old_key = self_signed(tmp_path, "echo.apps.svc", days=10)
    new_crt, new_key = self_signed(tmp_path, "echo.apps.svc", days=90)  # same files, new bytes
    pod = pod_factory(values, {("secret", "echo-tls"): {"tls.crt": old_crt, "tls.key": old_key}})
    pod.start()
    pod.run_startup_probe()
    port = pod.local_port("tls-echo")
    assert served_certificate(port) == ssl.PEM_cert_to_DER_cert(old_crt.decode())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=old_crt.decode())
    held = context.wrap_socket(connect(port), server_hostname="echo.apps.svc")
    assert echo_round_trip(held, b"before\n") == b"before\n"

    def expiry() -> float:
        return parse_metrics(http_get(pod.local_port("admin"), "/metrics")[1].decode())[
            'echo_tls_certificate_expiry_timestamp_seconds{listener="tls"}']

    before = expiry()
    pod.update_object("secret", "echo-tls", {"tls.crt": new_crt, "tls.key": new_key})
    new_der = ssl.PEM_cert_to_DER_cert(new_crt.decode())
    wait_until(lambda: served_certificate(port) == new_der, 20.0, interval=0.2, what="the rotated certificate to be served")
    assert echo_round_trip(held, b"after\n") == b"after\n", "the open connection must continue"
    held.close()
    metrics = parse_metrics(http_get(pod.local_port("admin"), "/metrics")[1].decode())
    assert metrics.get('echo_tls_reloads_total{listener="tls",result="ok"}', 0) >= 1, metrics
    assert 79 * 86400 < expiry() - before < 81 * 86400
    assert pod.proc.proc.poll() is None, "no restart"
