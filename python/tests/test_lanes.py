"""Lanes on a real worker: listening TCP sockets passed over a real link (LANE, LANES),
accepted on by the worker itself, kept across links, replaced, closed before DRAIN; the
test's copy of each socket plays the dispatcher's, which must keep working (closed by the
worker, never shut down) with the backlog it was made with."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import pytest
from conftest import TIMEOUT, FakeDispatcher, Lane, TcpPair

from sticky_dispatch import ClientInfo, Connection, Worker, WorkerOptions, wire
from sticky_dispatch import worker as worker_module


async def started(prefix: str, **kwargs: Any) -> Worker:
    worker = Worker(WorkerOptions(index=2, socket_prefix=prefix), notify_ready=False, **kwargs)
    await worker.start()
    return worker


async def link(prefix: str) -> FakeDispatcher:
    dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
    hello = await asyncio.to_thread(dispatcher.hello, 2)
    assert hello == wire.Hello(wire.Role.WORKER, 2, os.getpid(), wire.FEATURE_LANES)
    return dispatcher


async def send_lanes(dispatcher: FakeDispatcher, *lanes: Lane) -> None:
    """LANE per lane with its fd, then LANES, as the dispatcher does at link-up."""
    for lane in lanes:
        await asyncio.to_thread(dispatcher.send, lane.message, lane.sock.fileno())
    await asyncio.to_thread(dispatcher.send, wire.Lanes(len(lanes)))


async def settled(dispatcher: FakeDispatcher, seq: int) -> list[wire.Message]:
    """Returns once the worker has handled everything sent before (a CONN is handled in
    order, and its ACK comes back), with the ACCEPTEDs that came meanwhile."""
    tcp = TcpPair()
    await asyncio.to_thread(dispatcher.send, wire.Conn(seq, None, None, "x"), tcp.server.fileno())
    reports = []
    while (message := await asyncio.to_thread(dispatcher.recv)) != wire.Ack(seq):
        assert isinstance(message, wire.Accepted), message
        reports.append(message)
    tcp.close()
    return reports


async def next_conn(worker: Worker) -> Connection:
    return await asyncio.wait_for(worker.__anext__(), TIMEOUT)


async def next_lane_conn(worker: Worker) -> Connection:
    """The next connection accepted on a lane (CONNs used to synchronise are closed)."""
    while True:
        conn = await next_conn(worker)
        if conn.client.seq == 0:
            return conn
        conn.socket.close()


async def echoes(conn: Connection, client: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    client.sendall(b"ping")
    assert await loop.sock_recv(conn.socket, 4) == b"ping"
    await loop.sock_sendall(conn.socket, b"pong")
    assert await asyncio.to_thread(client.recv, 4) == b"pong"


def lane_accepts(lane: Lane) -> bool:
    """Whether the test's copy still accepts: a lane shut down by the worker would not
    (connecting would be refused for every holder)."""
    client = lane.connect()
    server, _ = lane.sock.accept()
    server.close()
    client.close()
    return True


@pytest.fixture(autouse=True)
def quick_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "ACCEPTED_INTERVAL", 0.2)


@pytest.mark.parametrize("host, source", [("127.0.0.1", "127.0.0.7"), ("::1", "::1")])
def test_the_worker_accepts_on_its_lane_with_the_real_client_and_reports_the_count(
    prefix: str, host: str, source: str
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        lane = Lane(host)
        await send_lanes(dispatcher, lane)
        client = lane.connect(source)
        conn = await next_conn(worker)
        port = client.getsockname()[1]
        assert conn.client == ClientInfo(0, (source, port), lane.local, "web")
        peer = conn.socket.getpeername()
        assert peer[:2] == (source, port)
        assert conn.socket.get_inheritable() is False
        await echoes(conn, client)
        # The worker never listen()ed again: the queue is the dispatcher's, as it made it.
        assert lane.queue() == (0, lane.backlog)
        assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(1)
        assert lane.holders() == 2
        conn.socket.close()
        client.close()
        dispatcher.close()
        await worker.close()
        assert lane.holders() == 1
        assert lane_accepts(lane)
        lane.close()

    asyncio.run(main())


def test_accepted_goes_at_most_once_an_interval_while_the_count_changes(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        lane = Lane()
        await send_lanes(dispatcher, lane)
        clients = []
        for expected in (1, 3):
            while len(clients) < expected:
                clients.append(lane.connect("127.0.0.8"))
                (await next_lane_conn(worker)).socket.close()
            assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(expected)
            if expected == 1:
                first = time.monotonic()
        assert time.monotonic() - first >= worker_module.ACCEPTED_INTERVAL - 0.01
        # Nothing more while the count stays: the next message is the drain's.
        worker.drain()
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        for client in clients:
            client.close()
        dispatcher.close()
        await worker.close()
        lane.close()

    asyncio.run(main())


def test_lanes_outlive_the_link_and_the_same_socket_sent_again_is_not_held_twice(
    prefix: str,
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        first = await link(prefix)
        lane = Lane()
        await send_lanes(first, lane)
        await settled(first, 1)
        assert lane.holders() == 2
        served = worker._lanes.sockets if worker._lanes is not None else []
        assert len(served) == 1
        first.close()  # the dispatcher is gone (killed, restarting): the kernel still routes
        client = lane.connect("127.0.0.9")
        conn = await next_lane_conn(worker)
        assert conn.client.peer == ("127.0.0.9", client.getsockname()[1])
        await echoes(conn, client)
        # The next dispatcher passes the same socket (a new fd of it) again.
        second = await link(prefix)
        await send_lanes(second, lane)
        # The count so far goes to the new dispatcher at once (or right after the ACK).
        reports = await settled(second, 1)
        if not reports:
            reports.append(await asyncio.to_thread(second.recv))
        assert reports == [wire.Accepted(1)]
        assert lane.holders() == 2  # the duplicate closed, the lane still served
        assert worker._lanes is not None and worker._lanes.sockets == served
        again = lane.connect("127.0.0.10")
        taken = await next_lane_conn(worker)
        assert taken.client.peer == ("127.0.0.10", again.getsockname()[1])
        for sock in (conn.socket, client, again, taken.socket):
            sock.close()
        second.close()
        await worker.close()
        lane.close()

    asyncio.run(main())


def test_a_lane_left_out_of_the_next_set_is_closed_not_shut_down(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        first = await link(prefix)
        old, new = Lane(name="old"), Lane(name="new")
        await send_lanes(first, old)
        await settled(first, 1)
        first.close()
        second = await link(prefix)
        await send_lanes(second, new, new)  # a socket twice in one set is served once
        await settled(second, 1)
        assert (old.holders(), new.holders()) == (1, 2)
        # Closed by the worker, not shut down: the old socket queues for its other holders.
        assert lane_accepts(old)
        client = new.connect("127.0.0.11")
        taken = await next_lane_conn(worker)
        assert taken.client.listener == "new"
        taken.socket.close()
        client.close()
        second.close()
        await worker.close()
        old.close()
        new.close()

    asyncio.run(main())


def test_lanes_zero_closes_every_lane(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        first = await link(prefix)
        lanes = [Lane(name="a"), Lane("::1", name="b")]
        await send_lanes(first, *lanes)
        await settled(first, 1)
        assert [lane.holders() for lane in lanes] == [2, 2]
        first.close()
        second = await link(prefix)
        await send_lanes(second)
        await settled(second, 1)
        assert [lane.holders() for lane in lanes] == [1, 1]
        assert all(lane_accepts(lane) for lane in lanes)
        second.close()
        await worker.close()
        for lane in lanes:
            lane.close()

    asyncio.run(main())


def test_the_drain_closes_the_lanes_before_drain_is_sent(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        lane = Lane()
        await send_lanes(dispatcher, lane)
        client = lane.connect("127.0.0.12")
        conn = await next_conn(worker)
        worker.drain()
        assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(1)
        assert lane.holders() == 1  # already closed when ACCEPTED and DRAIN were sent
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        # A client arriving now waits in the kernel for the next process of this index.
        late = lane.connect("127.0.0.13")
        assert lane.queue() == (1, lane.backlog)
        await asyncio.to_thread(dispatcher.send, wire.Drained(0))
        assert await asyncio.to_thread(dispatcher.recv) is None
        assert [c async for c in worker] == []
        server, peer = lane.sock.accept()
        assert peer == late.getsockname()
        for sock in (server, late, client, conn.socket):
            sock.close()
        dispatcher.close()
        lane.close()

    asyncio.run(main())


def test_lanes_arriving_while_the_worker_drains_are_closed_at_once(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
        await asyncio.to_thread(dispatcher.recv)  # the worker's HELLO
        worker.drain()
        lane = Lane()
        await asyncio.to_thread(dispatcher.send, wire.Hello(wire.Role.DISPATCHER, 2, 1))
        await send_lanes(dispatcher, lane)
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        await asyncio.to_thread(dispatcher.send, wire.Drained(0))
        assert await asyncio.to_thread(dispatcher.recv) is None
        assert lane.holders() == 1
        assert lane_accepts(lane)
        dispatcher.close()
        await worker.close()
        lane.close()

    asyncio.run(main())


def test_an_app_behind_pauses_the_lanes_and_the_kernel_holds_the_clients(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "ACCEPT_QUEUE", 2)

    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        lane = Lane()
        await send_lanes(dispatcher, lane)
        clients = [lane.connect(f"127.0.0.{20 + i}") for i in range(5)]
        # The worker takes two (its queue's room) and leaves three in the lane's queue.
        assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(2)
        assert lane.queue() == (3, lane.backlog)
        conns = [await next_conn(worker) for _ in clients]
        assert [c.client.peer for c in conns] == [c.getsockname() for c in clients]
        assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(5)
        for sock in [c.socket for c in conns] + clients:
            sock.close()
        dispatcher.close()
        await worker.close()
        lane.close()

    asyncio.run(main())


def test_a_lane_that_is_not_a_listening_tcp_socket_is_closed_and_the_rest_served(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        lane = Lane()
        unix, other = socket.socketpair()
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await asyncio.to_thread(dispatcher.send, wire.Lane(1, None, "bad"), unix.fileno())
            await send_lanes(dispatcher, lane)  # LANES 1 after 2 LANEs: the link closes
            assert await asyncio.to_thread(dispatcher.recv) is None
        assert "LANES 1 after 2 LANE(s)" in caplog.text
        assert lane.holders() == 1
        again = await link(prefix)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await asyncio.to_thread(again.send, wire.Lane(1, None, "bad"), unix.fileno())
            await asyncio.to_thread(again.send, lane.message, lane.sock.fileno())
            await asyncio.to_thread(again.send, wire.Lanes(2))
            await settled(again, 1)
        assert "a lane is not a listening TCP socket listener=bad" in caplog.text
        assert lane.holders() == 2
        client = lane.connect()
        taken = await next_lane_conn(worker)
        assert taken.client.listener == "web"
        for sock in (client, unix, other, taken.socket):
            sock.close()
        dispatcher.close()
        again.close()
        await worker.close()
        lane.close()

    asyncio.run(main())
