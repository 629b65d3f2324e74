"""What the aiohttp and uvicorn adapters add on top of :class:`Worker`.

The real client address needs nothing here: a handed-over socket's ``getpeername()`` is
the client the dispatcher reported (also when it consumed a PROXY header), so asyncio's
transport, ``request.remote`` (aiohttp) and ``scope["client"]`` (ASGI) are already right.

What the web servers cannot know on their own is whether they have started reading a
connection. A graceful shutdown closes idle connections, and a connection handed over just
before the drain ended may not have been read yet although its client has sent a request:
it must not be closed as idle. The adapters mark each connection when a request starts on
it (looked up by its peer and local addresses, as the servers see them) and wait (bounded)
until every handed-over connection has started a request or closed.

What the servers' graceful shutdown cannot tell apart either: a request that will finish
on its own from one that stays open as long as the client does. A WebSocket, or a
socket.io (engine.io) long-poll, is answered at the session's next ping (25 s) or never
(the client is gone), and the server waits for it until its shutdown timeout: the old
process runs on, and the worker's clients wait at the dispatcher until it has exited. The
adapters end these held requests when the app shuts down (:class:`HeldRequests`), so that
only ordinary requests are waited for.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Callable, Optional

from .options import WorkerOptions
from .worker import Connection, Worker, log

SocketKey = tuple[str, int, str, int]
"""A connection's (peer host, peer port, local host, local port)."""

# Checked against tests/vectors/constants.json by tests/test_constants.py.
SHUTDOWN_TIMEOUT = 30.0
"""How long requests in progress may finish once the worker has drained, by default
(aiohttp's ``shutdown_timeout``, uvicorn's ``timeout_graceful_shutdown``; constants.json's
``app_drain_timeout_ms``): longer than socket.io's 25 s long-poll, shorter than systemd's
default 90 s stop timeout. Not a part of the drain: the link is closed by then."""
FIRST_READ_TIMEOUT = 5.0
"""How long, once drained, the adapters wait for the server to start reading the last
connections it was given: a client that connects and says nothing is not waited for longer."""


def socket_key(peer: object, local: object) -> Optional[SocketKey]:
    """The key for ``getpeername()``/``getsockname()``-style addresses (2-tuples for
    IPv4, 4-tuples for IPv6, both (host, port) first)."""
    if isinstance(peer, (tuple, list)) and isinstance(local, (tuple, list)):
        if len(peer) >= 2 and len(local) >= 2:
            return (str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))
    return None


class Handoffs:
    """Handed-over connections no request has started on yet, keyed by :func:`socket_key`."""

    def __init__(self) -> None:
        self._unread: dict[SocketKey, socket.socket] = {}
        self._all_read = asyncio.Event()
        self._all_read.set()

    def handed(self, conn: Connection) -> None:
        """Records a connection before the server sees it."""
        # Both answered without a system call after the first getsockname(), which the
        # socket remembers for asyncio's transport (see worker._HandedSocket).
        try:
            key = socket_key(conn.socket.getpeername(), conn.socket.getsockname())
        except OSError:
            return  # already reset by the client: the server will see that too
        if key is None:
            return
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

    def request_started(self, key: Optional[SocketKey]) -> None:
        """Marks the connection as read."""
        if key is not None and self._unread.pop(key, None) is not None and not self._unread:
            self._all_read.set()

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


def is_held(method: str, query_string: str, upgrade: Optional[str]) -> bool:
    """Whether a request stays open until its client or the server ends it: a WebSocket
    upgrade, or an engine.io long-poll (socket.io's polling transport: ``GET`` with
    ``transport=polling`` and a session id)."""
    if upgrade is not None and upgrade.lower() == "websocket":
        return True
    if method != "GET" or "transport=polling" not in query_string:
        return False
    return "sid=" in query_string


class HeldRequests:
    """The held requests in progress (see :func:`is_held`), by the task that serves each.

    :meth:`end` cancels them, and any that starts later: engine.io answers a cancelled
    long-poll with an error and closes a cancelled WebSocket, and socket.io clients
    reconnect from either (to the restarted worker); the app's ``disconnect`` handlers run.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ended = False

    def started(self, task: Optional[asyncio.Task[Any]]) -> None:
        """Records the task serving a held request (removed once it is done)."""
        if task is None:
            return
        if self._ended:
            task.cancel()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def end(self) -> int:
        """Cancels every held request, and those that start from now on; returns how many
        were in progress."""
        self._ended = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)


async def serve_until_drained(
    handoffs: Handoffs,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    options: Optional[WorkerOptions],
    what: str,
    ssl_context: Optional[ssl.SSLContext] = None,
    on_ready: Optional[Callable[[], None]] = None,
) -> None:
    """The adapters' common middle: be the worker, attach each connection handed over (or
    accepted on a lane) to a new protocol in its own task (as asyncio's own servers do after
    ``accept()``), say ready, and return once drained, every attachment finished and the
    server reading every connection (:meth:`Handoffs.wait_first_reads`). ``what`` names the
    app in the log; with ``ssl_context`` the connections speak TLS (the server's own
    ``ssl_context=``); ``on_ready`` is called once the worker is ready.
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def attach(conn: Connection) -> None:
        try:
            await loop.connect_accepted_socket(protocol_factory, conn.socket, ssl=ssl_context)
        except OSError as err:
            log.warning("could not serve a handed-over connection: %s", err)
            conn.socket.close()

    def deliver(conn: Connection) -> None:
        handoffs.handed(conn)
        task = loop.create_task(attach(conn))
        pending.add(task)
        task.add_done_callback(pending.discard)

    worker = Worker(options, notify_ready=False, on_connection=deliver)
    await worker.start()
    worker.notify_ready()
    log.info("serving %s as worker %d", what, worker.index)
    if on_ready is not None:
        on_ready()
    await worker.drained()
    if pending:
        await asyncio.gather(*pending)
    await handoffs.wait_first_reads()
