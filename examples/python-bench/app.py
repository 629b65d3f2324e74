"""The benchmark's aiohttp app: one short plain-text answer per request.

    python app.py                 # behind sticky-dispatch (sticky_dispatch.aiohttp.run_app)
    python app.py --direct ADDR   # accepting itself on ADDR (SO_REUSEPORT, or one port each)
"""

from __future__ import annotations

import os
import socket
import sys

from aiohttp import web

INDEX = os.environ.get("STICKY_DISPATCH_INDEX", "-")


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"worker={INDEX} pid={os.getpid()} client={request.remote}\n")


app = web.Application()
app.router.add_get("/", index)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--direct":
        host, port = sys.argv[2].rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
        print("listening directly", file=sys.stderr, flush=True)
        web.run_app(app, sock=sock, print=None, access_log=None)
    else:
        import sticky_dispatch.aiohttp

        sticky_dispatch.aiohttp.run_app(app, access_log=None)
