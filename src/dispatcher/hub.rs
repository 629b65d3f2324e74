//! What the dispatcher's tasks share ([`Hub`]): the settings in force, the routing
//! decision (every connection goes through [`Hub::route`] once, and through
//! [`Hub::fail_over`] at most once), which workers are live, the fd store, and the
//! metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::fdstore::FdStore;
use super::held::Held;
use super::metrics::{Metrics, Totals};
use crate::config::{OnWorkerDown, Settings};
use crate::routing::{Router, RoutingKey};

/// What every task of the dispatcher reads.
pub(super) struct Hub {
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

impl Hub {
    pub(super) fn new(
        settings: watch::Receiver<Arc<Settings>>,
        fd_store: Option<Arc<FdStore>>,
        slots: Vec<mpsc::UnboundedSender<Held>>,
        listeners: &[Arc<str>],
    ) -> Hub {
        let current = settings.borrow().clone();
        let workers = current.workers;
        Hub {
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
    /// connection goes through here once, and through [`Hub::fail_over`] at most once:
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
        // A slot's inbox lives as long as the `Hub`; a send fails only while shutting down,
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
            kernel_routed,
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
            "{live}/{} workers live; {handed_off} connections handed off, {kernel_routed} \
             routed by the kernel; {waiting} waiting, \
             {in_flight} in flight; {resent} re-sent, {turned_away} turned away, \
             {failed_over} failed over{restart_note}",
            self.router.workers(),
        )
    }
}

/// What [`Hub::fail_over`] did.
pub(super) enum FailOver {
    /// Sent to the slot of this worker index.
    Sent(u32),
    /// Not failed over: the caller still has it.
    Kept(Held),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::testing::{held, hub};

    #[test]
    fn a_connection_goes_to_the_slot_of_its_keys_worker() {
        let (hub, mut inboxes) = hub(4, &[]);
        for n in 1..=20 {
            let ip = format!("198.51.100.{n}");
            let held = held(&hub, &ip);
            let expected = hub.router.worker_for(&held.key);
            assert_eq!(hub.route(held), expected);
            let arrived = inboxes[expected as usize].try_recv().unwrap();
            assert_eq!(arrived.peer.unwrap().ip().to_string(), ip);
        }
    }

    #[test]
    fn liveness_is_the_slots_word_and_the_gauge_shows_it() {
        let (hub, _inboxes) = hub(2, &[]);
        assert!(!hub.is_live(1));
        hub.set_live(1, true);
        assert!(hub.is_live(1) && !hub.is_live(0));
        assert_eq!(hub.metrics.worker(1).up.get(), 1);
        hub.set_live(1, false);
        assert_eq!(hub.metrics.worker(1).up.get(), 0);
    }

    #[test]
    fn failover_only_when_configured_once_and_to_a_live_worker() {
        let (waiting, _inboxes) = hub(4, &[]);
        let h = held(&waiting, "198.51.100.7");
        (0..4).for_each(|i| waiting.set_live(i, true));
        assert!(
            matches!(waiting.fail_over(h), FailOver::Kept(_)),
            "on_worker_down = wait"
        );

        let (hub, mut inboxes) = hub(4, &[("STICKY_DISPATCH_ON_WORKER_DOWN", "failover")]);
        let h = held(&hub, "198.51.100.7");
        let primary = hub.router.worker_for(&h.key);
        let FailOver::Kept(h) = hub.fail_over(h) else {
            panic!("failed over with no worker live");
        };
        (0..4)
            .filter(|&i| i != primary)
            .for_each(|i| hub.set_live(i, true));
        let FailOver::Sent(target) = hub.fail_over(h) else {
            panic!("not failed over although three workers are live");
        };
        assert_ne!(target, primary);
        assert_eq!(hub.metrics.worker(target).failed_over.get(), 1);
        let moved = inboxes[target as usize].try_recv().unwrap();
        assert!(moved.failed_over);
        assert!(
            matches!(hub.fail_over(moved), FailOver::Kept(_)),
            "a connection is failed over once"
        );
    }
}
