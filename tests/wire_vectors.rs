//! The Rust dispatcher's wire format against the shared vectors in
//! `tests/vectors/wire-v1.json`, which the Python worker's suite (`python/tests/test_wire.py`)
//! reads too: both must encode every valid message to exactly these bytes, decode them
//! to exactly these fields, and refuse every invalid datagram.

use std::net::SocketAddr;

use serde_json::Value;
use sticky_dispatch::wire::{Conn, Lane, Message, Role};

/// The vector fields the tests read; each panics, naming what it wanted, on a malformed
/// vector file.
trait Field {
    fn get_field(&self, key: &str) -> &Value;
    fn text(&self) -> &str;
    fn number(&self) -> u64;
    fn items(&self) -> &[Value];
    fn addr(&self) -> Option<SocketAddr>;
}

impl Field for Value {
    fn get_field(&self, key: &str) -> &Value {
        self.get(key)
            .unwrap_or_else(|| panic!("no {key:?} in {self}"))
    }
    fn text(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self}"))
    }
    fn number(&self) -> u64 {
        self.as_u64()
            .unwrap_or_else(|| panic!("not an unsigned integer: {self}"))
    }
    fn items(&self) -> &[Value] {
        self.as_array()
            .unwrap_or_else(|| panic!("not an array: {self}"))
    }
    fn addr(&self) -> Option<SocketAddr> {
        match self {
            Value::Null => None,
            other => Some(other.text().parse().unwrap()),
        }
    }
}

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wire-v1.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the vector file is JSON")
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn message(fields: &Value) -> Message {
    match fields.get_field("type").text() {
        "HELLO" => Message::Hello {
            role: match fields.get_field("role").text() {
                "dispatcher" => Role::Dispatcher,
                "worker" => Role::Worker,
                "node_worker" => Role::NodeWorker,
                other => panic!("role {other}"),
            },
            index: fields.get_field("index").number().try_into().unwrap(),
            pid: fields.get_field("pid").number().try_into().unwrap(),
            features: fields
                .get("features")
                .map_or(0, |f| f.number().try_into().unwrap()),
        },
        "CONN" => Message::Conn(Conn {
            seq: fields.get_field("seq").number(),
            peer: fields.get_field("peer").addr(),
            local: fields.get_field("local").addr(),
            listener: fields.get_field("listener").text().to_owned(),
        }),
        "ACK" => Message::Ack {
            seq: fields.get_field("seq").number(),
        },
        "DRAIN" => Message::Drain,
        "CHANNEL" => Message::Channel,
        "DRAINED" => Message::Drained {
            last_seq: fields.get_field("last_seq").number(),
        },
        "LANE" => Message::Lane(Lane {
            backlog: fields.get_field("backlog").number().try_into().unwrap(),
            local: fields.get_field("local").addr(),
            listener: fields.get_field("listener").text().to_owned(),
        }),
        "LANES" => Message::Lanes {
            count: fields.get_field("count").number().try_into().unwrap(),
        },
        "ACCEPTED" => Message::Accepted {
            count: fields.get_field("count").number(),
        },
        other => panic!("message type {other}"),
    }
}

#[test]
fn every_valid_vector_encodes_and_decodes_exactly() {
    let vectors = vectors();
    let valid = vectors.get_field("valid").items();
    let mut types = std::collections::BTreeSet::new();
    for vector in valid {
        let name = vector.get_field("name").text();
        let expected = message(vector.get_field("message"));
        types.insert(
            vector
                .get_field("message")
                .get_field("type")
                .text()
                .to_owned(),
        );
        let bytes = hex(vector.get_field("hex").text());
        let mut encoded = Vec::new();
        expected.encode(&mut encoded);
        assert_eq!(encoded, bytes, "{name}: encoding differs");
        assert_eq!(
            Message::decode(&bytes),
            Ok(expected),
            "{name}: decoding differs"
        );
    }
    assert_eq!(
        types,
        types_in_the_code(),
        "every message type has a vector"
    );
    println!("{} valid vectors agree", valid.len());
}

/// The message types `wire` knows, from the code itself: every type byte whose bare
/// header decodes, or is refused for its body rather than its type.
fn types_in_the_code() -> std::collections::BTreeSet<String> {
    use sticky_dispatch::wire::DecodeError;
    (0..=u8::MAX)
        .filter_map(
            |kind| match Message::decode(&[sticky_dispatch::wire::VERSION, kind]) {
                Ok(message) => Some(message.kind().to_owned()),
                Err(DecodeError::Malformed(name)) => Some(name.to_owned()),
                Err(_) => None,
            },
        )
        .collect()
}

#[test]
fn every_hello_role_has_a_vector() {
    let vectors = vectors();
    let in_vectors: std::collections::BTreeSet<u8> = vectors
        .get_field("valid")
        .items()
        .iter()
        .filter_map(|vector| match message(vector.get_field("message")) {
            Message::Hello { role, .. } => Some(role.byte()),
            _ => None,
        })
        .collect();
    let in_code: std::collections::BTreeSet<u8> = (0..=u8::MAX)
        .filter(|b| Role::from_byte(*b).is_some())
        .collect();
    assert_eq!(in_vectors, in_code);
}

#[test]
fn every_invalid_vector_is_refused() {
    let vectors = vectors();
    let invalid = vectors.get_field("invalid").items();
    for vector in invalid {
        let name = vector.get_field("name").text();
        let bytes = hex(vector.get_field("hex").text());
        assert!(
            Message::decode(&bytes).is_err(),
            "{name}: {bytes:02x?} was accepted as {:?}",
            Message::decode(&bytes)
        );
    }
    println!("{} invalid vectors refused", invalid.len());
}
