//! A client connection the dispatcher holds, from its accept until its worker has it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::fdstore::{Description, FdStore, Stored};
use crate::routing::RoutingKey;

/// A client connection the dispatcher holds until its worker acknowledges it.
pub(super) struct Held {
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: Option<SocketAddr>,
    pub(super) local: Option<SocketAddr>,
    pub(super) listener: Arc<str>,
    pub(super) key: RoutingKey,
    /// When it was accepted: the hand-off time is measured from here.
    pub(super) accepted: Instant,
    /// When it started waiting in its current slot: at accept, when failed over to another
    /// slot, or (taken back from the fd store) when a previous instance accepted it.
    pub(super) since: Instant,
    /// Already sent to a failover worker once: it is not bounced again.
    pub(super) failed_over: bool,
    /// Times a worker sent it back ([`Event::Resend`](super::worker_link::Event::Resend)).
    pub(super) resent: u8,
    /// Its entry in systemd's fd store while it waits for a worker that is down.
    pub(super) stored: Option<Stored>,
    /// Its share of `max_connections`, given back when the connection is let go.
    _permit: OwnedSemaphorePermit,
}

impl Held {
    pub(super) fn new(
        stream: std::net::TcpStream,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        listener: Arc<str>,
        key: RoutingKey,
        permit: OwnedSemaphorePermit,
    ) -> Held {
        let now = Instant::now();
        Held {
            stream,
            peer,
            local,
            listener,
            key,
            accepted: now,
            since: now,
            failed_over: false,
            resent: 0,
            stored: None,
            _permit: permit,
        }
    }
}

impl Held {
    /// Into systemd's fd store with it (once), so that it outlives a crash of the
    /// dispatcher while it waits for a worker that is down.
    pub(super) fn keep_safe(&mut self, store: Option<&Arc<FdStore>>) {
        let (Some(store), None) = (store, &self.stored) else {
            return;
        };
        let what = Description {
            listener: &self.listener,
            peer: self.peer,
            local: self.local,
            key: &self.key,
            since: self.since,
        };
        self.stored = Stored::store(store, std::os::fd::AsFd::as_fd(&self.stream), &what);
    }
}
