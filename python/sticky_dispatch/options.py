"""Where a worker finds its link socket and whom it trusts, from the environment."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field
from typing import Optional

# Checked against tests/vectors/constants.json by tests/test_constants.py.
INDEX_ENV = "STICKY_DISPATCH_INDEX"
SOCKET_PREFIX_ENV = "STICKY_DISPATCH_SOCKET_PREFIX"
DISPATCHER_USERS_ENV = "STICKY_DISPATCH_DISPATCHER_USERS"
# The link socket, listening, as an inherited fd: `sticky-dispatch worker-launcher` holds
# the name across reloads and passes each process it starts a copy.
LINK_FD_ENV = "STICKY_DISPATCH_LINK_FD"
DEFAULT_SOCKET_PREFIX = "sticky-dispatch/"


class ConfigError(Exception):
    """The environment does not say which worker this is, or names an unknown user."""


def default_users() -> frozenset[int]:
    """Our own uid and root: who may be the dispatcher unless configured otherwise."""
    return frozenset({os.geteuid(), 0})


@dataclass(frozen=True)
class WorkerOptions:
    """This worker's index, its link socket prefix and the uids accepted as dispatcher."""

    index: int
    socket_prefix: str = DEFAULT_SOCKET_PREFIX
    dispatcher_users: frozenset[int] = field(default_factory=default_users)

    @property
    def socket_name(self) -> str:
        """The abstract socket name, without the leading NUL (shown as ``@name``)."""
        return f"{self.socket_prefix}{self.index}"

    @classmethod
    def from_env(cls) -> WorkerOptions:
        """Index from ``STICKY_DISPATCH_INDEX``, else the systemd unit's instance name
        (``app@3.service`` → 3, then also set as ``STICKY_DISPATCH_INDEX`` for the app),
        else :class:`ConfigError`; prefix and users from their variables or the defaults
        the dispatcher also uses."""
        text = os.environ.get(INDEX_ENV)
        if text is not None:
            index = parse_index(text)
        else:
            instance = instance_from_cgroup(_own_cgroup())
            if instance is None:
                raise ConfigError(
                    f"no worker index: set {INDEX_ENV}, or run as an instance of a "
                    "template unit such as app@3.service"
                )
            index = parse_index(instance)
            # The app reads its index from the environment in every mode.
            os.environ[INDEX_ENV] = str(index)
        prefix = os.environ.get(SOCKET_PREFIX_ENV) or DEFAULT_SOCKET_PREFIX
        users_text = os.environ.get(DISPATCHER_USERS_ENV, "")
        users = parse_users(users_text) if users_text.strip() else default_users()
        return cls(index=index, socket_prefix=prefix, dispatcher_users=users)


def _own_cgroup() -> str:
    try:
        with open("/proc/self/cgroup") as f:
            return f.read()
    except OSError:
        return ""


def parse_index(text: str) -> int:
    """A worker index: a non-negative integer that fits the wire format's u32."""
    stripped = text.strip()
    if not stripped.isdigit() or int(stripped) >= 2**32:
        raise ConfigError(f"worker index {text!r} is not a non-negative integer")
    return int(stripped)


def instance_from_cgroup(cgroup: str) -> Optional[str]:
    """The instance name of the ``.service`` unit whose cgroup this process is in:
    ``0::/system.slice/system-app.slice/app@3.service`` → ``"3"``."""
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for unit in reversed(parts[2].split("/")):
            if unit.endswith(".service") and "@" in unit:
                instance = unit[: -len(".service")].split("@", 1)[1]
                if instance:
                    return instance
    return None


def parse_users(text: str) -> frozenset[int]:
    """``"app, 0 www-data"`` or the TOML-looking ``[0, "app"]`` → uids (names looked up)."""
    uids = set()
    for word in re.split(r"[\s,\[\]\"']+", text):
        if not word:
            continue
        if word.isdigit():
            uids.add(int(word))
            continue
        try:
            uids.add(pwd.getpwnam(word).pw_uid)
        except KeyError:
            raise ConfigError(f"{DISPATCHER_USERS_ENV}: unknown user {word!r}") from None
    return frozenset(uids)
