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
//!
//! A package that serves lanes says so in its `synced`; its lanes go right after that, as
//! handles of their own (`net.Native` lines, which Node acknowledges like connections),
//! then a `lanes` line that closes the set. Node's running count of the connections it
//! accepted on them comes back as `accepted` lines.

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;
use tracing::debug;

use super::{Event, LaneGrant};
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

    /// Whether the Node package said, in its `synced`, that it serves lanes.
    pub(super) fn takes_lanes(&self) -> bool {
        self.session.takes_lanes
    }

    /// A `lane` handle per lane, then `lanes`. Sent right after the sync, before any
    /// connection: Node's answers to the lanes come first, and are not connections'.
    pub(super) fn send_lanes(&mut self, out: &mut Vec<u8>, lanes: &[LaneGrant]) -> io::Result<()> {
        for lane in lanes {
            node_ipc::encode_lane(out, lane.listener, lane.backlog, lane.local);
            link::send_raw(self.channel.as_raw_fd(), out, Some(lane.socket))?;
            self.session.lane_sent();
        }
        node_ipc::encode_lanes(out, lanes.len());
        link::send_raw(self.channel.as_raw_fd(), out, None)
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
    /// Node's `synced` said it serves lanes.
    takes_lanes: bool,
    /// Lanes sent that Node has not answered yet. They go before any connection, and Node
    /// answers handles in the order sent: the first answers are theirs.
    lanes_unanswered: u64,
    /// Connection lines Node has answered (ACK or NACK) on this link: each answer is for
    /// the next connection sent, and sequence numbers count the connections sent, from 1.
    answered: u64,
}

impl NodeSession {
    fn new(sync_id: String) -> NodeSession {
        NodeSession {
            syncing: Some(sync_id),
            takes_lanes: false,
            lanes_unanswered: 0,
            answered: 0,
        }
    }

    /// A lane's handle went out: Node's next unclaimed answer is its.
    fn lane_sent(&mut self) {
        self.lanes_unanswered += 1;
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
                    lanes,
                } if answer == *id => {
                    self.syncing = None;
                    self.takes_lanes = lanes;
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
            FromNode::Ack if self.lanes_unanswered > 0 => self.lanes_unanswered -= 1,
            // Node is out of file descriptors, say: it does not serve that lane, and the
            // kernel queues its clients there. A new link sends the set again.
            FromNode::Nack if self.lanes_unanswered > 0 => {
                self.lanes_unanswered -= 1;
                events.push(Event::Closed("Node received a lane without its fd"));
            }
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
            // A running total: the last one read says it all.
            FromNode::Accepted(count) => match events.last_mut() {
                Some(Event::Accepted(last)) => *last = count,
                _ => events.push(Event::Accepted(count)),
            },
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
            lanes: false,
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

    fn synced_with_lanes(id: &str) -> FromNode {
        FromNode::Synced {
            id: id.into(),
            draining: false,
            lanes: true,
        }
    }

    #[test]
    fn node_says_in_its_sync_answer_whether_it_serves_lanes() {
        let mut events = Vec::new();
        let mut old_package = NodeSession::new("7-4".into());
        old_package.heard(synced("7-4", false), &mut events);
        assert!(!old_package.takes_lanes);
        let mut session = NodeSession::new("7-5".into());
        // A previous link's answer says nothing about this one.
        session.heard(synced_with_lanes("7-4"), &mut events);
        assert!(!session.takes_lanes);
        session.heard(synced_with_lanes("7-5"), &mut events);
        assert!(session.takes_lanes);
        assert_eq!(events, [Event::Ready, Event::Ready]);
    }

    #[test]
    fn the_first_answers_are_the_lanes_then_sequence_numbers_count_connections() {
        let mut session = NodeSession::new("7-6".into());
        let mut events = Vec::new();
        session.heard(synced_with_lanes("7-6"), &mut events);
        events.clear();
        session.lane_sent();
        session.lane_sent();
        for line in [
            FromNode::Ack,
            FromNode::Ack,
            FromNode::Ack,
            FromNode::Nack,
            FromNode::Ack,
        ] {
            session.heard(line, &mut events);
        }
        assert_eq!(
            events,
            [Event::Acked(1), Event::Resend(2), Event::Acked(3)],
            "the two lanes' ACKs acknowledge no connection"
        );
    }

    #[test]
    fn a_lane_that_reached_node_without_its_fd_ends_the_link() {
        let mut session = NodeSession::new("7-7".into());
        let mut events = Vec::new();
        session.heard(synced_with_lanes("7-7"), &mut events);
        events.clear();
        session.lane_sent();
        session.lane_sent();
        session.heard(FromNode::Ack, &mut events);
        assert!(events.is_empty());
        session.heard(FromNode::Nack, &mut events);
        assert_eq!(
            events,
            [Event::Closed("Node received a lane without its fd")]
        );
    }

    #[test]
    fn accepted_totals_read_together_are_one_event_and_stale_ones_are_dropped() {
        let mut session = NodeSession::new("7-8".into());
        let mut events = Vec::new();
        session.heard(FromNode::Accepted(40), &mut events);
        assert!(events.is_empty(), "a previous dispatcher's");
        session.heard(synced_with_lanes("7-8"), &mut events);
        events.clear();
        for line in [
            FromNode::Accepted(41),
            FromNode::Accepted(44),
            FromNode::Ack,
            FromNode::Accepted(45),
        ] {
            session.heard(line, &mut events);
        }
        assert_eq!(
            events,
            [Event::Accepted(44), Event::Acked(1), Event::Accepted(45)]
        );
    }

    /// A bridge that passes a channel whose Node end the test plays, with lines a previous
    /// dispatcher left unread already in it.
    /// Also returns the bridge's end of the link: the link closes when it goes.
    async fn node_link() -> (NodeLink, UnixDatagram, LinkStream) {
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
        let (link, bridge) = link_over(ours.as_fd()).await;
        (link, node, bridge)
    }

    /// A bridge that passes `ours` as the channel; returns its end of the link.
    async fn link_over(ours: std::os::fd::BorrowedFd<'_>) -> (NodeLink, LinkStream) {
        let (dispatcher, bridge) = LinkStream::pair().unwrap();
        let bridge_side = async {
            exchange_hello(&bridge, Role::NodeWorker, 3, 0)
                .await
                .unwrap();
            let mut out = Vec::new();
            Message::Channel.encode(&mut out);
            bridge.send(&out, Some(ours)).await.unwrap();
        };
        let dispatcher_side = async {
            let hello = exchange_hello(&dispatcher, Role::Dispatcher, 3, 0).await?;
            NodeLink::take(dispatcher, hello.pid).await
        };
        let (link, ()) = tokio::join!(dispatcher_side, bridge_side);
        (link.unwrap(), bridge)
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

    /// The socket an fd refers to: the same socket has the same (st_dev, st_ino).
    fn identity(fd: impl std::os::fd::AsFd) -> (u64, u64) {
        let stat = nix::sys::stat::fstat(fd.as_fd()).unwrap();
        (stat.st_dev, stat.st_ino)
    }

    #[tokio::test]
    async fn lanes_go_to_node_as_native_handles_then_the_set_and_their_answers_are_not_connections()
    {
        // The test plays Node on a link-like end, which receives the fds.
        let (ours, node) = LinkStream::pair().unwrap();
        let (mut link, _bridge) = link_over(ours.as_fd()).await;
        drop(ours);
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let received = node.recv(&mut buf).await.unwrap();
        let sync: serde_json::Value = serde_json::from_slice(&buf[..received.len]).unwrap();
        let answer = serde_json::json!({
            "stickyDispatch": "synced", "id": sync["id"], "draining": false, "lanes": true,
        });
        node.send(format!("{answer}\n").as_bytes(), None)
            .await
            .unwrap();
        let mut events = Vec::new();
        assert_eq!(link.before_sleep(0).unwrap(), None);
        while events.is_empty() {
            link.next(&mut buf, &mut events, false).await.unwrap();
        }
        assert_eq!(events, [Event::Ready]);
        assert!(link.takes_lanes());

        let sockets = [
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        ];
        let locals = sockets.each_ref().map(|s| s.local_addr().unwrap());
        let grants = [
            LaneGrant {
                listener: "web",
                socket: sockets[0].as_fd(),
                backlog: 4096,
                local: Some(locals[0]),
            },
            LaneGrant {
                listener: "tls",
                socket: sockets[1].as_fd(),
                backlog: 128,
                local: Some(locals[1]),
            },
        ];
        let mut out = Vec::new();
        link.send_lanes(&mut out, &grants).unwrap();
        for (grant, socket) in grants.iter().zip(&sockets) {
            let received = node.recv(&mut buf).await.unwrap();
            let mut expected = Vec::new();
            node_ipc::encode_lane(&mut expected, grant.listener, grant.backlog, grant.local);
            assert_eq!(&buf[..received.len], expected);
            let fd = received.fd.expect("a lane comes with its socket");
            assert_eq!(identity(fd), identity(socket), "{}", grant.listener);
        }
        let received = node.recv(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..received.len],
            b"{\"stickyDispatch\":\"lanes\",\"count\":2}\n"
        );
        assert!(received.fd.is_none());

        // Node core's answers to the two lanes, then to connection 1, and the package's count.
        for line in [
            "{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            "{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            "{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            "{\"stickyDispatch\":\"accepted\",\"count\":9}\n",
        ] {
            node.send(line.as_bytes(), None).await.unwrap();
        }
        events.clear();
        assert!(link.before_sleep(1).unwrap().is_some());
        link.read_now(&mut buf, &mut events).unwrap();
        assert_eq!(events, [Event::Acked(1), Event::Accepted(9)]);

        // No lanes: a set of none.
        link.send_lanes(&mut out, &[]).unwrap();
        let received = node.recv(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..received.len],
            b"{\"stickyDispatch\":\"lanes\",\"count\":0}\n"
        );
    }
}
