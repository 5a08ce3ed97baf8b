"""Loopback ports for the tests' servers and for 'nothing listens here' addresses."""
from __future__ import annotations

import socket


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released): a server may take it, a connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
