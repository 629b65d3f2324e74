//! `sticky-dispatch status`: a running dispatcher's listeners (which path each takes, what
//! waits in its lanes) and per-worker table, for a person, read from its `/metrics` and
//! `/health`.
//!
//! It reads only the dispatcher's own metric lines (`name{worker="N"} value`), so a small
//! reader of those lines does; a full Prometheus parser would add a dependency for
//! nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The port of the shipped sticky-dispatch-metrics.socket, asked when nothing says where.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9191";
/// A dispatcher answers in milliseconds; one that does not within this is not reachable.
const TIMEOUT: Duration = Duration::from_secs(3);

/// One worker's row.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkerRow {
    /// The link is up and the worker takes connections.
    pub up: bool,
    /// Connections acknowledged by it.
    pub handed_off: u64,
    /// Connections it accepted on its lanes (the kernel's path), as it reports them.
    pub kernel_routed: u64,
    /// Connections waiting for it.
    pub waiting: u64,
    /// Connections sent and not yet acknowledged.
    pub in_flight: u64,
    /// Connections sent again after its link broke.
    pub resent: u64,
    /// Connections closed because it could not take them.
    pub turned_away: u64,
}

/// One listener's row.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListenerRow {
    /// `kernel` or `userspace`, as `listener_path` says.
    pub path: String,
    /// The kernel's path was wanted and its lanes failed the checks.
    pub refused: bool,
    /// Its lanes (0 on the dispatcher's path).
    pub lanes: u64,
    /// Connections waiting in its lanes' accept queues.
    pub queued: u64,
    /// Connections the kernel dropped at its lanes.
    pub drops: u64,
}

/// What `status` shows.
#[derive(Debug)]
pub struct Report {
    /// `/health`'s status code and body.
    pub health: (u16, String),
    /// Rows by listener name.
    pub listeners: BTreeMap<String, ListenerRow>,
    /// Rows by worker index.
    pub workers: BTreeMap<u32, WorkerRow>,
}

impl Report {
    /// Every worker's link is up.
    pub fn all_up(&self) -> bool {
        !self.workers.is_empty() && self.workers.values().all(|w| w.up)
    }
}

/// Asks the dispatcher at `address` for its metrics and health.
pub fn fetch(address: SocketAddr) -> Result<Report, String> {
    let (_, metrics) = get(address, "/metrics")?;
    let health = get(address, "/health")?;
    Ok(Report {
        health: (health.0, health.1.trim().to_owned()),
        listeners: parse_listeners(&metrics),
        workers: parse(&metrics),
    })
}

/// One `GET` over HTTP/1.0 (the server closes after the answer): status and body.
fn get(address: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let fail = |err: std::io::Error| format!("could not ask {address}{path}: {err}");
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).map_err(fail)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(fail)?;
    let mut answer = String::new();
    stream
        .take(16 << 20)
        .read_to_string(&mut answer)
        .map_err(fail)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{address}{path}: not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{address}{path}: no HTTP status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The dispatcher's labelled series in the exposition text: its name without the
/// `sticky_dispatch_` prefix, its labels, its value.
fn series(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{')?;
            let name = name.strip_prefix("sticky_dispatch_")?;
            Some((name, labels, value.parse::<f64>().ok()?))
        })
}

/// The per-worker rows from the exposition text.
pub fn parse(text: &str) -> BTreeMap<u32, WorkerRow> {
    let mut rows: BTreeMap<u32, WorkerRow> = BTreeMap::new();
    for (name, labels, value) in series(text) {
        let Some(worker) = label(labels, "worker").and_then(|w| w.parse().ok()) else {
            continue;
        };
        let row = rows.entry(worker).or_default();
        let count = value as u64;
        match name {
            "worker_up" => row.up = value == 1.0,
            "handed_off_total" => row.handed_off = count,
            "kernel_routed_total" => row.kernel_routed = count,
            "waiting" => row.waiting = count,
            "in_flight" => row.in_flight = count,
            "resent_total" => row.resent = count,
            "turned_away_total" => row.turned_away += count,
            _ => {}
        }
    }
    rows
}

/// The per-listener rows from the exposition text: the path and, summed over its lanes,
/// what waits and what was dropped.
pub fn parse_listeners(text: &str) -> BTreeMap<String, ListenerRow> {
    let mut rows: BTreeMap<String, ListenerRow> = BTreeMap::new();
    for (name, labels, value) in series(text) {
        let Some(listener) = label(labels, "listener") else {
            continue;
        };
        // Every series with a `listener` label is of a listener the dispatcher has.
        let row = rows.entry(listener.to_owned()).or_default();
        let count = value as u64;
        match name {
            "listener_path" if value == 1.0 => {
                row.path = label(labels, "path").unwrap_or_default().to_owned();
            }
            "kernel_path_refused" => row.refused = value == 1.0,
            "lane_backlog" => row.lanes += 1,
            "lane_queued" => row.queued += count,
            "lane_drops_total" => row.drops += count,
            _ => {}
        }
    }
    rows
}

/// The value of `name="value"` in a label list `a="1",b="2"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels
        .trim_end_matches('}')
        .split(',')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\""))
        .map(|value| value.trim_end_matches('"'))
}

/// The table as a person reads it.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let (code, health) = &report.health;
    let _ = writeln!(out, "health: {code} {health}");
    for (name, l) in &report.listeners {
        let path = match (l.path.as_str(), l.refused) {
            ("kernel", _) => format!(
                "kernel path, {} lanes, {} queued, {} dropped",
                l.lanes, l.queued, l.drops
            ),
            (_, true) => "dispatcher path: the kernel's was REFUSED at start (see the log)".into(),
            _ => "dispatcher path".into(),
        };
        let _ = writeln!(out, "listener {name}: {path}");
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<4}  {:>13}  {:>10}  {:>7}  {:>9}  {:>7}  {:>11}",
        "worker",
        "up",
        "kernel routed",
        "handed off",
        "waiting",
        "in flight",
        "re-sent",
        "turned away"
    );
    for (index, w) in &report.workers {
        let _ = writeln!(
            out,
            "{:>6}  {:<4}  {:>13}  {:>10}  {:>7}  {:>9}  {:>7}  {:>11}",
            index,
            if w.up { "yes" } else { "DOWN" },
            w.kernel_routed,
            w.handed_off,
            w.waiting,
            w.in_flight,
            w.resent,
            w.turned_away
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_the_worker_series() {
        let text = "# TYPE sticky_dispatch_worker_up gauge\n\
            sticky_dispatch_worker_up{worker=\"1\"} 1\n\
            sticky_dispatch_worker_up{worker=\"0\"} 0\n\
            sticky_dispatch_handed_off_total{worker=\"1\"} 42\n\
            sticky_dispatch_waiting{worker=\"0\"} 3\n\
            sticky_dispatch_turned_away_total{worker=\"0\",reason=\"max_pending\"} 2\n\
            sticky_dispatch_turned_away_total{reason=\"pending_timeout\",worker=\"0\"} 5\n\
            sticky_dispatch_kernel_routed_total{worker=\"1\"} 7\n\
            sticky_dispatch_accepted_total{listener=\"web\"} 45\n\
            sticky_dispatch_listener_path{listener=\"web\",path=\"kernel\"} 1\n\
            sticky_dispatch_listener_path{listener=\"web\",path=\"userspace\"} 0\n\
            sticky_dispatch_kernel_path_refused{listener=\"web\"} 0\n\
            sticky_dispatch_lane_backlog{lane=\"0\",listener=\"web\"} 4096\n\
            sticky_dispatch_lane_backlog{lane=\"1\",listener=\"web\"} 4096\n\
            sticky_dispatch_lane_queued{lane=\"0\",listener=\"web\"} 2\n\
            sticky_dispatch_lane_queued{lane=\"1\",listener=\"web\"} 1\n\
            sticky_dispatch_lane_drops_total{lane=\"1\",listener=\"web\"} 5\n\
            sticky_dispatch_listener_path{listener=\"admin\",path=\"kernel\"} 0\n\
            sticky_dispatch_listener_path{listener=\"admin\",path=\"userspace\"} 1\n\
            sticky_dispatch_kernel_path_refused{listener=\"admin\"} 1\n\
            sticky_dispatch_handoff_seconds_count 45\n";
        let rows = parse(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[&0],
            WorkerRow {
                up: false,
                waiting: 3,
                turned_away: 7,
                ..WorkerRow::default()
            }
        );
        assert_eq!(
            rows[&1],
            WorkerRow {
                up: true,
                handed_off: 42,
                kernel_routed: 7,
                ..WorkerRow::default()
            }
        );
        let listeners = parse_listeners(text);
        assert_eq!(
            listeners["web"],
            ListenerRow {
                path: "kernel".into(),
                refused: false,
                lanes: 2,
                queued: 3,
                drops: 5,
            }
        );
        assert_eq!(listeners["admin"].path, "userspace");
        assert!(listeners["admin"].refused);
        let report = Report {
            health: (200, "ok: 1/2 workers up".into()),
            listeners,
            workers: rows,
        };
        assert!(!report.all_up());
        let table = render(&report);
        assert!(
            table.contains("listener web: kernel path, 2 lanes, 3 queued, 5 dropped"),
            "{table}"
        );
        assert!(table.contains("listener admin: dispatcher path: the kernel's was REFUSED"));
        assert!(table.contains("     0  DOWN"), "{table}");
        assert!(
            table.contains("     1  yes               7          42"),
            "{table}"
        );
    }
}
