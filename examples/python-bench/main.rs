//! Python benchmark: aiohttp workers behind sticky-dispatch, against the same workers on
//! one SO_REUSEPORT port (not sticky) and behind nginx `ip_hash` (what the python-socketio
//! docs recommend for several processes).
//!
//! ```text
//! cargo build --release --bins --example python-bench
//! target/release/examples/python-bench --python target/python-venv/bin/python \
//!     [--workers 4] [--concurrency 32] [--seconds 3] [--repeats 5] [--bin-dir target/release] \
//!     [--setups dispatch,dispatch-userspace,reuseport,nginx]
//! ```
//!
//! Three set-ups, each with `--workers` copies of `examples/python-bench/app.py`:
//!
//! - **dispatch**: `sticky-dispatch --listen 127.0.0.1:0 --workers N -- python app.py`
//!   (the kernel's path: each worker accepts on its lanes);
//! - **dispatch-userspace**: the same with `dispatch = "userspace"` (every connection
//!   passed by the dispatcher);
//! - **reuseport**: N `python app.py --direct ADDR` on one SO_REUSEPORT address;
//! - **nginx**: nginx (`worker_processes auto`, `upstream { ip_hash; ... }`, the
//!   python-socketio docs' proxy settings) in front of N `python app.py --direct` ports.
//!
//! C client tasks (one thread) each connect from a 127.x.y.1 source address (round robin
//! over 4096), send `GET /` with `Connection: close`, read the answer to the end, and
//! start over, for `--seconds`. Runs alternate between the set-ups, `--repeats` times after
//! an unmeasured warm-up; every figure is the median over the runs: connections per
//! second; the CPU time (utime + stime from `/proc/<pid>/stat`) per connection of what
//! sits in the middle (the dispatcher, or nginx's master and workers); and the server
//! CPU per connection (the middle plus the Python workers), which tells the capacity of
//! a set-up on a machine of its own even when the rate is disturbed by other load; and
//! the client's own CPU per connection (this process), which shares the machine. Rate
//! ratios are taken run by run (the runs of one repeat follow each other), then their
//! median. `--setups` runs a subset, e.g. `--workers 1 --setups dispatch` to profile one
//! worker (its pid is printed) with `perf stat -p` or `strace -c -p`.
//!
//! Loopback only; every loop is bounded in time and count; every process started is
//! stopped (SIGTERM, then SIGKILL) at the end, also on a panic.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const STARTUP: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_millis(500);
const CLIENT_ADDRESSES: u32 = 4096;

struct Options {
    python: PathBuf,
    workers: u32,
    concurrency: usize,
    seconds: f64,
    repeats: usize,
    bin_dir: PathBuf,
    setups: Vec<String>,
}

fn options() -> Options {
    let mut options = Options {
        python: PathBuf::from("python3"),
        workers: 4,
        concurrency: 32,
        seconds: 3.0,
        repeats: 5,
        bin_dir: PathBuf::from("target/release"),
        setups: vec!["dispatch".into(), "reuseport".into(), "nginx".into()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--python" => options.python = value().into(),
            "--workers" => options.workers = value().parse().unwrap(),
            "--concurrency" => options.concurrency = value().parse().unwrap(),
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--repeats" => options.repeats = value().parse().unwrap(),
            "--bin-dir" => options.bin_dir = value().into(),
            "--setups" => options.setups = value().split(',').map(String::from).collect(),
            other => panic!("unknown flag {other}; see the doc comment of python-bench"),
        }
    }
    options
}

/// A process stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Proc {
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Proc {
    fn spawn(mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Proc { child, lines }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until `n` stderr lines contain `text`; returns the first such line.
    fn wait_lines(&self, text: &str, n: usize) -> String {
        let deadline = Instant::now() + STARTUP;
        let mut lines = self.lines.0.lock().unwrap();
        loop {
            let found: Vec<&String> = lines.iter().filter(|l| l.contains(text)).collect();
            if found.len() >= n {
                return found[0].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {n}× {text:?} within {STARTUP:?}:\n{}",
                lines.join("\n")
            );
            lines = self.lines.1.wait_timeout(lines, left).unwrap().0;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process and, with `children`, of its live child processes.
fn cpu(pid: i32, children: bool) -> Duration {
    let ticks = |pid: i32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return 0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let mut total = ticks(pid);
    if children {
        let list =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        total += list
            .split_whitespace()
            .map(|p| ticks(p.parse().unwrap()))
            .sum::<u64>();
    }
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_micros(total * 1_000_000 / hz)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-bench/app.py")
}

fn python_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .display()
        .to_string()
}

/// A running set-up: where clients connect, and whose CPU to count.
struct Setup {
    name: &'static str,
    addr: SocketAddr,
    middle: Option<(i32, bool)>,
    /// Every server-side process: the middle and the Python workers.
    everything: Vec<(i32, bool)>,
    _procs: Vec<Proc>,
    _dir: Option<PathBuf>,
}

fn direct_workers(o: &Options, addrs: &[SocketAddr]) -> Vec<Proc> {
    let procs: Vec<Proc> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let mut c = Command::new(&o.python);
            c.arg(app())
                .args(["--direct", &addr.to_string()])
                .env("STICKY_DISPATCH_INDEX", i.to_string());
            Proc::spawn(c)
        })
        .collect();
    for p in &procs {
        p.wait_lines("listening directly", 1);
    }
    procs
}

/// sticky-dispatch standalone; `path`: its `dispatch` key (`auto`: the kernel's path for
/// the peer address, each worker accepting on its lanes; `userspace`: every connection
/// passed by the dispatcher).
fn dispatch(o: &Options, path: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("python-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let mut c = Command::new(o.bin_dir.join("sticky-dispatch"));
    c.arg("--config")
        .arg(&config)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &o.workers.to_string(),
            "--",
        ])
        .arg(&o.python)
        .arg(app())
        .env("PYTHONPATH", python_path())
        .env(
            "STICKY_DISPATCH_SOCKET_PREFIX",
            // One prefix per set-up: two dispatchers of one run must not share one.
            format!("python-bench/{}/{path}/", std::process::id()),
        )
        .env("STICKY_DISPATCH_LOG_LEVEL", "info")
        .env("STICKY_DISPATCH_DISPATCH", path);
    let p = Proc::spawn(c);
    let line = p.wait_lines("address=", 1);
    let addr = line
        .split("address=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    p.wait_lines("worker link up", o.workers as usize);
    Setup {
        name: if path == "userspace" {
            "sticky-dispatch, dispatcher's path"
        } else {
            "sticky-dispatch"
        },
        addr,
        middle: Some((p.pid(), false)),
        // The standalone dispatcher's children are the workers.
        everything: vec![(p.pid(), true)],
        _procs: vec![p],
        _dir: Some(dir),
    }
}

fn reuseport(o: &Options) -> Setup {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let procs = direct_workers(o, &vec![addr; o.workers as usize]);
    Setup {
        name: "SO_REUSEPORT",
        addr,
        middle: None,
        everything: procs.iter().map(|p| (p.pid(), false)).collect(),
        _procs: procs,
        _dir: None,
    }
}

fn nginx(o: &Options) -> Setup {
    let dir = std::env::temp_dir().join(format!("python-bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<SocketAddr> = (0..o.workers)
        .map(|_| ([127, 0, 0, 1], free_port()).into())
        .collect();
    let mut procs = direct_workers(o, &ports);
    let port = free_port();
    let servers: String = ports
        .iter()
        .map(|a| format!("        server {a};\n"))
        .collect();
    // The python-socketio docs' nginx example (ip_hash upstream, HTTP/1.1 with the
    // Upgrade headers), without logs to disk, in the foreground.
    let conf = format!(
        "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
events {{ worker_connections 4096; }}\n\
http {{\n    access_log off;\n    client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n\
    upstream socketio_nodes {{\n        ip_hash;\n{servers}    }}\n\
    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
            proxy_pass http://socketio_nodes;\n            proxy_http_version 1.1;\n\
            proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection \"Upgrade\";\n\
            proxy_set_header Host $host;\n        }}\n    }}\n}}\n",
        dir = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::File::create(&conf_path)
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let mut c = Command::new("nginx");
    c.arg("-c").arg(&conf_path).arg("-p").arg(&dir);
    let p = Proc::spawn(c);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // nginx has no readiness signal in the foreground: a bounded retry of real requests.
    let deadline = Instant::now() + STARTUP;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    while rt.block_on(one(addr, Ipv4Addr::new(127, 0, 0, 1))).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not answer within {STARTUP:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = p.pid();
    procs.push(p);
    Setup {
        name: "nginx ip_hash",
        addr,
        middle: Some((pid, true)),
        everything: procs.iter().map(|p| (p.pid(), p.pid() == pid)).collect(),
        _procs: procs,
        _dir: Some(dir),
    }
}

async fn one(to: SocketAddr, from: Ipv4Addr) -> Result<(), String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind((from, 0).into()).map_err(|e| e.to_string())?;
    let mut stream = socket.connect(to).await.map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::with_capacity(256);
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") && answer.windows(7).any(|w| w == b"worker=") {
        Ok(())
    } else {
        Err(format!("bad answer {:?}", String::from_utf8_lossy(&answer)))
    }
}

/// Connections completed and errors, by `concurrency` tasks for `length`.
fn run(addr: SocketAddr, concurrency: usize, length: Duration) -> (u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let end = Instant::now() + length;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (done, errors, next) = (done.clone(), errors.clone(), next.clone());
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let n = (next.fetch_add(1, Ordering::Relaxed) % CLIENT_ADDRESSES as u64)
                            as u32
                            + 1;
                        // Every address in a /24 of its own: nginx's ip_hash keys on the
                        // first three octets only, and 127.1.x.y would give it 17 keys for
                        // 4 servers (an uneven share, not what real clients look like).
                        let from = Ipv4Addr::new(127, 1 + (n >> 8) as u8, n as u8, 1);
                        match tokio::time::timeout(REQUEST_TIMEOUT, one(addr, from)).await {
                            Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                            _ => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The pids of a set-up's server processes (with the live children of those counted so).
fn pids(s: &Setup) -> Vec<i32> {
    let mut all = Vec::new();
    for &(pid, children) in &s.everything {
        all.push(pid);
        if children {
            let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            all.extend(list.split_whitespace().map(|p| p.parse::<i32>().unwrap()));
        }
    }
    all
}

fn main() {
    let o = options();
    println!(
        "python-bench: {} aiohttp workers, concurrency {}, {} s runs, {} repeats (medians)",
        o.workers, o.concurrency, o.seconds, o.repeats
    );
    let setups: Vec<Setup> = o
        .setups
        .iter()
        .map(|name| match name.as_str() {
            "dispatch" => dispatch(&o, "auto"),
            "dispatch-userspace" => dispatch(&o, "userspace"),
            "reuseport" => reuseport(&o),
            "nginx" => nginx(&o),
            other => {
                panic!("unknown set-up {other}: dispatch, dispatch-userspace, reuseport or nginx")
            }
        })
        .collect();
    // For profiling one process while the runs go on (perf stat -p, strace -c -p).
    for s in &setups {
        println!("{} server pids: {:?}", s.name, pids(s));
    }
    let length = Duration::from_secs_f64(o.seconds);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut totals: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut clients: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let me = std::process::id() as i32;
    let mut errors = vec![0u64; setups.len()];
    for s in &setups {
        run(s.addr, o.concurrency, WARM_UP);
    }
    for repeat in 0..o.repeats {
        for (i, s) in setups.iter().enumerate() {
            let before = s.middle.map(|(pid, children)| cpu(pid, children));
            let all = || -> Duration { s.everything.iter().map(|&(pid, c)| cpu(pid, c)).sum() };
            let all_before = all();
            let client_before = cpu(me, false);
            let started = Instant::now();
            let (done, failed) = run(s.addr, o.concurrency, length);
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed;
            rates[i].push(rate);
            errors[i] += failed;
            let total = all().saturating_sub(all_before).as_secs_f64() * 1e6 / done.max(1) as f64;
            totals[i].push(total);
            let client = cpu(me, false).saturating_sub(client_before).as_secs_f64() * 1e6
                / done.max(1) as f64;
            clients[i].push(client);
            let mut line = format!(
                "run {repeat} {:<16} {rate:8.0} conn/s  client CPU {client:5.1}  server CPU {total:6.1} us/conn",
                s.name
            );
            if let (Some(before), Some((pid, children))) = (before, s.middle) {
                let used = cpu(pid, children).saturating_sub(before);
                let per = used.as_secs_f64() * 1e6 / done.max(1) as f64;
                cpus[i].push(per);
                line.push_str(&format!("  middle CPU {per:6.1} us/conn"));
            }
            if failed > 0 {
                line.push_str(&format!("  {failed} errors"));
            }
            println!("{line}");
        }
    }
    println!("\nmedians over {} runs:", o.repeats);
    for (i, s) in setups.iter().enumerate() {
        let mut line = format!(
            "{:<16} {:8.0} conn/s  client CPU {:5.1}  server CPU {:6.1} us/conn",
            s.name,
            median(rates[i].clone()),
            median(clients[i].clone()),
            median(totals[i].clone())
        );
        if !cpus[i].is_empty() {
            line.push_str(&format!(
                "  middle CPU {:6.1} us/conn",
                median(cpus[i].clone())
            ));
        }
        line.push_str(&format!("  errors {}", errors[i]));
        println!("{line}");
    }
    let find = |name: &str| setups.iter().position(|s| s.name == name);
    let Some(d) = find("sticky-dispatch") else {
        return;
    };
    // Rate ratios of the runs made one after the other (the same repeat), then their
    // median: other load on the machine moves both sides of each ratio alike.
    let paired =
        |b: usize| -> f64 { median((0..o.repeats).map(|r| rates[d][r] / rates[b][r]).collect()) };
    let total = |i: usize| median(totals[i].clone());
    if let Some(b) = find("SO_REUSEPORT") {
        println!(
            "ratios sticky-dispatch / SO_REUSEPORT: rate {:.2}x (median of per-run ratios; \
             of medians {:.2}x), capacity (1 / server CPU per conn) {:.2}x",
            paired(b),
            median(rates[d].clone()) / median(rates[b].clone()),
            total(b) / total(d)
        );
    }
    if let Some(b) = find("nginx ip_hash") {
        println!(
            "ratios sticky-dispatch / nginx ip_hash: rate {:.2}x (median of per-run ratios; \
             of medians {:.2}x), capacity {:.2}x, middle CPU per conn nginx / dispatcher {:.2}x",
            paired(b),
            median(rates[d].clone()) / median(rates[b].clone()),
            total(b) / total(d),
            median(cpus[b].clone()) / median(cpus[d].clone())
        );
    }
}
