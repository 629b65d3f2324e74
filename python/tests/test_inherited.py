"""A listening link socket passed down by ``sticky-dispatch worker-launcher``
(``STICKY_DISPATCH_LINK_FD``): taken instead of binding, the variable unset, and anything
else refused with a message that says what is wrong, the fd left open."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from sticky_dispatch.options import LINK_FD_ENV, ConfigError
from sticky_dispatch.worker import take_inherited_link

NAME = f"sticky-dispatch-pytest/{os.getpid()}/inherited/0"


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind("\0" + NAME)
    sock.listen(4)
    yield sock
    sock.close()


def test_without_the_variable_nothing_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LINK_FD_ENV, raising=False)
    assert take_inherited_link(NAME) is None


def test_the_passed_socket_is_taken_and_the_variable_unset(
    monkeypatch: pytest.MonkeyPatch, listening: socket.socket
) -> None:
    copy = os.dup(listening.fileno())
    monkeypatch.setenv(LINK_FD_ENV, str(copy))
    taken = take_inherited_link(NAME)
    assert taken is not None
    assert LINK_FD_ENV not in os.environ
    assert taken.fileno() == copy
    assert not taken.get_inheritable()
    assert not taken.getblocking()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dispatcher:
        dispatcher.connect("\0" + NAME)
        taken.setblocking(True)
        link, _ = taken.accept()
        link.close()
    taken.close()
    # Closing our copy leaves the name to whoever else holds the socket.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as again:
        again.connect("\0" + NAME)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("three", "'three' is not a file descriptor number"),
        ("1", "fd 1 is a standard stream"),
        ("987", "fd 987 is not an open socket"),
    ],
)
def test_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch, value: str, why: str) -> None:
    monkeypatch.setenv(LINK_FD_ENV, value)
    with pytest.raises(ConfigError, match=why):
        take_inherited_link(NAME)
    assert LINK_FD_ENV not in os.environ


def test_another_name_or_a_socket_that_does_not_listen_is_refused_and_left_open(
    monkeypatch: pytest.MonkeyPatch, listening: socket.socket
) -> None:
    monkeypatch.setenv(LINK_FD_ENV, str(listening.fileno()))
    with pytest.raises(ConfigError, match=f"bound to @{NAME}, not to @other/0"):
        take_inherited_link("other/0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as quiet:
        quiet.bind("\0" + NAME + "/quiet")
        monkeypatch.setenv(LINK_FD_ENV, str(quiet.fileno()))
        with pytest.raises(ConfigError, match="is not listening"):
            take_inherited_link(NAME + "/quiet")
        assert quiet.fileno() >= 0
        os.fstat(quiet.fileno())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        monkeypatch.setenv(LINK_FD_ENV, str(tcp.fileno()))
        with pytest.raises(ConfigError, match="not an AF_UNIX SOCK_SEQPACKET socket"):
            take_inherited_link(NAME)
        os.fstat(tcp.fileno())
    os.fstat(listening.fileno())
