//! Node.js's dialect of the link, for a `node-worker` bridge: after its HELLO (role 2) the
//! bridge passes its Node process's IPC channel (CHANNEL), and connections go to Node
//! directly, one NODE_HANDLE line with its fd each (`crate::node_ipc`); Node's ACK lines
//! acknowledge them one by one, in the order sent. The bridge stays out of the
//! per-connection path (no extra process woken, no second hand-off) and its link only
//! says, by closing, that the worker is gone.
//!
//! Node's ACKs do not wake the dispatcher while connections are in flight: the channel is
//! out of the reactor then, and read whenever the slot wakes anyway (the next connection)
//! or [`ACK_READ_DELAY`] after the last read. Under load and one client at a time alike
//! that is one wake-up per connection (its arrival) instead of two (and its ACK). When
//! nothing is in flight the channel is watched, for Node's drain request or its exit.
//!
//! A Node channel may have had a previous dispatcher (this one restarted while Node lived):
//! ACKs and other lines it never read may still wait in the channel. So the first thing
//! sent on a channel is a `sync` with an id of this link's own; everything read before
//! Node's `synced` with that id is stale and dropped, and nothing is sent until then
//! ([`NodeSession`], which holds what the lines mean, apart from the I/O).

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;
use tracing::debug;

use super::Event;
use crate::dispatcher::held::Held;
use crate::link::{self, LinkStream};
use crate::node_ipc::{self, FromNode, ReadEnd};
use crate::shared::{LinkError, HELLO_TIMEOUT};
use crate::wire::{self, Message};

/// How long Node's ACKs may wait unread in its channel while connections are in flight:
/// the dispatcher keeps its copies of those connections' fds that much longer (bounded by
/// `max_in_flight`), and the hand-off histogram counts it.
const ACK_READ_DELAY: Duration = Duration::from_millis(2);
/// How often a send to a full Node channel is tried again. The channel is not watched for
/// write space: the kernel signals it each time Node reads a line, and each signal would
/// wake the dispatcher; a full channel means a Node that does not read, which is rare and
/// bounded by the bridge's `--ack-timeout`.
const FULL_RETRY: Duration = Duration::from_millis(1);

/// A link to a `node-worker` bridge, with its Node process's channel.
pub(in crate::dispatcher) struct NodeLink {
    /// The bridge's link: it carries nothing after CHANNEL, and closes when the bridge goes.
    link: LinkStream,
    pub(super) pid: u32,
    /// Registered for readability while nothing is in flight ([`NodeLink::before_sleep`]);
    /// a duplicate of `channel`, so that dropping it takes the channel out of the reactor.
    /// Declared before `channel`: deregistered before the fd closes.
    watched: Option<AsyncFd<OwnedFd>>,
    channel: OwnedFd,
    /// While not watched: when to read it at the latest.
    read_by: Option<Instant>,
    session: NodeSession,
}

/// Distinguishes the syncs of one dispatcher's links (the pid, those of its predecessors).
static SYNCS: AtomicU64 = AtomicU64::new(1);

/// A sync's id: unique to this dispatcher process, and to the link within it.
fn next_sync_id() -> String {
    let number = SYNCS.fetch_add(1, Ordering::Relaxed);
    format!("{}-{number}", std::process::id())
}

impl NodeLink {
    /// Takes the channel the bridge sends right after its HELLO, and starts the sync.
    pub(super) async fn take(link: LinkStream, pid: u32) -> Result<NodeLink, LinkError> {
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let no_channel = || LinkError::Protocol("no CHANNEL from the node-worker bridge".into());
        let received = tokio::time::timeout(HELLO_TIMEOUT, link.recv(&mut buf))
            .await
            .map_err(|_| no_channel())??;
        let (Message::Channel, Some(channel)) =
            (Message::decode(&buf[..received.len])?, received.fd)
        else {
            return Err(no_channel());
        };
        link::check_seqpacket(&channel)?;
        let id = next_sync_id();
        let mut out = Vec::with_capacity(64);
        node_ipc::encode_sync(&mut out, &id);
        // Room for one short line within the HELLO timeout, or Node is not reading at all.
        let sent = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match link::send_raw(channel.as_raw_fd(), &out, None) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(FULL_RETRY).await
                    }
                    sent => return sent,
                }
            }
        });
        sent.await
            .map_err(|_| LinkError::Protocol("Node does not read its channel".into()))??;
        Ok(NodeLink {
            link,
            pid,
            watched: None,
            channel,
            read_by: None,
            session: NodeSession::new(id),
        })
    }

    pub(super) fn is_ready(&self) -> bool {
        self.session.in_step()
    }

    /// Whether the Node package serves lanes. Not yet: everything goes to Node as
    /// connections. (Lanes for Node come with the package's side of them.)
    pub(super) fn takes_lanes(&self) -> bool {
        false
    }

    /// Never called while [`NodeLink::takes_lanes`] is false.
    pub(super) fn send_lanes(
        &mut self,
        _out: &mut Vec<u8>,
        _lanes: &[super::LaneGrant],
    ) -> io::Result<()> {
        Err(io::Error::other("this Node worker does not serve lanes"))
    }

    pub(super) fn try_send_conn(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        held: &Held,
    ) -> io::Result<()> {
        node_ipc::encode_connection(out, seq, held.peer, held.local, &held.listener);
        link::send_raw(self.channel.as_raw_fd(), out, Some(held.stream.as_fd()))
    }

    pub(super) fn send_drained(&mut self) -> io::Result<()> {
        link::send_raw(self.channel.as_raw_fd(), node_ipc::DRAIN_ANSWER_LINE, None)
    }

    /// Watches the channel when nothing is in flight (or it is syncing); otherwise returns
    /// when to read it at the latest.
    pub(super) fn before_sleep(&mut self, in_flight: usize) -> Result<Option<Instant>, LinkError> {
        let watch = in_flight == 0 || !self.session.in_step();
        match (watch, self.watched.is_some()) {
            (true, false) => {
                let dup = self.channel.try_clone()?;
                self.watched = Some(link::register(dup, Interest::READABLE)?);
            }
            (false, true) => self.watched = None,
            _ => {}
        }
        if watch {
            self.read_by = None;
            return Ok(None);
        }
        Ok(Some(
            *self
                .read_by
                .get_or_insert_with(|| Instant::now() + ACK_READ_DELAY),
        ))
    }

    /// Reads what the channel has waiting if it is not watched.
    pub(super) fn read_now(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
    ) -> Result<(), LinkError> {
        if self.watched.is_some() {
            return Ok(());
        }
        self.read_by = None;
        self.read_available(buf, events)
    }

    pub(super) async fn next(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
        want_writable: bool,
    ) -> Result<(), LinkError> {
        tokio::select! {
            received = self.link.recv(buf) => {
                if received?.len == 0 {
                    events.push(Event::Closed("the node-worker bridge closed the link"));
                    return Ok(());
                }
                Err(LinkError::Protocol("a message on a Node worker's link after CHANNEL".into()))
            }
            readable = readable(self.watched.as_ref()) => {
                readable?;
                self.read_available(buf, events)
            }
            () = tokio::time::sleep(FULL_RETRY), if want_writable => {
                events.push(Event::Writable);
                Ok(())
            }
        }
    }

    /// Reads every record waiting in the channel.
    fn read_available(&mut self, buf: &mut [u8], events: &mut Vec<Event>) -> Result<(), LinkError> {
        let session = &mut self.session;
        let end = node_ipc::read_lines(self.channel.as_raw_fd(), buf, |line| {
            session.heard(line, events);
            ControlFlow::Continue(())
        })?;
        if let ReadEnd::Closed(reason) = end {
            events.push(Event::Closed(reason));
        }
        Ok(())
    }
}

/// Waits until a watched channel has something to read, and clears its readiness: the
/// caller reads until `WouldBlock`. Never resolves for a channel not watched.
async fn readable(watched: Option<&AsyncFd<OwnedFd>>) -> io::Result<()> {
    match watched {
        Some(watched) => {
            watched.readable().await?.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// What Node's lines mean for the link, apart from any I/O: the sync, and which
/// connection each ACK or NACK answers.
#[derive(Debug)]
struct NodeSession {
    /// The id of the `sync` sent, until Node answers it; then `None`: in step.
    syncing: Option<String>,
    /// Lines Node has answered (ACK or NACK) on this link: each answer is for the next
    /// line sent, and sequence numbers count the lines sent, from 1.
    answered: u64,
}

impl NodeSession {
    fn new(sync_id: String) -> NodeSession {
        NodeSession {
            syncing: Some(sync_id),
            answered: 0,
        }
    }

    /// Node has answered the sync: what it sends now is about this link.
    fn in_step(&self) -> bool {
        self.syncing.is_none()
    }

    /// Appends what `line` means to `events`.
    fn heard(&mut self, line: FromNode, events: &mut Vec<Event>) {
        if let Some(id) = &self.syncing {
            match line {
                FromNode::Synced {
                    id: answer,
                    draining,
                } if answer == *id => {
                    self.syncing = None;
                    events.push(Event::Ready);
                    if draining {
                        events.push(Event::Drain);
                    }
                }
                stale => debug!(line = ?stale, "a line from before the sync dropped"),
            }
            return;
        }
        match line {
            FromNode::Ack => {
                self.answered += 1;
                // One event for a run of ACKs read together.
                match events.last_mut() {
                    Some(Event::Acked(last)) => *last = self.answered,
                    _ => events.push(Event::Acked(self.answered)),
                }
            }
            FromNode::Nack => {
                self.answered += 1;
                events.push(Event::Resend(self.answered));
            }
            FromNode::DrainRequest => events.push(Event::Drain),
            other => debug!(line = ?other, "message from Node ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::exchange_hello;
    use crate::wire::Role;
    use std::os::unix::net::UnixDatagram;

    fn synced(id: &str, draining: bool) -> FromNode {
        FromNode::Synced {
            id: id.into(),
            draining,
        }
    }

    #[test]
    fn lines_before_the_sync_answer_are_dropped() {
        let mut session = NodeSession::new("7-1".into());
        let mut events = Vec::new();
        for stale in [
            FromNode::Ack,
            FromNode::DrainRequest,
            FromNode::Nack,
            synced("6-1", false),
        ] {
            session.heard(stale, &mut events);
        }
        assert!(events.is_empty() && !session.in_step());
        session.heard(synced("7-1", false), &mut events);
        assert_eq!(events, [Event::Ready]);
        assert!(session.in_step());
    }

    #[test]
    fn a_node_that_was_draining_answers_the_sync_with_a_drain() {
        let mut session = NodeSession::new("7-2".into());
        let mut events = Vec::new();
        session.heard(synced("7-2", true), &mut events);
        assert_eq!(events, [Event::Ready, Event::Drain]);
    }

    #[test]
    fn answers_count_the_lines_sent_in_order() {
        let mut session = NodeSession::new("7-3".into());
        let mut events = Vec::new();
        session.heard(synced("7-3", false), &mut events);
        events.clear();
        for line in [
            FromNode::Ack,
            FromNode::Ack,
            FromNode::Nack,
            FromNode::Ack,
            FromNode::Other("{\"hello\":\"from the app\"}".into()),
            FromNode::Ready,
            FromNode::DrainRequest,
        ] {
            session.heard(line, &mut events);
        }
        assert_eq!(
            events,
            [
                Event::Acked(2),
                Event::Resend(3),
                Event::Acked(4),
                Event::Drain
            ]
        );
    }

    /// A bridge that passes a channel whose Node end the test plays, with lines a previous
    /// dispatcher left unread already in it.
    /// Also returns the bridge's end of the link: the link closes when it goes.
    async fn node_link() -> (NodeLink, UnixDatagram, LinkStream) {
        let (dispatcher, bridge) = LinkStream::pair().unwrap();
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let node = UnixDatagram::from(theirs);
        node.send(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n").unwrap();
        node.send(b"{\"stickyDispatch\":\"drain-request\"}\n")
            .unwrap();
        let bridge_side = async {
            exchange_hello(&bridge, Role::NodeWorker, 3, 0)
                .await
                .unwrap();
            let mut out = Vec::new();
            Message::Channel.encode(&mut out);
            bridge.send(&out, Some(ours.as_fd())).await.unwrap();
        };
        let dispatcher_side = async {
            let hello = exchange_hello(&dispatcher, Role::Dispatcher, 3, 0).await?;
            NodeLink::take(dispatcher, hello.pid).await
        };
        let (link, ()) = tokio::join!(dispatcher_side, bridge_side);
        (link.unwrap(), node, bridge)
    }

    fn sync_id_sent(node: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let len = node.recv(&mut buf).unwrap();
        let sync: serde_json::Value = serde_json::from_slice(&buf[..len]).unwrap();
        assert_eq!(sync["stickyDispatch"], "sync");
        sync["id"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_node_channel_syncs_then_is_read_when_the_slot_wakes() {
        let (mut link, node, bridge) = node_link().await;
        assert!(!link.is_ready(), "nothing is sent before the sync");
        let id = sync_id_sent(&node);
        node.send(b"{\"stickyDispatch\":\"synced\",\"id\":\"not-ours\"}\n")
            .unwrap();
        node.send(
            format!("{{\"stickyDispatch\":\"synced\",\"id\":\"{id}\",\"draining\":false}}\n")
                .as_bytes(),
        )
        .unwrap();
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let mut events = Vec::new();
        assert_eq!(link.before_sleep(0).unwrap(), None, "watched while syncing");
        while events.is_empty() {
            link.next(&mut buf, &mut events, false).await.unwrap();
        }
        // The stale ACK, drain request and foreign sync answer were dropped.
        assert_eq!(events, [Event::Ready]);
        assert!(link.is_ready());

        // In flight: not watched; read when the slot wakes.
        assert!(link.before_sleep(4).unwrap().is_some());
        node.send(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n").unwrap();
        node.send(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").unwrap();
        events.clear();
        link.read_now(&mut buf, &mut events).unwrap();
        assert_eq!(events, [Event::Acked(1), Event::Resend(2)]);
        link.send_drained().unwrap();
        let mut line = [0u8; 64];
        let len = node.recv(&mut line).unwrap();
        assert_eq!(&line[..len], node_ipc::DRAIN_ANSWER_LINE);

        drop(node);
        events.clear();
        link.read_now(&mut buf, &mut events).unwrap();
        assert!(
            matches!(events.as_slice(), [Event::Closed(_)]),
            "{events:?}"
        );

        // The bridge going closes the link too.
        drop(bridge);
        assert_eq!(link.before_sleep(0).unwrap(), None);
        events.clear();
        while events.is_empty() {
            link.next(&mut buf, &mut events, false).await.unwrap();
        }
        assert!(
            matches!(events.as_slice(), [Event::Closed(_)]),
            "{events:?}"
        );
    }
}
