"""Starting a worker as a converted app does: ``run_app``/``run`` with what
``aiohttp.web.run_app`` and ``uvicorn.run`` take (awaitable apps, import strings,
factories, the dispatcher's settings), in a process of its own against a fake
dispatcher; and the one-line errors and notices a newcomer sees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest
from conftest import TIMEOUT, FakeDispatcher, TcpPair

from sticky_dispatch import wire

PACKAGE = str(Path(__file__).resolve().parent.parent)


class Script:
    """``python -c SCRIPT`` as worker ``index`` with ``prefix``, its stderr collected."""

    def __init__(
        self,
        script: str,
        prefix: str,
        index: Optional[str] = "1",
        cwd: Optional[Path] = None,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.prefix = prefix
        full_env = dict(os.environ, PYTHONPATH=PACKAGE, STICKY_DISPATCH_SOCKET_PREFIX=prefix)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("STICKY_DISPATCH_INDEX", None)
        if index is not None:
            full_env["STICKY_DISPATCH_INDEX"] = index
        full_env.update(env or {})
        self.systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.systemd.bind("\0" + prefix + "notify")
        self.systemd.settimeout(TIMEOUT)
        full_env["NOTIFY_SOCKET"] = "@" + prefix + "notify"
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        try:
            message = self.systemd.recv(100)
        except socket.timeout:
            self.process.kill()
            raise AssertionError(f"never ready: {self.finish()}") from None
        assert message.startswith(b"READY=1"), message

    def finish(self) -> tuple[int, str, str]:
        """Waits (bounded) for the exit: status, stdout, stderr."""
        try:
            out, err = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.systemd.close()
        return self.process.returncode, out, err


def serve_one(prefix: str, index: int, request: bytes) -> str:
    """Links to worker ``index`` as the dispatcher, hands it one connection carrying
    ``request``, returns the answer; the link stays open (returned for the drain)."""
    dispatcher = FakeDispatcher(f"{prefix}{index}")
    dispatcher.hello(index)
    tcp = TcpPair()
    tcp.client.sendall(request)
    conn = wire.Conn(1, ("203.0.113.9", 5555), ("127.0.0.1", 80), "web")
    dispatcher.send(conn, tcp.server.fileno())
    tcp.server.close()
    assert dispatcher.recv() == wire.Ack(1)
    chunks = []
    while chunk := tcp.client.recv(4096):
        chunks.append(chunk)
    tcp.close()
    serve_one.links.append(dispatcher)  # type: ignore[attr-defined]
    return b"".join(chunks).decode()


serve_one.links = []  # type: ignore[attr-defined]


def drain(script: Script) -> tuple[int, str, str]:
    """SIGTERM, answer the DRAIN, and wait for the exit."""
    script.process.send_signal(signal.SIGTERM)
    dispatcher: FakeDispatcher = serve_one.links.pop()  # type: ignore[attr-defined]
    assert dispatcher.recv() == wire.Drain()
    dispatcher.send(wire.Drained(1))
    result = script.finish()
    dispatcher.close()
    return result


GET = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def test_aiohttp_run_app_takes_init_app_and_says_where_port_went(prefix: str) -> None:
    """python-socketio's examples end in ``web.run_app(init_app(), port=5000)``."""
    script = Script(
        """
        from aiohttp import web
        import sticky_dispatch.aiohttp

        async def index(request):
            return web.Response(text=f"remote={request.remote}")

        async def init_app():
            app = web.Application()
            app.router.add_get("/", index)
            return app

        sticky_dispatch.aiohttp.run_app(init_app(), host="0.0.0.0", port=5000)
        """,
        prefix,
    )
    script.wait_ready()
    answer = serve_one(prefix, 1, GET)
    status, out, err = drain(script)
    assert status == 0, err
    assert answer.startswith("HTTP/1.1 200"), answer
    assert answer.endswith("remote=203.0.113.9"), answer
    warnings = [line for line in err.splitlines() if "ignored" in line]
    assert warnings == [
        "sticky_dispatch: sticky_dispatch.aiohttp.run_app: host='0.0.0.0', port=5000 are "
        "ignored: the dispatcher listens (standalone: sticky-dispatch --listen ADDR; under "
        "systemd: ListenStream= in sticky-dispatch.socket) and hands this worker its "
        f"connections over the link socket @{prefix}1. Remove host=, port= to silence this."
    ], err
    # Never passed on to aiohttp's request handler.
    assert "custom kwargs" not in err, err
    # aiohttp's banner, saying where connections come from instead of a port.
    assert out.splitlines()[0] == (
        f"======== Running as worker 1 of sticky-dispatch (http, connections from "
        f"@{prefix}1) ========"
    ), out


def test_aiohttp_run_app_refuses_what_web_run_app_refuses(prefix: str) -> None:
    from aiohttp import web

    import sticky_dispatch.aiohttp

    with pytest.raises(TypeError):
        sticky_dispatch.aiohttp.run_app(web.Application(), porrt=5000)  # type: ignore[call-arg]


UVICORN_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"client={scope['client'][0]}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})

def create_app():
    return app
"""


@pytest.mark.parametrize(
    "call",
    [
        'run("asgiapp:app", host="0.0.0.0", port=8000, workers=4, reload=True, app_dir=APP_DIR)',
        'run("asgiapp:create_app", factory=True, app_dir=APP_DIR)',
    ],
)
def test_uvicorn_run_takes_import_strings_and_factories(
    prefix: str, tmp_path: Path, call: str
) -> None:
    (tmp_path / "asgiapp.py").write_text(UVICORN_APP)
    script = Script(
        f"""
        from sticky_dispatch.uvicorn import run
        APP_DIR = {str(tmp_path)!r}
        {call}
        """,
        prefix,
        index="3",
    )
    script.wait_ready()
    answer = serve_one(prefix, 3, GET)
    status, _, err = drain(script)
    assert status == 0, err
    assert answer.startswith("HTTP/1.1 200"), answer
    assert "\r\n\r\n12\r\nclient=203.0.113.9\r\n" in answer, answer
    warnings = [line for line in err.splitlines() if "ignored" in line]
    if "port" in call:
        assert warnings == [
            "sticky_dispatch: sticky_dispatch.uvicorn.run: host='0.0.0.0', port=8000 are "
            "ignored: the dispatcher listens (standalone: sticky-dispatch --listen ADDR; "
            "under systemd: ListenStream= in sticky-dispatch.socket) and hands this worker "
            f"its connections over the link socket @{prefix}3; workers=4 is ignored: the "
            "dispatcher runs one process per worker index (standalone: sticky-dispatch "
            "--workers N; under systemd: workers = N in /etc/sticky-dispatch/config.toml); "
            "reload=True is ignored: nothing watches the code here: to load new code, "
            "restart the workers (standalone: stop and start sticky-dispatch; under "
            "systemd: systemctl restart app@N, one at a time). "
            "Remove host=, port=, workers=, reload= to silence this."
        ], err
    else:
        assert warnings == [], err


AIOHTTP_MAIN = """
from aiohttp import web
import sticky_dispatch.aiohttp
sticky_dispatch.aiohttp.run_app(web.Application())
"""

NOT_IN_A_TEMPLATE_UNIT = """
import sticky_dispatch.options
sticky_dispatch.options._own_cgroup = lambda: "0::/user.slice/session-1.scope\\n"
"""
"""Makes the worker's process look outside a template unit's instance (no index from the
unit's name) wherever the test runs: it skipped inside one."""


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (
            "three",
            "sticky_dispatch: cannot start the worker: worker index 'three' is not a "
            "non-negative integer",
        ),
        (
            None,
            "sticky_dispatch: cannot start the worker: no worker index: set "
            "STICKY_DISPATCH_INDEX, or run as an instance of a template unit such as "
            "app@3.service",
        ),
    ],
)
def test_a_missing_or_bad_index_is_one_line_and_status_78(
    prefix: str, index: Optional[str], expected: str
) -> None:
    script = AIOHTTP_MAIN if index is not None else NOT_IN_A_TEMPLATE_UNIT + AIOHTTP_MAIN
    status, _, err = Script(script, prefix, index=index).finish()
    assert (status, err.strip()) == (78, expected)


def test_a_taken_link_socket_is_one_line_naming_socket_prefix(prefix: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as squatter:
        squatter.bind("\0" + prefix + "1")
        status, _, err = Script(AIOHTTP_MAIN, prefix).finish()
    assert status == 1, err
    assert err.strip() == (
        f"sticky_dispatch: cannot start the worker: the link socket @{prefix}1 is in use: "
        "worker 1 is already running, or another app on this host uses the same "
        f"socket_prefix {prefix!r}; give each app its own (socket_prefix in the "
        "dispatcher's config, STICKY_DISPATCH_SOCKET_PREFIX for its workers)"
    )


def test_a_worker_nobody_links_to_says_so_once(prefix: str) -> None:
    """After NO_DISPATCHER_NOTICE (shortened here) without a link: one line saying how
    to start a dispatcher; it keeps waiting, and a link after that works."""
    script = Script(
        """
        from aiohttp import web
        import sticky_dispatch.aiohttp, sticky_dispatch.worker
        sticky_dispatch.worker.NO_DISPATCHER_NOTICE = 0.2
        async def index(request):
            return web.Response(text="hi")
        app = web.Application()
        app.router.add_get("/", index)
        sticky_dispatch.aiohttp.run_app(app, print=None)
        """,
        prefix,
    )
    script.wait_ready()
    assert script.process.stderr is not None
    deadline = time.monotonic() + TIMEOUT
    lines = []
    while time.monotonic() < deadline:  # the command in the notice spans lines (-c SCRIPT)
        line = script.process.stderr.readline()
        lines.append(line)
        if not line or "(STICKY_DISPATCH_SOCKET_PREFIX)" in line:
            break
    notice = "".join(lines[next(i for i, t in enumerate(lines) if "no dispatcher" in t) :])
    assert notice.startswith(
        f"sticky_dispatch: no dispatcher has connected to this worker's link socket "
        f"@{prefix}1 within 0.2 s; the worker serves only what a dispatcher hands it. If "
        "none is running, start one that runs this command as its workers: sticky-dispatch "
        f"--listen 127.0.0.1:8080 --workers 4 -- {sys.executable} -c "
    ), lines
    assert notice.rstrip().endswith(
        "(or, under systemd, systemctl start sticky-dispatch.socket); its socket_prefix "
        f"must be {prefix!r}, as here (STICKY_DISPATCH_SOCKET_PREFIX)"
    ), lines
    answer = serve_one(prefix, 1, GET)
    status, _, err = drain(script)
    assert answer.endswith("hi"), answer
    assert status == 0, err
    assert "no dispatcher" not in err, err
