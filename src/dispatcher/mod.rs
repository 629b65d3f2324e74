//! The dispatcher: accepts client connections and hands each to its worker.
//!
//! [`run`] wires three roles together: one acceptor task per listener ([`accept`]), one
//! slot task per worker index ([`slot`]: the waiting queue, the link, acknowledgements),
//! and the status reporter here. Every accepted connection holds a permit of a semaphore
//! sized `max_connections` until its worker acknowledges it, so memory and fds stay
//! bounded: when the permits run out the acceptors pause and the kernel backlog holds.

mod accept;
mod slot;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Settings;
use crate::routing::{Router, RoutingKey};

/// How often `STATUS=` is refreshed (only sent when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A listening socket and the name it is known by (systemd's `FileDescriptorName=`, or the
/// address given with `--listen`).
#[derive(Debug)]
pub struct Listener {
    /// Name for logs and for the worker's `ClientInfo::listener`.
    pub name: Arc<str>,
    /// The bound, listening socket.
    pub socket: std::net::TcpListener,
}

/// What a dispatcher run did, for the exit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections handed off and acknowledged.
    pub handed_off: u64,
    /// Connections still held when the shutdown timeout ran out, closed unserved.
    pub abandoned: u64,
}

/// Where the dispatcher is in its life; acceptors stop at `Stopping`, slots finish their
/// queues at `Finishing` (after every acceptor is gone, so nothing new can arrive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Stopping,
    Finishing,
}

/// A client connection the dispatcher holds until its worker acknowledges it.
struct Held {
    stream: std::net::TcpStream,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    listener: Arc<str>,
    key: RoutingKey,
    /// When it started waiting in its current slot.
    since: Instant,
    /// Already sent to a failover worker once: it is not bounced again.
    failed_over: bool,
    _permit: OwnedSemaphorePermit,
}

/// Counters shown in `STATUS=` and the exit log.
#[derive(Default)]
struct Counters {
    handed_off: AtomicU64,
    waiting: AtomicU64,
    in_flight: AtomicU64,
    turned_away: AtomicU64,
    failed_over: AtomicU64,
}

/// State every task reads.
struct Shared {
    settings: Settings,
    router: Router,
    live: Box<[AtomicBool]>,
    slots: Box<[mpsc::UnboundedSender<Held>]>,
    counters: Counters,
}

impl Shared {
    /// Sends a connection to the slot of `index`.
    fn send_to(&self, index: u32, held: Held) {
        // A slot's inbox lives as long as `Shared`; a send fails only while shutting down,
        // and then the connection is closed by the drop, as the exit log reports.
        let _ = self.slots[index as usize].send(held);
    }

    fn live_workers(&self) -> usize {
        self.live
            .iter()
            .filter(|live| live.load(Ordering::Relaxed))
            .count()
    }

    fn status_line(&self) -> String {
        let c = &self.counters;
        format!(
            "{}/{} workers live; {} connections handed off; {} waiting, {} in flight; {} turned away, {} failed over",
            self.live_workers(),
            self.live.len(),
            c.handed_off.load(Ordering::Relaxed),
            c.waiting.load(Ordering::Relaxed),
            c.in_flight.load(Ordering::Relaxed),
            c.turned_away.load(Ordering::Relaxed),
            c.failed_over.load(Ordering::Relaxed),
        )
    }
}

/// Runs the dispatcher on `listeners` until `shutdown` resolves, then stops accepting,
/// finishes the hand-offs in progress and returns within `shutdown_timeout`.
pub async fn run(
    listeners: Vec<Listener>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let workers = settings.workers;
    let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..workers.get())
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    let shared = Arc::new(Shared {
        router: Router::new(
            workers,
            settings.ipv4_prefix,
            settings.ipv6_prefix,
            settings.hash_seed,
        ),
        live: (0..workers.get()).map(|_| AtomicBool::new(false)).collect(),
        slots: inboxes.into(),
        counters: Counters::default(),
        settings,
    });
    let (phase, phase_rx) = watch::channel(Phase::Running);
    let permits = Arc::new(Semaphore::new(shared.settings.max_connections.get()));

    let mut slots = JoinSet::new();
    for (index, inbox) in receivers.into_iter().enumerate() {
        let slot = slot::Slot::new(index as u32, shared.clone(), inbox, phase_rx.clone());
        slots.spawn(slot.run());
    }
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        let acceptor = accept::Acceptor::new(listener, shared.clone(), permits.clone())?;
        acceptors.spawn(acceptor.run(phase_rx.clone()));
    }

    let mut status = shared.status_line();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    info!(workers = workers.get(), "dispatcher ready");

    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                let line = shared.status_line();
                if line != status {
                    status = line;
                    notify(&[sd_notify::NotifyState::Status(&status)]);
                }
            }
        }
    }

    let deadline = Instant::now() + shared.settings.shutdown_timeout;
    info!(timeout = ?shared.settings.shutdown_timeout, "stopping: no new connections; finishing hand-offs");
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing hand-offs"),
    ]);
    phase.send_replace(Phase::Stopping);
    while acceptors.join_next().await.is_some() {}
    phase.send_replace(Phase::Finishing);
    let finished = tokio::time::timeout_at(deadline, async {
        while slots.join_next().await.is_some() {}
    })
    .await;
    let counters = &shared.counters;
    let abandoned = if finished.is_err() {
        slots.shutdown().await;
        let left =
            counters.waiting.load(Ordering::Relaxed) + counters.in_flight.load(Ordering::Relaxed);
        warn!(
            left,
            "shutdown timeout reached: closing the connections still waiting for a worker"
        );
        left
    } else {
        0
    };
    let summary = Summary {
        handed_off: counters.handed_off.load(Ordering::Relaxed),
        abandoned,
    };
    info!(
        handed_off = summary.handed_off,
        abandoned, "dispatcher stopped"
    );
    Ok(summary)
}

/// Lets a repeated warning through at most once per period, so a fault under load logs
/// a line every few seconds rather than one per connection.
struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Tells systemd; without `NOTIFY_SOCKET` (standalone) this does nothing.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(err) = sd_notify::notify(false, state) {
        warn!(%err, "could not notify systemd");
    }
}
