"""Shared by the test apps: the `worker=... pid=... client=...` line and the direct socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional


def who(client: Optional[str]) -> str:
    """The line the demo worker greets with; the tests parse it."""
    index = os.environ.get("STICKY_DISPATCH_INDEX", "-")
    return f"worker={index} pid={os.getpid()} client={client or '-'}"


def direct_socket(address: str) -> socket.socket:
    """A listening socket on ADDR shared by several processes (SO_REUSEPORT): the kernel
    spreads connections over them with no stickiness, the failure the tests show."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    return sock


# The page a person opens in a browser (GET / with Accept: text/html; curl and the tests
# get the `worker=...` line). The socket.io client comes from this app at
# /socket.io.min.js when a copy is at hand (CHAT_SOCKETIO_CLIENT_JS, or npm's under
# tests/node after `npm ci --prefix tests/node`), else from socket.io's own CDN.
_REPO = Path(__file__).resolve().parents[2]
CLIENT_JS_CDN = "https://cdn.socket.io/4.8.1/socket.io.min.js"


def client_js_path() -> Optional[Path]:
    """A local socket.io client to serve at /socket.io.min.js, if any."""
    named = os.environ.get("CHAT_SOCKETIO_CLIENT_JS")
    npm = _REPO / "tests/node/node_modules/socket.io-client/dist/socket.io.min.js"
    for path in (Path(named) if named else None, npm):
        if path is not None and path.is_file():
            return path
    return None


def wants_html(accept: Optional[str]) -> bool:
    return "text/html" in (accept or "")


def chat_page() -> str:
    src = "/socket.io.min.js" if client_js_path() is not None else CLIENT_JS_CDN
    return _PAGE.replace("CLIENT_JS", src)


_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>sticky-dispatch chat</title>
<style>body { font: 16px sans-serif; margin: 2em; } #log { white-space: pre-line; }</style>
<h1>sticky-dispatch chat</h1>
<p id="who">connecting...</p>
<form id="form"><input id="text" autocomplete="off" placeholder="say something">
<button>send</button></form>
<p>Messages go to everyone in room <b>lobby</b> on the same worker (each worker keeps its
own rooms; tests/python/broadcast_aiohttp.py reaches all workers through Redis).</p>
<div id="log"></div>
<script src="CLIENT_JS"></script>
<script>
  const socket = io();
  const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
  socket.on("hello", (line) => {
    document.getElementById("who").textContent = "connected: " + line;
    socket.emit("join", "lobby", (ack) => log("joined lobby on " + ack));
  });
  socket.on("message", (m) => log(`[worker ${m.worker}] ${m.from.slice(0, 6)}: ${m.text}`));
  socket.on("disconnect", (reason) => log("disconnected: " + reason));
  document.getElementById("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("text");
    if (input.value) socket.emit("message", { room: "lobby", text: input.value });
    input.value = "";
  });
</script>
"""
