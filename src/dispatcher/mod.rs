//! The dispatcher: accepts client connections and hands each to its worker.
//!
//! [`run`] starts the roles, one module each: `accept` (a task per listener), `keyed` (a
//! task per connection whose key comes from what it sends), `slot` (a task per worker
//! index: its waiting queue and acknowledgements, and its link's `lifecycle`) speaking to its worker
//! through `worker_link` (one module per dialect), `fdstore` (connections kept across a
//! restart), `observe` (`/metrics` and `/health`). What they share: `hub` (settings,
//! routing decisions, liveness, metrics), `held` (a connection until its worker has it),
//! `phase` (the lifecycle every task watches), `queue` (a queue that keeps its gauge),
//! `throttle` (log throttling). Here: the status reporter, reload, and the shutdown
//! sequence. Every accepted connection holds a
//! permit of a semaphore sized `max_connections` until its worker acknowledges it, so
//! memory and fds stay bounded: when the permits run out the acceptors pause and the
//! kernel backlog holds.

mod accept;
mod fdstore;
mod held;
mod hub;
mod keyed;
mod lanes;
mod lifecycle;
mod metrics;
mod observe;
mod phase;
mod queue;
mod slot;
#[cfg(test)]
mod testing;
mod throttle;
mod worker_link;

pub use fdstore::{is_stored_connection, HeldOver};
pub use lanes::bind_lanes;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval};
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use held::Held;
use hub::Hub;
use phase::Phase;

/// How often `STATUS=` is refreshed (only sent when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A listener: its listening sockets and the name it is known by (systemd's
/// `FileDescriptorName=`, or the address given with `--listen`).
#[derive(Debug)]
pub struct Listener {
    /// Name for logs and for the worker's `ClientInfo::listener`.
    pub name: Arc<str>,
    /// Its bound, listening sockets, on one address: one, or one per worker index in one
    /// SO_REUSEPORT group, in the group's order (its *lanes*, for the kernel's path; see
    /// `docs/routing.md`).
    pub sockets: Vec<std::net::TcpListener>,
}

/// What the dispatcher starts with: its listening sockets, and any client connections a
/// previous instance left in systemd's fd store.
#[derive(Debug, Default)]
pub struct Sockets {
    /// Listening sockets.
    pub listeners: Vec<Listener>,
    /// Sockets to serve `/metrics` and `/health` on.
    pub metrics: Vec<std::net::TcpListener>,
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

/// Another dispatcher on this host already uses this `socket_prefix`: starting would
/// connect to its workers and hand them this dispatcher's clients. The daemon exits with
/// status 78 (`EX_CONFIG`): only a different prefix fixes it.
#[derive(Debug, thiserror::Error)]
#[error(
    "another dispatcher on this host already uses socket_prefix \"{prefix}\" (it holds @{name}); \
     its workers would get this dispatcher's clients. Give each dispatcher its own \
     socket_prefix (config key `socket_prefix`, or STICKY_DISPATCH_SOCKET_PREFIX), and its \
     workers the same one (STICKY_DISPATCH_SOCKET_PREFIX in their environment); a \
     standalone dispatcher that spawns its workers picks its own unless one is configured"
)]
pub struct PrefixInUse {
    /// The contested prefix.
    pub prefix: String,
    /// The abstract socket name the other dispatcher holds.
    pub name: String,
}

/// Claims `prefix` for this dispatcher, or fails with [`PrefixInUse`].
fn claim_prefix(prefix: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    let name = crate::shared::dispatcher_socket_name(prefix);
    crate::link::claim(&name).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::Error::new(PrefixInUse {
                prefix: prefix.to_owned(),
                name,
            })
        } else {
            anyhow::Error::new(err).context(format!("could not bind @{name}"))
        }
    })
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

/// Runs the dispatcher on `sockets` until `Control::Shutdown` (or the control channel
/// closes), then stops accepting, finishes the hand-offs in progress and returns within
/// `shutdown_timeout`.
pub async fn run(
    sockets: Sockets,
    settings: Settings,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<Summary> {
    let dispatcher = Dispatcher::start(sockets, settings)?;
    // Accepting and hand-offs run in their own tasks; this one applies reloads and keeps
    // `STATUS=` current until told to stop.
    let mut status = Status::ready(&dispatcher.shared);
    loop {
        tokio::select! {
            command = control.recv() => match command {
                Some(Control::Reload(new)) => reload(&dispatcher.settings, *new),
                Some(Control::Shutdown) | None => break,
            },
            _ = status.tick() => status.refresh(&dispatcher.shared),
        }
    }
    Ok(dispatcher.shut_down(&mut control).await)
}

/// The running tasks, and the senders that steer them.
struct Dispatcher {
    shared: Arc<Hub>,
    settings: watch::Sender<Arc<Settings>>,
    phase: watch::Sender<Phase>,
    acceptors: JoinSet<()>,
    /// Each returns the connections it could not deliver, for the fd store.
    slots: JoinSet<Vec<Held>>,
    /// The metrics and health listeners: they run to the end (aborted with this).
    _observers: JoinSet<()>,
    /// Lanes beyond the workers': kept open (their worker count may grow to them), never
    /// used.
    _spare_lanes: Vec<std::net::TcpListener>,
    /// Holds `@<socket_prefix>dispatcher` while this dispatcher uses the prefix.
    _prefix_claim: std::os::fd::OwnedFd,
}

impl Dispatcher {
    /// Starts a slot per worker and an acceptor per listener, and routes what a previous
    /// instance left in the fd store.
    fn start(sockets: Sockets, settings: Settings) -> anyhow::Result<Dispatcher> {
        let prefix_claim = claim_prefix(&settings.socket_prefix)?;
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..settings.workers.get())
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let permits = Arc::new(Semaphore::new(connection_budget(&settings)));
        let (settings, settings_rx) = watch::channel(Arc::new(settings));
        let names: Vec<Arc<str>> = sockets.listeners.iter().map(|l| l.name.clone()).collect();
        let shared = Arc::new(Hub::new(
            settings_rx,
            fdstore::FdStore::connect(),
            inboxes,
            &names,
        ));
        let (phase, phase_rx) = watch::channel(Phase::Running);

        let workers = shared.router.workers().get();
        let kernel = shared.settings().kernel_routing();
        let mut suspects = lanes::Suspects::load();
        let mut worker_lanes: Vec<Vec<lanes::Lane>> = (0..workers).map(|_| Vec::new()).collect();
        let mut spare_lanes = Vec::new();
        let mut acceptors = JoinSet::new();
        for listener in sockets.listeners {
            match lanes::plan(listener, kernel, &shared.router, &mut suspects) {
                lanes::Plan::Kernel(group) => {
                    shared
                        .metrics
                        .set_path(&group.name, metrics::Path::Kernel, false);
                    group.register_metrics(&shared.metrics);
                    route_queued(&shared, &permits, &group);
                    // After the queued ones are taken: from here on the kernel routes all.
                    info!(listener = %group.name, address = %group.local, lanes = group.len(),
                        backlog = group.backlog, "listening: kernel path, each worker accepts on its own lane");
                    let (lanes, spares) = group.into_lanes(workers);
                    for lane in lanes {
                        worker_lanes[lane.index as usize].push(lane);
                    }
                    spare_lanes.extend(spares);
                }
                lanes::Plan::Userspace { listener, why } => {
                    if let Some(why) = &why {
                        warn!(listener = %listener.name, %why, "dispatcher path for this listener: not the kernel's");
                    }
                    shared.metrics.set_path(
                        &listener.name,
                        metrics::Path::Userspace,
                        why.is_some(),
                    );
                    for socket in listener.sockets {
                        let acceptor = accept::Acceptor::new(
                            listener.name.clone(),
                            socket,
                            shared.clone(),
                            permits.clone(),
                        )?;
                        acceptors.spawn(acceptor.run(phase_rx.clone()));
                    }
                }
            }
        }
        let mut slots = JoinSet::new();
        for ((index, inbox), lanes) in receivers.into_iter().enumerate().zip(worker_lanes) {
            let slot = slot::Slot::new(
                index as u32,
                shared.clone(),
                inbox,
                phase_rx.clone(),
                lanes,
                permits.clone(),
            );
            slots.spawn(slot.run());
        }
        let mut observers = JoinSet::new();
        for socket in sockets.metrics {
            observers.spawn(observe::serve(socket, shared.clone(), phase_rx.clone()));
        }
        take_back(&shared, &permits, sockets.held_over);
        Ok(Dispatcher {
            shared,
            settings,
            phase,
            acceptors,
            slots,
            _observers: observers,
            _spare_lanes: spare_lanes,
            _prefix_claim: prefix_claim,
        })
    }

    /// Stops accepting (the acceptors route the connections still sending their key), lets
    /// the slots finish within `shutdown_timeout`, and leaves what still waits in the fd store
    /// if it can. A second stop signal (`control`) cuts it short: what waits is kept, the
    /// rest is closed.
    async fn shut_down(mut self, control: &mut mpsc::Receiver<Control>) -> Summary {
        let settings = self.shared.settings();
        let deadline = Instant::now() + settings.shutdown_timeout;
        info!(timeout = ?settings.shutdown_timeout, "stopping: no new connections; finishing hand-offs");
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping: finishing hand-offs"),
        ]);
        self.phase.send_replace(Phase::Stopping);
        let mut left = Vec::new();
        let graceful = async {
            // Acceptors return once the connections still sending their key are routed.
            while self.acceptors.join_next().await.is_some() {}
            self.phase.send_replace(Phase::Finishing);
            while let Some(Ok(held)) = self.slots.join_next().await {
                left.extend(held);
            }
        };
        tokio::select! {
            finished = tokio::time::timeout_at(deadline, graceful) => if finished.is_err() {
                warn!("shutdown timeout reached: giving up on the connections still held");
            },
            () = second_stop(control) => {
                warn!("second stop signal: stopping at once; waiting connections stay in the fd store, unacknowledged ones are closed");
                notify(&[
                    sd_notify::NotifyState::Stopping,
                    sd_notify::NotifyState::Status("stopping at once (second stop signal)"),
                ]);
            }
        }
        self.phase.send_replace(Phase::Abandon);
        while let Some(Ok(held)) = self.slots.join_next().await {
            left.extend(held);
        }
        let waiting = left.len() as u64;
        let mut stored = 0;
        for mut held in left {
            held.keep_safe(self.shared.fd_store.as_ref());
            if let Some(entry) = held.stored.take() {
                entry.keep();
                stored += 1;
            }
        }
        let summary = Summary {
            handed_off: self.shared.metrics.totals().handed_off,
            stored,
            abandoned: waiting - stored,
        };
        if summary.abandoned > 0 {
            warn!(
                abandoned = summary.abandoned,
                "closed connections that were still waiting for a worker"
            );
        }
        if stored > 0 {
            info!(
                stored,
                "waiting connections kept in the systemd fd store for the next start"
            );
        }
        info!(
            handed_off = summary.handed_off,
            stored,
            abandoned = summary.abandoned,
            "dispatcher stopped"
        );
        summary
    }
}

/// Resolves on a second `Control::Shutdown` (SIGTERM or SIGINT again); reloads asked for
/// while stopping are ignored.
async fn second_stop(control: &mut mpsc::Receiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown) => return,
            Some(Control::Reload(_)) => debug!("reload ignored while stopping"),
            None => std::future::pending().await,
        }
    }
}

/// `READY=1`, then `STATUS=` whenever the counts change.
struct Status {
    line: String,
    tick: Interval,
}

impl Status {
    fn ready(shared: &Hub) -> Status {
        let line = shared.status_line();
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&line),
        ]);
        info!(
            workers = shared.router.workers().get(),
            fd_store = shared.fd_store.is_some(),
            "dispatcher ready"
        );
        Status {
            line,
            tick: tokio::time::interval(STATUS_INTERVAL),
        }
    }

    async fn tick(&mut self) {
        self.tick.tick().await;
    }

    fn refresh(&mut self, shared: &Hub) {
        let line = shared.status_line();
        if line != self.line {
            self.line = line;
            notify(&[sd_notify::NotifyState::Status(&self.line)]);
        }
    }
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

/// Routes, once, what a kernel-path listener's lanes queued before the routing program was
/// attached (they went to any lane): through the links, like the dispatcher's own path.
fn route_queued(shared: &Hub, permits: &Arc<Semaphore>, group: &lanes::LaneGroup) {
    let queued = group.take_queued();
    if queued.is_empty() {
        return;
    }
    info!(listener = %group.name, count = queued.len(), "routing the connections the lanes queued before the routing program");
    for (stream, peer) in queued {
        // Each needs a permit; at start there are max_connections of them, and more
        // connections than that cannot have queued behind a backlog of at most 4096 per lane
        // unless the lanes are many: those beyond are closed, and said so.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!("more queued connections than max_connections: closing the rest");
            return;
        };
        let local = stream.local_addr().ok();
        let key = shared.peer_key(Some(peer));
        shared.route(Held::new(
            stream,
            Some(peer),
            local,
            group.name.clone(),
            key,
            permit,
        ));
    }
}

/// Routes the connections a previous instance left in the fd store as it would have: by
/// the key it had (which may have come from a PROXY or HTTP header), with the real client
/// address, keeping the time they have waited. They stay in the store until sent or
/// closed, so that a second crash does not lose them either.
fn take_back(shared: &Hub, permits: &Arc<Semaphore>, held_over: Vec<HeldOver>) {
    if held_over.is_empty() {
        return;
    }
    let count = held_over.len();
    let mut by_peer = 0;
    for HeldOver { stream, name } in held_over {
        let Some(restored) = fdstore::parse(&name) else {
            warn!(
                name,
                "an fd in the store has a name this version cannot read: closing it"
            );
            drop(fdstore::adopt(shared.fd_store.as_ref(), &name));
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!("more connections in the fd store than max_connections: closing the rest");
            drop(fdstore::adopt(shared.fd_store.as_ref(), &name));
            continue;
        };
        let peer = restored.peer.or_else(|| stream.peer_addr().ok());
        let local = restored.local.or_else(|| stream.local_addr().ok());
        let key = restored.key.unwrap_or_else(|| {
            by_peer += 1;
            shared.peer_key(peer)
        });
        let mut held = Held::new(stream, peer, local, restored.listener, key, permit);
        held.since = Instant::now()
            .checked_sub(restored.waited)
            .unwrap_or_else(Instant::now);
        held.stored = fdstore::adopt(shared.fd_store.as_ref(), &name);
        shared.route(held);
    }
    info!(
        count,
        by_peer, "took back connections from the systemd fd store"
    );
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
            for key in &reloaded.applied {
                let value = reloaded.settings.value_of(key);
                info!(key, value, "applied on reload");
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

/// Tells systemd; without `NOTIFY_SOCKET` (standalone) this does nothing.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(err) = sd_notify::notify(false, state) {
        warn!(%err, "could not notify systemd");
    }
}
