//! What the dispatcher's tasks share: the held connection, the state every task reads
//! ([`Shared`], with the routing decision and the metrics), the queues that keep their
//! gauges, the lifecycle [`Phase`], and log throttling.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::fdstore::{Description, FdStore, Stored};
use super::metrics::{Metrics, Totals};
use crate::config::{OnWorkerDown, Settings};
use crate::routing::{Router, RoutingKey};

/// Where the dispatcher is in its life. Acceptors stop at `Stopping`. At `Finishing`
/// (every acceptor gone, so nothing new arrives) slots deliver what they can and return
/// what waits for a worker that is down, if the fd store can keep it. At `Abandon` (the
/// shutdown timeout) they return at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    Running,
    Stopping,
    Finishing,
    Abandon,
}

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

/// State every task reads.
pub(super) struct Shared {
    /// The settings in force; `Control::Reload` replaces the ones that can change live.
    settings: watch::Receiver<Arc<Settings>>,
    /// systemd's fd store, where connections waiting for a worker that is down are kept.
    pub(super) fd_store: Option<Arc<FdStore>>,
    pub(super) router: Router,
    slots: Box<[mpsc::UnboundedSender<Held>]>,
    /// Per worker: whether it takes connections (its slot's lifecycle is `Up`). The slot
    /// sets it; failover reads it, and the `worker_up` gauge shows it.
    live: Box<[AtomicBool]>,
    /// Counts, gauges (among them which workers are up) and the hand-off time.
    pub(super) metrics: Metrics,
}

impl Shared {
    pub(super) fn new(
        settings: watch::Receiver<Arc<Settings>>,
        fd_store: Option<Arc<FdStore>>,
        slots: Vec<mpsc::UnboundedSender<Held>>,
        listeners: &[Arc<str>],
    ) -> Shared {
        let current = settings.borrow().clone();
        let workers = current.workers;
        Shared {
            router: Router::new(
                workers,
                current.ipv4_prefix,
                current.ipv6_prefix,
                current.hash_seed,
            ),
            slots: slots.into(),
            live: (0..workers.get()).map(|_| AtomicBool::new(false)).collect(),
            metrics: Metrics::new(workers.get(), listeners),
            settings,
            fd_store,
        }
    }

    pub(super) fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// The key of a client known only by its address.
    pub(super) fn peer_key(&self, peer: Option<SocketAddr>) -> RoutingKey {
        self.router.key(peer.map(|peer| peer.ip()))
    }

    /// Sends a new connection to its worker's slot, by its key; returns the index. Every
    /// connection goes through here once, and through [`Shared::fail_over`] at most once:
    /// these two are the routing decisions.
    pub(super) fn route(&self, held: Held) -> u32 {
        let index = self.router.worker_for(&held.key);
        self.send_to(index, held);
        index
    }

    /// When `on_worker_down = failover`, sends a connection its worker cannot take to the
    /// next live choice for its key, once. Otherwise, or if no other worker is live, gives
    /// the connection back.
    pub(super) fn fail_over(&self, mut held: Held) -> FailOver {
        if held.failed_over || self.settings().on_worker_down != OnWorkerDown::Failover {
            return FailOver::Kept(held);
        }
        let live = |index: u32| self.is_live(index);
        let Some(target) = self.router.failover_for(&held.key, live) else {
            return FailOver::Kept(held);
        };
        held.failed_over = true;
        // It waits anew (pending_timeout) in the slot it goes to.
        held.since = Instant::now();
        self.metrics.worker(target).failed_over.inc();
        self.send_to(target, held);
        FailOver::Sent(target)
    }

    fn send_to(&self, index: u32, held: Held) {
        // A slot's inbox lives as long as `Shared`; a send fails only while shutting down,
        // and then the connection is closed by the drop, as the exit log reports.
        let _ = self.slots[index as usize].send(held);
    }

    /// Whether worker `index`'s link is up and it takes connections.
    pub(super) fn is_live(&self, index: u32) -> bool {
        self.live[index as usize].load(Ordering::Relaxed)
    }

    /// Worker `index`'s slot says whether it takes connections.
    pub(super) fn set_live(&self, index: u32, live: bool) {
        if self.live[index as usize].swap(live, Ordering::Relaxed) != live {
            self.metrics.worker(index).up.set(i64::from(live));
        }
    }

    pub(super) fn status_line(&self) -> String {
        let Totals {
            live,
            handed_off,
            waiting,
            in_flight,
            resent,
            turned_away,
            failed_over,
        } = self.metrics.totals();
        let restart_needed = &self.settings.borrow().restart_needed;
        let restart_note = if restart_needed.is_empty() {
            String::new()
        } else {
            format!("; restart needed for {}", restart_needed.join(", "))
        };
        format!(
            "{live}/{} workers live; {handed_off} connections handed off; {waiting} waiting, \
             {in_flight} in flight; {resent} re-sent, {turned_away} turned away, \
             {failed_over} failed over{restart_note}",
            self.router.workers(),
        )
    }
}

/// What [`Shared::fail_over`] did.
pub(super) enum FailOver {
    /// Sent to the slot of this worker index.
    Sent(u32),
    /// Not failed over: the caller still has it.
    Kept(Held),
}

/// A slot's queue, keeping its gauge equal to its length: every insertion adds one,
/// every removal (including the drop) takes one away.
pub(super) struct Queue<T> {
    items: VecDeque<T>,
    gauge: IntGauge,
}

impl<T> Queue<T> {
    pub(super) fn new(gauge: IntGauge) -> Queue<T> {
        Queue {
            items: VecDeque::new(),
            gauge,
        }
    }

    pub(super) fn push_back(&mut self, item: T) {
        self.gauge.inc();
        self.items.push_back(item);
    }

    pub(super) fn push_front(&mut self, item: T) {
        self.gauge.inc();
        self.items.push_front(item);
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.gauge.dec();
        Some(item)
    }

    pub(super) fn pop_back(&mut self) -> Option<T> {
        let item = self.items.pop_back()?;
        self.gauge.dec();
        Some(item)
    }

    /// Removes the first item if `condition` holds for it.
    pub(super) fn pop_front_if(&mut self, condition: impl FnOnce(&T) -> bool) -> Option<T> {
        if self.items.front().is_some_and(condition) {
            self.pop_front()
        } else {
            None
        }
    }

    pub(super) fn front(&self) -> Option<&T> {
        self.items.front()
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.iter_mut()
    }

    /// Empties the queue, in order.
    pub(super) fn take_all(&mut self) -> Vec<T> {
        self.gauge.sub(self.items.len() as i64);
        self.items.drain(..).collect()
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        self.gauge.sub(self.items.len() as i64);
    }
}

/// Lets a repeated warning through at most once per period, so a fault under load logs
/// a line every few seconds rather than one per connection.
pub(super) struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub(super) fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}
