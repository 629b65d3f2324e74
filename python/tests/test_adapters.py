"""The aiohttp and uvicorn adapters against a fake dispatcher: READY=1 once the app is
ready, the real client address from the CONN message, SIGTERM drains and ends the run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable
from typing import Any, Callable

import pytest
from conftest import TIMEOUT, FakeDispatcher, TcpPair

from sticky_dispatch import WorkerOptions, wire


async def exercise(
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[[WorkerOptions], Awaitable[None]],
) -> str:
    """Runs ``serve`` as worker 2, hands it one connection from "203.0.113.5:1234" whose
    socket peer is 127.0.0.1, returns the HTTP answer, then drains with SIGTERM."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + prefix + "notify")
        systemd.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + prefix + "notify")
        task = asyncio.ensure_future(serve(WorkerOptions(index=2, socket_prefix=prefix)))
        ready = await asyncio.to_thread(systemd.recv, 100)
        assert ready.startswith(b"READY=1"), ready
        dispatcher = await asyncio.to_thread(FakeDispatcher, prefix + "2")
        await asyncio.to_thread(dispatcher.hello, 2)
        tcp = TcpPair()
        tcp.client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        conn = wire.Conn(1, ("203.0.113.5", 1234), ("127.0.0.1", 80), "web")
        await asyncio.to_thread(dispatcher.send, conn, tcp.server.fileno())
        tcp.server.close()
        assert await asyncio.to_thread(dispatcher.recv) == wire.Ack(1)

        def read_all() -> bytes:
            chunks = []
            while chunk := tcp.client.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)

        answer = (await asyncio.to_thread(read_all)).decode()
        os.kill(os.getpid(), signal.SIGTERM)  # the adapters drain on it
        assert await asyncio.to_thread(dispatcher.recv) == wire.Drain()
        await asyncio.to_thread(dispatcher.send, wire.Drained(1))
        await asyncio.wait_for(task, TIMEOUT)
        assert await asyncio.to_thread(dispatcher.recv) is None
        dispatcher.close()
        tcp.close()
        return answer


def test_aiohttp_run_app_shows_the_real_client(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import web

    import sticky_dispatch.aiohttp

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"remote={request.remote}")

    app = web.Application()
    app.router.add_get("/", index)

    async def serve(options: WorkerOptions) -> None:
        await sticky_dispatch.aiohttp.serve_app(app, options=options, access_log=None)

    answer = asyncio.run(exercise(prefix, monkeypatch, serve))
    assert answer.startswith("HTTP/1.1 200"), answer
    assert answer.endswith("remote=203.0.113.5"), answer


def test_uvicorn_run_shows_the_real_client(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
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

    answer = asyncio.run(exercise(prefix, monkeypatch, serve))
    assert answer.startswith("HTTP/1.1 200"), answer
    assert "\r\n\r\n17\r\nclient=203.0.113.5:1234\r\n" in answer, answer
