//! Node.js's IPC dialect, as the dispatcher and the `node-worker` bridge speak it on a Node
//! process's IPC channel: one JSON object per line (`NODE_CHANNEL_SERIALIZATION_MODE=json`),
//! file descriptors as SCM_RIGHTS.
//!
//! What Node does with it (lib/internal/child_process.js, `setupChannel`, Node 18-22): a
//! line `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":M}` that arrives with an fd is
//! answered with `{"cmd":"NODE_HANDLE_ACK"}` (in the order received, before the app sees
//! the socket), then turned into a `net.Socket` and emitted as
//! `process.on('message', (M, socket))`. Without its fd the answer is
//! `{"cmd":"NODE_HANDLE_NACK"}`. Node pairs the fd a read brought with the first
//! NODE_HANDLE line it completes, and the kernel ends a read after the first message that
//! carries fds: so each line goes in a `sendmsg` of its own, with exactly its own fd. The
//! channel is a `SOCK_SEQPACKET` socket, which Node reads like a stream: every line is one
//! record, sent whole or not at all, so no line is ever split across Node's reads.
//!
//! The messages of the `sticky-dispatch` npm package (node/index.js) are marked with a
//! `stickyDispatch` field:
//!
//! ```text
//! to Node    {"stickyDispatch":"connection",seq,peer,local,listener} + fd   (as NODE_HANDLE's msg)
//! to Node    {"stickyDispatch":"lane",listener,backlog,local} + fd   (as a net.Native NODE_HANDLE's msg)
//! to Node    {"stickyDispatch":"lanes","count":K}  the K lanes since the sync are all of them
//! to Node    {"stickyDispatch":"sync","id":ID}     answer `synced` with the same ID
//! to Node    {"stickyDispatch":"drain"}            no more connections will come
//! from Node  {"stickyDispatch":"ready"}            the app called listen(server)
//! from Node  {"stickyDispatch":"synced","id":ID,"draining":B,"lanes":L}   every line before it
//!                                                  was read; B: Node is stopping, send it
//!                                                  nothing; L: it serves lanes
//! from Node  {"stickyDispatch":"drain-request"}    Node was asked to stop
//! from Node  {"stickyDispatch":"accepted","count":N}   N connections accepted on its lanes
//! ```
//!
//! A lane is a listening socket: its line is of type `net.Native`, which Node core
//! acknowledges like any handle and passes to the `'message'` listener as the raw TCP
//! handle (`handleConversion['net.Native'].got` emits it as it is), for the package to
//! `listen()` on with the lane's backlog.

use std::io::Write;
use std::net::SocketAddr;

/// One line from Node, as far as sticky-dispatch cares.
#[derive(Debug, PartialEq, Eq)]
pub enum FromNode {
    /// Node received the oldest handle not yet acknowledged.
    Ack,
    /// The oldest handle not yet acknowledged reached Node without its fd.
    Nack,
    /// The app called `listen(server)`: it can take connections.
    Ready,
    /// The answer to the `sync` with this `id`; `draining`: Node is stopping (it asked a
    /// previous dispatcher to drain, or was told to), so send it nothing.
    Synced {
        /// The sync's id.
        id: String,
        /// Whether Node is stopping.
        draining: bool,
        /// Whether the package serves lanes (a package from before lanes does not say).
        lanes: bool,
    },
    /// Node was asked to stop (SIGTERM, `close()`): send nothing new, then answer `drain`.
    DrainRequest,
    /// Node has accepted this many connections on its lanes since it started.
    Accepted(u64),
    /// Anything else (`process.send` from the app, other internal messages): ignored.
    Other(String),
}

/// Node's own ACK line, byte for byte (`JSON.stringify({cmd: 'NODE_HANDLE_ACK'})`): the
/// hot path compares instead of parsing.
const ACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";
const NACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}";

/// `{"stickyDispatch":"drain"}`, with its newline: the answer to Node's `drain-request`
/// (in the link protocol, DRAINED answers DRAIN).
pub const DRAIN_ANSWER_LINE: &[u8] = b"{\"stickyDispatch\":\"drain\"}\n";

/// Classifies one line (without its newline).
pub fn classify(line: &[u8]) -> FromNode {
    if line == ACK_LINE {
        return FromNode::Ack;
    }
    if line == NACK_LINE {
        return FromNode::Nack;
    }
    let text = || String::from_utf8_lossy(line).into_owned();
    let Ok(serde_json::Value::Object(message)) = serde_json::from_slice(line) else {
        return FromNode::Other(text());
    };
    let field = |name| message.get(name).and_then(|v| v.as_str());
    let flag = |name| message.get(name).and_then(|v| v.as_bool()) == Some(true);
    match (field("cmd"), field("stickyDispatch")) {
        (Some("NODE_HANDLE_ACK"), _) => FromNode::Ack,
        (Some("NODE_HANDLE_NACK"), _) => FromNode::Nack,
        (None, Some("ready")) => FromNode::Ready,
        (None, Some("drain-request")) => FromNode::DrainRequest,
        (None, Some("synced")) => match field("id") {
            Some(id) => FromNode::Synced {
                id: id.to_owned(),
                draining: flag("draining"),
                lanes: flag("lanes"),
            },
            None => FromNode::Other(text()),
        },
        (None, Some("accepted")) => match message.get("count").and_then(|v| v.as_u64()) {
            Some(count) => FromNode::Accepted(count),
            None => FromNode::Other(text()),
        },
        _ => FromNode::Other(text()),
    }
}

/// The lines of one record read from the channel, classified.
pub fn lines(record: &[u8]) -> impl Iterator<Item = FromNode> + '_ {
    record
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(classify)
}

/// How a [`read_lines`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Everything waiting was read.
    Empty,
    /// The callback asked to stop: the rest of that record is dropped, later records stay
    /// in the channel.
    Stopped,
    /// Node is gone: why.
    Closed(&'static str),
}

/// Reads, without waiting, every record a Node channel (`channel`, non-blocking) has
/// waiting, and gives each line to `each` until it breaks. The one reader of Node's
/// channel, for the dispatcher and the bridge alike. A record longer than `buf` is the
/// app's own `process.send()` (ours are short): skipped.
pub fn read_lines(
    channel: std::os::fd::RawFd,
    buf: &mut [u8],
    mut each: impl FnMut(FromNode) -> std::ops::ControlFlow<()>,
) -> std::io::Result<ReadEnd> {
    use std::io::ErrorKind;
    loop {
        let record = match crate::link::recv_record(channel, buf) {
            Ok(record) => record,
            Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(ReadEnd::Empty),
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            // Node died with lines unread.
            Err(err) if err.kind() == ErrorKind::ConnectionReset => {
                return Ok(ReadEnd::Closed("Node's IPC channel was reset (Node died)"))
            }
            Err(err) => return Err(err),
        };
        if record.len == 0 {
            return Ok(ReadEnd::Closed("Node closed its IPC channel"));
        }
        if record.truncated {
            tracing::debug!(len = record.len, "a long message from Node ignored");
            continue;
        }
        for line in lines(&buf[..record.len]) {
            if each(line).is_break() {
                return Ok(ReadEnd::Stopped);
            }
        }
    }
}

/// `{"stickyDispatch":"sync","id":ID}\n` into `out` (cleared first). `id` is plain ASCII.
pub fn encode_sync(out: &mut Vec<u8>, id: &str) {
    out.clear();
    out.extend_from_slice(b"{\"stickyDispatch\":\"sync\",\"id\":");
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, id);
    out.extend_from_slice(b"}\n");
}

/// `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"stickyDispatch":"connection",...}}\n`
/// into `out` (cleared first), to be sent with the connection's fd. `type` must be one Node
/// knows: an unknown one crashes Node after it has acknowledged the handle. No `key`: with
/// one, Node would report the socket's closing back over the channel.
pub fn encode_connection(
    out: &mut Vec<u8>,
    seq: u64,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    listener: &str,
) {
    out.clear();
    let _ = write!(
        out,
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{{\"stickyDispatch\":\"connection\",\"seq\":{seq},\"peer\":"
    );
    encode_addr(out, peer);
    out.extend_from_slice(b",\"local\":");
    encode_addr(out, local);
    out.extend_from_slice(b",\"listener\":");
    let _ = serde_json::to_writer(&mut *out, listener);
    out.extend_from_slice(b"}}\n");
}

/// `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"stickyDispatch":"lane",...}}\n` into
/// `out` (cleared first), to be sent with the lane's listening socket. `net.Native`: Node
/// passes the TCP handle itself to the package, which listens on it with `backlog`.
pub fn encode_lane(out: &mut Vec<u8>, listener: &str, backlog: u32, local: Option<SocketAddr>) {
    out.clear();
    out.extend_from_slice(
        b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"stickyDispatch\":\"lane\",\"listener\":",
    );
    let _ = serde_json::to_writer(&mut *out, listener);
    let _ = write!(out, ",\"backlog\":{backlog},\"local\":");
    encode_addr(out, local);
    out.extend_from_slice(b"}}\n");
}

/// `{"stickyDispatch":"lanes","count":K}\n` into `out` (cleared first): the `count` lanes
/// sent since the sync are all of this worker's (0: it serves none).
pub fn encode_lanes(out: &mut Vec<u8>, count: usize) {
    out.clear();
    let _ = writeln!(out, "{{\"stickyDispatch\":\"lanes\",\"count\":{count}}}");
}

fn encode_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        // Addresses and ports contain nothing JSON would escape.
        Some(addr) => {
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            let _ = write!(
                out,
                "{{\"address\":\"{}\",\"port\":{},\"family\":\"{family}\"}}",
                addr.ip(),
                addr.port()
            );
        }
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// tests/vectors/node-ipc.json, which node/test/node-ipc.test.js reads too.
    fn vectors() -> Value {
        serde_json::from_str(include_str!("../tests/vectors/node-ipc.json")).unwrap()
    }

    fn message<'v>(list: &'v Value, name: &str) -> &'v Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no {name:?} in the vectors"))
    }

    /// What `classify` made of a line, in the vector file's words.
    fn kind(line: FromNode) -> Value {
        match line {
            FromNode::Ack => serde_json::json!({"kind": "ack"}),
            FromNode::Nack => serde_json::json!({"kind": "nack"}),
            FromNode::Ready => serde_json::json!({"kind": "ready"}),
            FromNode::DrainRequest => serde_json::json!({"kind": "drain-request"}),
            FromNode::Synced {
                id,
                draining,
                lanes,
            } => {
                serde_json::json!({"kind": "synced", "id": id, "draining": draining, "lanes": lanes})
            }
            FromNode::Accepted(count) => serde_json::json!({"kind": "accepted", "count": count}),
            FromNode::Other(_) => serde_json::json!({"kind": "other"}),
        }
    }

    fn line_of(example: &Value) -> &[u8] {
        let line = example["line"].as_str().unwrap().as_bytes();
        line.strip_suffix(b"\n")
            .expect("a vector line ends in a newline")
    }

    #[test]
    fn the_channel_reader_reads_every_line_skips_long_records_and_sees_the_close() {
        use std::ops::ControlFlow;
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixDatagram;
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let node = UnixDatagram::from(theirs);
        node.send(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"stickyDispatch\":\"ready\"}\n")
            .unwrap();
        node.send(&[b'x'; 100]).unwrap(); // longer than the buffer: the app's own
        node.send(b"{\"stickyDispatch\":\"drain-request\"}\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        let end = read_lines(ours.as_raw_fd(), &mut buf, |line| {
            let ready = line == FromNode::Ready;
            seen.push(line);
            if ready {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(end.unwrap(), ReadEnd::Stopped);
        assert_eq!(seen, [FromNode::Ack, FromNode::Ready]);
        seen.clear();
        let end = read_lines(ours.as_raw_fd(), &mut buf, |line| {
            seen.push(line);
            ControlFlow::Continue(())
        });
        assert_eq!(end.unwrap(), ReadEnd::Empty);
        assert_eq!(seen, [FromNode::DrainRequest]);
        drop(node);
        let end = read_lines(ours.as_raw_fd(), &mut buf, |_| ControlFlow::Continue(()));
        assert_eq!(end.unwrap(), ReadEnd::Closed("Node closed its IPC channel"));
    }

    #[test]
    fn the_lines_we_write_are_the_vectors() {
        let vectors = vectors();
        let to_node = &vectors["to_node"];
        let connection = message(to_node, "connection");
        let mut out = Vec::new();
        for example in connection["examples"].as_array().unwrap() {
            let encode = &example["encode"];
            let addr = |field: &str| encode[field].as_str().map(|a| a.parse().unwrap());
            encode_connection(
                &mut out,
                encode["seq"].as_u64().unwrap(),
                addr("peer"),
                addr("local"),
                encode["listener"].as_str().unwrap(),
            );
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                example["line"],
                "{encode}"
            );
        }
        for example in message(to_node, "lane")["examples"].as_array().unwrap() {
            let encode = &example["encode"];
            encode_lane(
                &mut out,
                encode["listener"].as_str().unwrap(),
                encode["backlog"].as_u64().unwrap().try_into().unwrap(),
                encode["local"].as_str().map(|a| a.parse().unwrap()),
            );
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                example["line"],
                "{encode}"
            );
        }
        for example in message(to_node, "lanes")["examples"].as_array().unwrap() {
            let count = example["encode"]["count"].as_u64().unwrap();
            encode_lanes(&mut out, count.try_into().unwrap());
            assert_eq!(std::str::from_utf8(&out).unwrap(), example["line"]);
        }
        for example in message(to_node, "sync")["examples"].as_array().unwrap() {
            encode_sync(&mut out, example["encode"]["id"].as_str().unwrap());
            assert_eq!(std::str::from_utf8(&out).unwrap(), example["line"]);
        }
        let drain = &message(to_node, "drain")["examples"][0]["line"];
        assert_eq!(std::str::from_utf8(DRAIN_ANSWER_LINE).unwrap(), drain);
    }

    #[test]
    fn the_lines_we_read_are_classified_as_the_vectors_say() {
        let vectors = vectors();
        let mut checked = 0;
        let from_node = vectors["from_node"].as_array().unwrap().iter();
        let more = ["from_node_also_accepted", "from_node_ignored"]
            .iter()
            .map(|group| &vectors[*group]);
        for group in from_node.chain(more) {
            for example in group["examples"].as_array().unwrap() {
                assert_eq!(
                    kind(classify(line_of(example))),
                    example["classify"],
                    "{example}"
                );
                checked += 1;
            }
        }
        for example in vectors["from_node_records"]["examples"].as_array().unwrap() {
            let record = example["record"].as_str().unwrap().as_bytes();
            let kinds: Vec<Value> = lines(record).map(kind).collect();
            assert_eq!(Value::from(kinds), example["classify"]);
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} vectors");
    }

    #[test]
    fn connection_lines_are_what_node_expects() {
        let mut out = Vec::new();
        let peer = Some("127.0.0.5:40000".parse().unwrap());
        let local = Some("[::1]:8080".parse().unwrap());
        encode_connection(&mut out, 7, peer, local, "web \"1\"");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{\"stickyDispatch\":\"connection\",\"seq\":7,\
             \"peer\":{\"address\":\"127.0.0.5\",\"port\":40000,\"family\":\"IPv4\"},\
             \"local\":{\"address\":\"::1\",\"port\":8080,\"family\":\"IPv6\"},\"listener\":\"web \\\"1\\\"\"}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["msg"]["peer"]["port"], 40000);
        encode_connection(&mut out, 8, None, None, "x");
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(parsed["msg"]["peer"].is_null() && parsed["msg"]["local"].is_null());
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn lane_lines_are_net_native_handles_with_the_backlog() {
        let mut out = Vec::new();
        encode_lane(
            &mut out,
            "web \"1\"",
            u32::MAX,
            Some("[::]:8080".parse().unwrap()),
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["cmd"], "NODE_HANDLE");
        // The one type whose handle Node passes on as it is: net.Socket would make a
        // connected socket of a listening one.
        assert_eq!(parsed["type"], "net.Native");
        assert_eq!(parsed["msg"]["stickyDispatch"], "lane");
        assert_eq!(parsed["msg"]["listener"], "web \"1\"");
        assert_eq!(parsed["msg"]["backlog"], u64::from(u32::MAX));
        assert_eq!(
            parsed["msg"]["local"],
            serde_json::json!({"address": "::", "port": 8080, "family": "IPv6"})
        );
        assert!(parsed["msg"].get("key").is_none());
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        encode_lane(&mut out, "x", 1, None);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(parsed["msg"]["local"].is_null());
        encode_lanes(&mut out, 0);
        assert_eq!(out, b"{\"stickyDispatch\":\"lanes\",\"count\":0}\n");
    }

    #[test]
    fn accepted_lines_need_a_count() {
        assert_eq!(
            classify(b"{\"stickyDispatch\":\"accepted\",\"count\":18446744073709551615}"),
            FromNode::Accepted(u64::MAX)
        );
        for bad in [
            &b"{\"stickyDispatch\":\"accepted\"}"[..],
            b"{\"stickyDispatch\":\"accepted\",\"count\":-1}",
            b"{\"stickyDispatch\":\"accepted\",\"count\":1.5}",
            b"{\"stickyDispatch\":\"accepted\",\"count\":\"3\"}",
        ] {
            assert!(matches!(classify(bad), FromNode::Other(_)), "{bad:?}");
        }
    }

    #[test]
    fn sync_lines_round_trip() {
        let mut out = Vec::new();
        encode_sync(&mut out, "42-1");
        assert_eq!(out, b"{\"stickyDispatch\":\"sync\",\"id\":\"42-1\"}\n");
        assert_eq!(
            classify(b"{\"stickyDispatch\":\"synced\",\"id\":\"42-1\",\"draining\":false}"),
            FromNode::Synced {
                id: "42-1".into(),
                draining: false,
                lanes: false,
            }
        );
        assert_eq!(
            classify(
                b"{\"stickyDispatch\":\"synced\",\"id\":\"42-1\",\"draining\":true,\"lanes\":true}"
            ),
            FromNode::Synced {
                id: "42-1".into(),
                draining: true,
                lanes: true,
            }
        );
        assert!(matches!(
            classify(b"{\"stickyDispatch\":\"synced\"}"),
            FromNode::Other(_)
        ));
    }

    #[test]
    fn node_lines_are_classified() {
        assert_eq!(classify(ACK_LINE), FromNode::Ack);
        assert_eq!(classify(NACK_LINE), FromNode::Nack);
        assert_eq!(classify(b"{ \"cmd\": \"NODE_HANDLE_ACK\" }"), FromNode::Ack);
        assert_eq!(classify(b"{\"stickyDispatch\":\"ready\"}"), FromNode::Ready);
        assert_eq!(
            classify(b"{\"stickyDispatch\":\"ready\",\"pid\":3}"),
            FromNode::Ready
        );
        assert_eq!(
            classify(b"{\"stickyDispatch\":\"drain-request\"}"),
            FromNode::DrainRequest
        );
        assert!(matches!(classify(b"\"hello\""), FromNode::Other(_)));
        assert!(matches!(
            classify(b"{\"stickyDispatch\":1}"),
            FromNode::Other(_)
        ));
        assert!(matches!(classify(b"not json"), FromNode::Other(_)));
        let record = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"stickyDispatch\":\"ready\"}\n";
        assert_eq!(
            lines(record).collect::<Vec<_>>(),
            [FromNode::Ack, FromNode::Ready]
        );
    }
}
