"""What the aiohttp and uvicorn adapters add on top of :class:`Worker`.

Two things the web servers cannot know on their own:

- The real client address. Under ``routing_key = "proxy-protocol"`` the dispatcher has
  consumed the PROXY header, so the socket's own peer is the balancer; the CONN message
  carries the real client. The adapters look it up by the socket's own addresses (peer
  and local, unique among open TCP connections) when a request starts, and rewrite
  ``request.remote`` (aiohttp) or ``scope["client"]`` (ASGI) with it.
- Whether the server has started reading a connection. A graceful shutdown closes idle
  connections, and a connection handed over just before the drain ended may not have been
  read yet although its client has sent a request: it must not be closed as idle. The
  adapters wait (bounded) until every handed-over connection has started a request or
  closed.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Callable, Optional

from . import wire
from .worker import Connection, log

SocketKey = tuple[str, int, str, int]
"""The socket's own (peer host, peer port, local host, local port)."""

FIRST_READ_TIMEOUT = 5.0
"""How long a drain waits for the server to start reading the last connections it was
given: a client that connects and says nothing is not waited for longer."""
_MAX_REMEMBERED = 65536
"""Real addresses remembered at most. The key of a live connection is overwritten when the
kernel reuses it for a new one, so the bound only matters beyond this many proxied
connections open at once; past it the oldest fall back to the socket's own peer."""


def socket_key(peer: object, local: object) -> Optional[SocketKey]:
    """The key for a socket's ``getpeername()``/``getsockname()``-style addresses
    (2-tuples for IPv4, 4-tuples for IPv6, both (host, port) first)."""
    if isinstance(peer, (tuple, list)) and isinstance(local, (tuple, list)):
        if len(peer) >= 2 and len(local) >= 2:
            return (str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))
    return None


class Handoffs:
    """Real client addresses and not-yet-read connections, keyed by :func:`socket_key`."""

    def __init__(self) -> None:
        self._real: OrderedDict[SocketKey, wire.Address] = OrderedDict()
        self._unread: dict[SocketKey, socket.socket] = {}
        self._all_read = asyncio.Event()
        self._all_read.set()

    def handed(self, conn: Connection) -> None:
        """Records a connection before the server sees it."""
        try:
            key = socket_key(conn.socket.getpeername(), conn.socket.getsockname())
        except OSError:
            return  # already reset by the client: the server will see that too
        if key is None:
            return
        peer = conn.client.peer
        if peer is not None and (peer[0], peer[1]) != (key[0], key[1]):
            self._real[key] = peer
            self._real.move_to_end(key)
            if len(self._real) > _MAX_REMEMBERED:
                self._real.popitem(last=False)
        else:
            self._real.pop(key, None)
        self._unread[key] = conn.socket
        self._all_read.clear()
        if len(self._unread) > 1024:
            self._forget_closed()

    def _forget_closed(self) -> None:
        """Drops connections closed without a request (a closed socket has no fd)."""
        for key in [k for k, s in self._unread.items() if s.fileno() == -1]:
            del self._unread[key]
        if not self._unread:
            self._all_read.set()

    def request_started(self, key: Optional[SocketKey]) -> Optional[wire.Address]:
        """Marks the connection as read; returns its real client if it differs."""
        if key is None:
            return None
        if self._unread.pop(key, None) is not None and not self._unread:
            self._all_read.set()
        return self._real.get(key)

    async def wait_first_reads(self, timeout: float = FIRST_READ_TIMEOUT) -> None:
        """Waits until every connection handed over has started a request or closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._unread and loop.time() < deadline:
            self._forget_closed()
            if not self._unread:
                break
            try:
                await asyncio.wait_for(self._all_read.wait(), min(0.05, deadline - loop.time()))
            except asyncio.TimeoutError:
                pass


def connection_server(
    handoffs: Handoffs, protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[Callable[[Connection], None], Callable[[], Awaitable[None]]]:
    """What the adapters give :class:`Worker` as ``on_connection``, and what they await
    after the drain.

    Each connection is attached to a new protocol in its own task, as asyncio's own
    servers do after ``accept()``. The second function waits until every attachment has
    finished and the server has started reading every connection
    (:meth:`Handoffs.wait_first_reads`).
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def attach(conn: Connection) -> None:
        try:
            await loop.connect_accepted_socket(protocol_factory, conn.socket)
        except OSError as err:
            log.warning("could not serve a handed-over connection: %s", err)
            conn.socket.close()

    def deliver(conn: Connection) -> None:
        handoffs.handed(conn)
        task = loop.create_task(attach(conn))
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def settle() -> None:
        if pending:
            await asyncio.gather(*pending)
        await handoffs.wait_first_reads()

    return deliver, settle
