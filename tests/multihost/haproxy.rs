//! HAProxy (Debian's package) in the balancer's namespace, in the foreground, on
//! tests/multihost/haproxy.cfg, the configuration docs/scale-out.md shows; and its view
//! of the hosts, from its stats page (`/stats;csv`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::Running;
use crate::hosts::{http_get, poll_for};
use crate::net::{self, Netns};

const SOURCE: &str = env!("CARGO_MANIFEST_DIR");
/// The frontend and stats ports of haproxy.cfg.
pub const FRONTEND_PORT: u16 = 80;
const STATS_PORT: u16 = 8404;

/// The configuration file the test runs and the documentation shows.
pub fn config_path() -> PathBuf {
    Path::new(SOURCE).join("tests/multihost/haproxy.cfg")
}

/// haproxy.cfg with `extra` server lines appended to `backend hosts` (a fourth host).
pub fn config_with(extra: &[String]) -> String {
    let base = std::fs::read_to_string(config_path()).unwrap();
    let (before, after) = base
        .split_once("\n# Which hosts are up")
        .expect("haproxy.cfg: the stats section follows the backend");
    let mut text = before.trim_end().to_owned();
    for line in extra {
        text.push_str("\n    ");
        text.push_str(line);
    }
    text.push_str("\n\n# Which hosts are up");
    text.push_str(after);
    text
}

pub struct Haproxy {
    pub process: Running,
    pub config: PathBuf,
}

impl Haproxy {
    /// Starts `haproxy -db -f <config>` in `balancer`; returns once its stats page
    /// answers. Killed when dropped.
    pub fn start(program: &Path, balancer: &Netns, dir: &Path, config: &str) -> Haproxy {
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &balancer.name])
            .arg(program)
            .arg("-db")
            .arg("-f")
            .arg(&path);
        let mut haproxy = Haproxy {
            process: Running::spawn(command, "haproxy"),
            config: path,
        };
        poll_for("HAProxy's stats page", Duration::from_secs(20), || {
            if let Ok(Some(status)) = haproxy.process.child.try_wait() {
                panic!("haproxy exited ({status}): {}", haproxy.process.log.text());
            }
            balancer.run(stats).ok()
        });
        haproxy
    }
}

/// The frontend clients connect to.
pub fn frontend() -> SocketAddr {
    net::frontend(FRONTEND_PORT)
}

/// One server of `backend hosts` as HAProxy sees it.
#[derive(Debug, Clone)]
pub struct ServerState {
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `no check`...
    pub status: String,
    /// Transitions from UP to DOWN so far.
    pub chkdown: u64,
    /// Connections sent to it so far.
    pub stot: u64,
    /// The last health check's result, e.g. `L7OK` or `L7STS` (wrong status).
    pub check_status: String,
}

/// `backend hosts`'s servers by name, from `/stats;csv`. Call from the balancer's or the
/// client's namespace.
pub fn stats() -> Result<BTreeMap<String, ServerState>, String> {
    let (status, csv) = http_get(
        net::frontend(STATS_PORT),
        "/stats;csv",
        Duration::from_secs(5),
    )?;
    if status != 200 {
        return Err(format!("stats: HTTP {status}"));
    }
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or("empty stats")?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (px, sv, st, down, stot, check) = (
        col("pxname"),
        col("svname"),
        col("status"),
        col("chkdown"),
        col("stot"),
        col("check_status"),
    );
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > check && f[px] == "hosts" && f[sv] != "BACKEND")
        .map(|f| {
            (
                f[sv].to_owned(),
                ServerState {
                    status: f[st].to_owned(),
                    chkdown: f[down].parse().unwrap_or(0),
                    stot: f[stot].parse().unwrap_or(0),
                    check_status: f[check].to_owned(),
                },
            )
        })
        .collect())
}

/// Waits until server `name` has status `status` (`UP`, `DOWN`); how long that took.
pub fn wait_status(balancer: &Netns, name: &str, status: &str, within: Duration) -> Duration {
    poll_for(&format!("HAProxy to see {name} {status}"), within, || {
        let stats = balancer.run(stats).ok()?;
        (stats.get(name)?.status == status).then_some(())
    })
    .1
}
