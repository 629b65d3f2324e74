"""The worker side of the link on asyncio: receive client connections as sockets.

::

    async for conn in Worker():          # binds @sticky-dispatch/<index>, then READY=1
        serve(conn.socket, conn.client)  # conn.client.peer is the real client address
    # the loop ended: SIGTERM arrived and every connection in flight was received

The dispatcher connects to the worker's abstract ``SOCK_SEQPACKET`` socket; each link
starts with HELLO both ways, then carries CONN messages with one fd each. The worker
acknowledges every CONN as soon as it is received, before the application can read from
the connection: the dispatcher keeps its copy of each fd until acknowledged and re-sends
unacknowledged ones to a restarted worker, so what it re-sends must be untouched. On
SIGTERM the worker sends DRAIN, receives everything up to the dispatcher's DRAINED, then
the iteration ends.

Lanes (``routing_key = "peer-ip"``): the kernel routes most clients to their worker
itself, each listener having one listening socket per worker index in a SO_REUSEPORT
group. The worker's HELLO says it serves lanes; at every link-up the dispatcher passes it
its listening sockets (LANE, then LANES), and the worker accepts on them itself, giving
those connections to the app as it gives CONNs. They outlive the link (the kernel routes
to this worker while the dispatcher restarts) and are closed, never ``shutdown()`` (the
socket is every holder's), before DRAIN.
"""

from __future__ import annotations

import array
import asyncio
import enum
import errno
import logging
import os
import shlex
import signal
import socket
import struct
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from . import wire
from .notify import notify
from .options import LINK_FD_ENV, SOCKET_PREFIX_ENV, ConfigError, WorkerOptions

log = logging.getLogger("sticky_dispatch")

# The facts the Rust and Node sides share are checked against tests/vectors/constants.json
# by tests/test_constants.py: change them there first.
HELLO_TIMEOUT = 2.0
"""A dispatcher that links and sends no HELLO within this many seconds of ours is
dropped: a silent peer would otherwise hold a session until the worker stops."""
DRAIN_ANSWER_TIMEOUT = 10.0
"""A dispatcher that does not answer DRAIN within this many seconds (and send what it
announced) is not waited for: the worker is stopping, and systemd's stop timeout would
kill it anyway."""
LINK_BACKLOG = 16
"""Links waiting to be accepted on the link socket: enough for a dispatcher and a few
reconnecting peers; links are few and long-lived."""
ACCEPT_QUEUE = 256
"""Connections received but not yet taken by the application. Beyond it the link is not
read, so the dispatcher keeps holding (and could re-send) what the app has not taken."""
ACK_BURST = 32
"""CONNs already waiting on the link are received together and acknowledged with one
cumulative ACK (at most this many), before any of them reaches the app: one send and
one wake-up of the dispatcher per burst instead of per connection."""
NO_DISPATCHER_NOTICE = 5.0
"""A worker no dispatcher has linked to after this many seconds says so, once (it keeps
waiting: under socket activation the dispatcher may start later)."""
ACCEPTED_INTERVAL = 1.0
"""ACCEPTED (connections accepted on lanes) goes to the dispatcher at most this often, while
the count changes, and once more before DRAIN (docs/protocol.md)."""
LANE_BURST = 32
"""Connections accepted on one lane per readiness, before other work gets its turn."""
LANE_RETRY_DELAY = 0.1
"""A lane whose accept failed for lack of resources (EMFILE...) rests this long: the
connections wait in its queue meanwhile, instead of the loop spinning."""
_MAX_FDS = 4
"""Room for more fds than the one a CONN carries, so that extra ones are received and
closed rather than silently truncated by the kernel."""
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


@dataclass(frozen=True)
class ClientInfo:
    """What the dispatcher says about a connection it handed over (or, for one accepted on
    a lane, what ``accept()`` and the lane say)."""

    seq: int
    """Sequence number of the hand-off on its link; 0 for a connection the worker accepted
    on one of its lanes (routed by the kernel, not handed over)."""
    peer: Optional[wire.Address]
    """The real client address (under PROXY protocol, not the balancer's)."""
    local: Optional[wire.Address]
    """The address the client connected to."""
    listener: str
    """The name of the dispatcher's listener that accepted it (``FileDescriptorName=``), or
    whose lane it came on."""


@dataclass(frozen=True)
class Connection:
    """A client's TCP socket (non-blocking, close-on-exec) and what the dispatcher said.

    ``socket.getpeername()`` is the client the dispatcher reported (:attr:`ClientInfo.peer`,
    the real client also when a PROXY header named it), so asyncio transports and the
    servers on them see the real client too; it asks the kernel only when the dispatcher
    reported no address.
    """

    socket: socket.socket
    client: ClientInfo


def default_logging() -> None:
    """Sends this package's INFO lines to stderr unless the app configured logging.

    The adapters call it: a worker under systemd should say in the journal when it is
    ready, drains or refuses a link, and uvicorn's own logging setup covers only its
    loggers. No timestamps: the journal records them.
    """
    if logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("sticky_dispatch: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class LinkError(Exception):
    """The dispatcher broke the protocol: the link is closed with this reason logged."""


class LinkSocketInUse(OSError):
    """The worker's link socket ``@<prefix><index>`` is bound by another process: a
    worker with this index is running, or another app uses the same socket prefix."""


def take_inherited_link(name: str) -> Optional[socket.socket]:
    """The listening link socket a worker launcher passed, as the fd named by
    ``STICKY_DISPATCH_LINK_FD``, or None without one. The variable is removed from the
    environment (the app's own children must not take the number for theirs), and the
    socket is checked to be a listening AF_UNIX ``SOCK_SEQPACKET`` socket bound to
    ``@name`` (:class:`ConfigError` otherwise; the fd is then left as it was). It becomes
    non-inheritable and non-blocking; closing it closes only this process's copy: the
    launcher keeps the name."""
    text = os.environ.pop(LINK_FD_ENV, None)
    if text is None:
        return None

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"the link socket passed in {LINK_FD_ENV} cannot serve as @{name}: {why}"
        )

    try:
        fd = int(text.strip())
    except ValueError:
        raise refuse(f"{text!r} is not a file descriptor number") from None
    if fd <= 2:
        raise refuse(f"fd {fd} is a standard stream, not a socket")
    try:
        os.fstat(fd)
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise refuse(f"fd {fd} is not an open socket ({err.strerror})") from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise refuse(f"fd {fd} is not an AF_UNIX SOCK_SEQPACKET socket")
        bound = sock.getsockname()
        if isinstance(bound, str):
            bound = bound.encode()
        if bound != b"\0" + name.encode():
            shown = "@" + bound[1:].decode(errors="replace") if bound[:1] == b"\0" else repr(bound)
            raise refuse(
                f"fd {fd} is bound to {shown}, not to @{name} "
                "(another worker index or socket_prefix?)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise refuse(f"fd {fd} (@{name}) is not listening")
    except BaseException:
        sock.detach()  # not ours to close
        raise
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


class _End:
    """Put in the queue once every link has ended: iteration stops there."""


class Worker:
    """Receives the connections the dispatcher hands to this worker index.

    Iterate with ``async for``; the first iteration binds the link socket (or call
    :meth:`start` first). Or pass ``on_connection``: it is called with each connection
    as soon as it is acknowledged (no queue, no iteration: what servers that attach
    sockets themselves want), and :meth:`drained` tells when the drain is over.

    With ``notify_ready=False`` the caller sends ``READY=1`` itself through
    :meth:`notify_ready`, once its application is ready, as the aiohttp and uvicorn
    adapters do.
    """

    def __init__(
        self,
        options: Optional[WorkerOptions] = None,
        *,
        notify_ready: bool = True,
        drain_on_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        on_connection: Optional[Callable[[Connection], None]] = None,
    ) -> None:
        self.options = options if options is not None else WorkerOptions.from_env()
        self._notify_ready = notify_ready
        self._on_connection = on_connection
        self._drain_signals = drain_on_signals
        # Made in start(): on Python 3.9 they bind to the loop current at creation.
        self._queue: asyncio.Queue[Connection | _End]
        self._drained: asyncio.Event
        self._draining = False
        # Futures of tasks waiting for a socket to become readable: drain() wakes them.
        self._waiters: set[asyncio.Future[None]] = set()
        self._listener: Optional[socket.socket] = None
        self._lanes: Optional[_LaneSet] = None
        self._links: Optional[asyncio.Task[None]] = None
        self._no_dispatcher: Optional[asyncio.TimerHandle] = None

    @property
    def index(self) -> int:
        """This worker's index."""
        return self.options.index

    async def start(self) -> None:
        """Binds ``@<prefix><index>`` and starts taking links; sends ``READY=1`` unless
        constructed with ``notify_ready=False``. Raises OSError if the name is taken
        (another worker with this index is running). Under ``sticky-dispatch
        worker-launcher`` (``STICKY_DISPATCH_LINK_FD`` set) takes the listening socket it
        passed instead (:func:`take_inherited_link`)."""
        if self._listener is not None:
            return
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(ACCEPT_QUEUE)
        self._drained = asyncio.Event()
        listener = take_inherited_link(self.options.socket_name)
        if listener is None:
            listener = self._bind()
        self._listener = listener
        self._lanes = _LaneSet(self._deliver_accepted, self._has_room, self._wake_all)
        for sig in self._drain_signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._no_dispatcher = loop.call_later(NO_DISPATCHER_NOTICE, self._say_no_dispatcher)
        self._links = loop.create_task(self._serve_links(listener))
        log.info("worker ready index=%d socket=@%s", self.index, self.options.socket_name)
        if self._notify_ready:
            self.notify_ready()

    def _bind(self) -> socket.socket:
        """Binds and listens on ``@<prefix><index>``."""
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            listener.bind("\0" + self.options.socket_name)
            listener.listen(LINK_BACKLOG)
        except OSError as err:
            listener.close()
            name = self.options.socket_name
            if err.errno == errno.EADDRINUSE:
                raise LinkSocketInUse(
                    err.errno,
                    f"the link socket @{name} is in use: worker {self.index} is already "
                    "running, or another app on this host uses the same socket_prefix "
                    f"{self.options.socket_prefix!r}; give each app its own (socket_prefix "
                    f"in the dispatcher's config, {SOCKET_PREFIX_ENV} for its workers)",
                ) from err
            raise OSError(err.errno, f"could not bind the link socket @{name}: {err}") from err
        return listener

    def _say_no_dispatcher(self) -> None:
        command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
        log.warning(
            "no dispatcher has connected to this worker's link socket @%s within %g s; "
            "the worker serves only what a dispatcher hands it. If none is running, start "
            "one that runs this command as its workers: sticky-dispatch --listen "
            "127.0.0.1:8080 --workers 4 -- %s (or, under systemd, systemctl start "
            "sticky-dispatch.socket); its socket_prefix must be %r, as here "
            "(%s)",
            self.options.socket_name,
            NO_DISPATCHER_NOTICE,
            command,
            self.options.socket_prefix,
            SOCKET_PREFIX_ENV,
        )

    def _cancel_no_dispatcher_notice(self) -> None:
        if self._no_dispatcher is not None:
            self._no_dispatcher.cancel()
            self._no_dispatcher = None

    def notify_ready(self) -> None:
        """Tells systemd ``READY=1``: ``systemctl start app@N`` returns from here on."""
        notify(f"READY=1\nSTATUS=worker {self.index} ready")

    def drain(self) -> None:
        """Starts a drain, as SIGTERM does: the dispatcher is told to send nothing new,
        what it already sent is received, then the iteration ends."""
        if self._draining:
            return
        self._draining = True
        self._cancel_no_dispatcher_notice()
        # Before any session can send DRAIN (they run after this returns): from now on the
        # kernel queues this worker's clients on the dispatcher's copies of the lanes.
        if self._lanes is not None:
            self._lanes.close()
        self._wake_all()

    def _wake_all(self) -> None:
        """Wakes whatever waits for a link or on one, to look at the worker's state."""
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    @property
    def draining(self) -> bool:
        """Whether a drain has started."""
        return self._draining

    def _is_draining(self) -> bool:
        return self._draining

    async def _deliver(self, batch: list[Connection]) -> None:
        """Gives acknowledged connections to the app, in order."""
        if self._on_connection is not None:
            for conn in batch:
                self._on_connection(conn)
        else:
            for conn in batch:
                # Waits while the app is behind; meanwhile the link is not read.
                await self._queue.put(conn)

    def _deliver_accepted(self, conn: Connection) -> None:
        """Gives the app a connection accepted on a lane (never when it has no room)."""
        if self._on_connection is not None:
            self._on_connection(conn)
        else:
            self._queue.put_nowait(conn)

    def _has_room(self) -> bool:
        """Whether the app can take one more connection now; if not, the lanes pause (their
        clients wait in the kernel's queue) until it has taken one."""
        return self._on_connection is not None or not self._queue.full()

    async def drained(self) -> None:
        """Resolves once a drain has finished and the app has every connection."""
        await self.start()
        await self._drained.wait()

    def __aiter__(self) -> Worker:
        return self

    async def __anext__(self) -> Connection:
        await self.start()
        if self._drained.is_set():
            raise StopAsyncIteration
        item = await self._queue.get()
        if self._lanes is not None:
            self._lanes.resume()
        if isinstance(item, _End):
            self._drained.set()
            self._remove_signal_handlers()
            raise StopAsyncIteration
        return item

    def _on_signal(self, sig: int) -> None:
        log.info("%s: draining", signal.Signals(sig).name)
        self.drain()

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._drain_signals:
            loop.remove_signal_handler(sig)
        self._drain_signals = ()

    async def close(self) -> None:
        """Stops at once, without a drain: links are closed, and what the dispatcher
        had not seen acknowledged it will re-send to the next worker."""
        self.drain()
        if self._links is None:
            return
        self._remove_signal_handlers()
        self._links.cancel()
        try:
            await self._links
        except asyncio.CancelledError:
            pass
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Connection):
                item.socket.close()
        self._drained.set()

    async def _wait_for_link(self, listener: socket.socket) -> None:
        """Returns when a dispatcher connects to ``listener`` or a drain starts."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        fd = listener.fileno()
        loop.add_reader(fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            loop.remove_reader(fd)

    async def _serve_links(self, listener: socket.socket) -> None:
        """Accepts links until a drain starts, then waits for the links to finish."""
        sessions: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        try:
            while not self._draining:
                try:
                    link, _ = listener.accept()
                except BlockingIOError:
                    await self._wait_for_link(listener)
                    continue
                except OSError as err:
                    # Typically EMFILE: back off instead of spinning.
                    log.warning("accepting a link failed: %s", err)
                    await asyncio.sleep(0.1)
                    continue
                link.setblocking(False)
                if not self._admit(link):
                    link.close()
                    continue
                self._cancel_no_dispatcher_notice()
                session = _LinkSession(
                    _SeqpacketLink(link, self._waiters),
                    self.index,
                    self._is_draining,
                    self._deliver,
                    self._lanes,
                )
                task = loop.create_task(session.run())
                sessions.add(task)
                task.add_done_callback(sessions.discard)
        except asyncio.CancelledError:
            for task in sessions:
                task.cancel()
            raise
        finally:
            # Free the name now: a replacement worker may bind it as soon as we exit.
            listener.close()
        notify("STOPPING=1")
        if sessions:
            await asyncio.gather(*sessions, return_exceptions=True)
        log.info("all links closed")
        if self._on_connection is None:
            await self._queue.put(_End())
        else:
            self._remove_signal_handlers()
            self._drained.set()

    def _admit(self, link: socket.socket) -> bool:
        """Checks the connecting process's uid (SO_PEERCRED) before reading anything."""
        try:
            raw = link.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", raw)
        except OSError as err:
            log.warning("refused a link whose credentials could not be read: %s", err)
            return False
        if uid not in self.options.dispatcher_users:
            log.warning(
                "refused a link from a process of a user not in dispatcher_users uid=%d pid=%d",
                uid,
                pid,
            )
            return False
        return True


class LinkState(enum.Enum):
    """Where a link with one dispatcher stands; :class:`_LinkSession` has the transitions."""

    HANDSHAKING = "handshaking"
    """Our HELLO is sent; the dispatcher's is due within :data:`HELLO_TIMEOUT`."""
    SERVING = "serving"
    """CONNs arrive, are acknowledged, then go to the app."""
    DRAIN_ASKED = "drain asked"
    """The worker is stopping: DRAIN sent, DRAINED due within :data:`DRAIN_ANSWER_TIMEOUT`
    (CONNs already on their way still arrive and are served)."""
    DRAIN_ANSWERED = "drain answered"
    """DRAINED named the last CONN: the link ends once it is received and acknowledged
    (within the same deadline)."""
    ORPHANED = "orphaned"
    """The dispatcher died before our ACK: nobody will send what it sent again, so what
    arrives goes to the app unacknowledged; nothing more is sent."""
    CLOSED = "closed"
    """Ended: by the dispatcher, the drain, a timeout or a protocol error."""


class _Link(Protocol):
    """What a session needs of its link socket (:class:`_SeqpacketLink`; tests fake it)."""

    async def send(self, message: wire.Message) -> None: ...

    def try_recv(self) -> Optional[tuple[bytes, list[int]]]:
        """One datagram and its fds, or None if none is waiting; b"" when closed."""

    async def wait_readable(self, timeout: Optional[float]) -> None:
        """Returns when readable, when the worker starts draining, or after ``timeout``."""

    def dispatcher_gone(self) -> bool: ...

    def close(self) -> None: ...


class _Lanes(Protocol):
    """What a session needs of the worker's lanes (:class:`_LaneSet`; tests fake it)."""

    def replace(self, lanes: list[tuple[wire.Lane, int]]) -> None:
        """Serves exactly these lanes (LANE messages with their fds) from now on."""

    @property
    def accepted(self) -> int:
        """Connections accepted on lanes since the process started."""


class _LinkSession:
    """One link with one dispatcher, as a state machine (:class:`LinkState`)::

        HANDSHAKING --HELLO from the dispatcher, for our index---------> SERVING
        SERVING     --the worker drains: ACK what came, send DRAIN-----> DRAIN_ASKED
        DRAIN_ASKED --DRAINED(last)------------------------------------> DRAIN_ANSWERED
        DRAIN_ANSWERED --CONN `last` received and acknowledged---------> CLOSED
        SERVING, DRAIN_* --ACK fails and the dispatcher is gone--------> ORPHANED
        ORPHANED    --end of link, or DRAINED's last CONN received-----> CLOSED
        any         --end of link, timeout, protocol error-------------> CLOSED

    A drain that starts while HANDSHAKING sends DRAIN as soon as the HELLO has come.
    Its deadline runs from when the session first sees the drain, in every state but
    ORPHANED. CONNs are taken in bursts (at most :data:`ACK_BURST`) and acknowledged with
    one cumulative ACK before any of them reaches the app (:meth:`_acknowledge`).

    With ``lanes`` the HELLO says the worker serves them: after the HELLO and before the
    first CONN, LANEs are collected until LANES confirms their count, then the worker's
    lanes become exactly those. The count of connections accepted on lanes goes out as
    ACCEPTED when it changed, at most every :data:`ACCEPTED_INTERVAL` and before DRAIN.
    """

    def __init__(
        self,
        link: _Link,
        index: int,
        draining: Callable[[], bool],
        deliver: Callable[[list[Connection]], Awaitable[None]],
        lanes: Optional[_Lanes] = None,
    ) -> None:
        self.link = link
        self.index = index
        self._draining = draining
        self._deliver = deliver
        self._lanes = lanes
        self.lanes_received: list[tuple[wire.Lane, int]] = []
        """LANEs (with their fds) not yet confirmed by LANES."""
        self.lanes_done = False
        """LANES has come on this link: no more LANE."""
        self.accepted_sent = 0
        """The count of the last ACCEPTED sent on this link."""
        self._next_accepted = 0.0
        self.state = LinkState.HANDSHAKING
        self.last_seq = 0
        """The last CONN received."""
        self.acked = 0
        """The last CONN acknowledged (or, ORPHANED, given to the app unacknowledged)."""
        self.batch: list[Connection] = []
        """Received, not yet acknowledged: never given to the app before their ACK."""
        self.final_seq: Optional[int] = None
        """From DRAINED: the link ends after this CONN."""
        self._hello_deadline = 0.0
        self._drain_deadline: Optional[float] = None
        # The last receive found the link empty: after the ACK, wait for it to become
        # readable rather than try again (one failed recvmsg per burst instead of two).
        self._link_empty = False
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serves the link until it ends; logs why. Raises only CancelledError."""
        try:
            features = wire.FEATURE_LANES if self._lanes is not None else None
            await self.link.send(wire.Hello(wire.Role.WORKER, self.index, os.getpid(), features))
            self._hello_deadline = self._loop.time() + HELLO_TIMEOUT
            while self.state is not LinkState.CLOSED:
                await self._step()
            log.debug("link closed")
        except asyncio.CancelledError:
            raise
        except LinkError as err:
            log.warning("link closed: %s", err)
        except Exception as err:  # noqa: BLE001 - a bad link must never stop the app
            log.warning("link closed: %s: %s", type(err).__name__, err)
        finally:
            self.state = LinkState.CLOSED
            # Received but not acknowledged: the dispatcher still holds them and will
            # re-send them on its next link, so they must not reach the app from here.
            for conn in self.batch:
                conn.socket.close()
            self.batch.clear()
            # LANEs without their LANES: not a set to serve (the lanes served stay served).
            _close_all([fd for _, fd in self.lanes_received])
            self.lanes_received.clear()
            self.link.close()

    async def _step(self) -> None:
        """One turn: end a finished drain, start one, or receive (or wait for) a message."""
        if self.final_seq is not None and self.last_seq >= self.final_seq:
            await self._acknowledge()
            self.state = LinkState.CLOSED
            return
        if self.state is not LinkState.ORPHANED and self._draining():
            await self._on_worker_draining()
        received = None
        if not self._link_empty and self.last_seq - self.acked < ACK_BURST:
            received = self.link.try_recv()
            self._link_empty = received is None
        if received is not None:
            await self._on_datagram(*received)
        elif self.last_seq != self.acked:
            await self._acknowledge()
        elif not await self._report_accepted(self._loop.time()):
            await self._wait()

    async def _on_worker_draining(self) -> None:
        """The worker is stopping: starts the deadline (once), and asks for the drain
        once SERVING (after the HELLO), having acknowledged what came before."""
        if self._drain_deadline is None:
            self._drain_deadline = self._loop.time() + DRAIN_ANSWER_TIMEOUT
        if self.state is LinkState.SERVING:
            await self._acknowledge()
            if self.state is LinkState.SERVING:  # not orphaned by that ACK
                # The worker closed its lanes when the drain started: this count is final.
                await self._report_accepted(None)
                await self.link.send(wire.Drain())
                self.state = LinkState.DRAIN_ASKED

    async def _on_datagram(self, data: bytes, fds: list[int]) -> None:
        if not data:
            _close_all(fds)
            await self._on_end_of_link()
            return
        try:
            message = wire.decode(data)
        except wire.DecodeError as err:
            _close_all(fds)
            raise LinkError(str(err)) from None
        if (
            isinstance(message, wire.Conn)
            and len(fds) == 1
            and self.state is not LinkState.HANDSHAKING
        ):
            self._on_conn(message, fds[0])
            return
        if isinstance(message, wire.Lane) and len(fds) == 1 and self._lanes_expected():
            self.lanes_received.append((message, fds[0]))
            return
        _close_all(fds)
        await self._acknowledge()
        if isinstance(message, wire.Hello) and self.state is LinkState.HANDSHAKING:
            self._on_hello(message)
        elif isinstance(message, wire.Lanes) and self._lanes_expected():
            self._on_lanes(message)
        elif isinstance(message, wire.Drained) and self.state in (
            LinkState.DRAIN_ASKED,
            LinkState.ORPHANED,  # the dead dispatcher's last words: nothing comes after
        ):
            log.debug("dispatcher confirmed the drain until=%d", message.last_seq)
            self.final_seq = message.last_seq
            if self.state is LinkState.DRAIN_ASKED:
                self.state = LinkState.DRAIN_ANSWERED
        else:
            raise LinkError(
                f"unexpected {type(message).__name__} with {len(fds)} fd(s) from the dispatcher"
            )

    def _on_hello(self, message: wire.Hello) -> None:
        if message.role != wire.Role.DISPATCHER:
            raise LinkError(f"HELLO from a {message.role.name.lower()}, not the dispatcher")
        if message.index != self.index:
            raise LinkError(
                f"dispatcher addressed worker {message.index}, this is worker {self.index}"
            )
        log.info("link up dispatcher_pid=%d", message.pid)
        self.state = LinkState.SERVING

    def _lanes_expected(self) -> bool:
        """LANE and LANES come after the HELLO, before the first CONN, once per link."""
        return (
            self._lanes is not None
            and self.state in (LinkState.SERVING, LinkState.DRAIN_ASKED)
            and self.last_seq == 0
            and not self.lanes_done
        )

    def _on_lanes(self, message: wire.Lanes) -> None:
        received, self.lanes_received = self.lanes_received, []
        if message.count != len(received):
            _close_all([fd for _, fd in received])
            raise LinkError(f"LANES {message.count} after {len(received)} LANE(s)")
        self.lanes_done = True
        assert self._lanes is not None  # checked by _lanes_expected
        self._lanes.replace(received)

    async def _report_accepted(self, now: Optional[float]) -> bool:
        """Sends ACCEPTED if the count changed since this link last said it, and (unless
        ``now`` is None: before DRAIN) :data:`ACCEPTED_INTERVAL` has passed since.
        Returns whether it sent one."""
        if self._lanes is None or self.state is not LinkState.SERVING:
            return False
        count = self._lanes.accepted
        if count == self.accepted_sent or (now is not None and now < self._next_accepted):
            return False
        await self.link.send(wire.Accepted(count))
        self.accepted_sent = count
        self._next_accepted = self._loop.time() + ACCEPTED_INTERVAL
        return True

    def _on_conn(self, message: wire.Conn, fd: int) -> None:
        if message.seq != self.last_seq + 1:
            _close_all([fd])
            raise LinkError(f"CONN {message.seq} after {self.last_seq}")
        self.last_seq = message.seq
        conn = _connection(fd, message)
        if conn is not None:
            self.batch.append(conn)

    async def _on_end_of_link(self) -> None:
        """The dispatcher closed the link. What it sent unacknowledged it sends again on
        its next link, unless it died: then nobody will, and the app gets them."""
        if self.last_seq != self.acked:
            if self.state is not LinkState.ORPHANED and self.link.dispatcher_gone():
                log.warning("the dispatcher died before our ACK: serving what it had sent")
                self.state = LinkState.ORPHANED
            if self.state is LinkState.ORPHANED:
                await self._acknowledge()
        self.state = LinkState.CLOSED

    async def _wait(self) -> None:
        """Waits for the link to become readable, until the state's deadline."""
        if self.state is LinkState.HANDSHAKING:
            deadline: Optional[float] = self._hello_deadline
            reason = f"no HELLO from the dispatcher within {HELLO_TIMEOUT:g} s"
        else:
            deadline = self._drain_deadline
            reason = f"no answer to DRAIN within {DRAIN_ANSWER_TIMEOUT} s"
        now = self._loop.time()
        timeout = None
        if deadline is not None:
            timeout = deadline - now
            if timeout <= 0:
                raise LinkError(reason)
        if (
            self._lanes is not None
            and self.state is LinkState.SERVING
            and self._lanes.accepted != self.accepted_sent
        ):
            # A count to report once the interval is over (waking is no error).
            report = self._next_accepted - now
            timeout = report if timeout is None else min(timeout, report)
        await self.link.wait_readable(timeout)
        self._link_empty = False

    async def _acknowledge(self) -> None:
        """One cumulative ACK for the CONNs received in a burst, then they go to the
        app: never before their ACK is sent (see the module docstring). If the ACK cannot
        be sent because the dispatcher died, nobody will send these again (they left its
        fd store when sent): ORPHANED, they go to the app all the same."""
        if self.last_seq == self.acked:
            return
        if self.state is not LinkState.ORPHANED:
            try:
                await self.link.send(wire.Ack(self.last_seq))
            except OSError as err:
                if not self.link.dispatcher_gone():
                    raise  # it lives: it sends them again on its next link
                log.warning(
                    "the dispatcher died before our ACK: serving what it had sent (%s)", err
                )
                self.state = LinkState.ORPHANED
        self.acked = self.last_seq
        await self._deliver(self.batch)
        self.batch.clear()


class _SeqpacketLink:
    """The link socket of one session: sends, receives with fds, waits for readiness."""

    def __init__(self, link: socket.socket, waiters: set[asyncio.Future[None]]) -> None:
        self.sock = link
        # Worker.drain() resolves these, to wake a session that waits for the link.
        self._waiters = waiters
        # The dispatcher's pid in our pid namespace (SO_PEERCRED), to tell whether it died.
        self.peer_pid = _peer_pid(link)
        self.loop = asyncio.get_running_loop()
        # The link stays registered with the loop between waits (one epoll_ctl per
        # link, not two per message) while each readiness finds someone waiting.
        self._watching = False
        self._wake: Optional[asyncio.Future[None]] = None

    def _on_readable(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        else:
            # Nobody waits (the app is behind): stop watching, or the level-triggered
            # readiness would call us in a loop.
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watching:
            self.loop.remove_reader(self.sock.fileno())
            self._watching = False

    async def wait_readable(self, timeout: Optional[float]) -> None:
        """Returns when the link is readable, a drain starts, or ``timeout`` passes."""
        if not self._watching:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._watching = True
        wake: asyncio.Future[None] = self.loop.create_future()
        self._wake = wake
        timer = self.loop.call_later(timeout, _resolve, wake) if timeout is not None else None
        self._waiters.add(wake)
        try:
            await wake
        finally:
            self._wake = None
            self._waiters.discard(wake)
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        self._unwatch()
        self.sock.close()

    async def send(self, message: wire.Message) -> None:
        data = wire.encode(message)
        try:
            # A datagram goes whole or not at all; the link's buffer is nearly always free.
            self.sock.send(data)
        except BlockingIOError:
            await self.loop.sock_sendall(self.sock, data)

    def try_recv(self) -> Optional[tuple[bytes, list[int]]]:
        """One datagram and its fds, or None if none is waiting. Fds come close-on-exec."""
        # Not socket.recv_fds: up to at least CPython 3.12 it drops its flags argument, and
        # without MSG_CMSG_CLOEXEC a client's fd would leak into processes the app spawns.
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                wire.MAX_MESSAGE, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return None
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(list(fds))
            raise LinkError("a message or its fds were truncated")
        return data, list(fds)

    def dispatcher_gone(self) -> bool:
        """Whether the dispatcher process has exited (unknown pids count as alive)."""
        return _process_gone(self.peer_pid)


# accept() failures that say "not now" for lack of a resource, not "this lane is broken".
_ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _Lane:
    """A listening socket this worker accepts on: its lane of one of the dispatcher's
    listeners, identified by the socket itself (``st_dev``, ``st_ino``), not by the fd."""

    __slots__ = ("sock", "key", "listener", "watching")

    def __init__(self, sock: socket.socket, key: tuple[int, int], message: wire.Lane) -> None:
        self.sock = sock
        self.key = key
        self.listener = message.listener
        self.watching = False


class _LaneSet:
    """The lanes this worker serves, accepted on from the event loop.

    Each connection accepted goes to ``deliver`` as a :class:`Connection` (seq 0, the peer
    from ``accept()``), while ``room()`` says the app can take one; otherwise the lanes
    pause until :meth:`resume` (the clients wait in the kernel's queue). ``wake`` is called
    once the count of accepted connections has changed, at most every
    :data:`ACCEPTED_INTERVAL`, for the link sessions to report it.

    The lanes are shared with the dispatcher and the next process of this index: they are
    accepted on here, never given to a server that would call ``listen()`` again (asyncio's
    ``create_server(sock=)`` does, with its own backlog, shrinking the queue for every
    holder unless passed the LANE's ``backlog``), and only ever closed, never shut down
    (``shutdown()`` would stop the socket for every holder and reorder the group).
    """

    def __init__(
        self,
        deliver: Callable[[Connection], None],
        room: Callable[[], bool],
        wake: Callable[[], None],
    ) -> None:
        self._deliver = deliver
        self._room = room
        self._wake = wake
        self._loop = asyncio.get_running_loop()
        self._lanes: dict[tuple[int, int], _Lane] = {}
        self._closed = False
        self._paused = False
        self._report: Optional[asyncio.TimerHandle] = None
        self.accepted = 0
        """Connections accepted on lanes since the process started (ACCEPTED's count)."""

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets served now."""
        return [lane.sock for lane in self._lanes.values()]

    def replace(self, lanes: list[tuple[wire.Lane, int]]) -> None:
        """Serves exactly ``lanes`` from now on: a socket already served stays served (the
        new fd of it is closed), one no longer among them is closed. After :meth:`close`
        every fd given is closed at once."""
        kept: dict[tuple[int, int], _Lane] = {}
        for message, fd in lanes:
            lane = self._lane(message, fd)
            if lane is None:
                continue
            if self._closed or lane.key in kept:
                lane.sock.close()
            elif lane.key in self._lanes:
                kept[lane.key] = self._lanes.pop(lane.key)
                lane.sock.close()  # the same socket again: close() drops only this fd
            else:
                kept[lane.key] = lane
                self._watch(lane)
                log.info("serving lane listener=%s local=%s", lane.listener, _sockname(lane))
        for lane in self._lanes.values():
            log.info("stopped serving lane listener=%s local=%s", lane.listener, _sockname(lane))
            self._stop(lane)
        self._lanes = kept

    def _lane(self, message: wire.Lane, fd: int) -> Optional[_Lane]:
        """Wraps a lane's fd, or logs and closes it if it is not a listening TCP socket."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            os.close(fd)
            log.warning("a lane is not a socket listener=%s: %s", message.listener, err)
            return None
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            stat = os.fstat(fd)
        except OSError as err:
            sock.close()
            log.warning("a lane could not be read listener=%s: %s", message.listener, err)
            return None
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if not (tcp and listening):
            sock.close()
            log.warning("a lane is not a listening TCP socket listener=%s", message.listener)
            return None
        # O_NONBLOCK lives on the open file, shared with the dispatcher's copy (non-blocking
        # already, as are asyncio's listeners).
        sock.setblocking(False)
        return _Lane(sock, (stat.st_dev, stat.st_ino), message)

    def close(self) -> None:
        """Stops accepting and closes every lane, for good: the drain has started."""
        self._closed = True
        for lane in self._lanes.values():
            self._stop(lane)
        if self._lanes:
            log.info(
                "closed %d lane(s): their clients wait for this index's next process",
                len(self._lanes),
            )
        self._lanes = {}
        if self._report is not None:
            self._report.cancel()
            self._report = None

    def resume(self) -> None:
        """The app took a connection: paused lanes accept again."""
        if self._paused and not self._closed:
            self._paused = False
            for lane in self._lanes.values():
                self._watch(lane)

    def _watch(self, lane: _Lane) -> None:
        if not lane.watching and not self._paused:
            self._loop.add_reader(lane.sock.fileno(), self._on_readable, lane)
            lane.watching = True

    def _unwatch(self, lane: _Lane) -> None:
        if lane.watching:
            self._loop.remove_reader(lane.sock.fileno())
            lane.watching = False

    def _stop(self, lane: _Lane) -> None:
        self._unwatch(lane)
        lane.sock.close()  # never shutdown(): see the class

    def _rewatch(self, lane: _Lane) -> None:
        if self._lanes.get(lane.key) is lane:
            self._watch(lane)

    def _on_readable(self, lane: _Lane) -> None:
        for _ in range(LANE_BURST):
            if not self._room():
                self._paused = True
                for each in self._lanes.values():
                    self._unwatch(each)
                return
            try:
                # What socket.accept() does, minus its socket object: the connection becomes
                # a _HandedSocket that knows its peer, as a handed-over one does.
                fd, peer = lane.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                self._unwatch(lane)
                if err.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.warning("accepting on lane listener=%s failed: %s", lane.listener, err)
                    self._loop.call_later(LANE_RETRY_DELAY, self._rewatch, lane)
                else:
                    log.warning("lane listener=%s stopped: %s", lane.listener, err)
                    del self._lanes[lane.key]
                    lane.sock.close()
                return
            self.accepted += 1
            if self._report is None:
                self._report = self._loop.call_later(ACCEPTED_INTERVAL, self._on_report)
            conn = _accepted(fd, peer, lane)
            if conn is not None:
                self._deliver(conn)

    def _on_report(self) -> None:
        self._report = None
        self._wake()


def _accepted(fd: int, peer: Any, lane: _Lane) -> Optional[Connection]:
    """Wraps a connection accepted on ``lane``; its peer (from accept()) is the client."""
    try:
        sock = _HandedSocket(lane.sock.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    except OSError as err:
        os.close(fd)
        log.debug("a connection accepted on lane listener=%s failed: %s", lane.listener, err)
        return None
    sock._peername = peer
    try:
        sock.setblocking(False)
        local = sock.getsockname()  # remembered: asyncio's transport asks for it too
    except OSError as err:  # reset by the client already
        sock.close()
        log.debug("a connection accepted on lane listener=%s failed: %s", lane.listener, err)
        return None
    info = ClientInfo(0, (peer[0], peer[1]), (local[0], local[1]), lane.listener)
    return Connection(sock, info)


def _sockname(lane: _Lane) -> str:
    try:
        host, port = lane.sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _HandedSocket(socket.socket):
    """A handed-over client socket whose peer is the client the dispatcher reported.

    Saves the system calls asyncio and the adapters would make on every connection:
    ``getpeername()`` answers from the CONN message, ``getsockname()`` asks the kernel
    once, and ``setblocking()`` does nothing when the socket is already in that mode
    (asyncio's ``connect_accepted_socket`` calls it after :func:`_connection` did).
    """

    __slots__ = ("_peername", "_sockname")

    def __init__(
        self, family: int = -1, type: int = -1, proto: int = -1, fileno: Optional[int] = None
    ) -> None:
        super().__init__(family, type, proto, fileno)
        self._peername: Any = None
        self._sockname: Any = None

    def getpeername(self) -> Any:
        if self._peername is None:
            return super().getpeername()
        return self._peername

    def getsockname(self) -> Any:
        if self._sockname is None:
            self._sockname = super().getsockname()
        return self._sockname

    def setblocking(self, flag: bool) -> None:
        # Only the no-op case is skipped: setblocking(True) also clears a timeout.
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)

    def dup(self) -> _HandedSocket:
        sock = super().dup()
        sock._peername, sock._sockname = self._peername, self._sockname
        return sock


def _connection(fd: int, message: wire.Conn) -> Optional[Connection]:
    """Wraps a handed-over fd; anything but a TCP socket is logged and closed."""
    try:
        # Type and protocol given: CPython then skips getsockopt(SO_TYPE, SO_PROTOCOL).
        # The family (-1) comes from the getsockname() it makes anyway to check that the
        # fd is a socket.
        sock = _HandedSocket(-1, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    except OSError as err:
        os.close(fd)
        log.warning("a handed-over fd is not a socket seq=%d: %s", message.seq, err)
        return None
    # The dispatcher only hands over accepted TCP connections: the family (from the
    # kernel) tells a stray Unix socket; not asking the type saves a system call.
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        log.warning("a handed-over fd is not a TCP socket seq=%d", message.seq)
        sock.close()
        return None
    peer = message.peer
    if peer is not None:
        # Python's spelling: (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6.
        sock._peername = peer if ":" not in peer[0] else (peer[0], peer[1], 0, 0)
    # O_NONBLOCK lives on the open file, shared with the dispatcher's copy; asyncio needs it.
    sock.setblocking(False)
    info = ClientInfo(message.seq, message.peer, message.local, message.listener)
    return Connection(sock, info)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _peer_pid(link: socket.socket) -> int:
    """The pid of the process at the other end of ``link`` (0 when unknown)."""
    try:
        raw = link.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid: int = struct.unpack("3i", raw)[0]
    return pid


def _process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone); unknown pids count as alive."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(") ", 1)[-1][:1]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return state in ("Z", "X")
