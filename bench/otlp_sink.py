"""A do-nothing OTLP/HTTP receiver, so `make bench` can run echo-service with export on.

Accepts `POST /v1/traces` (and /v1/metrics, /v1/logs), reads the body, answers 200 with an empty
body (a valid empty ExportTraceServiceResponse). It counts requests, bytes and the spans in each
uncompressed ExportTraceServiceRequest (walking the protobuf wire format: resource_spans ->
scope_spans -> spans), prints the totals on SIGTERM and serves them on `GET /`, so the suite can
show that every span really left the server. HTTP/1.1
keep-alive, like a real collector. Standard library only.

    python3 bench/otlp_sink.py 127.0.0.1:4318
"""

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"requests": 0, "bytes": 0, "spans": 0}
LOCK = threading.Lock()


def fields(buf):
    """Yields (field number, wire type, value) of one protobuf message; LEN values as bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 2:
            length, i = varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        yield number, wire, value


def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def count_spans(body):
    """Spans in an ExportTraceServiceRequest (field 1 resource_spans; in it field 2
    scope_spans; in that field 2 spans)."""
    spans = 0
    # A memoryview: slicing it for the nested messages copies nothing (the sink shares the
    # client's core in `make bench`; every microsecond it spends per span is the client's).
    body = memoryview(body)
    for number, wire, resource_spans in fields(body):
        if number != 1 or wire != 2:
            continue
        for number, wire, scope_spans in fields(resource_spans):
            if number != 2 or wire != 2:
                continue
            spans += sum(1 for number, wire, _ in fields(scope_spans) if number == 2 and wire == 2)
    return spans


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        spans = 0
        if self.path == "/v1/traces" and self.headers.get("Content-Encoding") in (None, "identity"):
            try:
                spans = count_spans(body)
            except (ValueError, IndexError):
                spans = 0
        with LOCK:
            STATS["requests"] += 1
            STATS["bytes"] += length
            STATS["spans"] += spans
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        body = ("requests %(requests)d\nbytes %(bytes)d\nspans %(spans)d\n" % STATS).encode()
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
        print("otlp_sink: %(requests)d requests, %(bytes)d bytes, %(spans)d spans" % STATS,
              file=sys.stderr)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
