"""Index, socket prefix and dispatcher users from the environment; sd_notify."""

from __future__ import annotations

import os
import socket

import pytest

from sticky_dispatch import notify as notify_module
from sticky_dispatch.options import (
    ConfigError,
    WorkerOptions,
    instance_from_cgroup,
    parse_index,
    parse_users,
)


def test_instance_comes_from_the_unit_in_the_cgroup() -> None:
    assert instance_from_cgroup("0::/system.slice/system-app.slice/app@3.service\n") == "3"
    hybrid = (
        "12:pids:/system.slice/system-app.slice/app@11.service\n"
        "1:name=systemd:/system.slice/system-app.slice/app@11.service\n"
        "0::/system.slice/system-app.slice/app@11.service\n"
    )
    assert instance_from_cgroup(hybrid) == "11"
    assert instance_from_cgroup("0::/user.slice/session-1.scope\n") is None
    assert instance_from_cgroup("0::/system.slice/app.service\n") is None
    assert instance_from_cgroup("0::/system.slice/app@.service\n") is None
    assert instance_from_cgroup("") is None


def test_index_must_be_a_u32() -> None:
    assert parse_index(" 7\n") == 7
    for bad in ["-1", "x", "", "4294967296", "1.5"]:
        with pytest.raises(ConfigError):
            parse_index(bad)


def test_users_parse_from_names_and_uids() -> None:
    assert parse_users("root, 1000 2") == {0, 1000, 2}
    assert parse_users('[0, "root"]') == {0}
    with pytest.raises(ConfigError, match="no-such-user-here"):
        parse_users("no-such-user-here")


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKY_DISPATCH_INDEX", "5")
    monkeypatch.setenv("STICKY_DISPATCH_SOCKET_PREFIX", "p/")
    monkeypatch.delenv("STICKY_DISPATCH_DISPATCHER_USERS", raising=False)
    options = WorkerOptions.from_env()
    assert (options.index, options.socket_name) == (5, "p/5")
    assert options.dispatcher_users == {os.geteuid(), 0}
    monkeypatch.setenv("STICKY_DISPATCH_DISPATCHER_USERS", "1234")
    monkeypatch.delenv("STICKY_DISPATCH_SOCKET_PREFIX")
    options = WorkerOptions.from_env()
    assert options.dispatcher_users == {1234}
    assert options.socket_name == "sticky-dispatch/5"


def test_the_index_from_the_unit_name_is_given_to_the_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sticky_dispatch import options as options_module

    # setenv first, so that the variable from_env sets is undone after the test.
    monkeypatch.setenv("STICKY_DISPATCH_INDEX", "-")
    monkeypatch.delenv("STICKY_DISPATCH_INDEX")
    monkeypatch.setattr(
        options_module, "_own_cgroup", lambda: "0::/system.slice/system-app.slice/app@7.service\n"
    )
    assert WorkerOptions.from_env().index == 7
    assert os.environ["STICKY_DISPATCH_INDEX"] == "7"


def test_no_index_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sticky_dispatch import options as options_module

    monkeypatch.delenv("STICKY_DISPATCH_INDEX", raising=False)
    # Not in a template unit's instance, wherever the test runs (it skipped there).
    monkeypatch.setattr(options_module, "_own_cgroup", lambda: "0::/user.slice/session-1.scope\n")
    with pytest.raises(ConfigError, match="STICKY_DISPATCH_INDEX"):
        WorkerOptions.from_env()


@pytest.mark.parametrize("abstract", [True, False])
def test_notify_reaches_path_and_abstract_sockets(
    abstract: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        if abstract:
            name = f"sticky-dispatch-pytest-notify-{os.getpid()}"
            systemd.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = os.path.join(tmp_path, "notify")
            systemd.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
        systemd.settimeout(5)
        assert notify_module.notify("READY=1")
        assert systemd.recv(100) == b"READY=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify_module.notify("READY=1")
