"""A FastAPI app with python-socketio on uvicorn, shaped like python-socketio's examples.

docs/converting-python.md turns before/fastapi_app.py (one process on port 8000) into
after/fastapi_app.py (workers of sticky-dispatch); tests/python.rs runs the result."""

import asyncio
import os
from contextlib import asynccontextmanager

import socketio
import sticky_dispatch.uvicorn
from fastapi import FastAPI

sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=socketio.AsyncRedisManager(os.environ.get("REDIS_URL", "redis://")),
)


async def background_task():
    """Example of how to send server generated events to clients."""
    count = 0
    while True:
        await sio.sleep(float(os.environ.get("TICK_SECONDS", "10")))
        count += 1
        await sio.emit("my_response", {"data": "Server generated event", "count": count})


@asynccontextmanager
async def lifespan(api: FastAPI):
    if os.environ["STICKY_DISPATCH_INDEX"] != "0":  # one task, not one per worker
        yield
        return
    task = sio.start_background_task(background_task)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


api = FastAPI(lifespan=lifespan)
app = socketio.ASGIApp(sio, other_asgi_app=api)


@api.get("/")
async def index():
    return {"app": "python-socketio on FastAPI"}


@sio.event
async def my_event(sid, message):
    await sio.emit("my_response", {"data": message["data"]}, room=sid)


@sio.event
async def my_broadcast_event(sid, message):
    await sio.emit("my_response", {"data": message["data"]})


@sio.event
async def connect(sid, environ):
    await sio.emit("my_response", {"data": "Connected", "count": 0}, room=sid)


if __name__ == "__main__":
    sticky_dispatch.uvicorn.run("fastapi_app:app")
