"""A do-nothing OTLP/HTTP receiver, so `make bench` can run echo-service with export on.

Accepts `POST /v1/traces` (and /v1/metrics, /v1/logs), reads and discards the body, answers 200
with an empty body (a valid empty ExportTraceServiceResponse). It counts requests and bytes and
prints the totals on SIGTERM, so the suite can show the spans really left the server. HTTP/1.1
keep-alive, like a real collector. Standard library only.

    python3 bench/otlp_sink.py 127.0.0.1:4318
"""

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"requests": 0, "bytes": 0}
LOCK = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
        with LOCK:
            STATS["requests"] += 1
            STATS["bytes"] += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        body = ("requests %d\nbytes %d\n" % (STATS["requests"], STATS["bytes"])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4318").rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Sink)
    server.daemon_threads = True

    def stop(*_):
        print("otlp_sink: %(requests)d requests, %(bytes)d bytes" % STATS, file=sys.stderr)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
