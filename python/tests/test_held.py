"""Held requests (WebSockets, engine.io long-polls): which requests are held, and that
the shutdown ends them (#22: a restart must not wait for socket.io sessions)."""

from __future__ import annotations

import asyncio

from sticky_dispatch._handoff import HeldRequests, is_held


def test_websockets_and_engineio_long_polls_are_held() -> None:
    assert is_held("GET", "EIO=4&transport=websocket", "websocket")
    assert is_held("GET", "", "WebSocket")
    assert is_held("GET", "EIO=4&transport=polling&t=x&sid=abc", None)
    # The handshake (no session yet) and the POSTs that send packets end by themselves.
    assert not is_held("GET", "EIO=4&transport=polling&t=x", None)
    assert not is_held("POST", "EIO=4&transport=polling&sid=abc", None)
    assert not is_held("GET", "", None)
    assert not is_held("GET", "sid=abc", "h2c")


def test_end_cancels_held_requests_and_those_that_start_later() -> None:
    async def main() -> None:
        held = HeldRequests()
        forever = asyncio.get_running_loop().create_future()
        poll = asyncio.ensure_future(asyncio.shield(forever))
        done = asyncio.ensure_future(asyncio.sleep(0))
        held.started(poll)
        held.started(done)
        held.started(None)
        await done
        assert held.end() == 1  # the finished one was forgotten
        await asyncio.wait([poll], timeout=5)
        assert poll.cancelled()
        late = asyncio.ensure_future(asyncio.sleep(10))
        held.started(late)
        await asyncio.wait([late], timeout=5)
        assert late.cancelled()
        forever.cancel()

    asyncio.run(main())
