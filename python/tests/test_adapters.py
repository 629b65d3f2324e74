"""The aiohttp and uvicorn adapters against a fake dispatcher: READY=1 once the app is
ready, the real client address from the CONN message, SIGTERM drains and ends the run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable
from typing import Any, Callable, Optional

import pytest
from conftest import TIMEOUT, FakeDispatcher, Lane, TcpPair

from sticky_dispatch import WorkerOptions, wire


async def exercise(
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[[WorkerOptions], Awaitable[None]],
    lane: Optional[Lane] = None,
) -> str:
    """Runs ``serve`` as worker 2, hands it one connection from "203.0.113.5:1234" whose
    socket peer is 127.0.0.1 (or, with ``lane``, passes it that lane, where a client from
    127.0.0.9 connects), returns the HTTP answer, then drains with SIGTERM."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + prefix + "notify")
        systemd.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + prefix + "notify")
        task = asyncio.ensure_future(serve(WorkerOptions(index=2, socket_prefix=prefix)))
        ready = await asyncio.to_thread(systemd.recv, 100)
        assert ready.startswith(b"READY=1"), ready
        dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
        await asyncio.to_thread(dispatcher.hello, 2)
        request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        if lane is None:
            tcp = TcpPair()
            client = tcp.client
            client.sendall(request)
            conn = wire.Conn(1, ("203.0.113.5", 1234), ("127.0.0.1", 80), "web")
            await asyncio.to_thread(dispatcher.send, conn, tcp.server.fileno())
            tcp.server.close()
            assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)
        else:
            await asyncio.to_thread(dispatcher.send, lane.message, lane.sock.fileno())
            await asyncio.to_thread(dispatcher.send, wire.Lanes(1))
            client = lane.connect("127.0.0.9")
            client.sendall(request)

        def read_all() -> bytes:
            chunks = []
            while chunk := client.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)

        answer = (await asyncio.to_thread(read_all)).decode()
        os.kill(os.getpid(), signal.SIGTERM)  # the adapters drain on it
        if lane is not None:
            assert await asyncio.to_thread(dispatcher.recv) == wire.Accepted(1)
            assert lane.holders() == 1  # closed before DRAIN
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        await asyncio.to_thread(dispatcher.send, wire.Drained(1 if lane is None else 0))
        await asyncio.wait_for(task, TIMEOUT)
        assert await asyncio.to_thread(dispatcher.recv) is None
        dispatcher.close()
        client.close()
        if lane is not None:
            # Never listen()ed on again nor shut down: the queue is as the dispatcher made it.
            assert lane.queue() == (0, lane.backlog)
            late = lane.connect()
            assert lane.queue()[0] == 1
            late.close()
            lane.close()
        return answer


@pytest.mark.parametrize("on_lane", [False, True], ids=["handed over", "lane"])
def test_aiohttp_run_app_shows_the_real_client(
    prefix: str, monkeypatch: pytest.MonkeyPatch, on_lane: bool
) -> None:
    from aiohttp import web

    import sticky_dispatch.aiohttp

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"remote={request.remote}")

    app = web.Application()
    app.router.add_get("/", index)

    async def serve(options: WorkerOptions) -> None:
        await sticky_dispatch.aiohttp.serve_app(app, options=options, access_log=None)

    lane = Lane() if on_lane else None
    answer = asyncio.run(exercise(prefix, monkeypatch, serve, lane))
    assert answer.startswith("HTTP/1.1 200"), answer
    assert answer.endswith("remote=127.0.0.9" if on_lane else "remote=203.0.113.5"), answer


@pytest.mark.parametrize("on_lane", [False, True], ids=["handed over", "lane"])
def test_uvicorn_run_shows_the_real_client(
    prefix: str, monkeypatch: pytest.MonkeyPatch, on_lane: bool
) -> None:
    import uvicorn

    import sticky_dispatch.uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = f"client={scope['client'][0]}:{scope['client'][1]}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def serve(options: WorkerOptions) -> None:
        config = uvicorn.Config(app, log_level="warning")
        await sticky_dispatch.uvicorn.serve(config, options=options)

    lane = Lane() if on_lane else None
    answer = asyncio.run(exercise(prefix, monkeypatch, serve, lane))
    assert answer.startswith("HTTP/1.1 200"), answer
    if lane is None:
        assert "\r\n\r\n17\r\nclient=203.0.113.5:1234\r\n" in answer, answer
    else:
        assert "\r\nclient=127.0.0.9:" in answer, answer
