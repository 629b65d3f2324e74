//! The hand-off link's message format, version 1: pure encoding and decoding.
//!
//! Every message is one `SOCK_SEQPACKET` datagram (so no framing is needed), at most
//! [`MAX_MESSAGE`] bytes, integers big-endian:
//!
//! ```text
//! byte 0   version (1)
//! byte 1   type
//! HELLO   1  role u8 (0 dispatcher, 1 worker, 2 Node.js worker), index u32, pid u32,
//!            [features u8, a worker's only: bit 0 = it serves lanes]          both ways, first
//! CONN    2  seq u64, peer ADDR, local ADDR, listener u8 len + UTF-8    D → W, one fd attached
//! ACK     3  seq u64: every CONN up to and including seq was received    W → D
//! DRAIN   4  (empty): the worker is stopping, send nothing new           W → D
//! DRAINED 5  seq u64: the last CONN the dispatcher sent on this link     D → W
//! CHANNEL 6  (empty): Node.js's IPC channel, one fd attached             W → D, after HELLO role 2
//! LANE    7  backlog u32, local ADDR, listener u8 len + UTF-8: one listening socket
//!            (the worker's lane of that listener), one fd attached         D → W
//! LANES   8  count u8: the LANEs just sent are all this worker's lanes     D → W, after its LANEs
//! ACCEPTED 9 count u64: connections the worker accepted on its lanes so far W → D
//! ADDR    family u8: 0 none (then nothing), 4 (then 4 bytes + port u16), 6 (16 bytes + port u16)
//! ```
//!
//! A worker that says role 2 in its HELLO (`sticky-dispatch node-worker`) sends CHANNEL
//! next, with a `SOCK_SEQPACKET` socket whose peer is a Node.js process's IPC channel: the
//! dispatcher then hands that link's connections to Node directly, in Node's own dialect
//! (`crate::node_ipc`), and the link itself only says, by closing, that the worker is gone.
//!
//! A worker that sets the lanes bit in its HELLO gets, right after the HELLOs and at every
//! link-up, its lanes: a LANE per listener routed by the kernel, then LANES (count 0: none,
//! close any you hold). It accepts on them itself, and says now and then how many it took
//! (ACCEPTED), since the dispatcher no longer sees those connections.
//!
//! Sequence numbers count from 1 on each link. docs/protocol.md documents the same format
//! for workers written in other languages; keep the two in step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// No valid message is longer; a receive buffer of this size never truncates one.
pub const MAX_MESSAGE: usize = 512;

const HELLO: u8 = 1;
const CONN: u8 = 2;
const ACK: u8 = 3;
const DRAIN: u8 = 4;
const DRAINED: u8 = 5;
const CHANNEL: u8 = 6;
const LANE: u8 = 7;
const LANES: u8 = 8;
const ACCEPTED: u8 = 9;

/// The HELLO features bit of a worker that serves lanes (LANE, LANES, ACCEPTED).
pub const FEATURE_LANES: u8 = 1;

/// Which end of the link sent a HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The dispatcher (connecting end).
    Dispatcher,
    /// A worker (listening end).
    Worker,
    /// A worker that passes a Node.js IPC channel next (CHANNEL) and has its connections
    /// sent there, in Node's dialect.
    NodeWorker,
}

impl Role {
    /// The role's byte in a HELLO.
    pub fn byte(self) -> u8 {
        match self {
            Role::Dispatcher => 0,
            Role::Worker => 1,
            Role::NodeWorker => 2,
        }
    }

    /// The role a HELLO's byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Role> {
        [Role::Dispatcher, Role::Worker, Role::NodeWorker]
            .into_iter()
            .find(|role| role.byte() == byte)
    }
}

/// A connection being handed over; the fd travels beside it as SCM_RIGHTS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conn {
    /// Sequence number on this link, from 1.
    pub seq: u64,
    /// The client's address, if it has one.
    pub peer: Option<SocketAddr>,
    /// The address the client connected to, if known.
    pub local: Option<SocketAddr>,
    /// Name of the listener that accepted it (systemd's `FileDescriptorName=`).
    pub listener: String,
}

/// One message of the link protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Introduces each end; checked against the expected role and index.
    Hello {
        /// Who is speaking.
        role: Role,
        /// The worker index the link is for.
        index: u32,
        /// The sender's process id, for logs.
        pid: u32,
        /// What the worker can do beyond version 1's first messages ([`FEATURE_LANES`]);
        /// 0 from the dispatcher. Sent as a tenth byte only when not 0, so a HELLO without
        /// features is the 9-byte one every version-1 peer knows.
        features: u8,
    },
    /// A client connection; exactly one fd accompanies it.
    Conn(Conn),
    /// Cumulative acknowledgement.
    Ack {
        /// Highest sequence number received.
        seq: u64,
    },
    /// The worker is stopping.
    Drain,
    /// Answer to `Drain`: nothing after `last_seq` will be sent.
    Drained {
        /// The last sequence number sent on this link (0 if none).
        last_seq: u64,
    },
    /// Node.js's IPC channel; exactly one fd accompanies it.
    Channel,
    /// One of the worker's lanes: a listening socket it accepts on itself; exactly one fd
    /// accompanies it.
    Lane(Lane),
    /// The lanes sent since the HELLOs (or the last `Lanes`) are all of this worker's.
    Lanes {
        /// How many LANE messages came before it.
        count: u8,
    },
    /// Connections the worker has accepted on its lanes since it started.
    Accepted {
        /// The running total.
        count: u64,
    },
}

/// A lane being handed over; the listening socket travels beside it as SCM_RIGHTS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lane {
    /// The listen backlog the socket was created with: a worker that calls `listen()` on
    /// it (most servers do) must pass this one, or it shrinks the queue for everyone.
    pub backlog: u32,
    /// The address the socket is bound to.
    pub local: Option<SocketAddr>,
    /// Name of the listener it belongs to (systemd's `FileDescriptorName=`).
    pub listener: String,
}

/// Why a datagram is not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    Type(u8),
    /// The message ends early, has trailing bytes or holds an invalid field.
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

impl Message {
    /// The message type's name, as the protocol documentation spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "HELLO",
            Message::Conn(_) => "CONN",
            Message::Ack { .. } => "ACK",
            Message::Drain => "DRAIN",
            Message::Drained { .. } => "DRAINED",
            Message::Channel => "CHANNEL",
            Message::Lane(_) => "LANE",
            Message::Lanes { .. } => "LANES",
            Message::Accepted { .. } => "ACCEPTED",
        }
    }

    /// Encodes into `out` (cleared first), ready to send as one datagram.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(VERSION);
        match self {
            Message::Hello {
                role,
                index,
                pid,
                features,
            } => {
                out.push(HELLO);
                out.push(role.byte());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&pid.to_be_bytes());
                if *features != 0 {
                    out.push(*features);
                }
            }
            Message::Conn(conn) => {
                out.push(CONN);
                out.extend_from_slice(&conn.seq.to_be_bytes());
                encode_addr(conn.peer, out);
                encode_addr(conn.local, out);
                encode_name(&conn.listener, out);
            }
            Message::Lane(lane) => {
                out.push(LANE);
                out.extend_from_slice(&lane.backlog.to_be_bytes());
                encode_addr(lane.local, out);
                encode_name(&lane.listener, out);
            }
            Message::Lanes { count } => {
                out.push(LANES);
                out.push(*count);
            }
            Message::Accepted { count } => {
                out.push(ACCEPTED);
                out.extend_from_slice(&count.to_be_bytes());
            }
            Message::Ack { seq } => {
                out.push(ACK);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Message::Drain => out.push(DRAIN),
            Message::Drained { last_seq } => {
                out.push(DRAINED);
                out.extend_from_slice(&last_seq.to_be_bytes());
            }
            Message::Channel => out.push(CHANNEL),
        }
    }

    /// Decodes one datagram.
    pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader(datagram);
        let version = r.u8().ok_or(DecodeError::Malformed("empty"))?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = r.u8().ok_or(DecodeError::Malformed("header"))?;
        let (message, name) = match kind {
            HELLO => {
                let role = r.u8().and_then(Role::from_byte);
                let fields = role.zip(r.u32()).zip(r.u32());
                // The features byte is optional: absent means none.
                let features = r.u8().unwrap_or(0);
                let message = fields.map(|((role, index), pid)| Message::Hello {
                    role,
                    index,
                    pid,
                    features,
                });
                (message, "HELLO")
            }
            CONN => (decode_conn(&mut r).map(Message::Conn), "CONN"),
            ACK => (r.u64().map(|seq| Message::Ack { seq }), "ACK"),
            DRAIN => (Some(Message::Drain), "DRAIN"),
            DRAINED => (
                r.u64().map(|last_seq| Message::Drained { last_seq }),
                "DRAINED",
            ),
            CHANNEL => (Some(Message::Channel), "CHANNEL"),
            LANE => (decode_lane(&mut r).map(Message::Lane), "LANE"),
            LANES => (r.u8().map(|count| Message::Lanes { count }), "LANES"),
            ACCEPTED => (r.u64().map(|count| Message::Accepted { count }), "ACCEPTED"),
            other => return Err(DecodeError::Type(other)),
        };
        match message {
            Some(message) if r.0.is_empty() => Ok(message),
            _ => Err(DecodeError::Malformed(name)),
        }
    }
}

fn encode_addr(addr: Option<SocketAddr>, out: &mut Vec<u8>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

/// A listener's name, u8 length + UTF-8. Names longer than 255 bytes are cut at a char
/// boundary: they are labels only.
fn encode_name(name: &str, out: &mut Vec<u8>) {
    let mut len = name.len().min(255);
    while !name.is_char_boundary(len) {
        len -= 1;
    }
    out.push(len as u8);
    out.extend_from_slice(&name.as_bytes()[..len]);
}

fn decode_name(r: &mut Reader) -> Option<String> {
    let len = r.u8()? as usize;
    Some(std::str::from_utf8(r.take(len)?).ok()?.to_owned())
}

fn decode_lane(r: &mut Reader) -> Option<Lane> {
    let backlog = r.u32()?;
    let local = decode_addr(r)?;
    let listener = decode_name(r)?;
    Some(Lane {
        backlog,
        local,
        listener,
    })
}

fn decode_conn(r: &mut Reader) -> Option<Conn> {
    let seq = r.u64()?;
    let peer = decode_addr(r)?;
    let local = decode_addr(r)?;
    let listener = decode_name(r)?;
    Some(Conn {
        seq,
        peer,
        local,
        listener,
    })
}

/// `None` = malformed; `Some(None)` = the connection has no such address.
fn decode_addr(r: &mut Reader) -> Option<Option<SocketAddr>> {
    let ip = match r.u8()? {
        0 => return Some(None),
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
        6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
        _ => return None,
    };
    let port = r.u16()?;
    Some(Some(SocketAddr::new(ip, port)))
}

/// A cursor over a datagram; every read fails cleanly at the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) -> Vec<u8> {
        let mut buf = Vec::new();
        message.encode(&mut buf);
        assert!(buf.len() <= MAX_MESSAGE);
        assert_eq!(Message::decode(&buf), Ok(message));
        buf
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello {
            role: Role::Worker,
            index: 7,
            pid: 4242,
            features: 0,
        });
        round_trip(Message::Hello {
            role: Role::Worker,
            index: 7,
            pid: 4242,
            features: FEATURE_LANES,
        });
        round_trip(Message::Lane(Lane {
            backlog: 4096,
            local: Some("[::]:8080".parse().unwrap()),
            listener: "http".into(),
        }));
        round_trip(Message::Lanes { count: 2 });
        round_trip(Message::Accepted { count: 1 << 40 });
        round_trip(Message::Ack { seq: u64::MAX });
        round_trip(Message::Drain);
        round_trip(Message::Drained { last_seq: 0 });
        round_trip(Message::Channel);
        assert_eq!(
            round_trip(Message::Hello {
                role: Role::NodeWorker,
                index: 1,
                pid: 2,
                features: 0,
            })[2],
            2
        );
        round_trip(Message::Conn(Conn {
            seq: 1,
            peer: Some("[2001:db8::1]:443".parse().unwrap()),
            local: None,
            listener: "https".into(),
        }));
    }

    #[test]
    fn conn_layout_is_the_documented_one() {
        let bytes = round_trip(Message::Conn(Conn {
            seq: 2,
            peer: Some("127.1.2.3:40000".parse().unwrap()),
            local: Some("127.0.0.1:8080".parse().unwrap()),
            listener: "web".into(),
        }));
        let expected: Vec<u8> = [
            &[1, 2][..],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[4, 127, 1, 2, 3, 0x9c, 0x40],
            &[4, 127, 0, 0, 1, 0x1f, 0x90],
            &[3, b'w', b'e', b'b'],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn hello_layout_is_the_documented_one() {
        let bytes = round_trip(Message::Hello {
            role: Role::Dispatcher,
            index: 3,
            pid: 258,
            features: 0,
        });
        assert_eq!(bytes, [1, 1, 0, 0, 0, 0, 3, 0, 0, 1, 2]);
    }

    #[test]
    fn long_listener_names_are_cut_at_a_char_boundary() {
        let mut buf = Vec::new();
        Message::Conn(Conn {
            seq: 1,
            peer: None,
            local: None,
            listener: "é".repeat(200),
        })
        .encode(&mut buf);
        let Ok(Message::Conn(conn)) = Message::decode(&buf) else {
            panic!("did not decode");
        };
        assert_eq!(conn.listener, "é".repeat(127));
    }

    #[test]
    fn bad_datagrams_are_refused_not_panicked_on() {
        assert_eq!(Message::decode(&[]), Err(DecodeError::Malformed("empty")));
        assert_eq!(Message::decode(&[2, 3]), Err(DecodeError::Version(2)));
        assert_eq!(Message::decode(&[1, 99]), Err(DecodeError::Type(99)));
        assert_eq!(
            Message::decode(&[1, 3, 0, 0]),
            Err(DecodeError::Malformed("ACK"))
        );
        assert_eq!(
            Message::decode(&[1, 4, 0]),
            Err(DecodeError::Malformed("DRAIN"))
        );
        assert_eq!(
            Message::decode(&[1, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Malformed("HELLO"))
        );
        assert_eq!(
            Message::decode(&[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(DecodeError::Malformed("HELLO")),
            "one features byte at most"
        );
        // Every prefix of a valid CONN is refused cleanly.
        let mut buf = Vec::new();
        Message::Conn(Conn {
            seq: 5,
            peer: Some("[::1]:1".parse().unwrap()),
            local: Some("10.0.0.1:2".parse().unwrap()),
            listener: "x".into(),
        })
        .encode(&mut buf);
        for cut in 2..buf.len() {
            assert_eq!(
                Message::decode(&buf[..cut]),
                Err(DecodeError::Malformed("CONN"))
            );
        }
    }
}
