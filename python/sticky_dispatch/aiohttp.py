"""aiohttp on sticky-dispatch: :func:`run_app` instead of ``aiohttp.web.run_app``.

::

    from aiohttp import web
    import sticky_dispatch.aiohttp

    app = web.Application()
    ...
    sticky_dispatch.aiohttp.run_app(app)

Connections come from the dispatcher instead of a listening socket; ``request.remote`` is
the real client (also when the dispatcher consumed a PROXY header). ``READY=1`` goes to
systemd after the app's startup hooks ran. SIGTERM (or SIGINT) drains: every connection
handed over is served, then the app is shut down as ``web.run_app`` would, waiting up to
``shutdown_timeout`` seconds for requests in progress (a socket.io long-poll holds one for
up to its ``ping_interval``, 25 s by default).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Callable, Optional

from aiohttp import web

from ._handoff import Handoffs, serve_until_drained, socket_key
from .options import WorkerOptions
from .worker import default_logging

log = logging.getLogger("sticky_dispatch")

SHUTDOWN_TIMEOUT = 30.0
"""Default bound on finishing requests in progress after a drain, in seconds: longer
than socket.io's 25 s long-poll, shorter than systemd's default 90 s stop timeout."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _first_request_middleware(handoffs: Handoffs) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def first_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            handoffs.request_started(socket_key(peer, local))
        return await handler(request)

    return first_request


async def serve_app(
    app: web.Application,
    *,
    options: Optional[WorkerOptions] = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    **runner_kwargs: Any,
) -> None:
    """Serves ``app`` on the connections the dispatcher hands over, until drained.

    ``runner_kwargs`` go to ``web.AppRunner`` (``access_log``, ``handler_cancellation``...).
    """
    # First: the index (also set for the app when it comes from the unit's name).
    options = options if options is not None else WorkerOptions.from_env()
    handoffs = Handoffs()
    # First: a request has started once any middleware runs.
    app.middlewares.insert(0, _first_request_middleware(handoffs))
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **runner_kwargs)
    await runner.setup()
    try:
        server = runner.server
        assert server is not None  # set by setup()
        await serve_until_drained(handoffs, server, options, "aiohttp app")
        log.info("drained: finishing requests in progress (up to %s s)", shutdown_timeout)
    finally:
        await runner.cleanup()


def run_app(
    app: web.Application,
    *,
    options: Optional[WorkerOptions] = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    **runner_kwargs: Any,
) -> None:
    """Like ``aiohttp.web.run_app(app)``, on the connections of sticky-dispatch.

    This package's log lines go to stderr unless the app configured logging.
    """
    default_logging()
    asyncio.run(serve_app(app, options=options, shutdown_timeout=shutdown_timeout, **runner_kwargs))
