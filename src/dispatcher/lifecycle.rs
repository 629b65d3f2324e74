//! Where a worker's link is in its life ([`Lifecycle`]), apart from any I/O: the slot
//! owns one and makes its transitions.

use std::time::Duration;

use tokio::time::Instant;

/// First retry after a failed connect; doubled up to `RECONNECT_MAX`. Small, because a
/// restarting worker should get its waiting clients within milliseconds.
const RECONNECT_MIN: Duration = Duration::from_millis(2);
/// Bounds the reconnect backoff: a worker that comes back is found within this long.
const RECONNECT_MAX: Duration = Duration::from_millis(100);

/// Where a worker's link is in its life. The slot's transitions:
///
/// ```text
/// Down --link up--> Up (link protocol) or Syncing (Node) --Ready--> Up --Drain--> Draining
///   ^                                                                               |
///   +------------------- link down (from Syncing, Up or Draining) -------------------+
/// ```
///
/// Only `Up` takes connections: it is the worker's liveness, which failover and the
/// metrics read. A `Draining` link is over once everything sent on it is acknowledged
/// ([`Self::drained`]): the slot ends it and links again at once, so that a worker whose
/// replacement is already listening (a Node bridge that reloaded) serves its waiting
/// clients within milliseconds, not when the old process exits. Generic over the link so
/// that the transitions are tested without one.
#[derive(Debug)]
pub(super) enum Lifecycle<L> {
    /// No link; the next connect is at `retry.at`. Unavailable since `since`.
    Down { since: Instant, retry: Retry },
    /// Linked, but the worker cannot take connections yet (a Node worker before it
    /// answered the sync).
    Syncing { link: L, since: Instant },
    /// Taking connections; `next_seq` numbers the next one sent; `want_writable`: the
    /// last send found the socket full.
    Up {
        link: L,
        next_seq: u64,
        want_writable: bool,
    },
    /// The worker asked to drain (at `since`): nothing is sent after `last_seq`, and what
    /// was sent may still be acknowledged.
    Draining {
        link: L,
        last_seq: u64,
        since: Instant,
    },
}

/// When to try connecting again, and the backoff after that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Retry {
    at: Instant,
    backoff: Duration,
}

impl Retry {
    fn now(now: Instant) -> Retry {
        Retry {
            at: now,
            backoff: RECONNECT_MIN,
        }
    }

    /// After a failed attempt at `now`; `patient`: the next one waits the longest.
    fn after_failure(self, now: Instant, patient: bool) -> Retry {
        let backoff = if patient { RECONNECT_MAX } else { self.backoff };
        Retry {
            at: now + backoff,
            backoff: (backoff * 2).min(RECONNECT_MAX),
        }
    }
}

impl<L> Lifecycle<L> {
    pub(super) fn new(now: Instant) -> Lifecycle<L> {
        Lifecycle::Down {
            since: now,
            retry: Retry::now(now),
        }
    }

    pub(super) fn is_up(&self) -> bool {
        matches!(self, Lifecycle::Up { .. })
    }

    pub(super) fn link_mut(&mut self) -> Option<&mut L> {
        match self {
            Lifecycle::Down { .. } => None,
            Lifecycle::Syncing { link, .. }
            | Lifecycle::Up { link, .. }
            | Lifecycle::Draining { link, .. } => Some(link),
        }
    }

    /// Since when the worker has not been taking connections; `None` while it is up.
    pub(super) fn unavailable_since(&self) -> Option<Instant> {
        match self {
            Lifecycle::Down { since, .. }
            | Lifecycle::Syncing { since, .. }
            | Lifecycle::Draining { since, .. } => Some(*since),
            Lifecycle::Up { .. } => None,
        }
    }

    /// The highest sequence number sent on this link (0: none).
    pub(super) fn sent_up_to(&self) -> u64 {
        match self {
            Lifecycle::Up { next_seq, .. } => next_seq - 1,
            Lifecycle::Draining { last_seq, .. } => *last_seq,
            Lifecycle::Down { .. } | Lifecycle::Syncing { .. } => 0,
        }
    }

    /// Whether a draining link has nothing left to do: the drain was answered (at once, on
    /// [`Self::drain`]) and none of the `in_flight` connections sent before it is still
    /// unacknowledged. Nothing more will come on it but the worker's own close.
    pub(super) fn drained(&self, in_flight: usize) -> bool {
        matches!(self, Lifecycle::Draining { .. }) && in_flight == 0
    }

    /// When to try connecting, while down.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        match self {
            Lifecycle::Down { retry, .. } => Some(retry.at),
            _ => None,
        }
    }

    /// A link came up: it takes connections at once (`ready`), or after [`Self::ready`].
    pub(super) fn linked(&mut self, link: L, ready: bool) {
        let since = self.unavailable_since().unwrap_or_else(Instant::now);
        *self = if ready {
            Lifecycle::Up {
                link,
                next_seq: 1,
                want_writable: false,
            }
        } else {
            Lifecycle::Syncing { link, since }
        };
    }

    /// The worker can take connections now. `false`: it was not waiting to.
    pub(super) fn ready(&mut self) -> bool {
        self.replace_with(|state| match state {
            Lifecycle::Syncing { link, .. } => (
                Lifecycle::Up {
                    link,
                    next_seq: 1,
                    want_writable: false,
                },
                true,
            ),
            other => (other, false),
        })
    }

    /// The worker asked to drain at `now`: returns the last sequence number sent, or
    /// `None` if it was not up (a second DRAIN, or one before the sync).
    pub(super) fn drain(&mut self, now: Instant) -> Option<u64> {
        self.replace_with(|state| match state {
            Lifecycle::Up { link, next_seq, .. } => (
                Lifecycle::Draining {
                    link,
                    last_seq: next_seq - 1,
                    since: now,
                },
                Some(next_seq - 1),
            ),
            other => (other, None),
        })
    }

    /// The link is gone at `now`; returns it (`None` if there was none). A draining worker
    /// stays unavailable since its drain; any other since now.
    pub(super) fn down(&mut self, now: Instant) -> Option<L> {
        self.replace_with(|state| {
            let (link, since) = match state {
                Lifecycle::Down { .. } => return (state, None),
                Lifecycle::Draining { link, since, .. } => (link, since),
                Lifecycle::Syncing { link, .. } | Lifecycle::Up { link, .. } => (link, now),
            };
            let down = Lifecycle::Down {
                since,
                retry: Retry::now(now),
            };
            (down, Some(link))
        })
    }

    /// A connect failed at `now` (`patient`: to an impostor, so wait the longest).
    pub(super) fn connect_failed(&mut self, now: Instant, patient: bool) {
        if let Lifecycle::Down { retry, .. } = self {
            *retry = retry.after_failure(now, patient);
        }
    }

    fn replace_with<T>(&mut self, change: impl FnOnce(Self) -> (Self, T)) -> T {
        let now = Instant::now();
        let old = std::mem::replace(self, Lifecycle::new(now));
        let (new, result) = change(old);
        *self = new;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Life = Lifecycle<&'static str>;

    #[tokio::test(start_paused = true)]
    async fn a_link_protocol_worker_is_up_at_once_and_drains() {
        let start = Instant::now();
        let mut life = Life::new(start);
        assert!(!life.is_up());
        assert_eq!(life.unavailable_since(), Some(start));
        assert_eq!(life.retry_at(), Some(start));
        tokio::time::advance(Duration::from_secs(1)).await;
        life.linked("link", true);
        assert!(life.is_up());
        assert_eq!(life.unavailable_since(), None);
        assert_eq!(life.sent_up_to(), 0);
        if let Lifecycle::Up { next_seq, .. } = &mut life {
            *next_seq = 6; // five sent
        }
        assert_eq!(life.sent_up_to(), 5);
        let drained_at = Instant::now();
        assert_eq!(life.drain(drained_at), Some(5));
        assert!(!life.is_up());
        assert_eq!(life.sent_up_to(), 5, "ACKs up to the drain still count");
        assert_eq!(life.drain(drained_at), None, "a second DRAIN is refused");
        assert_eq!(life.link_mut(), Some(&mut "link"));
        // Down after a drain: unavailable since the drain, not since the link went.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(life.down(Instant::now()), Some("link"));
        assert_eq!(life.unavailable_since(), Some(drained_at));
        assert_eq!(life.retry_at(), Some(Instant::now()), "reconnect at once");
        assert_eq!(life.down(Instant::now()), None, "down once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_worker_syncs_before_it_is_up() {
        let start = Instant::now();
        let mut life = Life::new(start);
        tokio::time::advance(Duration::from_millis(5)).await;
        life.linked("node", false);
        assert!(matches!(life, Lifecycle::Syncing { .. }));
        assert!(!life.is_up());
        assert_eq!(
            life.unavailable_since(),
            Some(start),
            "still unavailable since down"
        );
        assert_eq!(life.drain(Instant::now()), None, "no DRAIN before the sync");
        assert!(life.ready());
        assert!(life.is_up());
        assert!(!life.ready(), "ready once");
        // Down from Up: unavailable since now.
        let now = Instant::now();
        assert_eq!(life.down(now), Some("node"));
        assert_eq!(life.unavailable_since(), Some(now));
    }

    /// A drained link ends as soon as nothing sent on it waits for an acknowledgement, and
    /// the next link is tried at once: the replacement's clients waited since the drain.
    #[tokio::test(start_paused = true)]
    async fn a_drained_link_is_over_once_nothing_is_in_flight_and_links_again_at_once() {
        let start = Instant::now();
        let mut life = Life::new(start);
        assert!(!life.drained(0), "down: no link to end");
        life.linked("old node", false);
        assert!(!life.drained(0), "syncing");
        assert!(life.ready());
        assert!(!life.drained(0), "up: it takes connections");
        if let Lifecycle::Up { next_seq, .. } = &mut life {
            *next_seq = 4; // three sent
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        let drained_at = Instant::now();
        assert_eq!(life.drain(drained_at), Some(3));
        assert!(
            !life.drained(2),
            "two sent before the drain are not acknowledged yet"
        );
        assert!(life.drained(0));
        tokio::time::advance(Duration::from_millis(3)).await;
        let now = Instant::now();
        assert_eq!(life.down(now), Some("old node"));
        assert!(!life.drained(0));
        assert_eq!(
            life.retry_at(),
            Some(now),
            "the replacement is linked at once"
        );
        assert_eq!(life.unavailable_since(), Some(drained_at));
        life.linked("new node", false);
        assert_eq!(
            life.unavailable_since(),
            Some(drained_at),
            "its clients have waited since the drain"
        );
        assert!(life.ready());
        assert_eq!(life.sent_up_to(), 0, "the new link numbers from 1");
        assert!(!life.drained(0));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_back_off_up_to_the_bound() {
        let start = Instant::now();
        let mut life = Life::new(start);
        let mut delays = Vec::new();
        for _ in 0..8 {
            let now = Instant::now();
            life.connect_failed(now, false);
            delays.push(life.retry_at().unwrap() - now);
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            delays,
            [
                ms(2),
                ms(4),
                ms(8),
                ms(16),
                ms(32),
                ms(64),
                ms(100),
                ms(100)
            ]
        );
        // An impostor: the longest wait at once.
        let mut life = Life::new(start);
        life.connect_failed(start, true);
        assert_eq!(life.retry_at(), Some(start + RECONNECT_MAX));
        // No retries while linked.
        life.linked("link", true);
        life.connect_failed(start, false);
        assert_eq!(life.retry_at(), None);
    }
}
