"""The facts the package shares with the dispatcher and the Node package, against their
published copy ``tests/vectors/constants.json`` (cargo test checks that file against the
Rust definitions): a Python copy that drifts fails here, naming the key and the name."""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import pytest
from conftest import CONSTANTS


def _seconds(ms: Any) -> float:
    return float(ms) / 1000


def _same(value: Any) -> Any:
    return value


# Key of constants.json → the Python names holding it (the definition first, then the
# public names that re-export it), and how the file's value converts to Python's unit.
COPIES: dict[str, tuple[list[str], Callable[[Any], Any]]] = {
    "env.index": (["sticky_dispatch.options.INDEX_ENV"], _same),
    "env.socket_prefix": (["sticky_dispatch.options.SOCKET_PREFIX_ENV"], _same),
    "env.dispatcher_users": (["sticky_dispatch.options.DISPATCHER_USERS_ENV"], _same),
    "env.link_fd": (["sticky_dispatch.options.LINK_FD_ENV"], _same),
    "default_socket_prefix": (["sticky_dispatch.options.DEFAULT_SOCKET_PREFIX"], _same),
    "hello_timeout_ms": (["sticky_dispatch.worker.HELLO_TIMEOUT"], _seconds),
    "drain_answer_timeout_ms": (["sticky_dispatch.worker.DRAIN_ANSWER_TIMEOUT"], _seconds),
    "accept_queue": (["sticky_dispatch.worker.ACCEPT_QUEUE"], _same),
    "first_read_timeout_ms": (["sticky_dispatch._handoff.FIRST_READ_TIMEOUT"], _seconds),
    "link_backlog": (["sticky_dispatch.worker.LINK_BACKLOG"], _same),
    "no_dispatcher_notice_ms": (["sticky_dispatch.worker.NO_DISPATCHER_NOTICE"], _seconds),
    "app_drain_timeout_ms": (
        [
            "sticky_dispatch._handoff.SHUTDOWN_TIMEOUT",
            "sticky_dispatch.aiohttp.SHUTDOWN_TIMEOUT",
            "sticky_dispatch.uvicorn.SHUTDOWN_TIMEOUT",
        ],
        _seconds,
    ),
    "ex_config": (["sticky_dispatch._settings.EX_CONFIG"], _same),
}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif key != "about":
            flat[f"{prefix}{key}"] = value
    return flat


FACTS = _flatten(json.loads(CONSTANTS.read_text()))


def _python_value(dotted: str) -> Any:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_shared_fact_has_a_python_copy() -> None:
    """A fact added to constants.json needs a Python counterpart (or a line here saying
    which name it is); a key dropped there must go from here too."""
    assert sorted(FACTS) == sorted(COPIES)


@pytest.mark.parametrize("key", sorted(COPIES))
def test_the_python_copy_matches_constants_json(key: str) -> None:
    names, convert = COPIES[key]
    expected = convert(FACTS[key])
    for dotted in names:
        actual = _python_value(dotted)
        assert (type(actual), actual) == (type(expected), expected), (
            f"{dotted} = {actual!r}, but tests/vectors/constants.json says "
            f"{key} = {FACTS[key]!r} (in Python: {expected!r})"
        )
