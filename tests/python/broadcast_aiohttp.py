"""Cross-worker broadcast: python-socketio on aiohttp with ``AsyncRedisManager``, as 4
workers of sticky-dispatch (docs/python.md, "Broadcast across workers").

    redis-server --port 6379 --save '' &
    REDIS_URL=redis://127.0.0.1:6379/0 sticky-dispatch --listen 127.0.0.1:8080 --workers 4 \\
        -- python tests/python/broadcast_aiohttp.py

Shaped like python-socketio's aiohttp example: ``my_event`` answers the sender,
``my_broadcast_event`` answers everyone, a background task emits a
"Server generated event" every ``TICK_SECONDS``. Three things change with several workers:

- ``client_manager=socketio.AsyncRedisManager(REDIS_URL)``: an emit to everyone (or to a
  room) goes through Redis to every worker, which passes it to its own clients. Without
  it, each worker reaches only the clients it serves: a quarter of them with 4 workers.
- The background task runs on worker 0 only. Started in every worker, its events would
  reach each client 4 times (each worker's task emits to everyone through Redis).
- The number of connected users is kept in Redis: each worker's own count in one field
  of a hash, the total is their sum. A count in a Python variable would be per worker;
  a worker that restarts starts again from 0 and overwrites only its own field.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as redis
import socketio
import sticky_dispatch.aiohttp
from aiohttp import web

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TICK_SECONDS = float(os.environ.get("TICK_SECONDS", "10"))
USERS_KEY = "broadcast-example:users"

sio = socketio.AsyncServer(
    async_mode="aiohttp",
    client_manager=socketio.AsyncRedisManager(REDIS_URL),
)
app = web.Application()
sio.attach(app)
store = redis.from_url(REDIS_URL)
connected = 0  # this worker's clients; the total is in Redis


def worker_index() -> int:
    """This worker's index: set by the dispatcher (standalone) or by sticky_dispatch from
    the unit's name (app@3.service), before init_app() runs."""
    return int(os.environ["STICKY_DISPATCH_INDEX"])


async def publish_users() -> None:
    """Stores this worker's count and tells every client the total."""
    await store.hset(USERS_KEY, str(worker_index()), connected)
    counts = await store.hvals(USERS_KEY)
    await sio.emit("users", {"count": sum(int(count) for count in counts)})


async def background_task() -> None:
    count = 0
    while True:
        await sio.sleep(TICK_SECONDS)
        count += 1
        await sio.emit("my_response", {"data": "Server generated event", "count": count})


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"broadcast example, worker {worker_index()}\n")


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    global connected
    connected += 1
    client = environ["aiohttp.request"].remote
    hello = {"data": "Connected", "worker": worker_index(), "client": client}
    await sio.emit("my_response", hello, to=sid)
    await publish_users()


@sio.event
async def disconnect(sid: str, reason: str) -> None:
    global connected
    connected -= 1
    await publish_users()


@sio.event
async def my_event(sid: str, message: dict[str, Any]) -> None:
    await sio.emit("my_response", {"data": message["data"]}, to=sid)


@sio.event
async def my_broadcast_event(sid: str, message: dict[str, Any]) -> None:
    await sio.emit("my_response", {"data": message["data"]})


async def init_app() -> web.Application:
    # This worker starts with no clients, whatever an earlier process left in Redis.
    await store.hset(USERS_KEY, str(worker_index()), 0)
    if worker_index() == 0:
        task = sio.start_background_task(background_task)

        async def stop_task(app: web.Application) -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.on_shutdown.append(stop_task)
    return app


app.router.add_get("/", index)

if __name__ == "__main__":
    sticky_dispatch.aiohttp.run_app(init_app(), access_log=None)
