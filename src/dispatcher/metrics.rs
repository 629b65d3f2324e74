//! What the dispatcher counts, in a Prometheus registry: per worker (hand-offs, link up,
//! waiting and in-flight gauges, re-sends, turned away by reason, fail-overs, link
//! transitions), per listener (accepted, accept pauses, key-read failures by reason), and
//! the time from accept to the worker's acknowledgement, with the `prometheus` crate (whose
//! text format is the one `promtool check metrics` reads).
//!
//! Every handle is made once, when the dispatcher starts, and kept by the task that
//! updates it, so that counting on the per-connection path is one atomic add, as the old
//! hand-written counters were; a scrape reads the same atomics. The metrics live as long
//! as the process: a reload keeps them, a restart starts them over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Prefix of every metric name.
const PREFIX: &str = "sticky_dispatch";

/// Why a slot closed a connection without handing it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TurnedAway {
    /// It waited `pending_timeout` for its worker.
    PendingTimeout,
    /// Its worker had been down longer than `pending_timeout` when it arrived.
    WorkerDown,
    /// Its worker's queue was full (`max_pending`).
    MaxPending,
    /// A Node worker got it without its fd, again and again (out of fds).
    Refused,
}

impl TurnedAway {
    const ALL: [TurnedAway; 4] = [
        TurnedAway::PendingTimeout,
        TurnedAway::WorkerDown,
        TurnedAway::MaxPending,
        TurnedAway::Refused,
    ];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            TurnedAway::PendingTimeout => "pending_timeout",
            TurnedAway::WorkerDown => "worker_down",
            TurnedAway::MaxPending => "max_pending",
            TurnedAway::Refused => "refused",
        }
    }
}

/// Why a connection was closed while its routing key was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyFailure {
    /// Nothing complete within `key_timeout`.
    Timeout,
    /// The client closed before sending its key.
    Closed,
    /// Not a valid PROXY protocol header.
    BadProxyHeader,
    /// A socket error.
    Io,
}

impl KeyFailure {
    const ALL: [KeyFailure; 4] = [
        KeyFailure::Timeout,
        KeyFailure::Closed,
        KeyFailure::BadProxyHeader,
        KeyFailure::Io,
    ];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            KeyFailure::Timeout => "timeout",
            KeyFailure::Closed => "closed",
            KeyFailure::BadProxyHeader => "bad_proxy_header",
            KeyFailure::Io => "io",
        }
    }
}

/// The handles one slot updates.
#[derive(Clone, Debug)]
pub(super) struct WorkerMetrics {
    pub(super) handed_off: IntCounter,
    pub(super) up: IntGauge,
    pub(super) waiting: IntGauge,
    pub(super) in_flight: IntGauge,
    pub(super) resent: IntCounter,
    pub(super) failed_over: IntCounter,
    pub(super) link_up: IntCounter,
    pub(super) link_down: IntCounter,
    /// Connections the worker accepted on its lanes (the kernel's path), as it reports.
    pub(super) kernel_routed: IntCounter,
    /// By [`TurnedAway`], in the order of `TurnedAway::ALL`.
    turned_away: [IntCounter; 4],
}

impl WorkerMetrics {
    pub(super) fn turned_away(&self, reason: TurnedAway) {
        self.turned_away[reason as usize].inc();
    }
}

/// The handles one acceptor (and the key readers of its connections) update.
#[derive(Clone, Debug)]
pub(super) struct ListenerMetrics {
    pub(super) accepted: IntCounter,
    pub(super) paused_fd_limit: IntCounter,
    pub(super) paused_max_connections: IntCounter,
    /// By [`KeyFailure`], in the order of `KeyFailure::ALL`.
    key_failures: [IntCounter; 4],
}

impl ListenerMetrics {
    pub(super) fn key_failure(&self, reason: KeyFailure) {
        self.key_failures[reason as usize].inc();
    }
}

/// Which path a listener's connections take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    /// Each worker accepts on its own lane.
    Kernel,
    /// The dispatcher accepts and passes connections over the links.
    Userspace,
}

impl Path {
    /// The `path` label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Path::Kernel => "kernel",
            Path::Userspace => "userspace",
        }
    }
}

/// One lane's series, refreshed from the kernel at each scrape.
#[derive(Debug)]
struct LaneSeries {
    inode: u64,
    local: SocketAddr,
    queued: IntGauge,
    backlog: IntGauge,
    drops: IntCounter,
}

/// Every metric of one dispatcher process.
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    workers: Box<[WorkerMetrics]>,
    listeners: HashMap<Arc<str>, ListenerMetrics>,
    path: IntGaugeVec,
    kernel_path_refused: IntGaugeVec,
    lane_queued: IntGaugeVec,
    lane_backlog: IntGaugeVec,
    lane_drops: IntCounterVec,
    lanes: std::sync::Mutex<Vec<LaneSeries>>,
    /// Seconds from accept to the worker's acknowledgement.
    pub(super) handoff_seconds: Histogram,
}

/// Registers a vector of counters or gauges; the names and label sets are ours and fixed,
/// so a registration error is a bug.
fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names and labels are valid and unique");
    metric
}

fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, vec)
}

fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, vec)
}

impl Metrics {
    /// The registry for `workers` worker indices and the named listeners. Every series
    /// exists from the start (at 0), so that dashboards and alerts see it before it moves.
    pub(super) fn new(workers: u32, listeners: &[Arc<str>]) -> Metrics {
        let registry =
            Registry::new_custom(Some(PREFIX.into()), None).expect("a valid metric prefix");
        gauges(
            &registry,
            "build_info",
            "The running sticky-dispatch version (always 1)",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);

        let worker = &["worker"];
        let handed_off = counters(
            &registry,
            "handed_off_total",
            "Connections handed to the worker and acknowledged by it",
            worker,
        );
        let resent = counters(
            &registry,
            "resent_total",
            "Connections sent again after the worker's link broke before acknowledging them",
            worker,
        );
        let failed_over = counters(
            &registry,
            "failed_over_total",
            "Connections failed over to this worker from another (on_worker_down = failover)",
            worker,
        );
        let link_up = counters(
            &registry,
            "link_up_total",
            "Times the link to the worker came up",
            worker,
        );
        let link_down = counters(
            &registry,
            "link_down_total",
            "Times the link to the worker went down",
            worker,
        );
        let up = gauges(
            &registry,
            "worker_up",
            "1 while the worker's link is up and it takes connections, else 0",
            worker,
        );
        let waiting = gauges(
            &registry,
            "waiting",
            "Connections waiting for the worker (it is down, or its in-flight window is full)",
            worker,
        );
        let in_flight = gauges(
            &registry,
            "in_flight",
            "Connections sent to the worker and not yet acknowledged",
            worker,
        );
        let kernel_routed = counters(
            &registry,
            "kernel_routed_total",
            "Connections the kernel routed to the worker's lane and the worker accepted there, as the worker reports them",
            worker,
        );
        let turned_away = counters(
            &registry,
            "turned_away_total",
            "Connections closed unserved because their worker could not take them, by reason",
            &["worker", "reason"],
        );
        let workers = (0..workers)
            .map(|index| {
                let label = index.to_string();
                let of = |vec: &IntCounterVec| vec.with_label_values(&[&label]);
                let gauge = |vec: &IntGaugeVec| vec.with_label_values(&[&label]);
                WorkerMetrics {
                    handed_off: of(&handed_off),
                    up: gauge(&up),
                    waiting: gauge(&waiting),
                    in_flight: gauge(&in_flight),
                    resent: of(&resent),
                    failed_over: of(&failed_over),
                    link_up: of(&link_up),
                    link_down: of(&link_down),
                    kernel_routed: of(&kernel_routed),
                    turned_away: TurnedAway::ALL
                        .map(|reason| turned_away.with_label_values(&[&label, reason.label()])),
                }
            })
            .collect();

        let accepted = counters(
            &registry,
            "accepted_total",
            "Client connections accepted",
            &["listener"],
        );
        let paused = counters(
            &registry,
            "accept_paused_total",
            "Times accepting paused: for lack of fds or memory (fd_limit), or at max_connections",
            &["listener", "reason"],
        );
        let key_failures = counters(
            &registry,
            "key_read_failures_total",
            "Connections closed while their routing key was read (PROXY header, HTTP head), by reason",
            &["listener", "reason"],
        );
        let listeners = listeners
            .iter()
            .map(|name| {
                let metrics = ListenerMetrics {
                    accepted: accepted.with_label_values(&[name]),
                    paused_fd_limit: paused.with_label_values(&[name, "fd_limit"]),
                    paused_max_connections: paused.with_label_values(&[name, "max_connections"]),
                    key_failures: KeyFailure::ALL
                        .map(|reason| key_failures.with_label_values(&[name, reason.label()])),
                };
                (name.clone(), metrics)
            })
            .collect();

        // 50 µs to about 3.3 s: a hand-off takes tens of microseconds when the worker is
        // up, and up to pending_timeout when it waits for one.
        let handoff_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "handoff_seconds",
                "Time from accepting a connection to the worker's acknowledgement",
            )
            .buckets(exponential_buckets(0.000_05, 2.0, 17).expect("valid buckets")),
        )
        .expect("valid metric");
        let handoff_seconds = register(&registry, handoff_seconds);

        let path = gauges(
            &registry,
            "listener_path",
            "1 for the path the listener's connections take: kernel (each worker accepts on its lane) or userspace (the dispatcher passes them)",
            &["listener", "path"],
        );
        let kernel_path_refused = gauges(
            &registry,
            "kernel_path_refused",
            "1 while the listener takes the dispatcher's path because its lanes failed the checks at start (the log says why and how to fix it)",
            &["listener"],
        );
        let lane = &["listener", "lane"];
        let lane_queued = gauges(
            &registry,
            "lane_queued",
            "Connections waiting in the lane's accept queue",
            lane,
        );
        let lane_backlog = gauges(
            &registry,
            "lane_backlog",
            "The lane's listen backlog: the most its accept queue holds",
            lane,
        );
        let lane_drops = counters(
            &registry,
            "lane_drops_total",
            "Connections the kernel dropped at the lane, its accept queue full",
            lane,
        );

        Metrics {
            registry,
            workers,
            listeners,
            handoff_seconds,
            path,
            kernel_path_refused,
            lane_queued,
            lane_backlog,
            lane_drops,
            lanes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records which path listener `name` takes, and whether the kernel's was wanted and
    /// refused (an alert: the dispatcher then carries every connection).
    pub(super) fn set_path(&self, name: &str, path: Path, refused: bool) {
        for other in [Path::Kernel, Path::Userspace] {
            self.path
                .with_label_values(&[name, other.label()])
                .set(i64::from(other == path));
        }
        self.kernel_path_refused
            .with_label_values(&[name])
            .set(i64::from(refused));
    }

    /// Adds the series of lane `index` of listener `name`, the socket `inode` on `local`.
    pub(super) fn add_lane(&self, name: &str, index: usize, inode: u64, local: SocketAddr) {
        let labels = [name, &index.to_string()];
        let series = LaneSeries {
            inode,
            local,
            queued: self.lane_queued.with_label_values(&labels),
            backlog: self.lane_backlog.with_label_values(&labels),
            drops: self.lane_drops.with_label_values(&labels),
        };
        self.lanes.lock().expect("never poisoned").push(series);
    }

    /// Reads every lane's queue and drops from the kernel (one sock_diag dump per address).
    fn refresh_lanes(&self) {
        let lanes = self.lanes.lock().expect("never poisoned");
        let mut addresses: Vec<SocketAddr> = lanes.iter().map(|lane| lane.local).collect();
        addresses.dedup();
        for local in addresses {
            let Ok(listening) = crate::sock_diag::listening_on(local.port(), local.ip()) else {
                continue;
            };
            for lane in lanes.iter().filter(|lane| lane.local == local) {
                let Some(found) = listening.iter().find(|l| l.inode == lane.inode) else {
                    continue;
                };
                lane.queued.set(i64::from(found.queued));
                lane.backlog.set(i64::from(found.backlog));
                let drops = u64::from(found.drops.unwrap_or(0));
                lane.drops.inc_by(drops.saturating_sub(lane.drops.get()));
            }
        }
    }

    pub(super) fn worker(&self, index: u32) -> &WorkerMetrics {
        &self.workers[index as usize]
    }

    /// The handles of a listener.
    pub(super) fn listener(&self, name: &Arc<str>) -> ListenerMetrics {
        self.listeners
            .get(name)
            .cloned()
            .expect("every listener is registered when the dispatcher starts")
    }

    /// The Prometheus text exposition of every metric (the lanes' read from the kernel now).
    pub(super) fn encode(&self) -> String {
        self.refresh_lanes();
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("our metrics encode")
    }

    /// Sums over the workers and listeners, for `STATUS=` and the exit log.
    pub(super) fn totals(&self) -> Totals {
        let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| self.workers.iter().map(f).sum::<u64>();
        let gauge = |g: &IntGauge| u64::try_from(g.get()).unwrap_or(0);
        let key_failures: u64 = self
            .listeners
            .values()
            .flat_map(|l| l.key_failures.iter().map(IntCounter::get))
            .sum();
        Totals {
            live: sum(&|w| gauge(&w.up)),
            handed_off: sum(&|w| w.handed_off.get()),
            kernel_routed: sum(&|w| w.kernel_routed.get()),
            waiting: sum(&|w| gauge(&w.waiting)),
            in_flight: sum(&|w| gauge(&w.in_flight)),
            resent: sum(&|w| w.resent.get()),
            turned_away: sum(&|w| w.turned_away.iter().map(IntCounter::get).sum()) + key_failures,
            failed_over: sum(&|w| w.failed_over.get()),
        }
    }
}

/// The dispatcher's counts summed over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) live: u64,
    pub(super) handed_off: u64,
    pub(super) kernel_routed: u64,
    pub(super) waiting: u64,
    pub(super) in_flight: u64,
    pub(super) resent: u64,
    pub(super) turned_away: u64,
    pub(super) failed_over: u64,
}
