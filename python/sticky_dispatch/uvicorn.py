"""ASGI apps on uvicorn behind sticky-dispatch: :func:`run` instead of ``uvicorn.run``.

::

    import sticky_dispatch.uvicorn
    sticky_dispatch.uvicorn.run(app)        # FastAPI, Starlette, socketio.ASGIApp, ...
    sticky_dispatch.uvicorn.run("main:app")  # an import string, as uvicorn.run takes

uvicorn has no public API for serving an already accepted socket, so this uses its
``Config``/``Server`` objects the way ``Server.startup`` does: ``Server.startup(sockets=[])``
(lifespan startup, no listener), ``config.http_protocol_class(config=, server_state=,
app_state=)`` as the protocol factory, ``Server.main_loop`` for the ``Date`` header ticks
and ``Server.shutdown`` for the graceful end. Tested with uvicorn 0.54; the package pins
``uvicorn<0.55`` for that reason. The lanes (listening sockets the kernel routes to this
worker) do not go through ``Server.startup(sockets=...)``: they come after start-up, change
at every link-up and must close before DRAIN; the worker accepts on them and gives those
connections to the same protocol factory.

``scope["client"]`` is the real client (also when the dispatcher consumed a PROXY header);
SIGTERM drains like the aiohttp adapter: WebSockets and socket.io long-polls are ended
(their tasks cancelled; socket.io clients reconnect to the restarted worker), then other
requests in progress get ``timeout_graceful_shutdown`` seconds (default here 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Callable, Optional, Union

import uvicorn

from ._handoff import SHUTDOWN_TIMEOUT as SHUTDOWN_TIMEOUT  # the default, public here too
from ._handoff import Handoffs, HeldRequests, is_held, serve_until_drained, socket_key
from ._settings import clean_exit, warn_ignored
from .options import WorkerOptions
from .worker import default_logging

log = logging.getLogger("sticky_dispatch")

DISPATCHER_OWNS = frozenset(
    ("host", "port", "uds", "fd", "backlog", "workers", "reload", "reload_dirs")
    + ("reload_includes", "reload_excludes", "reload_delay")
)
"""``uvicorn.run``'s settings that belong to the dispatcher: ignored, with a warning."""

Scope = MutableMapping[str, Any]
ASGIApp = Callable[..., Any]


class FirstRequests:
    """ASGI middleware: tells the drain which handed-over connections a request has
    started on (``scope["client"]`` is already the client the dispatcher reported), and
    records WebSockets and long-polls (uvicorn runs each request in a task of its own) so
    that the shutdown can end them."""

    def __init__(self, app: ASGIApp, handoffs: Handoffs, held: HeldRequests) -> None:
        self.app = app
        self.handoffs = handoffs
        self.held = held

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> Any:
        kind = scope.get("type")
        if kind in ("http", "websocket"):
            self.handoffs.request_started(socket_key(scope.get("client"), scope.get("server")))
            query = scope.get("query_string", b"")
            if kind == "websocket" or is_held(
                str(scope.get("method", "")), query.decode("latin-1"), None
            ):
                self.held.started(asyncio.current_task())
        return await self.app(scope, receive, send)


async def serve(config: uvicorn.Config, *, options: Optional[WorkerOptions] = None) -> None:
    """Serves the app of ``config`` on the connections the dispatcher hands over."""
    # First: the index (also set for the app when it comes from the unit's name).
    options = options if options is not None else WorkerOptions.from_env()
    server = uvicorn.Server(config)
    if not config.loaded:
        config.load()
    handoffs, held = Handoffs(), HeldRequests()
    # Outermost: a request has started once any middleware runs.
    config.loaded_app = FirstRequests(config.loaded_app, handoffs, held)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[])
    if server.should_exit:
        return
    ticks = asyncio.get_running_loop().create_task(server.main_loop())
    try:

        def protocol() -> asyncio.Protocol:
            factory: Callable[..., asyncio.Protocol] = config.http_protocol_class
            return factory(
                config=config, server_state=server.server_state, app_state=server.lifespan.state
            )

        # config.ssl: made by config.load() from ssl_keyfile=/ssl_certfile=, as uvicorn does.
        await serve_until_drained(handoffs, protocol, options, "ASGI app", config.ssl)
        ended = held.end()
        if ended:
            log.info("ended %d WebSocket or long-poll requests: their clients reconnect", ended)
    finally:
        server.should_exit = True
        await ticks
        await server.shutdown(sockets=[])


def run(
    app: Union[ASGIApp, str],
    *,
    options: Optional[WorkerOptions] = None,
    app_dir: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Like ``uvicorn.run(app, **kwargs)``, on the connections of sticky-dispatch.

    Takes what ``uvicorn.run`` takes: an app or an import string (``"main:app"``),
    ``factory=True``, ``app_dir``, and every ``uvicorn.Config`` setting (``log_level``,
    ``ssl_certfile``, ``proxy_headers``...). ``host``, ``port``, ``uds``, ``fd``,
    ``backlog``, ``workers`` and ``reload`` (with ``reload_dirs`` and the like) belong to
    the dispatcher: they are ignored, with one warning at start that says where they went.
    """
    if app_dir is not None:
        sys.path.insert(0, app_dir)  # as uvicorn.run does
    given = {key: kwargs.pop(key) for key in list(kwargs) if key in DISPATCHER_OWNS}
    kwargs.setdefault("timeout_graceful_shutdown", SHUTDOWN_TIMEOUT)
    config = uvicorn.Config(app, **kwargs)  # configures uvicorn's loggers, then ours:
    default_logging()
    with clean_exit():
        worker_options = options if options is not None else WorkerOptions.from_env()
    warn_ignored("sticky_dispatch.uvicorn.run", given, worker_options)
    # Loads the app as uvicorn.run does (an import string is imported, a factory called;
    # failures are logged by uvicorn and exit with its status).
    config.load()
    with clean_exit():
        asyncio.run(serve(config, options=worker_options))
