//! Slot: everything about one worker index — its queue of waiting connections, its link,
//! and the connections sent but not yet acknowledged.
//!
//! A connection is in exactly one place: `pending` (waiting for the link or for room in
//! the in-flight window), `unacked` (sent; the dispatcher still holds its fd), or gone
//! (acknowledged, turned away, or failed over to another slot). When the link breaks,
//! `unacked` goes back to the front of `pending`, in order, and is re-sent on the next link.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::fdstore::Stored;
use super::metrics::TurnedAway;
use super::state::{FailOver, Held, Phase, Queue, Shared, Throttle};
use super::worker_link::{Event, WorkerLink};
use crate::link;
use crate::shared::{link_socket_name, LinkError};
use crate::wire;

/// First retry after a failed connect; doubled up to `RECONNECT_MAX`. Small, because a
/// restarting worker should get its waiting clients within milliseconds.
const RECONNECT_MIN: Duration = Duration::from_millis(2);
/// Bounds the reconnect backoff: a worker that comes back is found within this long.
const RECONNECT_MAX: Duration = Duration::from_millis(100);
const WARN_EVERY: Duration = Duration::from_secs(5);
/// Times a connection is sent again after a Node worker got it without its fd (NACK: out
/// of fds, typically), as Node's own `child.send` does; then it is closed.
const MAX_REFUSALS: u8 = 3;

pub(super) struct Slot {
    index: u32,
    name: String,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Held>,
    phase: watch::Receiver<Phase>,
    /// Waiting for the link or for room in the in-flight window (`waiting` in `STATUS=`).
    pending: Queue<Held>,
    /// Sent, by sequence number; the dispatcher still holds the fd (`in flight`).
    unacked: Queue<(u64, Held)>,
    link: Option<WorkerLink>,
    /// The worker asked to drain this link: send nothing more on it.
    draining: bool,
    next_seq: u64,
    /// The last send found the socket buffer full.
    want_writable: bool,
    /// Since when the worker has not been taking connections.
    down_since: Instant,
    next_attempt: Instant,
    backoff: Duration,
    /// Why the last connect attempt failed, to log each new reason once.
    last_failure: Option<String>,
    turned_away_warning: Throttle,
    out: Vec<u8>,
    /// What the worker said in one wake-up, reused.
    events: Vec<Event>,
}

impl Slot {
    pub(super) fn new(
        index: u32,
        shared: Arc<Shared>,
        inbox: mpsc::UnboundedReceiver<Held>,
        phase: watch::Receiver<Phase>,
    ) -> Slot {
        let now = Instant::now();
        Slot {
            index,
            name: link_socket_name(&shared.settings().socket_prefix, index),
            pending: Queue::new(shared.metrics.worker(index).waiting.clone()),
            unacked: Queue::new(shared.metrics.worker(index).in_flight.clone()),
            shared,
            inbox,
            phase,
            link: None,
            draining: false,
            next_seq: 1,
            want_writable: false,
            down_since: now,
            next_attempt: now,
            backoff: RECONNECT_MIN,
            last_failure: None,
            turned_away_warning: Throttle::new(WARN_EVERY),
            out: Vec::with_capacity(wire::MAX_MESSAGE),
            events: Vec::with_capacity(8),
        }
    }

    /// Serves this worker until the dispatcher stops; returns the connections that were
    /// never sent, for the fd store.
    pub(super) async fn run(mut self) -> Vec<Held> {
        let mut buf = [0u8; wire::MAX_MESSAGE];
        loop {
            // A Node channel out of the reactor is read whenever the slot wakes.
            if let Some(link) = self.link.as_mut() {
                let read = link.read_unwatched(&mut buf, &mut self.events);
                self.on_received(read);
            }
            self.send_pending();
            let phase = *self.phase.borrow();
            let idle = self.pending.is_empty() && self.unacked.is_empty() && self.inbox.is_empty();
            let keep_for_next_start =
                phase == Phase::Finishing && self.shared.fd_store.is_some() && !self.is_up();
            if (phase >= Phase::Finishing && idle) || keep_for_next_start || phase == Phase::Abandon
            {
                return self.leftovers();
            }
            let pending_timeout = self.shared.settings().pending_timeout;
            let expiry = self
                .pending
                .front()
                .map(|held| held.since + pending_timeout);
            let read_by = match self
                .link
                .as_mut()
                .map(|link| link.settle(self.unacked.len()))
            {
                Some(Ok(read_by)) => read_by,
                Some(Err(err)) => {
                    self.link_down(&err.to_string());
                    continue;
                }
                None => None,
            };
            tokio::select! {
                Some(held) = self.inbox.recv() => self.arrive(held),
                received = recv(self.link.as_ref(), &mut buf, &mut self.events) => {
                    self.on_received(received);
                }
                ready = writable(self.link.as_ref()), if self.want_writable => {
                    self.want_writable = false;
                    if let Err(err) = ready {
                        self.link_down(&err.to_string());
                    }
                }
                _ = tokio::time::sleep_until(self.next_attempt), if self.link.is_none() => {
                    self.connect().await;
                }
                _ = sleep_until(expiry) => self.expire(),
                // Read at the top of the loop.
                _ = sleep_until(read_by) => {}
                _ = self.phase.changed() => {}
            }
        }
    }

    /// At exit: what was never sent (kept if the fd store can), and letting go of what was
    /// sent but not acknowledged: the worker has it (sending it again could serve it
    /// twice), and serves it once it sees this dispatcher gone.
    fn leftovers(&mut self) -> Vec<Held> {
        while let Ok(held) = self.inbox.try_recv() {
            self.pending.push_back(held);
        }
        if !self.unacked.is_empty() {
            warn!(
                index = self.index,
                count = self.unacked.len(),
                "letting go of connections the worker has not acknowledged: it serves them once we are gone"
            );
            self.unacked.take_all();
        }
        debug!(
            index = self.index,
            waiting = self.pending.len(),
            "slot finished"
        );
        self.pending.take_all()
    }

    /// A new connection for this worker.
    fn arrive(&mut self, mut held: Held) {
        let down_too_long =
            !self.is_up() && self.down_since.elapsed() >= self.shared.settings().pending_timeout;
        if down_too_long {
            self.give_up(
                held,
                TurnedAway::WorkerDown,
                "its worker has been down longer than pending_timeout",
            );
        } else if self.pending.len() >= self.shared.settings().max_pending.get() {
            self.give_up(
                held,
                TurnedAway::MaxPending,
                "its worker's queue is full (max_pending)",
            );
        } else {
            if !self.is_up() {
                keep_safe(&self.shared, &mut held);
            }
            self.pending.push_back(held);
        }
    }

    fn is_up(&self) -> bool {
        self.link.as_ref().is_some_and(WorkerLink::is_ready) && !self.draining
    }

    /// Sends waiting connections while the link is up and the in-flight window has room.
    fn send_pending(&mut self) {
        let max_in_flight = self.shared.settings().max_in_flight.get();
        while self.is_up() && !self.want_writable && self.unacked.len() < max_in_flight {
            let (Some(link), Some(held)) = (&self.link, self.pending.front()) else {
                return;
            };
            match link.try_send_conn(&mut self.out, self.next_seq, held) {
                Ok(()) => {
                    let mut held = self.pending.pop_front().expect("front exists");
                    // Sent: the worker has it (even if we die now, it reads the CONN), so
                    // the fd store must not give it to the next instance too.
                    held.stored = None;
                    self.unacked.push_back((self.next_seq, held));
                    self.next_seq += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.want_writable = true,
                Err(err) => return self.link_down(&format!("send failed: {err}")),
            }
        }
    }

    fn on_received(&mut self, received: Result<Option<&'static str>, LinkError>) {
        match received {
            Ok(None) => {}
            Ok(Some(reason)) => return self.link_down(reason),
            Err(err) => return self.link_down(&err.to_string()),
        }
        let mut events = std::mem::take(&mut self.events);
        let mut result = Ok(());
        for event in events.drain(..) {
            result = self.on_event(event);
            if result.is_err() {
                break;
            }
        }
        self.events = events;
        if let Err(err) = result {
            self.link_down(&err.to_string());
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), LinkError> {
        match event {
            Event::Acked(seq) if seq < self.next_seq => {
                let metrics = &self.shared.metrics;
                let handed_off = &metrics.worker(self.index).handed_off;
                let now = Instant::now();
                // Dropping our copy closes the dispatcher's fd: the worker has its own.
                while let Some((_, acked)) = self.unacked.pop_front_if(|(sent, _)| *sent <= seq) {
                    handed_off.inc();
                    let took = now.saturating_duration_since(acked.accepted);
                    metrics.handoff_seconds.observe(took.as_secs_f64());
                }
                Ok(())
            }
            Event::Refused(seq) => {
                let Some((_, mut again)) = self.unacked.pop_front_if(|(sent, _)| *sent == seq)
                else {
                    return Err(LinkError::Protocol(format!(
                        "Node refused connection {seq}, which is not the oldest in flight"
                    )));
                };
                again.refused += 1;
                if again.refused > MAX_REFUSALS {
                    warn!(index = self.index, peer = ?again.peer, "Node got a connection without its fd {MAX_REFUSALS} times (out of fds?): closing it");
                    self.shared
                        .metrics
                        .worker(self.index)
                        .turned_away(TurnedAway::Refused);
                } else {
                    debug!(
                        index = self.index,
                        seq, "Node got a connection without its fd: sending it again"
                    );
                    self.pending.push_front(again);
                }
                Ok(())
            }
            Event::Drain if !self.draining => {
                self.draining = true;
                self.down_since = Instant::now();
                self.shared.set_live(self.index, false);
                let last_seq = self.next_seq - 1;
                info!(
                    index = self.index,
                    last_seq, "worker is draining: holding its new connections"
                );
                let link = self.link.as_ref().expect("the event came from the link");
                link.send_drained(&mut self.out, last_seq)
                    .map_err(LinkError::from)
            }
            Event::Synced => {
                info!(
                    index = self.index,
                    "Node worker in step: taking connections"
                );
                self.shared.set_live(self.index, true);
                Ok(())
            }
            other => Err(LinkError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// The link is gone: what was not acknowledged waits again, in order, at the front.
    fn link_down(&mut self, reason: &str) {
        let was_draining = self.draining;
        self.link = None;
        self.draining = false;
        self.want_writable = false;
        self.shared.set_live(self.index, false);
        if !was_draining {
            self.down_since = Instant::now();
        }
        let resend = self.unacked.len();
        while let Some((_, held)) = self.unacked.pop_back() {
            self.pending.push_front(held);
        }
        // Everything held now waits for a worker that is down.
        for held in self.pending.iter_mut() {
            keep_safe(&self.shared, held);
        }
        let metrics = self.shared.metrics.worker(self.index);
        metrics.resent.inc_by(resend as u64);
        metrics.link_down.inc();
        if resend > 0 {
            warn!(
                index = self.index,
                reason,
                resend,
                waiting = self.pending.len(),
                "worker link down: unacknowledged connections will be re-sent"
            );
        } else {
            info!(
                index = self.index,
                reason,
                waiting = self.pending.len(),
                "worker link down"
            );
        }
        self.backoff = RECONNECT_MIN;
        self.next_attempt = Instant::now();
    }

    async fn connect(&mut self) {
        match self.open_link().await {
            Ok(link) => {
                let resend = self.pending.len();
                info!(
                    index = self.index,
                    worker_pid = link.pid,
                    socket = %format!("@{}", self.name),
                    waiting = resend,
                    node = !link.is_ready(),
                    "worker link up"
                );
                // A Node worker is live once in step (`Event::Synced`).
                self.shared.set_live(self.index, link.is_ready());
                self.link = Some(link);
                self.next_seq = 1;
                self.backoff = RECONNECT_MIN;
                self.last_failure = None;
                self.shared.metrics.worker(self.index).link_up.inc();
            }
            Err(err) => {
                let absent = matches!(&err, LinkError::Io(io) if link::is_absent(io));
                let reason = err.to_string();
                if absent {
                    debug!(index = self.index, %err, "worker not there yet");
                } else if self.last_failure.as_deref() != Some(reason.as_str()) {
                    warn!(index = self.index, socket = %format!("@{}", self.name), %err, "refused the worker link");
                }
                self.last_failure = Some(reason);
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
            }
        }
    }

    /// Connects, checks who listens, and exchanges HELLOs.
    async fn open_link(&mut self) -> Result<WorkerLink, LinkError> {
        let opened =
            WorkerLink::open(&self.name, self.index, &self.shared.settings().worker_users).await;
        if let Err(LinkError::Impostor { .. }) = opened {
            self.backoff = RECONNECT_MAX;
        }
        opened
    }

    /// Connections that waited `pending_timeout` follow `on_worker_down`.
    fn expire(&mut self) {
        let timeout = self.shared.settings().pending_timeout;
        let now = Instant::now();
        while let Some(held) = self
            .pending
            .pop_front_if(|held| held.since + timeout <= now)
        {
            self.give_up(
                held,
                TurnedAway::PendingTimeout,
                "it waited pending_timeout for its worker",
            );
        }
    }

    /// This worker cannot take `held`: fail it over, or close it.
    fn give_up(&mut self, held: Held, reason: TurnedAway, why: &str) {
        let held = match self.shared.fail_over(held) {
            FailOver::Sent(target) => {
                if self.turned_away_warning.allow() {
                    info!(
                        index = self.index,
                        target, why, "failing connections over to another worker"
                    );
                }
                return;
            }
            FailOver::Kept(held) => held,
        };
        self.shared.metrics.worker(self.index).turned_away(reason);
        if self.turned_away_warning.allow() {
            warn!(index = self.index, peer = ?held.peer, why, "closing a client connection");
        }
        drop(held);
    }
}

/// `held` waits for a worker that is down: into the fd store with it (once), so that it
/// outlives a crash of the dispatcher.
fn keep_safe(shared: &Shared, held: &mut Held) {
    if let (Some(store), None) = (&shared.fd_store, &held.stored) {
        held.stored = Stored::store(store, held);
    }
}

async fn recv(
    link: Option<&WorkerLink>,
    buf: &mut [u8],
    events: &mut Vec<Event>,
) -> Result<Option<&'static str>, LinkError> {
    match link {
        Some(link) => link.recv(buf, events).await,
        None => std::future::pending().await,
    }
}

async fn writable(link: Option<&WorkerLink>) -> io::Result<()> {
    match link {
        Some(link) => link.writable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
