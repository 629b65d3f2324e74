"""The link session's state machine (worker._LinkSession) on a fake link: no socket to a
dispatcher, no process, every transition of worker.LinkState."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from typing import Any, Callable, Optional

import pytest

from sticky_dispatch import wire
from sticky_dispatch import worker as worker_module
from sticky_dispatch.worker import ACK_BURST, Connection, LinkState, _close_all, _LinkSession

INDEX = 2
HELLO = wire.Hello(wire.Role.DISPATCHER, INDEX, 4321)


class FakeLink:
    """A link in memory: the test queues what the dispatcher sends; everything the session
    sends, and every connection it gives the app, is written to ``events`` in order."""

    def __init__(self) -> None:
        self.incoming: deque[tuple[bytes, list[int]]] = deque()
        self.events: list[Any] = []
        self.readable = asyncio.Event()
        self.gone = False
        self.send_error: Optional[OSError] = None
        self.closed = False
        self.sent_one = asyncio.Event()
        self.taken = 1

    def push(self, message: wire.Message, fd: Optional[int] = None) -> None:
        self.incoming.append((wire.encode(message), [] if fd is None else [fd]))
        self.readable.set()

    def push_end(self) -> None:
        self.incoming.append((b"", []))
        self.readable.set()

    def wake(self) -> None:
        """What Worker.drain() does to a session waiting for its link."""
        self.readable.set()

    async def send(self, message: wire.Message) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.events.append(message)
        self.sent_one.set()

    async def next_sent(self) -> wire.Message:
        """The session's next message not yet taken here (the HELLO is taken already)."""
        while len(self.sent) <= self.taken:
            self.sent_one.clear()
            await asyncio.wait_for(self.sent_one.wait(), 5)
        self.taken += 1
        return self.sent[self.taken - 1]

    def try_recv(self) -> Optional[tuple[bytes, list[int]]]:
        if not self.incoming:
            self.readable.clear()
            return None
        return self.incoming.popleft()

    async def wait_readable(self, timeout: Optional[float]) -> None:
        try:
            await asyncio.wait_for(self.readable.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def dispatcher_gone(self) -> bool:
        return self.gone

    def close(self) -> None:
        self.closed = True

    @property
    def sent(self) -> list[wire.Message]:
        return [e for e in self.events if not isinstance(e, tuple)]

    @property
    def delivered(self) -> list[int]:
        return [e[1] for e in self.events if isinstance(e, tuple) and e[0] == "app"]


class FakeLanes:
    """The worker's lanes as a session sees them: each LANES's set is written to the
    link's events (listener names), and the fds kept to be checked and closed."""

    def __init__(self, link: FakeLink) -> None:
        self.link = link
        self.accepted = 0
        self.fds: list[int] = []

    def replace(self, lanes: list[tuple[wire.Lane, int]]) -> None:
        self.link.events.append(("lanes", [lane.listener for lane, _ in lanes]))
        self.fds.extend(fd for _, fd in lanes)


class Harness:
    """A session on a FakeLink, run as a task; the app's connections are recorded. With
    ``lanes`` the session serves lanes (:class:`FakeLanes`)."""

    def __init__(self, lanes: bool = False) -> None:
        self.link = FakeLink()
        self.draining = False
        self.sockets: list[socket.socket] = []
        self.lanes = FakeLanes(self.link) if lanes else None
        self.session = _LinkSession(
            self.link, INDEX, lambda: self.draining, self._deliver, self.lanes
        )
        self.task = asyncio.get_running_loop().create_task(self.session.run())

    async def _deliver(self, batch: list[Connection]) -> None:
        for conn in batch:
            self.link.events.append(("app", conn.client.seq))
            self.sockets.append(conn.socket)

    def conn(self, seq: int) -> None:
        """Queues CONN ``seq`` with a TCP socket's fd, as the dispatcher sends it."""
        self.link.push(wire.Conn(seq, ("203.0.113.1", seq), None, "web"), _tcp_fd())

    def drain(self) -> None:
        self.draining = True
        self.link.wake()

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0)
        raise AssertionError(f"not reached; state {self.session.state}, {self.link.events}")

    def lane(self, listener: str) -> int:
        """Queues a LANE with a listening socket's fd; returns the fd the session gets."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        fd = sock.detach()
        self.link.push(wire.Lane(8, ("127.0.0.1", 1), listener), fd)
        return fd

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, 5)
        assert self.session.state is LinkState.CLOSED
        assert self.link.closed
        for sock in self.sockets:
            sock.close()


def _tcp_fd() -> int:
    """An fd of a TCP socket (unconnected: the session only checks the family)."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()


def run(test: Callable[[Harness], Any], lanes: bool = False) -> None:
    async def main() -> None:
        harness = Harness(lanes)
        try:
            await test(harness)
        finally:
            harness.task.cancel()
            for sock in harness.sockets:
                sock.close()
            if harness.lanes is not None:
                _close_all(harness.lanes.fds)

    asyncio.run(main())


async def serving(h: Harness) -> None:
    h.link.push(HELLO)
    await h.until(lambda: h.session.state is LinkState.SERVING)


def test_our_hello_goes_first_and_theirs_starts_serving() -> None:
    async def test(h: Harness) -> None:
        await h.until(lambda: bool(h.link.sent))
        assert h.link.sent == [wire.Hello(wire.Role.WORKER, INDEX, os.getpid())]
        assert h.session.state is LinkState.HANDSHAKING
        await serving(h)
        h.link.push_end()
        await h.finished()

    run(test)


def test_no_hello_within_the_timeout_closes_the_link(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "HELLO_TIMEOUT", 0.05)

    async def test(h: Harness) -> None:
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await h.finished()
        assert "link closed: no HELLO from the dispatcher within 0.05 s" in caplog.text

    run(test)


@pytest.mark.parametrize(
    "message, reason",
    [
        (wire.Hello(wire.Role.WORKER, INDEX, 1), "HELLO from a worker, not the dispatcher"),
        (wire.Hello(wire.Role.DISPATCHER, 5, 1), "dispatcher addressed worker 5"),
        (wire.Conn(1, None, None, "x"), "unexpected Conn with 1 fd(s)"),
        (wire.Drained(0), "unexpected Drained"),
    ],
)
def test_handshaking_refuses_anything_but_the_right_hello(
    message: wire.Message, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(h: Harness) -> None:
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            h.link.push(message, _tcp_fd() if isinstance(message, wire.Conn) else None)
            await h.finished()
        assert reason in caplog.text
        assert h.link.delivered == []

    run(test)


def test_a_burst_is_acknowledged_once_before_the_app_gets_it() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        for seq in (1, 2, 3):
            h.conn(seq)
        await h.until(lambda: len(h.link.delivered) == 3)
        assert h.link.events[1:] == [wire.Ack(3), ("app", 1), ("app", 2), ("app", 3)]
        h.link.push_end()
        await h.finished()

    run(test)


def test_a_long_burst_is_acknowledged_every_ack_burst_conns() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        for seq in range(1, ACK_BURST + 6):
            h.conn(seq)
        await h.until(lambda: len(h.link.delivered) == ACK_BURST + 5)
        assert [m for m in h.link.sent[1:]] == [wire.Ack(ACK_BURST), wire.Ack(ACK_BURST + 5)]
        h.link.push_end()
        await h.finished()

    run(test)


def test_a_conn_out_of_sequence_closes_the_link(caplog: pytest.LogCaptureFixture) -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.conn(2)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await h.finished()
        assert "CONN 2 after 0" in caplog.text

    run(test)


def test_the_drain_is_asked_answered_and_ends_after_the_last_conn() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.conn(1)
        await h.until(lambda: h.link.delivered == [1])
        h.drain()
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        assert h.link.sent[-1] == wire.Drain()
        h.link.push(wire.Drained(2))
        await h.until(lambda: h.session.state is LinkState.DRAIN_ANSWERED)
        h.conn(2)  # in flight when DRAIN arrived
        await h.finished()
        assert h.link.sent[-1] == wire.Ack(2)
        assert h.link.delivered == [1, 2]

    run(test)


def test_a_conn_that_comes_with_the_drain_is_served_after_drain_is_sent() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.draining = True
        h.conn(1)  # wakes the session, which sees the drain first
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        h.link.push(wire.Drained(1))
        await h.finished()
        assert h.link.events[1:] == [wire.Drain(), wire.Ack(1), ("app", 1)]

    run(test)


def test_drained_naming_what_was_received_ends_at_once() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.conn(1)
        await h.until(lambda: h.link.delivered == [1])
        h.drain()
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        h.link.push(wire.Drained(1))
        await h.finished()

    run(test)


def test_a_drain_while_handshaking_asks_once_the_hello_came() -> None:
    async def test(h: Harness) -> None:
        await h.until(lambda: bool(h.link.sent))
        h.drain()
        for _ in range(10):
            await asyncio.sleep(0)
        assert h.session.state is LinkState.HANDSHAKING
        assert h.link.sent == [wire.Hello(wire.Role.WORKER, INDEX, os.getpid())]
        h.link.push(HELLO)
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        assert h.link.sent[1:] == [wire.Drain()]
        h.link.push(wire.Drained(0))
        await h.finished()

    run(test)


@pytest.mark.parametrize("answered", [False, True])
def test_no_drained_or_no_last_conn_within_the_deadline_closes_the_link(
    answered: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "DRAIN_ANSWER_TIMEOUT", 0.05)

    async def test(h: Harness) -> None:
        await serving(h)
        h.drain()
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        if answered:
            h.link.push(wire.Drained(1))  # CONN 1 never comes
            await h.until(lambda: h.session.state is LinkState.DRAIN_ANSWERED)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await h.finished()
        assert "link closed: no answer to DRAIN within 0.05 s" in caplog.text

    run(test)


@pytest.mark.parametrize("second", [False, True])
def test_drained_without_drain_or_twice_closes_the_link(
    second: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        if second:
            h.drain()
            await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
            h.link.push(wire.Drained(1))
            await h.until(lambda: h.session.state is LinkState.DRAIN_ANSWERED)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            h.link.push(wire.Drained(1))
            await h.finished()
        assert "unexpected Drained with 0 fd(s)" in caplog.text

    run(test)


def test_an_ack_to_a_dead_dispatcher_orphans_the_link_and_serves_what_came() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.link.gone = True
        h.link.send_error = BrokenPipeError(32, "Broken pipe")
        h.conn(1)
        await h.until(lambda: h.link.delivered == [1])
        assert h.session.state is LinkState.ORPHANED
        # Orphaned: a drain sends nothing; what the dead dispatcher sent still comes.
        h.drain()
        h.conn(2)
        await h.until(lambda: h.link.delivered == [1, 2])
        assert h.session.state is LinkState.ORPHANED
        h.link.push_end()
        await h.finished()
        assert h.link.sent == [wire.Hello(wire.Role.WORKER, INDEX, os.getpid())]

    run(test)


def test_an_ack_that_fails_while_the_dispatcher_lives_keeps_the_conns_from_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It will send them again on its next link: they must not reach the app twice."""

    async def test(h: Harness) -> None:
        await serving(h)
        h.link.send_error = ConnectionResetError(104, "Connection reset by peer")
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            h.conn(1)
            await h.finished()
        assert h.link.delivered == []
        assert "link closed: ConnectionResetError" in caplog.text

    run(test)


@pytest.mark.parametrize("gone", [False, True])
def test_the_link_ending_with_unacknowledged_conns_serves_them_only_if_the_dispatcher_died(
    gone: bool,
) -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.link.gone = gone
        h.conn(1)
        h.link.push_end()  # received in the same burst as CONN 1, before its ACK
        await h.finished()
        assert h.link.delivered == ([1] if gone else [])
        assert h.link.sent[1:] == []

    run(test)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_with_lanes_the_hello_says_so_and_lanes_confirms_the_set() -> None:
    async def test(h: Harness) -> None:
        await h.until(lambda: bool(h.link.sent))
        assert h.link.sent == [wire.Hello(wire.Role.WORKER, INDEX, os.getpid(), 1)]
        await serving(h)
        fds = [h.lane("http"), h.lane("https")]
        await h.until(lambda: len(h.session.lanes_received) == 2)
        assert h.link.events[1:] == []  # nothing served before LANES
        h.link.push(wire.Lanes(2))
        await h.until(lambda: len(h.link.events) == 2)
        assert h.link.events[1:] == [("lanes", ["http", "https"])]
        assert h.lanes is not None and h.lanes.fds == fds
        h.conn(1)  # then connections, as before
        await h.until(lambda: h.link.delivered == [1])
        h.link.push_end()
        await h.finished()

    run(test, lanes=True)


def test_lanes_zero_is_an_empty_set() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.link.push(wire.Lanes(0))
        await h.until(lambda: len(h.link.events) == 2)
        assert h.link.events[1:] == [("lanes", [])]
        h.link.push_end()
        await h.finished()

    run(test, lanes=True)


@pytest.mark.parametrize(
    "steps, reason, served",
    [
        (["lane"], "unexpected Lane with 1 fd(s)", []),  # before the HELLO
        (["hello", "conn", "lane"], "unexpected Lane with 1 fd(s)", []),
        (["hello", "lanes 0", "lane"], "unexpected Lane with 1 fd(s)", [[]]),
        (["hello", "lanes 0", "lanes 0"], "unexpected Lanes with 0 fd(s)", [[]]),
        (["hello", "lane", "lanes 2"], "LANES 2 after 1 LANE(s)", []),
        (["hello", "lane", "lane", "lanes 1"], "LANES 1 after 2 LANE(s)", []),
    ],
)
def test_lanes_out_of_place_close_the_link_and_their_fds(
    steps: list[str], reason: str, served: list[list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    async def test(h: Harness) -> None:
        fds = []
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            for step in steps:
                if step == "hello":
                    await serving(h)
                elif step == "conn":
                    h.conn(1)
                elif step == "lane":
                    fds.append(h.lane("web"))
                else:
                    h.link.push(wire.Lanes(int(step.split()[1])))
            await h.finished()
        assert reason in caplog.text
        assert not any(_is_open(fd) for fd in fds)
        assert [e[1] for e in h.link.events if isinstance(e, tuple) and e[0] == "lanes"] == served

    run(test, lanes=True)


def test_a_worker_without_lanes_refuses_them(caplog: pytest.LogCaptureFixture) -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        assert h.link.sent[0] == wire.Hello(wire.Role.WORKER, INDEX, os.getpid())
        fd = h.lane("web")
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await h.finished()
        assert "unexpected Lane with 1 fd(s)" in caplog.text
        assert not _is_open(fd)

    run(test)


def test_lanes_without_their_count_when_the_link_ends_are_closed_not_served() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        fd = h.lane("web")
        await h.until(lambda: len(h.session.lanes_received) == 1)
        h.link.push_end()
        await h.finished()
        assert not _is_open(fd)
        assert h.link.events[1:] == []

    run(test, lanes=True)


def test_accepted_goes_when_the_count_changed_at_most_once_an_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "ACCEPTED_INTERVAL", 0.2)

    async def test(h: Harness) -> None:
        assert h.lanes is not None
        await serving(h)
        h.link.push(wire.Lanes(0))
        h.lanes.accepted = 3
        h.link.wake()  # what the worker's lanes do, once an interval, while accepting
        assert await h.link.next_sent() == wire.Accepted(3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        h.lanes.accepted = 5
        h.link.wake()
        # Not before the interval is over, and without another wake-up.
        assert await h.link.next_sent() == wire.Accepted(5)
        assert loop.time() - began >= 0.2 - 0.01
        # An unchanged count is not sent again; the drain sends a changed one first.
        h.lanes.accepted = 6
        h.drain()
        assert await h.link.next_sent() == wire.Accepted(6)
        assert await h.link.next_sent() == wire.Drain()
        h.link.push(wire.Drained(0))
        await h.finished()
        assert h.link.sent[1:] == [
            wire.Accepted(3),
            wire.Accepted(5),
            wire.Accepted(6),
            wire.Drain(),
        ]

    run(test, lanes=True)


def test_an_unchanged_count_is_not_sent_before_drain() -> None:
    async def test(h: Harness) -> None:
        await serving(h)
        h.link.push(wire.Lanes(0))
        await h.until(lambda: len(h.link.events) == 2)
        h.drain()
        assert await h.link.next_sent() == wire.Drain()
        h.link.push(wire.Drained(0))
        await h.finished()
        assert h.link.sent[1:] == [wire.Drain()]

    run(test, lanes=True)


def test_lanes_that_come_after_drain_was_sent_are_still_taken() -> None:
    """The dispatcher sent them before it read DRAIN: the worker (draining) closes them."""

    async def test(h: Harness) -> None:
        await serving(h)
        h.drain()
        await h.until(lambda: h.session.state is LinkState.DRAIN_ASKED)
        h.lane("web")
        h.link.push(wire.Lanes(1))
        h.link.push(wire.Drained(0))
        await h.finished()
        assert h.link.events[1:] == [wire.Drain(), ("lanes", ["web"])]

    run(test, lanes=True)
