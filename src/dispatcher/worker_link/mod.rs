//! The dispatcher's end of one worker's link. A worker speaks one of two dialects, each in
//! a module of its own behind the one small interface of [`WorkerLink`]:
//!
//! - [`plain`]: the link protocol (`crate::wire`): CONN with the fd on the link, ACK,
//!   DRAIN, DRAINED;
//! - [`node`]: Node.js's IPC dialect (`crate::node_ipc`), for a `node-worker` bridge,
//!   which says role 2 in its HELLO and then passes its Node process's IPC channel
//!   (CHANNEL): connections go to Node directly.
//!
//! Whatever the dialect, the slot sees the same [`Event`]s, and every method takes
//! `&mut self`: one task (the slot) owns the link.

mod node;
mod plain;

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use tokio::time::Instant;

use super::held::Held;
use crate::link::LinkStream;
use crate::shared::{exchange_hello, LinkError};
use crate::wire::Role;

/// What a worker said, in either dialect.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// Every connection sent up to this sequence number is the worker's.
    Acked(u64),
    /// Connection `seq` (the oldest not yet acknowledged) came back: send it again.
    Resend(u64),
    /// The worker is stopping: send nothing more, then answer with
    /// [`WorkerLink::send_drained`].
    Drain,
    /// The worker can take connections now (a Node worker answered the sync).
    Ready,
    /// A send that would have blocked may succeed now.
    Writable,
    /// The worker has accepted this many connections on its lanes since it started.
    Accepted(u64),
    /// The worker went away; why.
    Closed(&'static str),
}

/// One of a worker's lanes, as it is passed to the worker: its listening socket in the
/// kernel's group, and what the worker needs to serve it.
#[derive(Clone, Copy, Debug)]
pub(super) struct LaneGrant<'a> {
    /// The listener's name, for the worker's `ClientInfo::listener`.
    pub(super) listener: &'a str,
    pub(super) socket: BorrowedFd<'a>,
    /// The backlog it was created with, for a worker whose server calls `listen()` again.
    pub(super) backlog: u32,
    /// The address it is bound to.
    pub(super) local: Option<SocketAddr>,
}

/// An established link to a worker, in its dialect.
pub(super) enum WorkerLink {
    Plain(plain::PlainLink),
    Node(node::NodeLink),
}

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

    /// Exchanges HELLOs on a connected link; the worker's role says the dialect.
    async fn over(link: LinkStream, index: u32) -> Result<WorkerLink, LinkError> {
        let hello = exchange_hello(&link, Role::Dispatcher, index, 0).await?;
        Ok(match hello.role {
            Role::NodeWorker => WorkerLink::Node(node::NodeLink::take(link, hello.pid).await?),
            _ => WorkerLink::Plain(plain::PlainLink::new(
                link,
                hello.pid,
                hello.features & crate::wire::FEATURE_LANES != 0,
            )),
        })
    }

    /// The worker's process id (its HELLO), for logs.
    pub(super) fn pid(&self) -> u32 {
        match self {
            WorkerLink::Plain(link) => link.pid,
            WorkerLink::Node(link) => link.pid,
        }
    }

    /// Whether connections may be sent at once, or only after [`Event::Ready`].
    pub(super) fn is_ready(&self) -> bool {
        match self {
            WorkerLink::Plain(_) => true,
            WorkerLink::Node(link) => link.is_ready(),
        }
    }

    /// Whether the worker serves lanes (known once it [`is_ready`](Self::is_ready)).
    pub(super) fn takes_lanes(&self) -> bool {
        match self {
            WorkerLink::Plain(link) => link.takes_lanes,
            WorkerLink::Node(link) => link.takes_lanes(),
        }
    }

    /// Passes the worker its lanes (all of them; none tells it to close any it holds), once
    /// per link, before any connection; only to a worker that [`takes_lanes`](Self::takes_lanes).
    pub(super) fn send_lanes(&mut self, out: &mut Vec<u8>, lanes: &[LaneGrant]) -> io::Result<()> {
        match self {
            WorkerLink::Plain(link) => link.send_lanes(out, lanes),
            WorkerLink::Node(link) => link.send_lanes(out, lanes),
        }
    }

    /// Sends `held` as connection `seq`, now, or fails with `WouldBlock` (then wait for
    /// [`Event::Writable`]). `out` is scratch space.
    pub(super) fn try_send_conn(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        held: &Held,
    ) -> io::Result<()> {
        match self {
            WorkerLink::Plain(link) => link.try_send_conn(out, seq, held),
            WorkerLink::Node(link) => link.try_send_conn(out, seq, held),
        }
    }

    /// Answers a drain: nothing after `last_seq` will be sent. Not waiting for room: a
    /// worker that does not get it stops on its own after its timeout.
    pub(super) fn send_drained(&mut self, out: &mut Vec<u8>, last_seq: u64) -> io::Result<()> {
        match self {
            WorkerLink::Plain(link) => link.send_drained(out, last_seq),
            WorkerLink::Node(link) => link.send_drained(),
        }
    }

    /// Before the slot sleeps with `in_flight` connections unacknowledged: when, at the
    /// latest, to wake and [`read_now`](Self::read_now) (a Node channel is not watched
    /// while connections are in flight).
    pub(super) fn before_sleep(&mut self, in_flight: usize) -> Result<Option<Instant>, LinkError> {
        match self {
            WorkerLink::Plain(_) => Ok(None),
            WorkerLink::Node(link) => link.before_sleep(in_flight),
        }
    }

    /// Reads, without waiting, what the worker said that no wake-up announced (the slot is
    /// awake anyway), into `events`.
    pub(super) fn read_now(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
    ) -> Result<(), LinkError> {
        match self {
            WorkerLink::Plain(_) => Ok(()),
            WorkerLink::Node(link) => link.read_now(buf, events),
        }
    }

    /// Waits until the worker says something (appended to `events`; nothing if it was of
    /// no interest) or, with `want_writable`, until a send may succeed. Cancel-safe.
    pub(super) async fn next(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
        want_writable: bool,
    ) -> Result<(), LinkError> {
        match self {
            WorkerLink::Plain(link) => link.next(buf, events, want_writable).await,
            WorkerLink::Node(link) => link.next(buf, events, want_writable).await,
        }
    }
}
