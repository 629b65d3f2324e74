"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("sticky_dispatch")


def notify(state: str) -> bool:
    """Sends ``state`` (``"READY=1"``, ``"STOPPING=1"``, ...) to systemd.

    Returns False when not run by systemd (no ``NOTIFY_SOCKET``) or when the send fails;
    a worker must run without systemd too, so this never raises.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    # "@name" is an abstract socket: the kernel spells it with a leading NUL.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as err:
        log.warning("could not notify systemd (%s): %s", path, err)
        return False
