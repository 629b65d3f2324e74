"""The hand-off link's message format, version 1: pure encoding and decoding.

Written from the protocol's description (``docs/protocol.md``), not from the Rust code,
so that the shared test vectors (``tests/vectors/wire-v1.json``) check two independent
readings of the same text. Every message is one ``SOCK_SEQPACKET`` datagram of at most
:data:`MAX_MESSAGE` bytes, integers big-endian: version byte, type byte, then the body.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Union

VERSION = 1
"""The protocol version this package speaks."""
MAX_MESSAGE = 512
"""No valid message is longer: a receive buffer of this size never truncates one."""

HELLO, CONN, ACK, DRAIN, DRAINED, CHANNEL, LANE, LANES, ACCEPTED = 1, 2, 3, 4, 5, 6, 7, 8, 9

FEATURE_LANES = 1
"""HELLO features bit 0: the worker serves lanes (LANE, LANES, ACCEPTED)."""

Address = tuple[str, int]
"""``(host, port)`` as Python's sockets spell an IPv4 peer; IPv6 hosts are compressed."""


class Role(IntEnum):
    """Which end of the link sent a HELLO."""

    DISPATCHER = 0
    WORKER = 1
    NODE_WORKER = 2
    """A ``node-worker`` bridge: it sends CHANNEL next (this package never does)."""


@dataclass(frozen=True)
class Hello:
    """First message each way: who is speaking, for which worker index."""

    role: Role
    index: int
    pid: int
    features: Optional[int] = None
    """A worker's optional features byte (:data:`FEATURE_LANES`); None: the 9-byte HELLO
    without it."""


@dataclass(frozen=True)
class Conn:
    """A client connection; exactly one fd travels beside it (SCM_RIGHTS)."""

    seq: int
    peer: Optional[Address]
    local: Optional[Address]
    listener: str


@dataclass(frozen=True)
class Ack:
    """Cumulative: every CONN up to and including ``seq`` was received."""

    seq: int


@dataclass(frozen=True)
class Drain:
    """The worker is stopping: send nothing new."""


@dataclass(frozen=True)
class Drained:
    """Answer to DRAIN: ``last_seq`` is the last CONN sent on this link (0 if none)."""

    last_seq: int


@dataclass(frozen=True)
class Channel:
    """A ``node-worker`` bridge passes its Node.js process's IPC channel (one fd beside it)
    to the dispatcher. Decoded here so the codec is whole; a Python worker never sends it,
    and the dispatcher never sends it to a worker."""


@dataclass(frozen=True)
class Lane:
    """One of this worker's lanes: a listening TCP socket (one fd beside it) that the
    kernel routes this worker's clients to, for the worker to accept on itself."""

    backlog: int
    """The listen backlog: a server that calls ``listen()`` on the lane again passes this."""
    local: Optional[Address]
    """The address the lane is bound to."""
    listener: str
    """The name of the dispatcher's listener the lane belongs to."""


@dataclass(frozen=True)
class Lanes:
    """The LANEs sent since the HELLOs are all of this worker's lanes (0: none)."""

    count: int


@dataclass(frozen=True)
class Accepted:
    """Connections this worker process has accepted on its lanes since it started."""

    count: int


Message = Union[Hello, Conn, Ack, Drain, Drained, Channel, Lane, Lanes, Accepted]

_NAMES = {
    HELLO: "HELLO",
    CONN: "CONN",
    ACK: "ACK",
    DRAIN: "DRAIN",
    DRAINED: "DRAINED",
    CHANNEL: "CHANNEL",
    LANE: "LANE",
    LANES: "LANES",
    ACCEPTED: "ACCEPTED",
}


class DecodeError(ValueError):
    """A datagram that is not a valid v1 message; the link carrying it is closed."""


def encode(message: Message) -> bytes:
    """One datagram for ``message``.

    Listener names longer than 255 bytes are cut at a character boundary: they are
    labels for logs, and the length field is one byte.
    """
    if isinstance(message, Hello):
        hello = struct.pack(">BBBII", VERSION, HELLO, int(message.role), message.index, message.pid)
        return hello if message.features is None else hello + bytes([message.features])
    if isinstance(message, Conn):
        return b"".join(
            [
                struct.pack(">BBQ", VERSION, CONN, message.seq),
                _encode_addr(message.peer),
                _encode_addr(message.local),
                _encode_name(message.listener),
            ]
        )
    if isinstance(message, Lane):
        return b"".join(
            [
                struct.pack(">BBI", VERSION, LANE, message.backlog),
                _encode_addr(message.local),
                _encode_name(message.listener),
            ]
        )
    if isinstance(message, Lanes):
        return bytes([VERSION, LANES, message.count])
    if isinstance(message, Accepted):
        return struct.pack(">BBQ", VERSION, ACCEPTED, message.count)
    if isinstance(message, Ack):
        return struct.pack(">BBQ", VERSION, ACK, message.seq)
    if isinstance(message, Drain):
        return bytes([VERSION, DRAIN])
    if isinstance(message, Channel):
        return bytes([VERSION, CHANNEL])
    return struct.pack(">BBQ", VERSION, DRAINED, message.last_seq)


def _encode_name(name: str) -> bytes:
    data = name.encode()[:255].decode(errors="ignore").encode()
    return bytes([len(data)]) + data


def _encode_addr(addr: Optional[Address]) -> bytes:
    if addr is None:
        return b"\x00"
    if ":" in addr[0]:
        return b"\x06" + socket.inet_pton(socket.AF_INET6, addr[0]) + struct.pack(">H", addr[1])
    return b"\x04" + socket.inet_pton(socket.AF_INET, addr[0]) + struct.pack(">H", addr[1])


_LAYOUTS = {fmt: struct.Struct(fmt) for fmt in (">H", ">I", ">Q")}


class _Reader:
    """A cursor over one datagram; reading past its end raises :class:`DecodeError`."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 2
        self.name = name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DecodeError(f"malformed {self.name} message: ends early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        layout = _LAYOUTS[fmt]
        (value,) = layout.unpack(self.take(layout.size))
        return int(value)

    def addr(self) -> Optional[Address]:
        family = self.take(1)[0]
        if family == 0:
            return None
        size = _ADDR_LENGTHS.get(family)
        if size is None:
            raise DecodeError(f"malformed {self.name} message: address family {family}")
        host = socket.inet_ntop(_FAMILIES[family], self.take(size))
        return (host, self.unpack(">H"))

    def listener(self) -> str:
        try:
            return self.take(self.take(1)[0]).decode()
        except UnicodeDecodeError:
            raise DecodeError(
                f"malformed {self.name} message: listener name is not UTF-8"
            ) from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(
                f"malformed {self.name} message: {len(self.data) - self.pos} trailing bytes"
            )


_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ADDR_LENGTHS = {4: 4, 6: 16}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _decode_conn(data: bytes) -> Conn:
    """CONN, one per connection: decoded by offsets rather than with :class:`_Reader`
    (half the time)."""
    end = len(data)
    try:
        (seq,) = _U64.unpack_from(data, 2)
        pos = 10
        addrs: list[Optional[Address]] = []
        for _ in range(2):
            family = data[pos]
            if family == 0:
                addrs.append(None)
                pos += 1
                continue
            size = _ADDR_LENGTHS.get(family)
            if size is None:
                raise DecodeError(f"malformed CONN message: address family {family}")
            port_at = pos + 1 + size
            if port_at + 2 > end:
                raise IndexError
            # inet_ntop: the spelling Python's sockets use for peer addresses (and fast).
            host = socket.inet_ntop(_FAMILIES[family], data[pos + 1 : port_at])
            addrs.append((host, _U16.unpack_from(data, port_at)[0]))
            pos = port_at + 2
        name_end = pos + 1 + data[pos]
    except (IndexError, struct.error):
        raise DecodeError("malformed CONN message: ends early") from None
    if name_end > end:
        raise DecodeError("malformed CONN message: ends early")
    if name_end < end:
        raise DecodeError(f"malformed CONN message: {end - name_end} trailing bytes")
    try:
        listener = data[pos + 1 : name_end].decode()
    except UnicodeDecodeError:
        raise DecodeError("malformed CONN message: listener name is not UTF-8") from None
    return Conn(seq, addrs[0], addrs[1], listener)


def decode(data: bytes) -> Message:
    """Decodes one datagram, or raises :class:`DecodeError` saying what is wrong."""
    if len(data) > 1 and data[0] == VERSION and data[1] == CONN:
        return _decode_conn(data)
    if not data:
        raise DecodeError("empty message")
    if data[0] != VERSION:
        raise DecodeError(f"unsupported protocol version {data[0]} (this worker speaks {VERSION})")
    if len(data) < 2:
        raise DecodeError("malformed message: no type byte")
    kind = data[1]
    if kind not in _NAMES:
        raise DecodeError(f"unknown message type {kind}")
    r = _Reader(data, _NAMES[kind])
    message: Message
    if kind == HELLO:
        role = r.take(1)[0]
        if role not in set(Role):
            raise DecodeError(f"malformed HELLO message: role {role}")
        index, pid = r.unpack(">I"), r.unpack(">I")
        # A worker's HELLO may carry one more byte, its features.
        features = r.take(1)[0] if r.pos < len(data) else None
        message = Hello(Role(role), index, pid, features)
    elif kind == ACK:
        message = Ack(r.unpack(">Q"))
    elif kind == DRAIN:
        message = Drain()
    elif kind == CHANNEL:
        message = Channel()
    elif kind == LANE:
        message = Lane(r.unpack(">I"), r.addr(), r.listener())
    elif kind == LANES:
        message = Lanes(r.take(1)[0])
    elif kind == ACCEPTED:
        message = Accepted(r.unpack(">Q"))
    else:
        message = Drained(r.unpack(">Q"))
    r.end()
    return message
