"""The test chat on aiohttp + python-socketio, as a worker of sticky-dispatch.

    python chat_aiohttp.py                 # a worker: connections from the dispatcher
    python chat_aiohttp.py --direct ADDR   # no dispatcher: listen on ADDR with SO_REUSEPORT

The protocol is the demo worker's (tests/node/socketio-clients.js expects it): on connect
the server emits ``hello`` with ``worker=<index> pid=<pid> client=<ip>``; ``join(room)``
enters the room and acknowledges with that line; ``message({room, text})`` goes to the
room. ``GET /`` answers the same line plus ``listener=`` and ``local=`` (tests' request()),
or, to a browser (Accept: text/html), a chat page.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import socketio
from aiohttp import web
from common import chat_page, client_js_path, direct_socket, wants_html, who

# CHAT_PING_INTERVAL: a long-poll is held up to this long (socket.io's default 25 s);
# the drain test shortens it.
sio = socketio.AsyncServer(
    async_mode="aiohttp",
    cors_allowed_origins="*",
    ping_interval=float(os.environ.get("CHAT_PING_INTERVAL", "25")),
)
app = web.Application()
sio.attach(app)


async def index(request: web.Request) -> web.Response:
    if wants_html(request.headers.get("Accept")):
        return web.Response(text=chat_page(), content_type="text/html")
    local = request.transport.get_extra_info("sockname") if request.transport else None
    text = f"{who(request.remote)}\nlistener=aiohttp local={local[0] if local else '-'}\n"
    return web.Response(text=text)


async def client_js(request: web.Request) -> web.StreamResponse:
    path = client_js_path()
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


async def slow(request: web.Request) -> web.StreamResponse:
    """``GET /slow?ms=N``: ``started``, then after N ms ``finished`` (a request in
    progress for the restart tests)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(b"started\n")
    await asyncio.sleep(int(request.query.get("ms", "500")) / 1000)
    await response.write(b"finished\n")
    await response.write_eof()
    return response


app.router.add_get("/", index)
app.router.add_get("/slow", slow)
app.router.add_get("/socket.io.min.js", client_js)


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    line = who(environ["aiohttp.request"].remote)
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--direct":
        sock = direct_socket(sys.argv[2])
        print("listening directly", flush=True, file=sys.stderr)
        web.run_app(app, sock=sock, print=None, access_log=None)
    else:
        import sticky_dispatch.aiohttp

        sticky_dispatch.aiohttp.run_app(app, access_log=None)
