#!/usr/bin/env python3
"""Does every connection's span reach the collector at full churn? (issue 14 §1)

Starts bench/otlp_sink.py (CPU 1), echo-service with every span exported to it over OTLP/HTTP
(CPU 0), and `echo-bench churn` (CPU 1) until at least --connections connections were made;
stops the service with SIGTERM (which flushes its queue) and compares, exactly:

    connections made (echo_connections_made_total)  ==  spans the sink decoded

and prints the service's own echo_otlp_* counters, so a loss says where it happened
(queue_full, export_failed, shutdown). Extra OTEL_* settings can be passed as NAME=VALUE
arguments, e.g. OTEL_BSP_MAX_QUEUE_SIZE=8192. Exit status 0 when nothing was lost.

    python3 bench/span_loss.py --bin-dir target/release --connections 100000
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"process {proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port}")


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def metrics(port):
    out = {}
    for line in get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total(m, name):
    """Sum of a metric over its label sets (echo_connections_made_total has a listener label)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(HERE), "target", "release"))
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("otel", nargs="*", help="extra NAME=VALUE environment for echo-service")
    args = ap.parse_args()

    sink_port, echo_port, admin_port = free_port(), free_port(), free_port()
    sink = subprocess.Popen(["taskset", "-c", "1", sys.executable,
                             os.path.join(HERE, "otlp_sink.py"), f"127.0.0.1:{sink_port}"],
                            stdin=subprocess.DEVNULL)
    wait_listening(sink_port, sink)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ECHO_"))}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_TRACES_SAMPLER": "always_on"})
    env.update(dict(kv.split("=", 1) for kv in args.otel))
    service = subprocess.Popen(
        ["taskset", "-c", "0", os.path.join(args.bin_dir, "echo-service"),
         "--listen", f"127.0.0.1:{echo_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
         "--log-level", "warn"], env=env, stdin=subprocess.DEVNULL)
    try:
        wait_listening(admin_port, service)
        started = time.monotonic()
        while total(metrics(admin_port), "echo_connections_made_total") < args.connections:
            if time.monotonic() - started > args.max_seconds:
                sys.exit("gave up: too slow")
            subprocess.run(["taskset", "-c", "1", os.path.join(args.bin_dir, "echo-bench"),
                            "churn", "-c", str(args.concurrency), "-s", "64", "--quiet",
                            "--duration", "2s", "--warmup", "0s",
                            "--target", f"127.0.0.1:{echo_port}"],
                           check=True, stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - started
        m = metrics(admin_port)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
    time.sleep(0.5)
    stats = dict(line.split() for line in get(sink_port, "/").splitlines())
    sink.send_signal(signal.SIGTERM)
    sink.wait(10)
    made = int(total(m, "echo_connections_made_total"))
    spans = int(stats["spans"])
    print(f"connections made     {made} in {seconds:.1f}s ({made / seconds:.0f}/s)")
    print(f"spans at the sink    {spans} in {stats['requests']} requests")
    for key in sorted(m):
        if key.startswith("echo_otlp_") and "_bucket" not in key:
            print(f"  {key} {m[key]:g} (before shutdown)")
    print("OK: no span lost" if spans == made else f"LOST {made - spans} spans")
    return 0 if spans == made else 1


if __name__ == "__main__":
    sys.exit(main())
