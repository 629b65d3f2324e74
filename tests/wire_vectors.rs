//! The Rust dispatcher's wire format against the shared vectors in
//! `tests/vectors/wire-v1.json`, which the Python worker's suite (`python/tests/test_wire.py`)
//! reads too: both must encode every valid message to exactly these bytes, decode them
//! to exactly these fields, and refuse every invalid datagram.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sticky_dispatch::wire::{Conn, Message, Role};

/// Just enough JSON for the vector file (no JSON crate among the dependencies).
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// Numbers kept as text: u64::MAX does not survive an f64.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn parse(text: &str) -> Json {
        let mut parser = Parser {
            text: text.as_bytes(),
            pos: 0,
        };
        let value = parser.value();
        parser.skip_space();
        assert_eq!(parser.pos, parser.text.len(), "trailing text in the JSON");
        value
    }

    fn skip_space(&mut self) {
        while self.pos < self.text.len() && self.text[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) {
        self.skip_space();
        assert_eq!(
            self.text.get(self.pos),
            Some(&byte),
            "expected {:?} at byte {}",
            byte as char,
            self.pos
        );
        self.pos += 1;
    }

    fn value(&mut self) -> Json {
        self.skip_space();
        match self.text[self.pos] {
            b'{' => {
                self.pos += 1;
                let mut object = BTreeMap::new();
                self.skip_space();
                if self.text[self.pos] == b'}' {
                    self.pos += 1;
                    return Json::Object(object);
                }
                loop {
                    self.skip_space();
                    let Json::Str(key) = self.value() else {
                        panic!("object key is not a string at byte {}", self.pos)
                    };
                    self.eat(b':');
                    object.insert(key, self.value());
                    self.skip_space();
                    self.pos += 1;
                    match self.text[self.pos - 1] {
                        b',' => continue,
                        b'}' => return Json::Object(object),
                        other => panic!("unexpected {:?} in an object", other as char),
                    }
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_space();
                if self.text[self.pos] == b']' {
                    self.pos += 1;
                    return Json::Array(items);
                }
                loop {
                    items.push(self.value());
                    self.skip_space();
                    self.pos += 1;
                    match self.text[self.pos - 1] {
                        b',' => continue,
                        b']' => return Json::Array(items),
                        other => panic!("unexpected {:?} in an array", other as char),
                    }
                }
            }
            b'"' => {
                self.pos += 1;
                let mut bytes = Vec::new();
                loop {
                    let byte = self.text[self.pos];
                    self.pos += 1;
                    match byte {
                        b'"' => break,
                        b'\\' => {
                            let escaped = self.text[self.pos];
                            self.pos += 1;
                            match escaped {
                                b'"' | b'\\' | b'/' => bytes.push(escaped),
                                b'n' => bytes.push(b'\n'),
                                b't' => bytes.push(b'\t'),
                                b'u' => {
                                    let hex =
                                        std::str::from_utf8(&self.text[self.pos..self.pos + 4])
                                            .unwrap();
                                    self.pos += 4;
                                    let c = char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                        .unwrap();
                                    bytes.extend_from_slice(c.to_string().as_bytes());
                                }
                                other => panic!("unsupported escape \\{}", other as char),
                            }
                        }
                        _ => bytes.push(byte),
                    }
                }
                Json::Str(String::from_utf8(bytes).unwrap())
            }
            b'n' => self.word("null", Json::Null),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            _ => {
                let start = self.pos;
                while self.pos < self.text.len()
                    && (self.text[self.pos].is_ascii_digit()
                        || b"-+.eE".contains(&self.text[self.pos]))
                {
                    self.pos += 1;
                }
                assert!(self.pos > start, "unexpected byte at {start}");
                Json::Number(String::from_utf8(self.text[start..self.pos].to_vec()).unwrap())
            }
        }
    }

    fn word(&mut self, word: &str, value: Json) -> Json {
        assert!(self.text[self.pos..].starts_with(word.as_bytes()));
        self.pos += word.len();
        value
    }
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(object) => object
                .get(key)
                .unwrap_or_else(|| panic!("no {key:?} in {self:?}")),
            _ => panic!("not an object: {self:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(text) => text,
            _ => panic!("not a string: {self:?}"),
        }
    }
    fn u64(&self) -> u64 {
        match self {
            Json::Number(text) => text.parse().unwrap(),
            _ => panic!("not a number: {self:?}"),
        }
    }
    fn array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => panic!("not an array: {self:?}"),
        }
    }
    fn addr(&self) -> Option<SocketAddr> {
        match self {
            Json::Null => None,
            other => Some(other.str().parse().unwrap()),
        }
    }
}

fn vectors() -> Json {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wire-v1.json");
    Parser::parse(&std::fs::read_to_string(path).unwrap())
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn message(fields: &Json) -> Message {
    match fields.get("type").str() {
        "HELLO" => Message::Hello {
            role: match fields.get("role").str() {
                "dispatcher" => Role::Dispatcher,
                "worker" => Role::Worker,
                other => panic!("role {other}"),
            },
            index: fields.get("index").u64().try_into().unwrap(),
            pid: fields.get("pid").u64().try_into().unwrap(),
        },
        "CONN" => Message::Conn(Conn {
            seq: fields.get("seq").u64(),
            peer: fields.get("peer").addr(),
            local: fields.get("local").addr(),
            listener: fields.get("listener").str().to_owned(),
        }),
        "ACK" => Message::Ack {
            seq: fields.get("seq").u64(),
        },
        "DRAIN" => Message::Drain,
        "DRAINED" => Message::Drained {
            last_seq: fields.get("last_seq").u64(),
        },
        other => panic!("message type {other}"),
    }
}

#[test]
fn every_valid_vector_encodes_and_decodes_exactly() {
    let vectors = vectors();
    let valid = vectors.get("valid").array();
    let mut types = std::collections::BTreeSet::new();
    for vector in valid {
        let name = vector.get("name").str();
        let expected = message(vector.get("message"));
        types.insert(vector.get("message").get("type").str().to_owned());
        let bytes = hex(vector.get("hex").str());
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
        types.into_iter().collect::<Vec<_>>(),
        ["ACK", "CONN", "DRAIN", "DRAINED", "HELLO"],
        "every message type has a vector"
    );
    println!("{} valid vectors agree", valid.len());
}

#[test]
fn every_invalid_vector_is_refused() {
    let vectors = vectors();
    let invalid = vectors.get("invalid").array();
    for vector in invalid {
        let name = vector.get("name").str();
        let bytes = hex(vector.get("hex").str());
        assert!(
            Message::decode(&bytes).is_err(),
            "{name}: {bytes:02x?} was accepted as {:?}",
            Message::decode(&bytes)
        );
    }
    println!("{} invalid vectors refused", invalid.len());
}
