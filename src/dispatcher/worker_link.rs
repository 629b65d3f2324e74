//! The dispatcher's end of one worker's link, in either of its two dialects:
//!
//! - the link protocol (`crate::wire`): CONN with the fd on the link, ACK, DRAIN, DRAINED;
//! - Node.js's (`crate::node_ipc`), for a `node-worker` bridge, which says role 2 in its
//!   HELLO and then passes its Node process's IPC channel (CHANNEL). Connections go to
//!   Node directly, one NODE_HANDLE line with its fd each; Node's ACK lines acknowledge
//!   them one by one, in the order sent; the bridge stays out of the per-connection path
//!   (no extra process woken, no second hand-off) and its link only says, by closing,
//!   that the worker is gone.
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
//! Node's `synced` with that id is stale and dropped, and nothing is sent until then.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;
use tracing::debug;

use super::state::Held;
use crate::link::{self, LinkStream, Received};
use crate::node_ipc::{self, FromNode};
use crate::shared::{exchange_hello, LinkError, HELLO_TIMEOUT};
use crate::wire::{self, Conn, Message, Role};

/// What a worker said, in either dialect.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// Every connection sent up to this sequence number is the worker's.
    Acked(u64),
    /// Node got connection `seq` (the oldest not yet answered) without its fd.
    Refused(u64),
    /// The worker is stopping: send nothing more, then answer with [`WorkerLink::send_drained`].
    Drain,
    /// A Node worker answered the sync: connections may be sent.
    Synced,
}

/// How long Node's ACKs may wait unread in its channel while connections are in flight:
/// the dispatcher keeps its copies of those connections' fds that much longer (bounded by
/// `max_in_flight`), and the hand-off histogram counts it.
const ACK_READ_DELAY: Duration = Duration::from_millis(2);
/// How often a send to a full Node channel is tried again. The channel is not watched for
/// write space: the kernel signals it each time Node reads a line, and each signal would
/// wake the dispatcher; a full channel means a Node that does not read, which is rare and
/// bounded by the bridge's `--ack-timeout`.
const FULL_RETRY: Duration = Duration::from_millis(1);

/// An established link to a worker.
pub(super) struct WorkerLink {
    link: LinkStream,
    node: Option<NodeChannel>,
    /// The worker's process id (its HELLO), for logs.
    pub(super) pid: u32,
}

/// A Node process's IPC channel, passed by its bridge.
struct NodeChannel {
    /// Registered for readability while nothing is in flight ([`WorkerLink::settle`]);
    /// a duplicate of `fd`, so that dropping it takes the channel out of the reactor.
    /// Declared before `fd`: deregistered before the fd closes.
    watched: Option<AsyncFd<OwnedFd>>,
    fd: OwnedFd,
    /// Lines Node has answered (ACK or NACK) on this link: each answer is for the next
    /// line sent, and sequence numbers count the lines sent, from 1. (Atomics only to be
    /// written from the slot's receive future, which shares the link with its send side;
    /// one task uses them.)
    answered: AtomicU64,
    /// The number of the `sync` sent (see [`sync_id`]) until Node answers it, then 0.
    syncing: AtomicU64,
    /// While not watched: when to read it at the latest.
    read_by: Option<Instant>,
}

/// A sync's id: unique to this dispatcher process, and to the link within it.
fn sync_id(number: u64) -> String {
    format!("{}-{number}", std::process::id())
}

/// Distinguishes the syncs of one dispatcher's links (the pid, those of its predecessors);
/// from 1, as 0 means "in step".
static SYNCS: AtomicU64 = AtomicU64::new(1);

impl WorkerLink {
    /// Connects to `@name`, checks who listens (`allowed` uids), exchanges HELLOs and, with
    /// a Node worker, takes its channel and starts the sync.
    pub(super) async fn open(
        name: &str,
        index: u32,
        allowed: &[nix::unistd::Uid],
    ) -> Result<WorkerLink, LinkError> {
        let link = LinkStream::connect(name)?;
        let peer = link.peer_cred()?;
        if !allowed.contains(&peer.uid) {
            // Nothing is sent to an impostor, not even our HELLO.
            return Err(LinkError::Impostor {
                uid: peer.uid.as_raw(),
                pid: peer.pid,
                allowed: "worker_users",
            });
        }
        WorkerLink::over(link, index).await
    }

    /// Exchanges HELLOs on a connected link (and takes a Node worker's channel).
    async fn over(link: LinkStream, index: u32) -> Result<WorkerLink, LinkError> {
        let hello = exchange_hello(&link, Role::Dispatcher, index).await?;
        let node = match hello.role {
            Role::NodeWorker => Some(NodeChannel::receive(&link).await?),
            _ => None,
        };
        Ok(WorkerLink {
            link,
            node,
            pid: hello.pid,
        })
    }

    /// Whether connections may be sent (a Node worker has answered the sync).
    pub(super) fn is_ready(&self) -> bool {
        match &self.node {
            Some(node) => node.syncing.load(Ordering::Relaxed) == 0,
            None => true,
        }
    }

    /// Sends `held` as connection `seq`, now, or fails with `WouldBlock` (then wait for
    /// [`writable`](Self::writable)). `out` is scratch space.
    pub(super) fn try_send_conn(&self, out: &mut Vec<u8>, seq: u64, held: &Held) -> io::Result<()> {
        let fd = Some(held.stream.as_fd());
        match &self.node {
            None => {
                Message::Conn(Conn {
                    seq,
                    peer: held.peer,
                    local: held.local,
                    listener: held.listener.to_string(),
                })
                .encode(out);
                self.link.try_send(out, fd)
            }
            Some(node) => {
                node_ipc::encode_connection(out, seq, held.peer, held.local, &held.listener);
                link::send_raw(node.fd.as_raw_fd(), out, fd)
            }
        }
    }

    /// Answers a drain: nothing after `last_seq` will be sent. Not waiting for room: a
    /// worker that does not get it stops on its own after its timeout.
    pub(super) fn send_drained(&self, out: &mut Vec<u8>, last_seq: u64) -> io::Result<()> {
        match &self.node {
            None => {
                Message::Drained { last_seq }.encode(out);
                self.link.try_send(out, None)
            }
            Some(node) => link::send_raw(node.fd.as_raw_fd(), node_ipc::DRAIN_LINE, None),
        }
    }

    /// Waits until a send may succeed (for a Node channel: until it is worth trying again).
    pub(super) async fn writable(&self) -> io::Result<()> {
        match &self.node {
            None => self.link.writable().await,
            Some(_) => {
                tokio::time::sleep(FULL_RETRY).await;
                Ok(())
            }
        }
    }

    /// Before the slot sleeps with `in_flight` connections unacknowledged: watches a Node
    /// channel when nothing is in flight (or it is syncing), and otherwise returns when
    /// to read it ([`read_unwatched`](Self::read_unwatched)) at the latest.
    pub(super) fn settle(&mut self, in_flight: usize) -> Result<Option<Instant>, LinkError> {
        let Some(node) = &mut self.node else {
            return Ok(None);
        };
        let watch = in_flight == 0 || node.syncing.load(Ordering::Relaxed) != 0;
        match (watch, node.watched.is_some()) {
            (true, false) => {
                let dup = node.fd.try_clone()?;
                node.watched = Some(link::register(dup, Interest::READABLE)?);
            }
            (false, true) => node.watched = None,
            _ => {}
        }
        if watch {
            node.read_by = None;
            return Ok(None);
        }
        Ok(Some(
            *node
                .read_by
                .get_or_insert_with(|| Instant::now() + ACK_READ_DELAY),
        ))
    }

    /// Reads what a Node channel that is not watched has waiting, without waiting (the
    /// slot is awake anyway). `Ok(Some(reason))`: Node went away.
    pub(super) fn read_unwatched(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
    ) -> Result<Option<&'static str>, LinkError> {
        match &mut self.node {
            Some(node) if node.watched.is_none() => {
                node.read_by = None;
                node.read_available(buf, events)
            }
            _ => Ok(None),
        }
    }

    /// Waits for what the worker says next and appends it to `events` (empty if what came
    /// was of no interest). `Ok(Some(reason))`: the worker went away. Cancel-safe.
    pub(super) async fn recv(
        &self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
    ) -> Result<Option<&'static str>, LinkError> {
        let Some(node) = &self.node else {
            return recv_link_message(&self.link, buf, events).await;
        };
        tokio::select! {
            // The bridge's link carries nothing after CHANNEL; it closes when the bridge goes.
            received = self.link.recv(buf) => {
                let received = received?;
                if received.len == 0 {
                    return Ok(Some("the node-worker bridge closed the link"));
                }
                Err(LinkError::Protocol("a message on a Node worker's link after CHANNEL".into()))
            }
            readable = readable(node.watched.as_ref()) => {
                readable?;
                node.read_available(buf, events)
            }
        }
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

async fn recv_link_message(
    link: &LinkStream,
    buf: &mut [u8],
    events: &mut Vec<Event>,
) -> Result<Option<&'static str>, LinkError> {
    let Received { len, fd } = link.recv(buf).await?;
    if len == 0 {
        return Ok(Some("the worker closed the link"));
    }
    if fd.is_some() {
        return Err(LinkError::Protocol("the worker sent an fd".into()));
    }
    match Message::decode(&buf[..len])? {
        Message::Ack { seq } => events.push(Event::Acked(seq)),
        Message::Drain => events.push(Event::Drain),
        other => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
    }
    Ok(None)
}

impl NodeChannel {
    /// Takes the channel the bridge sends right after its HELLO, and starts the sync.
    async fn receive(link: &LinkStream) -> Result<NodeChannel, LinkError> {
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let no_channel = || LinkError::Protocol("no CHANNEL from the node-worker bridge".into());
        let received = tokio::time::timeout(HELLO_TIMEOUT, link.recv(&mut buf))
            .await
            .map_err(|_| no_channel())??;
        let (Message::Channel, Some(fd)) = (Message::decode(&buf[..received.len])?, received.fd)
        else {
            return Err(no_channel());
        };
        link::check_seqpacket(&fd)?;
        let number = SYNCS.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(64);
        node_ipc::encode_sync(&mut out, &sync_id(number));
        // Room for one short line within the HELLO timeout, or Node is not reading at all.
        let sent = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match link::send_raw(fd.as_raw_fd(), &out, None) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(FULL_RETRY).await
                    }
                    sent => return sent,
                }
            }
        });
        sent.await
            .map_err(|_| LinkError::Protocol("Node does not read its channel".into()))??;
        Ok(NodeChannel {
            watched: None,
            fd,
            answered: AtomicU64::new(0),
            syncing: AtomicU64::new(number),
            read_by: None,
        })
    }

    /// Reads every record waiting; `Ok(Some(_))` if Node closed the channel.
    fn read_available(
        &self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
    ) -> Result<Option<&'static str>, LinkError> {
        loop {
            let record = match link::recv_record(self.fd.as_raw_fd(), buf) {
                Ok(record) => record,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // Node died with lines unread.
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(Some("Node's IPC channel was reset (Node died)"))
                }
                Err(err) => return Err(err.into()),
            };
            if record.len == 0 {
                return Ok(Some("Node closed its IPC channel"));
            }
            if record.truncated {
                // Ours are short: this is the app's own process.send().
                debug!(len = record.len, "a long message from Node ignored");
                continue;
            }
            for line in node_ipc::lines(&buf[..record.len]) {
                self.heard(line, events);
            }
        }
    }

    fn heard(&self, line: FromNode, events: &mut Vec<Event>) {
        let number = self.syncing.load(Ordering::Relaxed);
        if number != 0 {
            match line {
                FromNode::Synced { id, draining } if id == sync_id(number) => {
                    self.syncing.store(0, Ordering::Relaxed);
                    events.push(Event::Synced);
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
                let seq = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
                // One event for a run of ACKs read together.
                match events.last_mut() {
                    Some(Event::Acked(last)) => *last = seq,
                    _ => events.push(Event::Acked(seq)),
                }
            }
            FromNode::Nack => {
                let seq = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
                events.push(Event::Refused(seq));
            }
            FromNode::DrainRequest => events.push(Event::Drain),
            other => debug!(line = ?other, "message from Node ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A bridge that passes a channel whose Node end the test plays, with lines a previous
    /// dispatcher left unread already in it.
    /// Also returns the bridge's end of the link: the link closes when it goes.
    async fn node_link() -> (WorkerLink, UnixDatagram, LinkStream) {
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
            exchange_hello(&bridge, Role::NodeWorker, 3).await.unwrap();
            let mut out = Vec::new();
            Message::Channel.encode(&mut out);
            bridge.send(&out, Some(ours.as_fd())).await.unwrap();
        };
        let (link, ()) = tokio::join!(WorkerLink::over(dispatcher, 3), bridge_side);
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
    async fn a_node_channel_syncs_then_counts_node_acks_in_order() {
        let (mut link, node, _bridge) = node_link().await;
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
        assert_eq!(link.settle(0).unwrap(), None, "watched while syncing");
        while events.is_empty() {
            assert_eq!(link.recv(&mut buf, &mut events).await.unwrap(), None);
        }
        // The stale ACK, drain request and foreign sync answer were dropped.
        assert_eq!(events, [Event::Synced]);
        assert!(link.is_ready());

        // In flight: not watched; read when the slot wakes.
        assert!(link.settle(4).unwrap().is_some());
        for line in [
            &b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"[..],
            b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n",
            b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            b"{\"hello\":\"from the app\"}\n",
            b"{\"stickyDispatch\":\"drain-request\"}\n",
        ] {
            node.send(line).unwrap();
        }
        events.clear();
        assert_eq!(link.read_unwatched(&mut buf, &mut events).unwrap(), None);
        assert_eq!(
            events,
            [
                Event::Acked(2),
                Event::Refused(3),
                Event::Acked(4),
                Event::Drain
            ]
        );
        let mut out = Vec::new();
        link.send_drained(&mut out, 4).unwrap();
        let mut line = [0u8; 64];
        let len = node.recv(&mut line).unwrap();
        assert_eq!(&line[..len], node_ipc::DRAIN_LINE);

        drop(node);
        events.clear();
        assert!(link
            .read_unwatched(&mut buf, &mut events)
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_node_that_was_draining_is_sent_nothing_after_the_sync() {
        let (mut link, node, _bridge) = node_link().await;
        let id = sync_id_sent(&node);
        node.send(
            format!("{{\"stickyDispatch\":\"synced\",\"id\":\"{id}\",\"draining\":true}}\n")
                .as_bytes(),
        )
        .unwrap();
        let mut buf = [0u8; wire::MAX_MESSAGE];
        let mut events = Vec::new();
        link.settle(0).unwrap();
        while events.is_empty() {
            link.recv(&mut buf, &mut events).await.unwrap();
        }
        assert_eq!(events, [Event::Synced, Event::Drain]);
    }
}
