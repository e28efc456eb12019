"""Baseline for `make bench`: the classic Twisted echo server this project descends from.

The Protocol/Factory echo from Twisted's own examples (docs/core/examples/echoserv.py), with the
listen address taken from the command line. Run it from the bench venv (`make bench-venv`):

    .venv/bench/bin/python bench/twisted_echo.py 127.0.0.1:8000

Unchanged from the classic apart from two knobs a deployment would set: the listen backlog is
1024 like tokio's (Twisted defaults to 50, which drops SYNs while 10,000 clients connect), and
the epoll reactor is asked for explicitly (it is the default on Linux anyway).
"""

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402  (must follow the reactor install)
from twisted.internet.protocol import Factory, Protocol  # noqa: E402


class Echo(Protocol):
    """As soon as any data is received, write it back."""

    def dataReceived(self, data):
        self.transport.write(data)


def main():
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000").rpartition(":")
    factory = Factory()
    factory.protocol = Echo
    reactor.listenTCP(int(port), factory, backlog=1024, interface=host.strip("[]") or "0.0.0.0")
    reactor.run()


if __name__ == "__main__":
    main()
