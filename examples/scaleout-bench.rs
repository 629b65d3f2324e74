//! Scale-out benchmark (issue #14, docs/scale-out.md): the two tiers against HAProxy
//! alone, on the topology of tests/multihost.rs (network namespaces, 198.18.0.0/15).
//!
//! ```text
//! cargo build --release --bins --examples
//! sudo target/release/examples/scaleout-bench [--seconds 3] [--repeats 3]
//!     [--concurrency 32] [--bulk-mib 256] [--bin-dir target/release]
//! ```
//!
//! Three hosts, each a namespace with 2 demo workers (`sticky-dispatch-demo`), and one
//! balancer namespace with two HAProxies side by side, both `balance source` +
//! `hash-type consistent`, `weight 100` (an even ring, as tests/multihost/haproxy.cfg),
//! no health checks (the same for both):
//!
//! - **two tiers**: HAProxy (port 80) → `send-proxy-v2` → on each host `sticky-dispatch`
//!   standalone (`routing_key = "proxy-protocol"`) → fd hand-off → its 2 workers;
//! - **HAProxy alone** (port 81): each worker listens itself (`--direct`, its own port)
//!   and is a server of its own in HAProxy: 6 servers, sticky by the client's address,
//!   what a user would do without sticky-dispatch.
//!
//! Clients, in a client namespace, open connections from 300 source addresses
//! (198.19.x.y), send one `GET /` with `Connection: close` and read the answer, with
//! `--concurrency` connections in flight, for `--seconds`. Runs alternate between the
//! two set-ups, `--repeats` times each; every figure is the median of the runs:
//! connections per second, CPU time per connection of HAProxy and of the hosts (each
//! host's dispatcher and workers, from /proc/<pid>/stat: all hosts' CPU over all
//! connections, and each host's over the connections it served), and bulk throughput after the
//! hand-off (`GET /bulk` answers of 64 MiB on new connections, `--bulk-mib` in all).
//! Everything runs on this machine, so the clients, HAProxy and the hosts share its
//! cores: the ratios are the result, not the absolute figures.
//!
//! Needs root (network namespaces). Bounded: every run in time and count; every process
//! and namespace it made is removed when it ends, also on failure (guards).

#[path = "../tests/multihost/net.rs"]
mod net;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const HOSTS: usize = 3;
const WORKERS: usize = 2;
const CLIENTS: usize = 300;
const TWO_TIERS_PORT: u16 = 80;
const ALONE_PORT: u16 = 81;
/// A short request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP: Duration = Duration::from_secs(30);
const BULK_CHUNK: u64 = 64 << 20;
const MAX_CONNECTIONS_PER_RUN: u64 = 2_000_000;

struct Options {
    seconds: f64,
    repeats: usize,
    concurrency: usize,
    bulk_mib: u64,
    bin_dir: PathBuf,
}

fn options() -> Options {
    let mut o = Options {
        seconds: 3.0,
        repeats: 3,
        concurrency: 32,
        bulk_mib: 256,
        bin_dir: PathBuf::from("target/release"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).unwrap_or_else(|| usage(&args[i]));
        match args[i].as_str() {
            "--seconds" => o.seconds = value.parse().unwrap_or_else(|_| usage(value)),
            "--repeats" => o.repeats = value.parse().unwrap_or_else(|_| usage(value)),
            "--concurrency" => o.concurrency = value.parse().unwrap_or_else(|_| usage(value)),
            "--bulk-mib" => o.bulk_mib = value.parse().unwrap_or_else(|_| usage(value)),
            "--bin-dir" => o.bin_dir = PathBuf::from(value),
            other => usage(other),
        }
        i += 2;
    }
    assert!(o.repeats >= 1 && o.concurrency >= 1 && o.seconds > 0.0 && o.seconds <= 60.0);
    o
}

fn usage(bad: &str) -> ! {
    eprintln!(
        "scaleout-bench: bad argument {bad:?}\nusage: scaleout-bench [--seconds S] [--repeats N] \
         [--concurrency C] [--bulk-mib M] [--bin-dir DIR]"
    );
    std::process::exit(2)
}

macro_rules! say {
    ($($arg:tt)*) => { println!("[scaleout-bench] {}", format_args!($($arg)*)) };
}

/// A process started in a namespace; SIGTERM, then SIGKILL, when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(ns: &net::Netns, args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        let mut command = ns.command(args);
        command
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Proc(command.spawn().unwrap_or_else(|e| panic!("{args:?}: {e}")))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) of a process and its children, from /proc/<pid>/stat.
fn cpu_of(pid: i32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// The pids of `pid`'s children (a standalone dispatcher's workers).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// One set-up: its frontend, HAProxy's pid, and per host the pids whose CPU counts.
struct Setup {
    name: &'static str,
    frontend: SocketAddr,
    haproxy: i32,
    hosts: Vec<Vec<i32>>,
}

impl Setup {
    fn cpu(&self) -> (Duration, Vec<Duration>) {
        let hosts = self
            .hosts
            .iter()
            .map(|pids| pids.iter().map(|&p| cpu_of(p)).sum())
            .collect();
        (cpu_of(self.haproxy), hosts)
    }
}

#[derive(Default, Clone)]
struct Run {
    per_second: f64,
    haproxy_us: f64,
    hosts_us: f64,
    per_host_us: Vec<f64>,
    errors: u64,
    by_host: BTreeMap<String, u64>,
}

fn haproxy_config(two_tiers: bool) -> String {
    let mut servers = String::new();
    for h in 0..HOSTS {
        let ip = net::host_ip(h);
        if two_tiers {
            servers += &format!(
                "    server h{h} {ip}:8080 id {} weight 100 send-proxy-v2\n",
                h + 1
            );
        } else {
            for w in 0..WORKERS {
                let port = 8081 + w;
                let id = h * WORKERS + w + 1;
                servers += &format!("    server h{h}w{w} {ip}:{port} id {id} weight 100\n");
            }
        }
    }
    let port = if two_tiers {
        TWO_TIERS_PORT
    } else {
        ALONE_PORT
    };
    format!(
        "global\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 1m\n    timeout server 1m\n\nfrontend clients\n    bind {}:{port}\n    \
         default_backend hosts\n\nbackend hosts\n    balance source\n    hash-type consistent\n{servers}",
        net::FRONTEND_IP
    )
}

/// One measured run of `seconds` against `setup`.
async fn run(setup: &Setup, concurrency: usize, seconds: f64) -> Run {
    let (ha0, hosts0) = setup.cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let by_host = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (stop, done, errors, by_host, next) = (
                stop.clone(),
                done.clone(),
                errors.clone(),
                by_host.clone(),
                next.clone(),
            );
            let to = setup.frontend;
            tokio::spawn(async move {
                let mut mine: BTreeMap<String, u64> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed)
                    && done.load(Ordering::Relaxed) < MAX_CONNECTIONS_PER_RUN
                {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize % CLIENTS;
                    match tokio::time::timeout(REQUEST_TIMEOUT, get(net::client_ip(n), to, "/"))
                        .await
                    {
                        Ok(Ok(body)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            *mine.entry(host_of(&body)).or_default() += 1;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                let mut all = by_host.lock().unwrap();
                for (host, n) in mine {
                    *all.entry(host).or_default() += n;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ha1, hosts1) = setup.cpu();
    let by_host = by_host.lock().unwrap().clone();
    let n = done.load(Ordering::Relaxed).max(1) as f64;
    let host_cpu: Vec<f64> = hosts0
        .iter()
        .zip(&hosts1)
        .map(|(a, b)| (*b - *a).as_secs_f64() * 1e6)
        .collect();
    // Each host's CPU over the connections it served (the answers name the host).
    let per_host_us = host_cpu
        .iter()
        .enumerate()
        .map(|(h, cpu)| {
            let served = by_host.get(&net::host_ip(h).to_string()).copied();
            cpu / served.unwrap_or(1).max(1) as f64
        })
        .collect();
    Run {
        per_second: n / elapsed,
        haproxy_us: (ha1 - ha0).as_secs_f64() * 1e6 / n,
        hosts_us: host_cpu.iter().sum::<f64>() / n,
        per_host_us,
        errors: errors.load(Ordering::Relaxed),
        by_host,
    }
}

/// The host that served an answer, from the demo's `listener=`/`local=`: the host's
/// address (direct workers, or the dispatcher's listener name in standalone mode).
fn host_of(body: &str) -> String {
    let listener = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listener="))
        .unwrap_or("?");
    listener
        .rsplit_once(':')
        .map_or(listener, |(ip, _)| ip)
        .to_owned()
}

/// One request on a new connection from `from`; the whole answer.
async fn get(from: Ipv4Addr, to: SocketAddr, path: &str) -> std::io::Result<String> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let mut stream = socket.connect(to).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut text = Vec::new();
    stream.read_to_end(&mut text).await?;
    if !text.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not 200"));
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Bulk throughput through `to`: `total` bytes as 64 MiB `GET /bulk` answers, each on a
/// new connection from one client (so one host, one worker); MiB/s.
async fn bulk(to: SocketAddr, total: u64) -> f64 {
    let started = Instant::now();
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..total.div_ceil(BULK_CHUNK) {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((net::client_ip(0), 0)))
            .unwrap();
        let mut stream = socket.connect(to).await.expect("bulk connect");
        stream
            .write_all(
                format!("GET /bulk?bytes={BULK_CHUNK} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(120), async {
            let mut n = 0u64;
            loop {
                let read = stream.read(&mut buf).await.expect("bulk read");
                if read == 0 {
                    return n;
                }
                n += read as u64;
            }
        })
        .await
        .expect("a bulk answer within 120 s");
        assert!(body >= BULK_CHUNK, "bulk answer cut short: {body} bytes");
        received += body;
    }
    received as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// Waits until `ok` holds, polling every 20 ms, for at most STARTUP.
fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + STARTUP;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let o = options();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "scaleout-bench needs root (network namespaces)"
    );
    let bin = |name: &str| {
        let path = o.bin_dir.join(name);
        assert!(
            path.exists(),
            "{} missing: cargo build --release --bins",
            path.display()
        );
        path.canonicalize().unwrap().to_string_lossy().into_owned()
    };
    let (dispatcher, demo) = (bin("sticky-dispatch"), bin("sticky-dispatch-demo"));
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("haproxy (apt-get install haproxy)");
    let scratch =
        Scratch(std::env::temp_dir().join(format!("scaleout-bench-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();
    let scratch = &scratch.0;
    let empty = scratch.join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_string_lossy().into_owned();

    let topology = net::Topology::build("bench", HOSTS);
    let mut procs: Vec<Proc> = Vec::new();
    let mut two_tiers_hosts = Vec::new();
    let mut alone_hosts = Vec::new();
    for (h, ns) in topology.hosts.iter().enumerate() {
        let listen = format!("{}:8080", net::host_ip(h));
        let d = Proc::spawn(
            ns,
            &[
                &dispatcher,
                "--config",
                &empty,
                "--listen",
                &listen,
                "--workers",
                "2",
                "--",
                &demo,
            ],
            &[
                ("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol"),
                ("STICKY_DISPATCH_LOG_LEVEL", "warn"),
            ],
            &scratch.join(format!("h{h}-dispatcher.log")),
        );
        let pid = d.pid();
        procs.push(d);
        wait("the dispatcher's workers", || {
            children(pid).len() == WORKERS
        });
        let mut pids = vec![pid];
        pids.extend(children(pid));
        two_tiers_hosts.push(pids);
        let mut direct = Vec::new();
        for w in 0..WORKERS {
            let addr = format!("{}:{}", net::host_ip(h), 8081 + w);
            let worker = Proc::spawn(
                ns,
                &[&demo, "--direct", &addr],
                &[
                    ("STICKY_DISPATCH_INDEX", &w.to_string()),
                    ("RUST_LOG", "warn"),
                ],
                &scratch.join(format!("h{h}-direct{w}.log")),
            );
            direct.push(worker.pid());
            procs.push(worker);
        }
        alone_hosts.push(direct);
    }
    let mut haproxies = Vec::new();
    for (two_tiers, name) in [(true, "two-tiers"), (false, "alone")] {
        let path = scratch.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&path, haproxy_config(two_tiers)).unwrap();
        let p = Proc::spawn(
            &topology.balancer,
            &[haproxy, "-db", "-f", &path.to_string_lossy()],
            &[],
            &scratch.join(format!("haproxy-{name}.log")),
        );
        haproxies.push(p.pid());
        procs.push(p);
    }
    // Everything from here (sockets, the runtime's threads) is in the client namespace.
    net::enter(&topology.client.path());
    let setups = [
        Setup {
            name: "two tiers (HAProxy + sticky-dispatch)",
            frontend: net::frontend(TWO_TIERS_PORT),
            haproxy: haproxies[0],
            hosts: two_tiers_hosts,
        },
        Setup {
            name: "HAProxy alone (to each worker)",
            frontend: net::frontend(ALONE_PORT),
            haproxy: haproxies[1],
            hosts: alone_hosts,
        },
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for setup in &setups {
            let deadline = Instant::now() + STARTUP;
            // Ready when every client is answered: all hosts and workers are up.
            loop {
                let mut ok = 0;
                for n in 0..CLIENTS {
                    ok += usize::from(get(net::client_ip(n), setup.frontend, "/").await.is_ok());
                }
                if ok == CLIENTS {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: {ok}/{CLIENTS} answered",
                    setup.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            run(setup, o.concurrency, 0.5).await; // warm-up, not counted
        }
        say!(
            "{HOSTS} hosts x {WORKERS} workers, {CLIENTS} client addresses, concurrency {}, \
             {} s x {} runs each, alternating; medians:",
            o.concurrency,
            o.seconds,
            o.repeats
        );
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
        for _ in 0..o.repeats {
            for (i, setup) in setups.iter().enumerate() {
                runs[i].push(run(setup, o.concurrency, o.seconds).await);
            }
        }
        let mut bulks: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
        for _ in 0..o.repeats {
            for (i, setup) in setups.iter().enumerate() {
                bulks[i].push(bulk(setup.frontend, o.bulk_mib << 20).await);
            }
        }
        let mut summary = Vec::new();
        for (i, setup) in setups.iter().enumerate() {
            let r = &runs[i];
            let m = |f: &dyn Fn(&Run) -> f64| median(r.iter().map(f).collect());
            let per_host: Vec<String> = (0..HOSTS)
                .map(|h| format!("{:.1}", m(&|run: &Run| run.per_host_us[h])))
                .collect();
            let errors: u64 = r.iter().map(|run| run.errors).sum();
            let row = (
                m(&|run| run.per_second),
                m(&|run| run.haproxy_us),
                m(&|run| run.hosts_us),
                median(bulks[i].clone()),
            );
            say!(
                "{}: {:.0} conn/s; CPU per connection: HAProxy {:.1} us, all hosts {:.1} us \
                 (each host over the connections it served, h0 h1 h2: {}); bulk {:.0} MiB/s; errors {errors}; connections per host in \
                 the last run {:?}",
                setup.name,
                row.0,
                row.1,
                row.2,
                per_host.join(" "),
                row.3,
                r.last().unwrap().by_host
            );
            summary.push(row);
        }
        let (a, b) = (summary[0], summary[1]);
        say!(
            "ratios two tiers / HAProxy alone: conn/s {:.2}, HAProxy CPU per connection {:.2}, \
             hosts CPU per connection {:.2}, bulk {:.2}",
            a.0 / b.0,
            a.1 / b.1,
            a.2 / b.2,
            a.3 / b.3
        );
    });
    drop(procs);
    drop(topology);
}

/// The scratch directory (configs, logs), removed when dropped; kept with
/// SCALEOUT_BENCH_KEEP=1 to read the logs.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("SCALEOUT_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
