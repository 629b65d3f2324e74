"""The wire format against the shared vectors (the Rust suite reads the same file)."""

from __future__ import annotations

import json
import typing
from typing import Any, Optional

import pytest
from conftest import VECTORS

from sticky_dispatch import wire


def _addr(text: Optional[str]) -> Optional[wire.Address]:
    if text is None:
        return None
    host, port = text.rsplit(":", 1)
    return (host.strip("[]"), int(port))


def _message(fields: dict[str, Any]) -> wire.Message:
    kind = fields["type"]
    if kind == "HELLO":
        role = wire.Role[fields["role"].upper()]
        return wire.Hello(role, fields["index"], fields["pid"], fields.get("features"))
    if kind == "CONN":
        return wire.Conn(
            fields["seq"], _addr(fields["peer"]), _addr(fields["local"]), fields["listener"]
        )
    if kind == "ACK":
        return wire.Ack(fields["seq"])
    if kind == "DRAIN":
        return wire.Drain()
    if kind == "CHANNEL":
        return wire.Channel()
    if kind == "LANE":
        return wire.Lane(fields["backlog"], _addr(fields["local"]), fields["listener"])
    if kind == "LANES":
        return wire.Lanes(fields["count"])
    if kind == "ACCEPTED":
        return wire.Accepted(fields["count"])
    assert kind == "DRAINED", kind
    return wire.Drained(fields["last_seq"])


VECTOR_DATA = json.loads(VECTORS.read_text())


@pytest.mark.parametrize("vector", VECTOR_DATA["valid"], ids=lambda v: v["name"])
def test_valid_vectors_encode_and_decode_exactly(vector: dict[str, Any]) -> None:
    message = _message(vector["message"])
    assert wire.encode(message).hex() == vector["hex"]
    assert wire.decode(bytes.fromhex(vector["hex"])) == message


@pytest.mark.parametrize("vector", VECTOR_DATA["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode(bytes.fromhex(vector["hex"]))


def test_every_message_type_has_a_vector() -> None:
    """The types as wire.py defines them (its type bytes and its message classes), not a
    list kept by hand: a type added to the code without a vector fails here."""
    by_byte = set(wire._NAMES.values())
    by_class = {kind.__name__.upper() for kind in typing.get_args(wire.Message)}
    assert by_byte == by_class
    assert {v["message"]["type"] for v in VECTOR_DATA["valid"]} == by_byte


def test_every_hello_role_has_a_vector() -> None:
    roles = {v["message"]["role"] for v in VECTOR_DATA["valid"] if v["message"]["type"] == "HELLO"}
    assert roles == {role.name.lower() for role in wire.Role}


def test_a_hello_with_and_without_the_features_byte_has_a_vector() -> None:
    hellos = [v["message"] for v in VECTOR_DATA["valid"] if v["message"]["type"] == "HELLO"]
    assert any("features" in hello for hello in hellos)
    assert any("features" not in hello for hello in hellos)


@pytest.mark.parametrize(
    "message",
    [
        wire.Conn(5, ("::1", 1), ("10.0.0.1", 2), "x"),
        wire.Lane(4096, ("::1", 8080), "http"),
        wire.Lane(1, ("10.0.0.1", 80), "é"),
    ],
    ids=repr,
)
def test_every_prefix_of_a_message_with_addresses_is_refused_cleanly(
    message: wire.Message,
) -> None:
    data = wire.encode(message)
    assert wire.decode(data) == message
    for cut in range(len(data)):
        with pytest.raises(wire.DecodeError):
            wire.decode(data[:cut])


def test_a_lane_with_a_bad_address_family_or_name_is_refused() -> None:
    with pytest.raises(wire.DecodeError, match="address family 5"):
        wire.decode(bytes.fromhex("0107000000010500"))
    with pytest.raises(wire.DecodeError, match="not UTF-8"):
        wire.decode(bytes.fromhex("010700000001" + "00" + "01ff"))


@pytest.mark.parametrize(
    "message",
    [wire.Conn(1, None, None, "é" * 200), wire.Lane(1, None, "é" * 200)],
    ids=["CONN", "LANE"],
)
def test_long_listener_names_are_cut_at_a_character_boundary(
    message: typing.Union[wire.Conn, wire.Lane],
) -> None:
    data = wire.encode(message)
    decoded = wire.decode(data)
    assert isinstance(decoded, type(message))
    assert decoded.listener == "é" * 127
    assert len(data) <= wire.MAX_MESSAGE
