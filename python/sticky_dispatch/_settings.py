"""What the adapters say about the web servers' own start-up settings, and how they end
when the worker cannot start.

``aiohttp.web.run_app`` and ``uvicorn.run`` take settings that belong to the dispatcher
here (where to listen, how many processes, reloading): converting an app by changing the
function's name keeps them, so the adapters accept them, ignore them, and say once, at
start, where each one went instead.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .options import ConfigError, WorkerOptions
from .worker import LinkSocketInUse

log = logging.getLogger("sticky_dispatch")

# Checked against tests/vectors/constants.json by tests/test_constants.py.
EX_CONFIG = 78
"""Exit status for a worker that cannot know who it is (no or a bad index): the
dispatcher's own status for configuration errors (sysexits' EX_CONFIG)."""

_ADDRESS = (
    "the dispatcher listens (standalone: sticky-dispatch --listen ADDR; under systemd: "
    "ListenStream= in sticky-dispatch.socket) and hands this worker its connections over "
    "the link socket @{socket}"
)
_PROCESSES = (
    "the dispatcher runs one process per worker index (standalone: sticky-dispatch "
    "--workers N; under systemd: workers = N in /etc/sticky-dispatch/config.toml)"
)
_RELOAD = (
    "nothing watches the code here: to load new code, restart the workers (standalone: "
    "stop and start sticky-dispatch; under systemd: systemctl restart app@N, one at a time)"
)

WHERE = {
    "host": _ADDRESS,
    "port": _ADDRESS,
    "path": _ADDRESS,
    "sock": _ADDRESS,
    "uds": _ADDRESS,
    "fd": _ADDRESS,
    "backlog": _ADDRESS,
    "reuse_address": _ADDRESS,
    "reuse_port": _ADDRESS,
    "workers": _PROCESSES,
    "reload": _RELOAD,
    "reload_dirs": _RELOAD,
    "reload_includes": _RELOAD,
    "reload_excludes": _RELOAD,
    "reload_delay": _RELOAD,
}
"""The settings that belong to the dispatcher, and where each one went."""


def ignored_message(function: str, given: Mapping[str, Any], options: WorkerOptions) -> str:
    """The one warning for the dispatcher's settings in ``given`` (empty if none):
    ``port=5000 is ignored: the dispatcher listens (...); remove port=``."""
    groups: dict[str, list[str]] = {}
    for key, value in given.items():
        if key in WHERE:
            groups.setdefault(WHERE[key], []).append(f"{key}={value!r}")
    if not groups:
        return ""
    parts = []
    names = []
    for where, settings in groups.items():
        verb = "is" if len(settings) == 1 else "are"
        parts.append(
            f"{', '.join(settings)} {verb} ignored: {where.format(socket=options.socket_name)}"
        )
        names += [setting.split("=", 1)[0] + "=" for setting in settings]
    return f"{function}: {'; '.join(parts)}. Remove {', '.join(names)} to silence this."


def warn_ignored(function: str, given: Mapping[str, Any], options: WorkerOptions) -> None:
    """Logs :func:`ignored_message` once, if there is anything to say."""
    message = ignored_message(function, given, options)
    if message:
        log.warning("%s", message)


@contextmanager
def clean_exit(unused: object = None) -> Iterator[None]:
    """Turns the errors that stop a worker at start into one log line and an exit status
    instead of a traceback: no or a bad index (78, like the dispatcher's configuration
    errors), a link socket that is taken (1: the dispatcher restarts the worker, and the
    name is free once the other process has stopped). ``unused``, if a coroutine (the
    app's ``init_app()``), is closed first so that Python does not warn it was never
    awaited."""
    try:
        yield
    except (ConfigError, LinkSocketInUse) as err:
        if inspect.iscoroutine(unused):
            unused.close()
        text = err.strerror if isinstance(err, LinkSocketInUse) else str(err)
        log.error("cannot start the worker: %s", text)
        sys.exit(EX_CONFIG if isinstance(err, ConfigError) else 1)
