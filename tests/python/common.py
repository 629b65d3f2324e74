"""Shared by the test apps: the `worker=... pid=... client=...` line and the direct socket."""

from __future__ import annotations

import os
import socket
from typing import Optional


def who(client: Optional[str]) -> str:
    """The line the demo worker greets with; the tests parse it."""
    index = os.environ.get("STICKY_DISPATCH_INDEX", "-")
    return f"worker={index} pid={os.getpid()} client={client or '-'}"


def direct_socket(address: str) -> socket.socket:
    """A listening socket on ADDR shared by several processes (SO_REUSEPORT): the kernel
    spreads connections over them with no stickiness, the failure the tests show."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    return sock
