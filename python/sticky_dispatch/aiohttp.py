"""aiohttp on sticky-dispatch: :func:`run_app` instead of ``aiohttp.web.run_app``.

::

    from aiohttp import web
    import sticky_dispatch.aiohttp

    app = web.Application()
    ...
    sticky_dispatch.aiohttp.run_app(app)        # or run_app(init_app()), as web.run_app

Connections come from the dispatcher instead of a listening socket (handed over, or
accepted by the worker on the lanes the dispatcher passes it: see :mod:`.worker`);
``request.remote`` is the real client (also when the dispatcher consumed a PROXY header).
``READY=1`` goes to systemd after the app's startup hooks ran. SIGTERM (or SIGINT)
drains: every connection handed over is served, then the app is shut down as
``web.run_app`` would, waiting up to ``shutdown_timeout`` seconds for requests in
progress; WebSockets and socket.io long-polls, which would hold the process until the
session's next ping or the timeout, are ended first (an ``on_shutdown`` hook cancels
their ``request.task``), and the socket.io clients reconnect to the restarted worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable
from typing import Any, Callable, Optional, Union

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger

from ._handoff import SHUTDOWN_TIMEOUT as SHUTDOWN_TIMEOUT  # the default, public here too
from ._handoff import Handoffs, HeldRequests, is_held, serve_until_drained, socket_key
from ._settings import clean_exit, warn_ignored
from .options import WorkerOptions
from .worker import default_logging

log = logging.getLogger("sticky_dispatch")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _first_request_middleware(
    handoffs: Handoffs, held: HeldRequests
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def first_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            handoffs.request_started(socket_key(peer, local))
        if is_held(request.method, request.query_string, request.headers.get("Upgrade")):
            held.started(request.task)
        return await handler(request)

    return first_request


def _end_held_requests(held: HeldRequests) -> Callable[[web.Application], Awaitable[None]]:
    async def end_held_requests(app: web.Application) -> None:
        ended = held.end()
        if ended:
            log.info("ended %d WebSocket or long-poll requests: their clients reconnect", ended)

    return end_held_requests


async def serve_app(
    app: Union[web.Application, Awaitable[web.Application]],
    *,
    options: Optional[WorkerOptions] = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ssl_context: Optional[ssl.SSLContext] = None,
    print: Optional[Callable[..., None]] = None,
    **runner_kwargs: Any,
) -> None:
    """Serves ``app`` (or the application an awaitable such as ``init_app()`` returns) on
    the connections the dispatcher hands over, until drained.

    ``runner_kwargs`` go to ``web.AppRunner`` and from it to each request handler
    (``access_log``, ``keepalive_timeout``, ``handler_cancellation``...): pass only what
    ``web.run_app`` would pass there; :func:`run_app` sorts its arguments out.
    """
    # First: the index (also set for the app when it comes from the unit's name).
    options = options if options is not None else WorkerOptions.from_env()
    if inspect.isawaitable(app):
        app = await app  # as web.run_app(init_app()) does
    handoffs, held = Handoffs(), HeldRequests()
    # First: a request has started once any middleware runs.
    app.middlewares.insert(0, _first_request_middleware(handoffs, held))
    # First: the app's own hooks may wait for its sessions to end.
    app.on_shutdown.insert(0, _end_held_requests(held))
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **runner_kwargs)
    await runner.setup()
    try:
        server = runner.server
        assert server is not None  # set by setup()
        on_ready = None
        if print is not None:
            say, scheme = print, "https" if ssl_context is not None else "http"
            banner = (
                f"======== Running as worker {options.index} of sticky-dispatch ({scheme}, "
                f"connections from @{options.socket_name}) ========"
            )

            def on_ready() -> None:
                say(banner)

        await serve_until_drained(
            handoffs, server, options, "aiohttp app", ssl_context, on_ready=on_ready
        )
        log.info("drained: finishing requests in progress (up to %s s)", shutdown_timeout)
    finally:
        await runner.cleanup()


def run_app(
    app: Union[web.Application, Awaitable[web.Application]],
    *,
    host: Any = None,
    port: Optional[int] = None,
    path: Any = None,
    sock: Any = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    keepalive_timeout: float = 75.0,
    ssl_context: Optional[ssl.SSLContext] = None,
    print: Optional[Callable[..., None]] = print,
    backlog: Optional[int] = None,
    access_log_class: Optional[type[AbstractAccessLogger]] = None,
    access_log_format: Optional[str] = None,
    access_log: Optional[logging.Logger] = access_logger,
    handle_signals: bool = True,
    reuse_address: Optional[bool] = None,
    reuse_port: Optional[bool] = None,
    handler_cancellation: bool = False,
    loop: Optional[asyncio.AbstractEventLoop] = None,
    options: Optional[WorkerOptions] = None,
    **kwargs: Any,
) -> None:
    """Like ``aiohttp.web.run_app(app, ...)``, on the connections of sticky-dispatch.

    Takes what ``web.run_app`` takes. ``app`` may be an awaitable that returns the
    application (``run_app(init_app())``). ``host``, ``port``, ``path``, ``sock``,
    ``backlog``, ``reuse_address`` and ``reuse_port`` belong to the dispatcher: they are
    ignored, with one warning at start that says where they went. ``ssl_context`` makes
    the handed-over connections speak TLS. SIGTERM and SIGINT always drain
    (``handle_signals`` changes nothing). ``shutdown_timeout`` is 30 s by default (see the
    module). Other keyword arguments go to ``web.AppRunner``, as with ``web.run_app``, if
    ``web.RequestHandler`` takes them (``max_line_size``...); others raise TypeError. This
    package's log lines go to stderr unless the app configured logging.
    """
    # aiohttp would hand unknown ones to every request handler, which fails on each
    # connection ("Failed to create request handler with custom kwargs"): refuse them now.
    handler_settings = inspect.signature(web.RequestHandler.__init__).parameters
    for key in kwargs:
        if key not in handler_settings or key in ("self", "manager", "loop"):
            raise TypeError(
                f"sticky_dispatch.aiohttp.run_app() got an unexpected keyword argument {key!r}"
            )
    default_logging()
    given = {"host": host, "port": port, "path": path, "sock": sock, "backlog": backlog}
    given.update(reuse_address=reuse_address, reuse_port=reuse_port)
    runner_kwargs: dict[str, Any] = {
        **kwargs,
        "keepalive_timeout": keepalive_timeout,
        "access_log": access_log,
        "handler_cancellation": handler_cancellation,
    }
    if access_log_class is not None:
        runner_kwargs["access_log_class"] = access_log_class
    if access_log_format is not None:
        runner_kwargs["access_log_format"] = access_log_format

    with clean_exit(app):
        worker_options = options if options is not None else WorkerOptions.from_env()
    warn_ignored(
        "sticky_dispatch.aiohttp.run_app",
        {key: value for key, value in given.items() if value is not None},
        worker_options,
    )

    async def main() -> None:
        with clean_exit():
            await serve_app(
                app,
                options=worker_options,
                shutdown_timeout=shutdown_timeout,
                ssl_context=ssl_context,
                print=print,
                **runner_kwargs,
            )

    if loop is None:
        asyncio.run(main())
    else:
        loop.run_until_complete(main())
