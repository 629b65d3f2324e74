"""The test chat as an ASGI app: FastAPI with python-socketio's ASGIApp, on uvicorn.

    python chat_asgi.py                 # a worker: connections from the dispatcher
    python chat_asgi.py --direct ADDR   # no dispatcher: listen on ADDR with SO_REUSEPORT

Same protocol (and page) as chat_aiohttp.py; the client address is ``scope["client"]``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import socketio
import uvicorn
from common import chat_page, client_js_path, direct_socket, wants_html, who
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

# CHAT_PING_INTERVAL: a long-poll is held up to this long (socket.io's default 25 s);
# the drain test shortens it.
sio = socketio.AsyncServer(
    async_mode="asgi",
    cors_allowed_origins="*",
    ping_interval=float(os.environ.get("CHAT_PING_INTERVAL", "25")),
)
api = FastAPI()


@api.get("/")
async def index(request: Request) -> Response:
    if wants_html(request.headers.get("accept")):
        return HTMLResponse(chat_page())
    client = request.client.host if request.client else None
    server = request.scope.get("server")
    text = f"{who(client)}\nlistener=asgi local={server[0] if server else '-'}\n"
    return PlainTextResponse(text)


@api.get("/slow")
async def slow(ms: int = 500) -> Response:
    """``started``, then after ``ms`` ms ``finished`` (a request in progress for the
    restart tests)."""

    async def body() -> AsyncIterator[bytes]:
        yield b"started\n"
        await asyncio.sleep(ms / 1000)
        yield b"finished\n"

    return StreamingResponse(body(), media_type="text/plain")


@api.get("/socket.io.min.js")
async def client_js() -> Response:
    path = client_js_path()
    if path is None:
        raise HTTPException(status_code=404)
    return FileResponse(path)


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    client = environ["asgi.scope"].get("client")
    line = who(client[0] if client else None)
    await sio.save_session(sid, {"who": line})
    await sio.emit("hello", line, to=sid)


@sio.event
async def join(sid: str, room: str) -> str:
    await sio.enter_room(sid, room)
    session = await sio.get_session(sid)
    return str(session["who"])


@sio.event
async def message(sid: str, data: dict[str, Any]) -> None:
    out = {
        "room": data["room"],
        "text": data["text"],
        "from": sid,
        "worker": os.environ.get("STICKY_DISPATCH_INDEX"),
    }
    await sio.emit("message", out, room=data["room"])


app = socketio.ASGIApp(sio, other_asgi_app=api)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--direct":
        sock = direct_socket(sys.argv[2])
        print("listening directly", flush=True, file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    else:
        import sticky_dispatch.uvicorn

        sticky_dispatch.uvicorn.run(app, log_level="warning")
