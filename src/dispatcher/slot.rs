//! Slot: everything about one worker index — its queue of waiting connections, its link
//! and where that link is in its life ([`Lifecycle`]), and the connections sent but not
//! yet acknowledged.
//!
//! A connection is in exactly one place: `pending` (waiting for the link or for room in
//! the in-flight window), `unacked` (sent; the dispatcher still holds its fd), or gone
//! (acknowledged, turned away, or failed over to another slot). When the link breaks,
//! `unacked` goes back to the front of `pending`, in order, and is re-sent on the next link.
//!
//! On the kernel's path the slot also holds its worker's lanes (one per kernel-path
//! listener): it passes them at every link-up to a worker that serves lanes, and accepts on
//! them itself only while the worker cannot (a worker that does not serve lanes, or one
//! down longer than `pending_timeout`); what it accepts there takes the fd-passing path.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::held::Held;
use super::hub::{FailOver, Hub};
use super::lanes::{self, Lane};
use super::lifecycle::Lifecycle;
use super::metrics::TurnedAway;
use super::phase::Phase;
use super::queue::Queue;
use super::throttle::Throttle;
use super::worker_link::{Event, WorkerLink};
use crate::link;
use crate::shared::{link_socket_name, LinkError};
use crate::wire;

const WARN_EVERY: Duration = Duration::from_secs(5);
/// Times a connection the worker sent back (a Node worker that got it without its fd:
/// out of fds, typically) is sent again, as Node's own `child.send` does; then it is closed.
const MAX_RESENDS: u8 = 3;

pub(super) struct Slot {
    index: u32,
    name: String,
    shared: Arc<Hub>,
    inbox: mpsc::UnboundedReceiver<Held>,
    phase: watch::Receiver<Phase>,
    /// Waiting for the link or for room in the in-flight window (`waiting` in `STATUS=`).
    pending: Queue<Held>,
    /// Sent, by sequence number; the dispatcher still holds the fd (`in flight`).
    unacked: Queue<(u64, Held)>,
    lifecycle: Lifecycle<WorkerLink>,
    /// Why the last connect attempt failed, to log each new reason once.
    last_failure: Option<String>,
    turned_away_warning: Throttle,
    out: Vec<u8>,
    /// What the worker said in one wake-up, reused.
    events: Vec<Event>,
    /// This worker's lane of each kernel-path listener.
    lanes: Vec<Lane>,
    /// For the connections this slot accepts on its lanes.
    permits: Arc<Semaphore>,
    /// The last lane count a worker reported (ACCEPTED), and its pid: a new link to the
    /// same process continues from it, a new process starts from 0. Forgotten when a
    /// drained link goes: that process reports no more, and the next link with the same
    /// pid is a bridge's next Node process, counting from 0.
    reported: Option<(u32, u64)>,
}

impl Slot {
    pub(super) fn new(
        index: u32,
        shared: Arc<Hub>,
        inbox: mpsc::UnboundedReceiver<Held>,
        phase: watch::Receiver<Phase>,
        lanes: Vec<Lane>,
        permits: Arc<Semaphore>,
    ) -> Slot {
        Slot {
            lanes,
            permits,
            reported: None,
            index,
            name: link_socket_name(&shared.settings().socket_prefix, index),
            pending: Queue::new(shared.metrics.worker(index).waiting.clone()),
            unacked: Queue::new(shared.metrics.worker(index).in_flight.clone()),
            shared,
            inbox,
            phase,
            lifecycle: Lifecycle::new(Instant::now()),
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
            // What a link not watched by the reactor has to say is read whenever we wake.
            if let Some(link) = self.lifecycle.link_mut() {
                let read = link.read_now(&mut buf, &mut self.events);
                self.on_received(read);
            }
            self.send_pending();
            if self.lifecycle.drained(self.unacked.len()) {
                // Nothing more will come on it: link again at once. A Node bridge that
                // reloaded passes its new process's channel; a worker that stopped freed its
                // name, so the next link finds nobody, or its replacement.
                self.link_down("drained: every connection sent was acknowledged");
            }
            self.shared.set_live(self.index, self.lifecycle.is_up());
            if self.finished(*self.phase.borrow()) {
                return self.leftovers();
            }
            let expiry = self.pending_expiry();
            let read_by = match self
                .lifecycle
                .link_mut()
                .map(|link| link.before_sleep(self.unacked.len()))
            {
                Some(Ok(read_by)) => read_by,
                Some(Err(err)) => {
                    self.link_down(&err.to_string());
                    continue;
                }
                None => None,
            };
            let want_writable = matches!(
                self.lifecycle,
                Lifecycle::Up {
                    want_writable: true,
                    ..
                }
            );
            let retry_at = self.lifecycle.retry_at();
            let (take_lanes, take_lanes_at) = self.lanes_taken_over();
            for lane in &mut self.lanes {
                lane.watch(take_lanes);
            }
            tokio::select! {
                Some(held) = self.inbox.recv() => self.arrive(held),
                (at, accepted, permit) = accept_lane(&self.lanes, &self.permits), if take_lanes => {
                    self.accepted_on_lane(at, accepted, permit);
                }
                _ = sleep_until(take_lanes_at) => {}
                received = next(self.lifecycle.link_mut(), &mut buf, &mut self.events, want_writable) => {
                    self.on_received(received);
                }
                _ = sleep_until(retry_at) => self.connect().await,
                _ = sleep_until(expiry) => self.expire(),
                // Read at the top of the loop.
                _ = sleep_until(read_by) => {}
                _ = self.phase.changed() => {}
            }
        }
    }

    /// Whether the slot accepts on its lanes now (its worker cannot: it does not serve
    /// lanes, or has been down `pending_timeout`), and if not, when it will at the latest.
    fn lanes_taken_over(&self) -> (bool, Option<Instant>) {
        if self.lanes.is_empty() || *self.phase.borrow() != Phase::Running {
            return (false, None);
        }
        if let Lifecycle::Up { link, .. } = &self.lifecycle {
            return (!link.takes_lanes(), None);
        }
        let pending_timeout = self.shared.settings().pending_timeout;
        match self.lifecycle.unavailable_since() {
            Some(since) if since.elapsed() >= pending_timeout => (true, None),
            Some(since) => (false, Some(since + pending_timeout)),
            None => (false, None),
        }
    }

    /// A connection the slot accepted on one of its lanes: it takes the fd-passing path,
    /// as one the dispatcher accepted would.
    fn accepted_on_lane(
        &mut self,
        at: usize,
        accepted: io::Result<(std::net::TcpStream, std::net::SocketAddr)>,
        permit: OwnedSemaphorePermit,
    ) {
        let lane = &self.lanes[at];
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                debug!(index = self.index, listener = %lane.listener, %err, "accept on a lane failed");
                return;
            }
        };
        self.shared.metrics.listener(&lane.listener).accepted.inc();
        let local = if lane.local.ip().is_unspecified() {
            stream.local_addr().ok()
        } else {
            Some(lane.local)
        };
        let key = self.shared.peer_key(Some(peer));
        let held = Held::new(
            stream,
            Some(peer),
            local,
            lane.listener.clone(),
            key,
            permit,
        );
        self.arrive(held);
    }

    /// Passes the worker its lanes, once per link, if it serves them: all of them, or none
    /// (then it closes any it held from an earlier link).
    fn grant_lanes(&mut self) -> Result<(), LinkError> {
        let Some(link) = self.lifecycle.link_mut() else {
            return Ok(());
        };
        if !link.takes_lanes() {
            if !self.lanes.is_empty() {
                info!(
                    index = self.index,
                    "this worker does not serve lanes: the dispatcher accepts on them and passes its connections"
                );
            }
            return Ok(());
        }
        let grants: Vec<_> = self.lanes.iter().map(Lane::grant).collect();
        link.send_lanes(&mut self.out, &grants)?;
        if !grants.is_empty() {
            info!(
                index = self.index,
                lanes = grants.len(),
                "worker serves its lanes: the kernel hands it its clients directly"
            );
        }
        Ok(())
    }

    /// Whether this slot's work is over in `phase`:
    /// - `Abandon`: at once;
    /// - `Finishing` (nothing new arrives): once nothing is held; or at once if the worker
    ///   is not up and the fd store keeps what waits for the next instance.
    fn finished(&self, phase: Phase) -> bool {
        let idle = self.pending.is_empty() && self.unacked.is_empty() && self.inbox.is_empty();
        match phase {
            Phase::Running | Phase::Stopping => false,
            Phase::Finishing => idle || (self.shared.fd_store.is_some() && !self.lifecycle.is_up()),
            Phase::Abandon => true,
        }
    }

    /// When the oldest waiting connection has waited `pending_timeout`.
    fn pending_expiry(&self) -> Option<Instant> {
        let pending_timeout = self.shared.settings().pending_timeout;
        self.pending
            .front()
            .map(|held| held.since + pending_timeout)
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
        let pending_timeout = self.shared.settings().pending_timeout;
        let down_too_long = self
            .lifecycle
            .unavailable_since()
            .is_some_and(|since| since.elapsed() >= pending_timeout);
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
            if !self.lifecycle.is_up() {
                held.keep_safe(self.shared.fd_store.as_ref());
            }
            self.pending.push_back(held);
        }
    }

    /// Sends waiting connections while the link is up and the in-flight window has room.
    fn send_pending(&mut self) {
        let max_in_flight = self.shared.settings().max_in_flight.get();
        let Lifecycle::Up {
            link,
            next_seq,
            want_writable,
        } = &mut self.lifecycle
        else {
            return;
        };
        while !*want_writable && self.unacked.len() < max_in_flight {
            let Some(held) = self.pending.front() else {
                return;
            };
            match link.try_send_conn(&mut self.out, *next_seq, held) {
                Ok(()) => {
                    let mut held = self.pending.pop_front().expect("front exists");
                    // Sent: the worker has it (even if we die now, it reads the CONN), so
                    // the fd store must not give it to the next instance too.
                    held.stored = None;
                    self.unacked.push_back((*next_seq, held));
                    *next_seq += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => *want_writable = true,
                Err(err) => return self.link_down(&format!("send failed: {err}")),
            }
        }
    }

    fn on_received(&mut self, received: Result<(), LinkError>) {
        if let Err(err) = received {
            return self.link_down(&err.to_string());
        }
        let mut events = std::mem::take(&mut self.events);
        let mut result = Ok(());
        for event in events.drain(..) {
            result = match event {
                // Nothing after it is about this link.
                Event::Closed(reason) => Err(reason.to_owned()),
                event => self.on_event(event).map_err(|err| err.to_string()),
            };
            if result.is_err() {
                break;
            }
        }
        self.events = events;
        if let Err(reason) = result {
            self.link_down(&reason);
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), LinkError> {
        match event {
            Event::Acked(seq) if seq <= self.lifecycle.sent_up_to() => {
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
            Event::Resend(seq) => self.resend(seq),
            Event::Drain => {
                let Some(last_seq) = self.lifecycle.drain(Instant::now()) else {
                    return Err(LinkError::Protocol(
                        "a DRAIN while not taking connections".into(),
                    ));
                };
                info!(
                    index = self.index,
                    last_seq, "worker is draining: holding its new connections"
                );
                let link = self.lifecycle.link_mut().expect("draining has a link");
                link.send_drained(&mut self.out, last_seq)
                    .map_err(LinkError::from)
            }
            Event::Ready => {
                if !self.lifecycle.ready() {
                    return Err(LinkError::Protocol("ready twice".into()));
                }
                info!(
                    index = self.index,
                    "Node worker in step: taking connections"
                );
                self.grant_lanes()
            }
            Event::Accepted(count) => {
                let pid = self.lifecycle.link_mut().map_or(0, |link| link.pid());
                let base = match self.reported {
                    Some((same, last)) if same == pid => last,
                    _ => 0,
                };
                let routed = &self.shared.metrics.worker(self.index).kernel_routed;
                routed.inc_by(count.saturating_sub(base));
                self.reported = Some((pid, count));
                Ok(())
            }
            Event::Writable => {
                if let Lifecycle::Up { want_writable, .. } = &mut self.lifecycle {
                    *want_writable = false;
                }
                Ok(())
            }
            other => Err(LinkError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// The worker sent connection `seq` back: it waits again at the front, up to
    /// [`MAX_RESENDS`] times.
    fn resend(&mut self, seq: u64) -> Result<(), LinkError> {
        let Some((_, mut again)) = self.unacked.pop_front_if(|(sent, _)| *sent == seq) else {
            return Err(LinkError::Protocol(format!(
                "the worker sent back connection {seq}, which is not the oldest in flight"
            )));
        };
        again.resent += 1;
        if again.resent > MAX_RESENDS {
            warn!(index = self.index, peer = ?again.peer, "the worker sent a connection back {MAX_RESENDS} times (out of fds?): closing it");
            self.shared
                .metrics
                .worker(self.index)
                .turned_away(TurnedAway::Refused);
        } else {
            debug!(
                index = self.index,
                seq, "the worker sent a connection back: sending it again"
            );
            self.pending.push_front(again);
        }
        Ok(())
    }

    /// The link is gone: what was not acknowledged waits again, in order, at the front.
    fn link_down(&mut self, reason: &str) {
        if matches!(self.lifecycle, Lifecycle::Draining { .. }) {
            self.reported = None;
        }
        if self.lifecycle.down(Instant::now()).is_none() {
            return; // already down (a second reason for the same loss)
        }
        self.shared.set_live(self.index, false);
        let resend = self.unacked.len();
        while let Some((_, held)) = self.unacked.pop_back() {
            self.pending.push_front(held);
        }
        // Everything held now waits for a worker that is down.
        for held in self.pending.iter_mut() {
            held.keep_safe(self.shared.fd_store.as_ref());
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
    }

    async fn connect(&mut self) {
        let opened =
            WorkerLink::open(&self.name, self.index, &self.shared.settings().worker_users).await;
        match opened {
            Ok(link) => {
                let ready = link.is_ready();
                info!(
                    index = self.index,
                    worker_pid = link.pid(),
                    socket = %format!("@{}", self.name),
                    waiting = self.pending.len(),
                    node = !ready,
                    "worker link up"
                );
                // A Node worker takes connections once in step (`Event::Ready`).
                self.lifecycle.linked(link, ready);
                self.last_failure = None;
                self.shared.metrics.worker(self.index).link_up.inc();
                if ready {
                    if let Err(err) = self.grant_lanes() {
                        self.link_down(&format!("passing the lanes failed: {err}"));
                    }
                }
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
                let impostor = matches!(err, LinkError::Impostor { .. });
                self.lifecycle.connect_failed(Instant::now(), impostor);
            }
        }
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

async fn next(
    link: Option<&mut WorkerLink>,
    buf: &mut [u8],
    events: &mut Vec<Event>,
    want_writable: bool,
) -> Result<(), LinkError> {
    match link {
        Some(link) => link.next(buf, events, want_writable).await,
        None => std::future::pending().await,
    }
}

/// Accepts on a watched lane, with a permit (waiting for one first: the lane's backlog
/// holds meanwhile). Cancel-safe: a connection is only taken when it is returned.
async fn accept_lane(
    lanes: &[Lane],
    permits: &Arc<Semaphore>,
) -> (
    usize,
    io::Result<(std::net::TcpStream, std::net::SocketAddr)>,
    OwnedSemaphorePermit,
) {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let (at, accepted) = lanes::accept_any(lanes).await;
    (at, accepted, permit)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::testing;
    use crate::worker::link::{DispatcherLink, LinkServer};
    use crate::worker::WorkerOptions;

    const PATIENCE: Duration = Duration::from_secs(5);

    async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(PATIENCE, future)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
    }

    async fn next_link(server: &LinkServer) -> DispatcherLink {
        let admitted = within("link", server.accept()).await.unwrap();
        within("HELLO", admitted.handshake()).await.unwrap()
    }

    /// A worker of the link protocol drains: the dispatcher answers, holds the connection
    /// that comes meanwhile, and ends the link itself once the two sent before the drain
    /// are acknowledged (the worker's ACCEPTED after its DRAIN counted, not an error).
    /// It links again at once: here the same name answers, as a reloaded Node bridge's
    /// would, and the held connection goes to it, first on the new link; nothing is lost.
    #[tokio::test]
    async fn a_drained_link_ends_once_acknowledged_and_the_next_link_follows_at_once() {
        let prefix = format!("sticky-dispatch-unit/{}/slot-drained/", std::process::id());
        let (hub, mut inboxes) = testing::hub(1, &[("STICKY_DISPATCH_SOCKET_PREFIX", &prefix)]);
        let hub = Arc::new(hub);
        let options = WorkerOptions {
            index: 0,
            socket_prefix: prefix,
            dispatcher_users: vec![nix::unistd::Uid::effective()],
            drain_on_sigterm: false,
        };
        let server = LinkServer::bind(&options).unwrap();
        let (_phase, phase) = watch::channel(Phase::Running);
        let slot = Slot::new(
            0,
            hub.clone(),
            inboxes.remove(0),
            phase,
            Vec::new(),
            Arc::new(Semaphore::new(8)),
        );
        let slot = tokio::spawn(slot.run());

        let mut old = next_link(&server).await;
        for ip in ["127.0.0.1", "127.0.0.2"] {
            hub.route(testing::held(&hub, ip));
        }
        for seq in [1, 2] {
            let handoff = within("CONN", old.recv()).await.unwrap().unwrap();
            assert_eq!(handoff.seq(), seq);
        }
        old.drain().await.unwrap();
        old.send_accepted(5).await.unwrap();
        // DRAINED: nothing after the two.
        assert!(within("DRAINED", old.recv()).await.unwrap().is_none());
        // Arrives while draining: held for the next link.
        hub.route(testing::held(&hub, "127.0.0.3"));
        // Both ACKs, after the drain, in two messages: the link lives until the second.
        old.ack(1).await.unwrap();
        old.ack(2).await.unwrap();

        let mut new = next_link(&server).await;
        let handoff = within("the held CONN", new.recv()).await.unwrap().unwrap();
        assert_eq!(handoff.seq(), 1, "the new link numbers from 1");
        assert_eq!(handoff.client.peer.unwrap().ip().to_string(), "127.0.0.3");
        new.ack(1).await.unwrap();
        // The same pid (one test process), a new process's count: from 0 again.
        new.send_accepted(3).await.unwrap();
        let metrics = hub.metrics.worker(0);
        within("the counts", async {
            while metrics.kernel_routed.get() < 8 || metrics.handed_off.get() < 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert_eq!(metrics.kernel_routed.get(), 8);
        assert_eq!(metrics.handed_off.get(), 3);
        assert_eq!(metrics.resent.get(), 0, "nothing was sent twice");
        assert_eq!(metrics.link_down.get(), 1);
        assert_eq!(metrics.link_up.get(), 2);
        slot.abort();
    }
}
