"""Python workers for sticky-dispatch.

The dispatcher hashes each client to a worker index and hands the accepted TCP connection
to that worker over the abstract Unix socket ``@<prefix><index>`` (or, routing by client
address, passes the worker its *lanes*: listening sockets the kernel routes its clients
to, which the worker accepts on itself). This package is the worker's end of that link
(wire format v1, standard library only) and adapters that make it a drop-in for the usual
way of starting a server:

- :func:`sticky_dispatch.aiohttp.run_app` instead of ``aiohttp.web.run_app``;
- :func:`sticky_dispatch.uvicorn.run` instead of ``uvicorn.run`` (ASGI: FastAPI, Starlette);
- :class:`Worker` for anything else on asyncio: ``async for conn in Worker(): ...``.

Layout: :mod:`.wire` (message format), :mod:`.options` (index, prefix, users from the
environment), :mod:`.notify` (sd_notify), :mod:`.worker` (the link on asyncio),
:mod:`._handoff` (real client addresses and first reads, for the adapters).
"""

from .options import ConfigError, WorkerOptions
from .worker import ClientInfo, Connection, LinkError, LinkSocketInUse, Worker

__all__ = [
    "ClientInfo",
    "ConfigError",
    "Connection",
    "LinkError",
    "LinkSocketInUse",
    "Worker",
    "WorkerOptions",
]
__version__ = "0.2.0"
