//! What the dispatcher's tasks share: the held connection, the state every task reads
//! ([`Shared`], with the routing decision), the counters and the queues that keep them,
//! the lifecycle [`Phase`], and log throttling.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;

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
    /// When it started waiting in its current slot.
    pub(super) since: Instant,
    /// Already sent to a failover worker once: it is not bounced again.
    pub(super) failed_over: bool,
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
        Held {
            stream,
            peer,
            local,
            listener,
            key,
            since: Instant::now(),
            failed_over: false,
            _permit: permit,
        }
    }
}

/// Counters shown in `STATUS=` and the exit log. `waiting` and `in_flight` are kept by
/// the [`Queue`]s that hold those connections.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) handed_off: AtomicU64,
    waiting: AtomicU64,
    in_flight: AtomicU64,
    pub(super) turned_away: AtomicU64,
    pub(super) failed_over: AtomicU64,
}

/// State every task reads.
pub(super) struct Shared {
    /// The settings in force; `Control::Reload` replaces the ones that can change live.
    settings: watch::Receiver<Arc<Settings>>,
    /// Connections waiting for a down worker at exit go to systemd's fd store.
    pub(super) fd_store: bool,
    pub(super) router: Router,
    live: Box<[AtomicBool]>,
    slots: Box<[mpsc::UnboundedSender<Held>]>,
    pub(super) counters: Counters,
}

impl Shared {
    pub(super) fn new(
        settings: watch::Receiver<Arc<Settings>>,
        fd_store: bool,
        slots: Vec<mpsc::UnboundedSender<Held>>,
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
            live: (0..workers.get()).map(|_| AtomicBool::new(false)).collect(),
            slots: slots.into(),
            counters: Counters::default(),
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
        self.counters.failed_over.fetch_add(1, Ordering::Relaxed);
        self.send_to(target, held);
        FailOver::Sent(target)
    }

    fn send_to(&self, index: u32, held: Held) {
        // A slot's inbox lives as long as `Shared`; a send fails only while shutting down,
        // and then the connection is closed by the drop, as the exit log reports.
        let _ = self.slots[index as usize].send(held);
    }

    pub(super) fn is_live(&self, index: u32) -> bool {
        self.live[index as usize].load(Ordering::Relaxed)
    }

    pub(super) fn set_live(&self, index: u32, live: bool) {
        self.live[index as usize].store(live, Ordering::Relaxed);
    }

    pub(super) fn status_line(&self) -> String {
        let c = &self.counters;
        let live = self.live.iter().filter(|live| live.load(Ordering::Relaxed));
        let restart_needed = &self.settings.borrow().restart_needed;
        let restart_note = if restart_needed.is_empty() {
            String::new()
        } else {
            format!("; restart needed for {}", restart_needed.join(", "))
        };
        format!(
            "{}/{} workers live; {} connections handed off; {} waiting, {} in flight; {} turned away, {} failed over{}",
            live.count(),
            self.live.len(),
            c.handed_off.load(Ordering::Relaxed),
            c.waiting.load(Ordering::Relaxed),
            c.in_flight.load(Ordering::Relaxed),
            c.turned_away.load(Ordering::Relaxed),
            c.failed_over.load(Ordering::Relaxed),
            restart_note,
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

/// Which counter a [`Queue`] keeps.
#[derive(Clone, Copy)]
pub(super) enum Count {
    Waiting,
    InFlight,
}

/// A slot's queue, keeping its counter equal to its length across all slots: every
/// insertion adds one, every removal (including the drop) takes one away.
pub(super) struct Queue<T> {
    items: VecDeque<T>,
    shared: Arc<Shared>,
    count: Count,
}

impl<T> Queue<T> {
    pub(super) fn new(shared: Arc<Shared>, count: Count) -> Queue<T> {
        Queue {
            items: VecDeque::new(),
            shared,
            count,
        }
    }

    fn counter(&self) -> &AtomicU64 {
        let counters = &self.shared.counters;
        match self.count {
            Count::Waiting => &counters.waiting,
            Count::InFlight => &counters.in_flight,
        }
    }

    pub(super) fn push_back(&mut self, item: T) {
        self.counter().fetch_add(1, Ordering::Relaxed);
        self.items.push_back(item);
    }

    pub(super) fn push_front(&mut self, item: T) {
        self.counter().fetch_add(1, Ordering::Relaxed);
        self.items.push_front(item);
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.counter().fetch_sub(1, Ordering::Relaxed);
        Some(item)
    }

    pub(super) fn pop_back(&mut self) -> Option<T> {
        let item = self.items.pop_back()?;
        self.counter().fetch_sub(1, Ordering::Relaxed);
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

    /// Empties the queue, in order.
    pub(super) fn take_all(&mut self) -> Vec<T> {
        self.counter()
            .fetch_sub(self.items.len() as u64, Ordering::Relaxed);
        self.items.drain(..).collect()
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        self.counter()
            .fetch_sub(self.items.len() as u64, Ordering::Relaxed);
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
