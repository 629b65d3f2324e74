"""The asyncio worker against a fake dispatcher over a real abstract SEQPACKET socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import replace

import pytest
from conftest import FakeDispatcher, TcpPair

from sticky_dispatch import Worker, WorkerOptions, wire
from sticky_dispatch.worker import HELLO_TIMEOUT, Connection


async def started(prefix: str, **kwargs: object) -> Worker:
    worker = Worker(WorkerOptions(index=2, socket_prefix=prefix), notify_ready=False, **kwargs)  # type: ignore[arg-type]
    await worker.start()
    return worker


async def link(prefix: str) -> FakeDispatcher:
    dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
    hello = await asyncio.to_thread(dispatcher.hello, 2)
    assert hello == wire.Hello(wire.Role.WORKER, 2, os.getpid(), wire.FEATURE_LANES)
    return dispatcher


async def next_conn(worker: Worker) -> Connection:
    return await asyncio.wait_for(worker.__anext__(), 10)


def test_conn_is_acknowledged_and_yielded_with_its_client_info(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        tcp = TcpPair()
        tcp.client.sendall(b"ping")
        conn_msg = wire.Conn(1, ("203.0.113.7", 4444), ("127.0.0.1", 80), "web")
        await asyncio.to_thread(dispatcher.send, conn_msg, tcp.server.fileno())
        tcp.server.close()  # the dispatcher lets go of its copy after the ACK
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
        conn = await next_conn(worker)
        assert conn.client.peer == ("203.0.113.7", 4444)
        assert conn.client.local == ("127.0.0.1", 80)
        assert (conn.client.seq, conn.client.listener) == (1, "web")
        assert conn.socket.get_inheritable() is False
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(conn.socket, 4) == b"ping"
        await loop.sock_sendall(conn.socket, b"pong")
        assert tcp.client.recv(4) == b"pong"
        conn.socket.close()
        tcp.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


def test_ack_comes_before_the_app_takes_the_connection(prefix: str) -> None:
    """The ACK is sent on receipt, even while nobody iterates the worker."""

    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        pairs = [TcpPair() for _ in range(3)]
        for seq, pair in enumerate(pairs, 1):
            await asyncio.to_thread(
                dispatcher.send, wire.Conn(seq, None, None, "x"), pair.server.fileno()
            )
            assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(seq)
        # Only now does the app take them, in order.
        for seq in (1, 2, 3):
            conn = await next_conn(worker)
            assert conn.client.seq == seq
            conn.socket.close()
        for pair in pairs:
            pair.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


def test_conns_waiting_together_get_one_cumulative_ack(prefix: str) -> None:
    """Sent while the worker cannot run (from the event loop's own thread), three CONNs
    are received in one burst and acknowledged once, before the app sees any of them."""

    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        pairs = [TcpPair() for _ in range(3)]
        for seq, pair in enumerate(pairs, 1):
            dispatcher.send(wire.Conn(seq, None, None, "x"), pair.server.fileno())
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(3)
        assert [(await next_conn(worker)).client.seq for _ in range(3)] == [1, 2, 3]
        for pair in pairs:
            pair.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "bad, reason",
    [
        (bytes([2, 3]), "unsupported protocol version 2"),
        (bytes([1, 99]), "unknown message type 99"),
        (bytes([1, 3, 0]), "malformed ACK"),
        (wire.encode(wire.Conn(7, None, None, "x")), "unexpected Conn with 0 fd"),
        (wire.encode(wire.Drained(0)), "unexpected Drained"),
    ],
)
def test_malformed_messages_close_the_link_not_the_worker(
    prefix: str, bad: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await asyncio.to_thread(dispatcher.send_raw, bad)
            assert await asyncio.to_thread(dispatcher.recv) is None  # closed by the worker
        assert any(reason in r.getMessage() for r in caplog.records), caplog.text
        dispatcher.close()
        # The worker is still there: a new link works.
        again = await link(prefix)
        tcp = TcpPair()
        await asyncio.to_thread(again.send, wire.Conn(1, None, None, "x"), tcp.server.fileno())
        assert await asyncio.to_thread(again.recv) == wire.Ack(1)
        (await next_conn(worker)).socket.close()
        tcp.close()
        again.close()
        await worker.close()

    asyncio.run(main())


def test_out_of_order_sequence_and_wrong_index_are_refused(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            dispatcher = await link(prefix)
            tcp = TcpPair()
            await asyncio.to_thread(
                dispatcher.send, wire.Conn(2, None, None, "x"), tcp.server.fileno()
            )
            assert await asyncio.to_thread(dispatcher.recv) is None
            dispatcher.close()
            wrong = await asyncio.to_thread(FakeDispatcher, prefix + "2")
            await asyncio.to_thread(wrong.recv)
            await asyncio.to_thread(wrong.send, wire.Hello(wire.Role.DISPATCHER, 5, 1))
            assert await asyncio.to_thread(wrong.recv) is None
            wrong.close()
        assert "CONN 2 after 0" in caplog.text
        assert "dispatcher addressed worker 5, this is worker 2" in caplog.text
        tcp.close()
        await worker.close()

    asyncio.run(main())


def test_a_dispatcher_that_links_and_says_nothing_is_dropped_after_the_hello_timeout(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A silent peer would otherwise hold its session until the worker stops."""

    async def main() -> None:
        worker = await started(prefix)
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            silent = await asyncio.to_thread(FakeDispatcher, prefix + "2")
            assert await asyncio.to_thread(silent.recv) == wire.Hello(
                wire.Role.WORKER, 2, os.getpid(), wire.FEATURE_LANES
            )
            began = time.monotonic()
            assert await asyncio.to_thread(silent.recv) is None  # closed by the worker
            waited = time.monotonic() - began
        assert HELLO_TIMEOUT - 0.1 <= waited < HELLO_TIMEOUT + 5, waited
        assert f"link closed: no HELLO from the dispatcher within {HELLO_TIMEOUT:g} s" in (
            caplog.text
        )
        silent.close()
        # The worker still takes a dispatcher that does say HELLO.
        dispatcher = await link(prefix)
        tcp = TcpPair()
        await asyncio.to_thread(dispatcher.send, wire.Conn(1, None, None, "x"), tcp.server.fileno())
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
        (await next_conn(worker)).socket.close()
        tcp.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


def test_a_handed_over_fd_that_is_not_tcp_is_acknowledged_and_dropped(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        read_end, write_end = os.pipe()
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            await asyncio.to_thread(dispatcher.send, wire.Conn(1, None, None, "x"), read_end)
            assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
            tcp = TcpPair()
            await asyncio.to_thread(
                dispatcher.send, wire.Conn(2, None, None, "x"), tcp.server.fileno()
            )
            assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(2)
        assert (await next_conn(worker)).client.seq == 2
        assert "not a socket" in caplog.text or "not a TCP socket" in caplog.text
        for fd in (read_end, write_end):
            os.close(fd)
        tcp.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


def test_a_dispatcher_of_another_uid_is_refused_before_anything_is_read(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Stand-in for another uid: our own uid is not in the allowed list. (The test with a
    real process of another uid is tests/python.rs, as root.)"""

    async def main() -> None:
        options = WorkerOptions(index=2, socket_prefix=prefix, dispatcher_users=frozenset({4242}))
        worker = Worker(options, notify_ready=False)
        await worker.start()
        with caplog.at_level(logging.WARNING, logger="sticky_dispatch"):
            dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
            assert await asyncio.to_thread(dispatcher.recv) is None  # no HELLO, closed
        assert f"uid={os.geteuid()}" in caplog.text
        dispatcher.close()
        await worker.close()

    asyncio.run(main())


def test_drain_takes_everything_up_to_drained_then_ends(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        first, second = TcpPair(), TcpPair()
        await asyncio.to_thread(
            dispatcher.send, wire.Conn(1, None, None, "x"), first.server.fileno()
        )
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
        worker.drain()
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        # A CONN already in flight when DRAIN arrived, then the answer.
        await asyncio.to_thread(
            dispatcher.send, wire.Conn(2, None, None, "x"), second.server.fileno()
        )
        await asyncio.to_thread(dispatcher.send, wire.Drained(2))
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(2)
        assert await asyncio.to_thread(dispatcher.recv) is None  # the worker closed the link
        seqs = [conn.client.seq async for conn in worker]
        assert seqs == [1, 2]
        await asyncio.wait_for(worker.drained(), 5)
        # The name is free again for the next worker with this index.
        replacement = await started(prefix)
        await replacement.close()
        for pair in (first, second):
            pair.close()
        dispatcher.close()

    asyncio.run(main())


def test_the_link_name_of_a_running_worker_cannot_be_taken(prefix: str) -> None:
    async def main() -> None:
        worker = await started(prefix)
        with pytest.raises(OSError, match="already running"):
            await started(prefix)
        await worker.close()

    asyncio.run(main())


def test_options_replace_keeps_users(prefix: str) -> None:
    options = WorkerOptions(index=1, socket_prefix=prefix)
    assert replace(options, index=3).socket_name == prefix + "3"
    assert socket.SOCK_SEQPACKET  # the platform has it (Linux)


DYING_DISPATCHER = r"""
import os, socket, sys
sys.path.insert(0, sys.argv[3])
from sticky_dispatch import wire
name, fd = sys.argv[1], int(sys.argv[2])
link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
link.connect("\0" + name)
link.send(wire.encode(wire.Hello(wire.Role.DISPATCHER, 2, os.getpid())))
link.recv(wire.MAX_MESSAGE)  # the worker's HELLO: the link is up
sys.stdout.write("u")
sys.stdout.flush()
sys.stdin.read(1)  # the test says when
socket.send_fds(link, [wire.encode(wire.Conn(1, ("198.51.100.9", 5), None, "web"))], [fd])
os._exit(0)  # dies without reading the ACK
"""


def test_a_conn_from_a_dispatcher_that_died_before_the_ack_is_served(prefix: str) -> None:
    """The dispatcher sends a CONN and dies: the ACK cannot be sent, and nobody will send
    the connection again (it left the fd store when sent), so the worker serves it."""
    import subprocess
    import sys
    from pathlib import Path

    async def main() -> None:
        worker = await started(prefix)
        tcp = TcpPair()
        package = str(Path(__file__).resolve().parent.parent)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                DYING_DISPATCHER,
                prefix + "2",
                str(tcp.server.fileno()),
                package,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[tcp.server.fileno()],
        )
        tcp.server.close()
        # The worker accepts the link and exchanges HELLOs meanwhile.
        assert child.stdout is not None and child.stdin is not None
        assert await asyncio.to_thread(child.stdout.read, 1) == b"u"
        # Blocking the event loop: the worker cannot run until the dispatcher is gone.
        child.stdin.write(b"x")
        child.stdin.close()
        assert child.wait(timeout=10) == 0
        conn = await next_conn(worker)
        assert conn.client.peer == ("198.51.100.9", 5)
        tcp.client.sendall(b"ping")
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(conn.socket, 4) == b"ping"
        conn.socket.close()
        tcp.close()
        await worker.close()

    asyncio.run(main())


def test_a_handed_over_socket_reports_the_dispatchers_peer_and_stays_nonblocking(
    prefix: str,
) -> None:
    async def main() -> None:
        worker = await started(prefix)
        dispatcher = await link(prefix)
        tcp = TcpPair()
        conn_message = wire.Conn(1, ("2001:db8::5", 4321), ("127.0.0.1", 80), "x")
        await asyncio.to_thread(dispatcher.send, conn_message, tcp.server.fileno())
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
        conn = await next_conn(worker)
        sock = conn.socket
        assert sock.getpeername() == ("2001:db8::5", 4321, 0, 0)
        assert sock.getsockname() == tcp.server.getsockname()
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        assert sock.gettimeout() == 0.0
        sock.setblocking(False)
        assert sock.gettimeout() == 0.0
        sock.settimeout(2.0)
        sock.setblocking(True)
        assert sock.gettimeout() is None
        copy = sock.dup()
        assert copy.getpeername() == sock.getpeername()
        copy.close()
        sock.close()
        tcp.close()
        dispatcher.close()
        await worker.close()

    asyncio.run(main())
