#!/usr/bin/env python3
"""Soak test: echo-service under mixed load for a long time, watching for leaks.

Runs the release `echo-service` with OTLP export on (to bench/otlp_sink.py) and four
`echo-bench` loads at once for --duration seconds:

    ping-pong   32 connections, 512-byte messages, every echo verified
    bulk        2 connections streaming 64 KiB writes, every byte verified
    churn       4 connect/echo/close loops
    idle        2,000 connections held open

Every --interval seconds it samples the server's RSS (/proc/PID/status VmRSS), open fds
(/proc/PID/fd) and /metrics. It fails (exit 1) when:

- any load reports an error, a corrupted echo, or a non-zero exit;
- RSS grows in the second half: the median of the last fifth of the samples exceeds the median
  around the midpoint by more than max(--rss-tolerance x midpoint RSS, --rss-slack-mib);
- the open fds are not back to the pre-load baseline (+2) within 15 s after the load stops;
- echo_connections_active is not back to 0, or the service does not exit 0 on SIGTERM.

The report (Markdown and JSON, with every sample) goes to target/soak/. Standard library only.

    python3 tests/soak/soak.py --duration 600     # make soak
    python3 tests/soak/soak.py --duration 60      # make soak-ci
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, limit=10.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"soak: process exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"soak: nothing listening on {port} after {limit} s")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(admin):
    """The echo_* samples of /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("echo_") and " " in line:
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


class Service:
    """echo-service on free loopback ports; its JSON log lines go to a file."""

    def __init__(self, binary, env, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        serving = threading.Event()
        self.addresses = {}

        def pump():
            for line in self.proc.stdout:
                self.log.write(line)
                self.log.flush()
                if not serving.is_set() and "echo-service serving" in line:
                    fields = json.loads(line)["fields"]
                    self.addresses = {"listen": fields["listen"], "admin": fields["admin"],
                                      "otlp": fields.get("otlp")}
                    serving.set()

        threading.Thread(target=pump, daemon=True).start()
        if not serving.wait(20):
            self.proc.kill()
            sys.exit("soak: echo-service did not report that it is serving within 20 s")
        self.pid = self.proc.pid
        self.listen = self.addresses["listen"]
        self.admin = self.addresses["admin"]


def median_in(samples, lo, hi, key):
    values = [s[key] for s in samples if lo <= s["t"] <= hi]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples")
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    parser.add_argument("--out", default=os.path.join(ROOT, "target", "soak"))
    parser.add_argument("--rss-tolerance", type=float, default=0.10,
                        help="allowed second-half RSS growth, fraction of the midpoint RSS")
    parser.add_argument("--rss-slack-mib", type=float, default=8,
                        help="allowed second-half RSS growth in MiB, if larger")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections held")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    service_bin = os.path.join(args.bin_dir, "echo-service")
    bench_bin = os.path.join(args.bin_dir, "echo-bench")
    for binary in (service_bin, bench_bin):
        if not os.access(binary, os.X_OK):
            sys.exit(f"soak: {binary} missing; run `cargo build --release --bins` (make soak does)")

    # Telemetry on: spans exported over OTLP/HTTP to a do-nothing sink, 1 s batches.
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "otlp_sink.py"),
                             f"127.0.0.1:{sink_port}"], stderr=subprocess.PIPE, text=True)
    wait_listening(sink_port, sink)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ECHO_"))}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "echo-service-soak",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
    })
    service = Service(service_bin, env, os.path.join(args.out, f"soak-{stamp}-service.log"))
    if not service.addresses.get("otlp"):
        sys.exit("soak: echo-service did not turn OTLP export on")

    time.sleep(1)
    baseline = {"rss": rss_bytes(service.pid), "fds": fd_count(service.pid)}
    duration = f"{args.duration}s"
    common = ["-t", service.listen, "-d", duration, "-w", "0s", "--json", "-q", "--threads", "1"]
    loads = {
        "ping-pong": ["ping-pong", "-c", "32", "-s", "512"],
        "bulk": ["bulk", "-c", "2", "-s", "64KiB"],
        "churn": ["churn", "-c", "4", "-s", "256"],
        "idle": ["idle", "-c", str(args.idle), "-s", "16"],
    }
    procs = {name: subprocess.Popen([bench_bin] + argv + common, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, argv in loads.items()}
    print(f"soak: {args.duration:.0f} s of {', '.join(loads)} against {service.listen} "
          f"(pid {service.pid}); report in {args.out}", flush=True)

    # Sample while the loads run.
    samples = []
    start = time.time()
    next_sample = start
    while any(p.poll() is None for p in procs.values()):
        now = time.time()
        if now >= next_sample:
            try:
                metrics = scrape(service.admin)
            except OSError as err:
                metrics = {"scrape_error": str(err)}
            sample = {"t": round(now - start, 1), "rss": rss_bytes(service.pid),
                      "fds": fd_count(service.pid),
                      "active": metrics.get("echo_connections_active"),
                      "made": metrics.get("echo_connections_made_total")}
            samples.append(sample)
            print(f"  t={sample['t']:6.1f}s rss={sample['rss'] / 2**20:6.1f} MiB "
                  f"fds={sample['fds']:5d} active={sample['active']}", flush=True)
            next_sample += args.interval
        time.sleep(0.2)
    load_seconds = time.time() - start

    failures = []
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = {"unparsed_stdout": out[-2000:]}
        report["exit"] = proc.returncode
        results[name] = report
        if proc.returncode != 0:
            failures.append(f"{name}: echo-bench exited {proc.returncode}: {err.strip()[-500:]}")
        if report.get("errors") or report.get("mismatches"):
            failures.append(f"{name}: {report.get('errors')} errors, "
                            f"{report.get('mismatches')} mismatches")
    if results["idle"].get("held") not in (None, args.idle):
        failures.append(f"idle: held {results['idle'].get('held')} of {args.idle}")

    # After the load: connections gone, fds back to the baseline.
    settle_deadline = time.time() + 15
    while True:
        fds, metrics = fd_count(service.pid), scrape(service.admin)
        if (fds <= baseline["fds"] + 2 and metrics.get("echo_connections_active") == 0) \
                or time.time() > settle_deadline:
            break
        time.sleep(0.25)
    after = {"rss": rss_bytes(service.pid), "fds": fds,
             "active": metrics.get("echo_connections_active")}
    if fds > baseline["fds"] + 2:
        failures.append(f"fds not back to baseline: {fds} open, baseline {baseline['fds']}")
    if after["active"] != 0:
        failures.append(f"echo_connections_active = {after['active']} after the load")

    # RSS in the second half of the run: last fifth vs the midpoint.
    mid = median_in(samples, 0.4 * args.duration, 0.6 * args.duration, "rss")
    end = median_in(samples, 0.8 * args.duration, args.duration + 60, "rss")
    growth = (end - mid) if (mid is not None and end is not None) else None
    allowed = max(args.rss_tolerance * mid, args.rss_slack_mib * 2**20) if mid else None
    if growth is None:
        failures.append("too few RSS samples to judge growth (lower --interval)")
    elif growth > allowed:
        failures.append(f"RSS grew {growth / 2**20:.1f} MiB in the second half "
                        f"(allowed {allowed / 2**20:.1f} MiB)")

    # Graceful exit.
    service.proc.send_signal(signal.SIGTERM)
    try:
        code = service.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        service.proc.kill()
        code = "timeout"
    if code != 0:
        failures.append(f"echo-service exited {code} after SIGTERM")
    sink.send_signal(signal.SIGTERM)
    try:
        sink_totals = sink.communicate(timeout=5)[1].strip()
    except subprocess.TimeoutExpired:
        sink.kill()
        sink_totals = "sink did not stop"
    final = metrics

    verified = sum(r.get("bytes_verified", 0) for r in results.values())
    summary = {
        "started": stamp, "duration_s": args.duration, "load_seconds": round(load_seconds, 1),
        "passed": not failures, "failures": failures, "bytes_verified": verified,
        "baseline": baseline, "after": after,
        "rss_mid_bytes": mid, "rss_end_bytes": end, "rss_growth_bytes": growth,
        "rss_allowed_growth_bytes": allowed,
        "rss_peak_bytes": max((s["rss"] for s in samples), default=None),
        "fds_peak": max((s["fds"] for s in samples), default=None),
        "final_metrics": final, "otlp_sink": sink_totals, "loads": results, "samples": samples,
    }
    json_path = os.path.join(args.out, f"soak-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    md = markdown(summary)
    md_path = os.path.join(args.out, f"soak-{stamp}.md")
    with open(md_path, "w") as f:
        f.write(md)
    for name, path in (("latest.md", md_path), ("latest.json", json_path)):
        link = os.path.join(args.out, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.basename(path), link)
    print(md)
    print(f"soak: report written to {md_path}")
    sys.exit(0 if not failures else 1)


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def label(key):
    """The label value of a `name{reason="x"}` sample key."""
    return key.split('"')[1]


def markdown(s):
    lines = [f"# echo-service soak, {s['duration_s']:.0f} s ({s['started']})", "",
             f"**{'PASS' if s['passed'] else 'FAIL'}**"]
    lines += [f"- {f}" for f in s["failures"]]
    lines += ["", "| load | result |", "|---|---|"]
    for name, r in s["loads"].items():
        keys = ("bytes_verified", "messages", "msgs_per_s", "held", "errors", "mismatches", "exit")
        detail = ", ".join(f"{k}={r[k]}" for k in keys if k in r)
        if "connections_per_s" in r:
            detail += f", connections_per_s={r['connections_per_s']}"
        lines.append(f"| {name} | {detail} |")
    m = s["final_metrics"]
    lines += [
        "",
        f"- bytes verified by the clients: {s['bytes_verified']:,}",
        f"- connections made: {m.get('echo_connections_made_total', 0):,.0f}; "
        "lost by reason: " + ", ".join(
            f"{label(k)}={v:,.0f}" for k, v in sorted(m.items())
            if k.startswith("echo_connections_lost_total{") and v),
        f"- RSS: baseline {mib(s['baseline']['rss'])}, midpoint {mib(s['rss_mid_bytes'])}, "
        f"last fifth {mib(s['rss_end_bytes'])}, peak {mib(s['rss_peak_bytes'])}; second-half "
        f"growth {mib(s['rss_growth_bytes'])} (allowed {mib(s['rss_allowed_growth_bytes'])})",
        f"- fds: baseline {s['baseline']['fds']}, peak {s['fds_peak']}, "
        f"after the load {s['after']['fds']}",
        f"- OTLP sink: {s['otlp_sink']}",
        "", "RSS and fds over time:", "", "| t (s) | RSS | fds | active |", "|---|---|---|---|",
    ]
    step = max(1, len(s["samples"]) // 24)
    for sample in s["samples"][::step]:
        lines.append(f"| {sample['t']:.0f} | {mib(sample['rss'])} | {sample['fds']} | "
                     f"{sample['active']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
