"""A python-socketio app on aiohttp, shaped like python-socketio's examples.

docs/converting-python.md turns before/aiohttp_app.py (one process on port 5000) into
after/aiohttp_app.py (workers of sticky-dispatch); tests/python.rs runs the result."""

import os

import socketio
import sticky_dispatch.aiohttp
from aiohttp import web

sio = socketio.AsyncServer(
    async_mode="aiohttp",
    client_manager=socketio.AsyncRedisManager(os.environ.get("REDIS_URL", "redis://")),
)
app = web.Application()
sio.attach(app)


async def background_task():
    """Example of how to send server generated events to clients."""
    count = 0
    while True:
        await sio.sleep(float(os.environ.get("TICK_SECONDS", "10")))
        count += 1
        await sio.emit("my_response", {"data": "Server generated event", "count": count})


async def index(request):
    return web.Response(text="python-socketio on aiohttp\n")


@sio.event
async def my_event(sid, message):
    await sio.emit("my_response", {"data": message["data"]}, room=sid)


@sio.event
async def my_broadcast_event(sid, message):
    await sio.emit("my_response", {"data": message["data"]})


@sio.event
async def connect(sid, environ):
    await sio.emit("my_response", {"data": "Connected", "count": 0}, room=sid)


@sio.event
def disconnect(sid, reason):
    print("Client disconnected, reason:", reason)


app.router.add_get("/", index)


async def init_app():
    if os.environ["STICKY_DISPATCH_INDEX"] == "0":  # one task, not one per worker
        sio.start_background_task(background_task)
    return app


if __name__ == "__main__":
    sticky_dispatch.aiohttp.run_app(init_app())
