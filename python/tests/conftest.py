"""Shared by the package's tests: a fake dispatcher speaking the link from the other end."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sticky_dispatch import wire  # noqa: E402

VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors" / "wire-v1.json"
CONSTANTS = VECTORS.with_name("constants.json")


def pytest_configure(config: pytest.Config) -> None:
    """The adapter tests need aiohttp and uvicorn: missing, the run fails saying so,
    rather than skipping them and passing untested."""
    missing = [name for name in ("aiohttp", "uvicorn") if not _importable(name)]
    if missing:
        raise pytest.UsageError(
            f"the adapter tests need {', '.join(missing)}: "
            "pip install -r tests/python/requirements.txt -r tests/python/requirements-dev.txt"
        )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


TIMEOUT = 10.0


class FakeDispatcher:
    """The dispatcher's end of one link, blocking with a timeout: tests drive it step by
    step (from a thread when the worker runs on the test's event loop)."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect("\0" + name)

    def send(self, message: wire.Message, fd: Optional[int] = None) -> None:
        data = wire.encode(message)
        if fd is None:
            self.sock.send(data)
        else:
            socket.send_fds(self.sock, [data], [fd])

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self) -> Optional[wire.Message]:
        """The next message, or None when the worker closed the link."""
        data = self.sock.recv(wire.MAX_MESSAGE)
        return wire.decode(data) if data else None

    def hello(self, index: int) -> wire.Message:
        """Exchanges HELLOs; returns the worker's."""
        theirs = self.recv()
        self.send(wire.Hello(wire.Role.DISPATCHER, index, os.getpid()))
        assert theirs is not None
        return theirs

    def close(self) -> None:
        self.sock.close()


class TcpPair:
    """A real loopback TCP connection: the server side is what a dispatcher hands over."""

    def __init__(self, source: str = "127.0.0.1") -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.client = socket.create_connection(
                listener.getsockname(), timeout=TIMEOUT, source_address=(source, 0)
            )
            self.server, self.peer = listener.accept()
        self.local = self.server.getsockname()

    def close(self) -> None:
        self.client.close()
        self.server.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    # Abstract names are short (107 bytes): a digest of the test's name keeps them unique.
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return f"sticky-dispatch-pytest/{os.getpid()}/{digest}/"


class Lane:
    """A listening TCP socket as the dispatcher makes a lane: bound, listening with
    ``backlog``; the test's copy plays the dispatcher's (and the group's other holders)."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 700, name: str = "web") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.sock.settimeout(TIMEOUT)
        self.backlog = backlog
        self.local: wire.Address = self.sock.getsockname()[:2]
        self.message = wire.Lane(backlog, self.local, name)

    def connect(self, source: Optional[str] = None) -> socket.socket:
        """A client connection; ``source`` picks its address (127.0.0.x are all local)."""
        return socket.create_connection(
            self.local, timeout=TIMEOUT, source_address=None if source is None else (source, 0)
        )

    def queue(self) -> tuple[int, int]:
        """(connections waiting to be accepted, the queue's limit: the listen backlog), from
        TCP_INFO, where a listening socket reports them as tcpi_unacked and tcpi_sacked
        (after 8 one-byte fields: rto, ato, snd_mss, rcv_mss, unacked, sacked)."""
        raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        unacked, sacked = struct.unpack_from("=8x4x4x4x4xII", raw)
        return unacked, sacked

    def holders(self) -> int:
        """How many fds of this process refer to this socket (the test's copy is one)."""
        link = f"socket:[{os.fstat(self.sock.fileno()).st_ino}]"
        count = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{name}") == link
            except OSError:
                pass  # the fd of the listing itself, closed by now
        return count

    def close(self) -> None:
        self.sock.close()
