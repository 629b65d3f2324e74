//! Node.js's IPC channel, the bridge's end: a `SOCK_STREAM` Unix socket carrying one JSON
//! object per line (`NODE_CHANNEL_SERIALIZATION_MODE=json`), with file descriptors as
//! SCM_RIGHTS.
//!
//! What Node does with it (lib/internal/child_process.js, `setupChannel`, Node 18-22):
//! a line `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":M}` that arrives with an fd is
//! answered with `{"cmd":"NODE_HANDLE_ACK"}` (in the order received), then turned into a
//! `net.Socket` and emitted as `process.on('message', (M, socket))`. Without its fd the
//! answer is `{"cmd":"NODE_HANDLE_NACK"}`. Node pairs the fd a read brought with the first
//! NODE_HANDLE line it completes, keeping one fd at a time, and the kernel ends a read
//! after the first message that carries fds: so each line goes in a `sendmsg` of its own,
//! with exactly its own fd (two lines in one `sendmsg` would give every later connection
//! the previous connection's fd), and no line may be split across reads (the bridge's
//! window of unacknowledged lines keeps them whole: see `WINDOW`).
//!
//! The socket is not in tokio's reactor: every line Node reads and every ACK it writes
//! would wake the bridge (tokio registers read and write interest, edge-triggered, and the
//! kernel signals write space each time Node reads a line). The bridge sends and reads
//! with `MSG_DONTWAIT` when it is awake anyway (a connection arrived, a timer fired) and
//! registers the socket for readability ([`NodeChannel::arm`]) only while it has to wait
//! for Node: at start, when idle, when the window is full, while draining.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::worker::ClientInfo;

/// A line longer than this without a newline is not a message Node would send us (ACKs,
/// `ready`, small user messages); the bridge gives up on such a peer.
const MAX_LINE: usize = 1 << 20;

/// One message from Node, as far as the bridge cares.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FromNode {
    /// Node received the oldest handle not yet acknowledged.
    Ack,
    /// The oldest handle not yet acknowledged reached Node without its fd.
    Nack,
    /// The app called `listen(server)`: it can take connections.
    Ready,
    /// Node got SIGTERM itself: drain as on the bridge's own SIGTERM.
    DrainRequest,
    /// Anything else (`process.send` from the app, other internal messages): logged and
    /// ignored.
    Other(String),
}

/// The bridge's end of the channel.
#[derive(Debug)]
pub(super) struct NodeChannel {
    /// Registered for readability while the bridge waits for Node; dropped (out of the
    /// reactor) otherwise. Declared before `fd`: deregistered before the fd closes.
    armed: Option<AsyncFd<OwnedFd>>,
    fd: OwnedFd,
    /// Bytes read, not yet split into lines; lines before `start` are consumed.
    input: Vec<u8>,
    start: usize,
    /// The line being sent, reused for every connection.
    out: Vec<u8>,
}

/// A connected pair: the bridge's end, and Node's end (close-on-exec; the child clears
/// the flag on its copy only).
pub(super) fn pair() -> io::Result<(NodeChannel, OwnedFd)> {
    let (ours, theirs) = socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    Ok((
        NodeChannel {
            armed: None,
            fd: ours,
            input: Vec::with_capacity(4096),
            start: 0,
            out: Vec::with_capacity(512),
        },
        theirs,
    ))
}

impl NodeChannel {
    /// Registers the socket for readability (`true`) or takes it out of the reactor.
    pub(super) fn arm(&mut self, armed: bool) -> io::Result<()> {
        match (armed, self.armed.is_some()) {
            // A duplicate, owned by the registration: tokio deregisters it when dropped,
            // then it closes (same socket, so the same readiness).
            (true, false) => {
                let dup = self.fd.try_clone()?;
                self.armed = Some(crate::link::register(dup, Interest::READABLE)?);
            }
            (false, true) => self.armed = None,
            _ => {}
        }
        Ok(())
    }

    /// Whether the socket is registered for readability.
    pub(super) fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Waits until there is something to read (or the channel closed), if armed; never
    /// resolves otherwise. Cancel-safe. Read with [`read_available`](Self::read_available)
    /// next: the readiness is cleared here, and only a read that meets EAGAIN may follow.
    pub(super) async fn readable(&self) -> io::Result<()> {
        match &self.armed {
            Some(armed) => {
                armed.readable().await?.clear_ready();
                Ok(())
            }
            None => std::future::pending().await,
        }
    }

    /// Reads everything available now, without waiting. `Ok(false)`: Node closed the
    /// channel (it is exiting, or called `process.disconnect()`).
    pub(super) fn read_available(&mut self) -> io::Result<bool> {
        loop {
            if self.input.len() - self.start > MAX_LINE {
                return Err(io::Error::other(format!(
                    "Node sent more than {MAX_LINE} bytes without a newline"
                )));
            }
            let len = self.input.len();
            self.input.resize(len + 4096, 0);
            // A plain recv: any fd Node might attach (a handle passed to process.send) is
            // closed by the kernel, never installed here.
            let read = socket::recv(
                self.fd.as_raw_fd(),
                &mut self.input[len..],
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from);
            self.input.truncate(len + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// The next complete line read, classified.
    pub(super) fn next_message(&mut self) -> Option<FromNode> {
        let pending = &self.input[self.start..];
        let Some(newline) = pending.iter().position(|&b| b == b'\n') else {
            // Everything consumed or a partial line: move it to the front, so the buffer
            // does not grow with the connection count.
            self.input.drain(..self.start);
            self.start = 0;
            return None;
        };
        let line = &pending[..newline];
        self.start += newline + 1;
        Some(classify(line))
    }

    /// Sends one connection: its line and its fd in one `sendmsg`, the rest of the line (if
    /// the socket took only part of it) without the fd. Waits while the socket is full.
    pub(super) async fn send_connection(
        &mut self,
        client: &ClientInfo,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        encode_connection(&mut self.out, client);
        write_all(self.fd.as_raw_fd(), &self.out, Some(fd)).await
    }

    /// Tells Node that nothing more will come.
    pub(super) async fn send_drain(&mut self) -> io::Result<()> {
        write_all(self.fd.as_raw_fd(), DRAIN_LINE, None).await
    }
}

const DRAIN_LINE: &[u8] = b"{\"stickyDispatch\":\"drain\"}\n";

/// How often a send to a full socket is tried again. The window keeps what Node has not
/// read under 32 KiB, far below the socket's buffer: a full socket means a Node that does
/// not read, which the callers' timeouts bound; polling it saves registering the socket
/// for write space, which would wake the bridge whenever Node reads a line.
const FULL_RETRY: Duration = Duration::from_millis(1);

async fn write_all(
    sock: RawFd,
    mut bytes: &[u8],
    mut fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    while !bytes.is_empty() {
        match send_raw(sock, bytes, fd) {
            Ok(sent) => {
                // The fd went with the first byte.
                fd = None;
                bytes = &bytes[sent..];
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(FULL_RETRY).await
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn send_raw(sock: i32, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    let iov = [io::IoSlice::new(bytes)];
    let fds;
    let cmsgs: &[ControlMessage] = match fd {
        Some(fd) => {
            fds = [fd.as_raw_fd()];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    // MSG_NOSIGNAL: a Node that died gives EPIPE, not a SIGPIPE that kills the bridge.
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    Ok(socket::sendmsg::<()>(sock, &iov, cmsgs, flags, None)?)
}

/// Node's own ACK lines, byte for byte (`JSON.stringify({cmd: 'NODE_HANDLE_ACK'})`): the
/// hot path compares instead of parsing.
const ACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";
const NACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}";

fn classify(line: &[u8]) -> FromNode {
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
    match (
        message.get("cmd").and_then(|v| v.as_str()),
        message.get("stickyDispatch").and_then(|v| v.as_str()),
    ) {
        (Some("NODE_HANDLE_ACK"), _) => FromNode::Ack,
        (Some("NODE_HANDLE_NACK"), _) => FromNode::Nack,
        (None, Some("ready")) => FromNode::Ready,
        (None, Some("drain-request")) => FromNode::DrainRequest,
        _ => FromNode::Other(text()),
    }
}

/// `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"stickyDispatch":"connection",...}}\n`
/// into `out` (cleared first). `type` must be one Node knows: an unknown one crashes Node
/// after it has acknowledged the handle.
fn encode_connection(out: &mut Vec<u8>, client: &ClientInfo) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{{\"stickyDispatch\":\"connection\",\"seq\":{},\"peer\":",
        client.seq
    );
    encode_addr(out, client.peer);
    out.extend_from_slice(b",\"local\":");
    encode_addr(out, client.local);
    out.extend_from_slice(b",\"listener\":");
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &*client.listener);
    out.extend_from_slice(b"}}\n");
}

fn encode_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    use std::io::Write;
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

    #[test]
    fn connection_lines_are_what_node_expects() {
        let mut out = Vec::new();
        let client = ClientInfo {
            seq: 7,
            peer: Some("127.0.0.5:40000".parse().unwrap()),
            local: Some("[::1]:8080".parse().unwrap()),
            listener: "web \"1\"".into(),
        };
        encode_connection(&mut out, &client);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{\"stickyDispatch\":\"connection\",\"seq\":7,\
             \"peer\":{\"address\":\"127.0.0.5\",\"port\":40000,\"family\":\"IPv4\"},\
             \"local\":{\"address\":\"::1\",\"port\":8080,\"family\":\"IPv6\"},\"listener\":\"web \\\"1\\\"\"}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["msg"]["peer"]["port"], 40000);
        let anonymous = ClientInfo {
            peer: None,
            local: None,
            ..client
        };
        encode_connection(&mut out, &anonymous);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(parsed["msg"]["peer"].is_null() && parsed["msg"]["local"].is_null());
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
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
    }

    #[tokio::test]
    async fn lines_are_split_and_fds_travel_one_per_line() {
        let (mut ours, theirs) = pair().unwrap();
        ours.arm(true).unwrap();
        let node = std::os::unix::net::UnixStream::from(theirs);
        let (a, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        let client = ClientInfo {
            seq: 1,
            peer: None,
            local: None,
            listener: "x".into(),
        };
        use std::os::fd::AsFd;
        ours.send_connection(&client, a.as_fd()).await.unwrap();
        ours.send_connection(&ClientInfo { seq: 2, ..client }, a.as_fd())
            .await
            .unwrap();
        // Each recvmsg on Node's side yields one line and one fd.
        for seq in 1..=2 {
            let mut buf = [0u8; 1024];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                node.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .unwrap();
            let fds: usize = msg
                .cmsgs()
                .unwrap()
                .map(|c| match c {
                    socket::ControlMessageOwned::ScmRights(fds) => {
                        fds.iter().for_each(|&fd| {
                            let _ = nix::unistd::close(fd);
                        });
                        fds.len()
                    }
                    _ => 0,
                })
                .sum();
            let len = msg.bytes;
            let text = std::str::from_utf8(&buf[..len]).unwrap();
            assert_eq!(fds, 1, "{text}");
            assert!(text.contains(&format!("\"seq\":{seq},")) && text.ends_with('\n'));
        }
        use std::io::Write;
        (&node)
            .write_all(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"stickyDis")
            .unwrap();
        ours.readable().await.unwrap();
        assert!(ours.read_available().unwrap());
        assert_eq!(ours.next_message(), Some(FromNode::Ack));
        assert_eq!(ours.next_message(), None);
        (&node).write_all(b"patch\":\"ready\"}\n").unwrap();
        ours.readable().await.unwrap();
        assert!(ours.read_available().unwrap());
        assert_eq!(ours.next_message(), Some(FromNode::Ready));
        drop(node);
        ours.readable().await.unwrap();
        assert!(!ours.read_available().unwrap());
    }
}
