//! The dispatcher: accepts client connections and hands each to its worker.
//!
//! [`run`] wires the roles together, one module each: `accept` (a task per listener),
//! `keyed` (a task per connection whose key comes from what it sends), `slot` (a task per
//! worker index: the waiting queue, the link, acknowledgements), `fdstore` (connections
//! kept across a restart), and the status reporter here. Every accepted connection holds a
//! permit of a semaphore sized `max_connections` until its worker acknowledges it, so
//! memory and fds stay bounded: when the permits run out the acceptors pause and the
//! kernel backlog holds.

mod accept;
mod fdstore;
mod keyed;
mod slot;

pub use fdstore::{stored_connection_listener, HeldOver};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

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

/// What the dispatcher starts with: its listening sockets, and any client connections a
/// previous instance left in systemd's fd store.
#[derive(Debug, Default)]
pub struct Sockets {
    /// Listening sockets.
    pub listeners: Vec<Listener>,
    /// Connections taken back from the fd store.
    pub held_over: Vec<HeldOver>,
}

/// Instructions to a running dispatcher.
#[derive(Debug)]
pub enum Control {
    /// Apply a re-read configuration (SIGHUP, `systemctl reload`).
    Reload(Box<Settings>),
    /// Stop gracefully (SIGTERM, SIGINT).
    Shutdown,
}

/// What a dispatcher run did, for the exit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections handed off and acknowledged.
    pub handed_off: u64,
    /// Connections still waiting at exit, handed to systemd's fd store.
    pub stored: u64,
    /// Connections still held at exit that could not be kept, closed unserved.
    pub abandoned: u64,
}

/// Where the dispatcher is in its life. Acceptors stop at `Stopping`. At `Finishing`
/// (every acceptor gone, so nothing new arrives) slots deliver what they can and return
/// what waits for a worker that is down, if the fd store can keep it. At `Abandon` (the
/// shutdown timeout) they return at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Stopping,
    Finishing,
    Abandon,
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
    /// The settings in force; `Control::Reload` replaces the ones that can change live.
    settings: watch::Receiver<Arc<Settings>>,
    /// Connections waiting for a down worker at exit go to systemd's fd store.
    fd_store: bool,
    router: Router,
    live: Box<[AtomicBool]>,
    slots: Box<[mpsc::UnboundedSender<Held>]>,
    counters: Counters,
}

impl Shared {
    fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

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
        let restart_needed = &self.settings.borrow().restart_needed;
        let restart_note = if restart_needed.is_empty() {
            String::new()
        } else {
            format!("; restart needed for {}", restart_needed.join(", "))
        };
        format!(
            "{}/{} workers live; {} connections handed off; {} waiting, {} in flight; {} turned away, {} failed over{}",
            self.live_workers(),
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

/// Runs the dispatcher on `sockets` until `Control::Shutdown` (or the control channel
/// closes), then stops accepting, finishes the hand-offs in progress and returns within
/// `shutdown_timeout`.
pub async fn run(
    sockets: Sockets,
    settings: Settings,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<Summary> {
    let workers = settings.workers;
    let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..workers.get())
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    let (settings_tx, settings_rx) = watch::channel(Arc::new(settings));
    let settings = settings_rx.borrow().clone();
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
        settings: settings_rx,
        fd_store: fdstore::available(),
    });
    let (phase, phase_rx) = watch::channel(Phase::Running);
    let permits = Arc::new(Semaphore::new(connection_budget(&settings)));

    let mut slots = JoinSet::new();
    for (index, inbox) in receivers.into_iter().enumerate() {
        let slot = slot::Slot::new(index as u32, shared.clone(), inbox, phase_rx.clone());
        slots.spawn(slot.run());
    }
    let mut acceptors = JoinSet::new();
    for listener in sockets.listeners {
        let acceptor = accept::Acceptor::new(listener, shared.clone(), permits.clone())?;
        acceptors.spawn(acceptor.run(phase_rx.clone()));
    }
    take_back(&shared, &permits, sockets.held_over);

    let mut status = shared.status_line();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    info!(
        workers = workers.get(),
        fd_store = shared.fd_store,
        "dispatcher ready"
    );

    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            command = control.recv() => match command {
                Some(Control::Reload(new)) => reload(&settings_tx, *new),
                Some(Control::Shutdown) | None => break,
            },
            _ = tick.tick() => {
                let line = shared.status_line();
                if line != status {
                    status = line;
                    notify(&[sd_notify::NotifyState::Status(&status)]);
                }
            }
        }
    }

    let shutdown_timeout = shared.settings().shutdown_timeout;
    let deadline = Instant::now() + shutdown_timeout;
    info!(timeout = ?shutdown_timeout, "stopping: no new connections; finishing hand-offs");
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing hand-offs"),
    ]);
    phase.send_replace(Phase::Stopping);
    while acceptors.join_next().await.is_some() {}
    phase.send_replace(Phase::Finishing);
    let mut left = Vec::new();
    let finished = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(held)) = slots.join_next().await {
            left.extend(held);
        }
    })
    .await;
    if finished.is_err() {
        warn!("shutdown timeout reached: giving up on the connections still held");
        phase.send_replace(Phase::Abandon);
        while let Some(Ok(held)) = slots.join_next().await {
            left.extend(held);
        }
    }
    let waiting = left.len() as u64;
    let stored = if shared.fd_store && waiting > 0 {
        fdstore::store(left)
    } else {
        drop(left);
        0
    };
    let summary = Summary {
        handed_off: shared.counters.handed_off.load(Ordering::Relaxed),
        stored,
        abandoned: waiting - stored,
    };
    if summary.abandoned > 0 {
        warn!(
            abandoned = summary.abandoned,
            "closed connections that were still waiting for a worker"
        );
    }
    info!(
        handed_off = summary.handed_off,
        stored,
        abandoned = summary.abandoned,
        "dispatcher stopped"
    );
    Ok(summary)
}

/// fds the dispatcher needs besides held connections: stdio, journald, listeners, the
/// notify socket, a link per worker and one being opened, with room to spare.
fn fd_reserve(workers: u32) -> u64 {
    64 + 2 * u64::from(workers)
}

/// `max_connections`, lowered if the fd limit would not hold that many: the links must
/// always find an fd, or waiting connections could never be delivered.
fn connection_budget(settings: &Settings) -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let wanted = settings.max_connections.get();
    let Ok((limit, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let room = limit
        .saturating_sub(fd_reserve(settings.workers.get()))
        .max(16);
    let budget = wanted.min(usize::try_from(room).unwrap_or(usize::MAX));
    if budget < wanted {
        warn!(
            max_connections = wanted,
            budget,
            fd_limit = limit,
            "max_connections lowered to fit the fd limit (raise LimitNOFILE=)"
        );
    }
    budget
}

/// Routes the connections a previous instance left in the fd store, then tells systemd
/// to forget them.
fn take_back(shared: &Shared, permits: &Arc<Semaphore>, held_over: Vec<HeldOver>) {
    if held_over.is_empty() {
        return;
    }
    fdstore::forget(&held_over);
    let count = held_over.len();
    for HeldOver { listener, stream } in held_over {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!("more connections in the fd store than max_connections: closing the rest");
            break;
        };
        let peer = stream.peer_addr().ok();
        let key = shared.router.key(peer.map(|p| p.ip()));
        let index = shared.router.worker_for(&key);
        let local = stream.local_addr().ok();
        shared.send_to(
            index,
            Held {
                stream,
                peer,
                local,
                listener,
                key,
                since: Instant::now(),
                failed_over: false,
                _permit: permit,
            },
        );
    }
    info!(count, "took back connections from the systemd fd store");
}

/// Applies what can change while running (the keys whose reload class is `live`); the
/// restart-only keys keep their running values, and the log and `STATUS=` say which.
fn reload(settings: &watch::Sender<Arc<Settings>>, new: Settings) {
    // systemd 253 and later want the clock reading with RELOADING=1.
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    notify(&reloading);
    let running = settings.borrow().clone();
    match running.reloaded(new) {
        Ok(reloaded) => {
            for key in &reloaded.kept {
                warn!(key, "changed in the configuration: takes effect at the next restart (`systemctl restart sticky-dispatch` keeps waiting connections)");
            }
            info!(
                applied = ?reloaded.applied,
                restart_needed = ?reloaded.settings.restart_needed,
                "configuration reloaded"
            );
            settings.send_replace(Arc::new(reloaded.settings));
        }
        Err(err) => error!(%err, "reload refused: keeping the running configuration"),
    }
    notify(&[sd_notify::NotifyState::Ready]);
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
