//! Hand-off benchmark: what the dispatcher costs compared with workers that accept
//! directly.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/handoff-bench [--workers 1,2,4] [--concurrency 1,32] [--seconds 3]
//!     [--repeats 5] [--clients 4096] [--bulk-mib 1024] [--no-bulk] [--client-threads 1]
//!     [--bin-dir target/release]
//! ```
//!
//! For every worker count it starts two set-ups side by side, both with the demo worker
//! (`sticky-dispatch-demo`):
//!
//! - **(a)** `sticky-dispatch` standalone on 127.0.0.1, spawning N demo workers;
//! - **(b)** N demo workers started with `--direct ADDR`, sharing one SO_REUSEPORT address:
//!   the kernel spreads connections among them with no dispatcher. This is the kernel's
//!   limit on this machine, and it is not sticky.
//!
//! For every concurrency level, C client tasks each open a connection from a 127.x.y.z
//! source address (the next of `--clients` addresses, round robin), send one
//! `GET / HTTP/1.1` with `Connection: close`, read the answer to the end, and start over,
//! for `--seconds`. Runs of (a) and (b) alternate, `--repeats` times each, and every
//! figure printed is the median over the runs:
//!
//! - connections per second;
//! - latency from the start of `connect` to the first byte of the answer, p50 and p99;
//! - the dispatcher's CPU time per connection: utime + stime of its process, from
//!   `/proc/<pid>/stat`, over the run, divided by the connections of the run;
//! - stickiness: clients answered by more than one worker, over every run of a set-up.
//!
//! Then, per worker count, the dispatcher's peak RSS (VmHWM in `/proc/<pid>/status`) and
//! bulk throughput on one established connection in each direction: `GET /bulk` answers
//! of 64 MiB, then `POST /bulk` bodies of 64 MiB, `--bulk-mib` in total each way.
//!
//! Everything goes to loopback only; every loop is bounded in time and count, and the
//! processes it started are stopped (SIGTERM, then SIGKILL) when it ends.

// Log capture, CPU and memory readings and client addresses, as the tests have them.
#[path = "../tests/common/process.rs"]
#[allow(dead_code)] // the tests use more of it
mod process;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use process::{client_ip, cpu_time, status_kib, Log};

/// How long processes may take to start and report ready.
const STARTUP: Duration = Duration::from_secs(30);
/// A single short request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the connections of one run, whatever the machine's speed.
const MAX_CONNECTIONS_PER_RUN: i64 = 5_000_000;
/// A bulk transfer (one direction, one repeat) is abandoned after this long.
const BULK_TIMEOUT: Duration = Duration::from_secs(120);
/// Size of one `GET /bulk` answer or `POST /bulk` body: the demo's maximum.
const BULK_CHUNK: u64 = 64 << 20;
/// Unmeasured run before the measured ones, per set-up and concurrency.
const WARM_UP: Duration = Duration::from_millis(500);
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

struct Options {
    workers: Vec<u32>,
    concurrency: Vec<usize>,
    seconds: f64,
    repeats: usize,
    clients: u32,
    bulk_mib: u64,
    bulk: bool,
    client_threads: usize,
    bin_dir: PathBuf,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/release/examples/handoff-bench → target/release
        let default_bin_dir = exe
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from("target/release"), Path::to_path_buf);
        let mut options = Options {
            workers: vec![4],
            concurrency: vec![1, 32],
            seconds: 3.0,
            repeats: 5,
            clients: 4096,
            bulk_mib: 1024,
            bulk: true,
            client_threads: 1,
            bin_dir: default_bin_dir,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "--no-bulk" {
                options.bulk = false;
                continue;
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |_| format!("bad value {value:?} for {flag}");
            match flag.as_str() {
                "--workers" => options.workers = list(&value).map_err(bad)?,
                "--concurrency" => options.concurrency = list(&value).map_err(bad)?,
                "--seconds" => options.seconds = value.parse().map_err(|_| bad(()))?,
                "--repeats" => options.repeats = value.parse().map_err(|_| bad(()))?,
                "--clients" => options.clients = value.parse().map_err(|_| bad(()))?,
                "--bulk-mib" => options.bulk_mib = value.parse().map_err(|_| bad(()))?,
                "--client-threads" => {
                    options.client_threads = value.parse().map_err(|_| bad(()))?
                }
                "--bin-dir" => options.bin_dir = PathBuf::from(&value),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        let ok = options.workers.iter().all(|&w| (1..=256).contains(&w))
            && options.concurrency.iter().all(|&c| (1..=4096).contains(&c))
            && (0.1..=600.0).contains(&options.seconds)
            && (1..=100).contains(&options.repeats)
            && (1..=1 << 20).contains(&options.clients)
            && (1..=64 * 1024).contains(&options.bulk_mib)
            && (1..=64).contains(&options.client_threads)
            && !options.workers.is_empty()
            && !options.concurrency.is_empty();
        if !ok {
            return Err("a value is out of range (workers 1..=256, concurrency 1..=4096, seconds 0.1..=600, repeats 1..=100, clients 1..=1048576, bulk-mib 1..=65536, client-threads 1..=64)".into());
        }
        Ok(options)
    }
}

fn list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>, ()> {
    text.split(',')
        .map(|part| part.trim().parse().map_err(drop))
        .collect()
}

/// A process this benchmark started: stopped with SIGTERM (then SIGKILL) when dropped.
struct Process {
    child: Child,
    log: Log,
}

impl Process {
    fn spawn(mut command: Command) -> Result<Process, String> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Logs must come to our pipe, not to a journal this shell may be attached to.
            .env_remove("JOURNAL_STREAM");
        let mut child = command
            .spawn()
            .map_err(|err| format!("could not start {command:?}: {err}"))?;
        let log = Log::capture(&mut child, "bench");
        Ok(Process { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which worker each client was answered by, and who was answered by several.
struct Stickiness {
    first: Vec<AtomicU32>,
    violated: Vec<AtomicBool>,
}

impl Stickiness {
    const NONE: u32 = u32::MAX;

    fn new(clients: u32) -> Stickiness {
        Stickiness {
            first: (0..clients).map(|_| AtomicU32::new(Self::NONE)).collect(),
            violated: (0..clients).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn record(&self, client: u32, worker: u32) {
        let c = client as usize;
        match self.first[c].compare_exchange(
            Self::NONE,
            worker,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => {}
            Err(seen) if seen != worker => self.violated[c].store(true, Ordering::Relaxed),
            Err(_) => {}
        }
    }

    /// (clients seen, clients answered by more than one worker)
    fn summary(&self) -> (usize, usize) {
        let seen = self
            .first
            .iter()
            .filter(|w| w.load(Ordering::Relaxed) != Self::NONE)
            .count();
        let violated = self
            .violated
            .iter()
            .filter(|v| v.load(Ordering::Relaxed))
            .count();
        (seen, violated)
    }
}

/// One set-up under test: where to connect, and whom to charge the CPU time to.
struct Target {
    address: SocketAddr,
    /// The dispatcher's pid for (a); `None` for the direct baseline.
    dispatcher: Option<u32>,
    stickiness: Stickiness,
}

/// One measured run.
struct Run {
    rate: f64,
    connections: u64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_connection: Option<f64>,
}

/// One short request from `client`: latency to the first answer byte, and the worker.
async fn one_request(source: Ipv4Addr, target: SocketAddr) -> Result<(Duration, u32), String> {
    let start = Instant::now();
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let mut stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(REQUEST)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let n = stream
        .read(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let first_byte = start.elapsed();
    answer.extend_from_slice(&buf[..n]);
    // Then to the end: the server closes after the answer (`Connection: close`).
    let mut open = n > 0;
    while open {
        let more = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        answer.extend_from_slice(&buf[..more]);
        open = more > 0;
    }
    let text = String::from_utf8_lossy(&answer);
    let worker = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("worker="))
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("no worker= in {text:?}"))?;
    Ok((first_byte, worker))
}

/// Closed-loop load: `concurrency` tasks, each one connection at a time, for `length`.
async fn load(
    target: Arc<Target>,
    concurrency: usize,
    length: Duration,
    clients: u32,
    next_client: Arc<AtomicU64>,
) -> (u64, u64, Vec<u32>, Duration) {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let budget = Arc::new(AtomicI64::new(MAX_CONNECTIONS_PER_RUN));
    for _ in 0..concurrency {
        let (target, next_client, budget) = (target.clone(), next_client.clone(), budget.clone());
        tasks.spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            let mut latencies_ns = Vec::new();
            while Instant::now() < deadline && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                let client =
                    (next_client.fetch_add(1, Ordering::Relaxed) % u64::from(clients)) as u32;
                let attempt = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    one_request(client_ip(client), target.address),
                )
                .await;
                match attempt {
                    Ok(Ok((latency, worker))) => {
                        done += 1;
                        latencies_ns.push(latency.as_nanos().min(u128::from(u32::MAX)) as u32);
                        target.stickiness.record(client, worker);
                    }
                    Ok(Err(err)) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("  request error: {err}");
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (done, errors, latencies_ns)
        });
    }
    let (mut done, mut errors, mut latencies) = (0, 0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        let (d, e, l) = joined.expect("a load task panicked");
        done += d;
        errors += e;
        latencies.extend(l);
    }
    (done, errors, latencies, started.elapsed())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

fn run_load(
    runtime: &tokio::runtime::Runtime,
    target: &Arc<Target>,
    concurrency: usize,
    length: Duration,
    options: &Options,
    next_client: &Arc<AtomicU64>,
) -> Run {
    let cpu_us = |pid: u32| cpu_time(pid as i32).map(|t| t.as_secs_f64() * 1e6);
    let cpu_before = target.dispatcher.and_then(cpu_us);
    let (connections, errors, mut latencies, elapsed) = runtime.block_on(load(
        target.clone(),
        concurrency,
        length,
        options.clients,
        next_client.clone(),
    ));
    let cpu_after = target.dispatcher.and_then(cpu_us);
    latencies.sort_unstable();
    Run {
        rate: connections as f64 / elapsed.as_secs_f64(),
        connections,
        errors,
        p50_us: percentile(&latencies, 0.50) / 1e3,
        p99_us: percentile(&latencies, 0.99) / 1e3,
        cpu_us_per_connection: match (cpu_before, cpu_after) {
            (Some(before), Some(after)) if connections > 0 => {
                Some((after - before) / connections as f64)
            }
            _ => None,
        },
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns the body length and the
/// first bytes of the body.
async fn read_response(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(u64, String), String> {
    let mut head = Vec::new();
    let body_start = loop {
        let n = stream.read(buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed in the response head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > 64 * 1024 {
            return Err("response head too long".into());
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    if !text.starts_with("http/1.1 200") {
        return Err(format!(
            "unexpected response: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    let length: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no content-length")?;
    let preview =
        String::from_utf8_lossy(&head[body_start..head.len().min(body_start + 200)]).into_owned();
    let mut left = length.saturating_sub((head.len() - body_start) as u64);
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = stream
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed in the body".into());
        }
        left -= n as u64;
    }
    Ok((length, preview))
}

/// Bulk throughput on one connection: (download MB/s, upload MB/s).
async fn bulk(target: SocketAddr, source: Ipv4Addr, total: u64) -> Result<(f64, f64), String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| e.to_string())?;
    let mut stream = socket.connect(target).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    // One small request first: the connection is established and handed off before timing.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    read_response(&mut stream, &mut buf).await?;

    let requests = total.div_ceil(BULK_CHUNK);
    let start = Instant::now();
    for _ in 0..requests {
        let request = format!("GET /bulk?bytes={BULK_CHUNK} HTTP/1.1\r\nHost: bench\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let (length, _) = read_response(&mut stream, &mut buf).await?;
        if length != BULK_CHUNK {
            return Err(format!("asked for {BULK_CHUNK} bytes, got {length}"));
        }
    }
    let download = (requests * BULK_CHUNK) as f64 / start.elapsed().as_secs_f64() / 1e6;

    let zeros = vec![0u8; 256 * 1024];
    let start = Instant::now();
    for _ in 0..requests {
        let head =
            format!("POST /bulk HTTP/1.1\r\nHost: bench\r\nContent-Length: {BULK_CHUNK}\r\n\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut left = BULK_CHUNK;
        while left > 0 {
            let n = zeros.len().min(left as usize);
            stream
                .write_all(&zeros[..n])
                .await
                .map_err(|e| e.to_string())?;
            left -= n as u64;
        }
        let (_, preview) = read_response(&mut stream, &mut buf).await?;
        if !preview.starts_with(&format!("received={BULK_CHUNK}\n")) {
            return Err(format!("upload not counted: {preview:?}"));
        }
    }
    let upload = (requests * BULK_CHUNK) as f64 / start.elapsed().as_secs_f64() / 1e6;
    Ok((download, upload))
}

/// Both set-ups for one worker count.
struct Setups {
    dispatcher: Process,
    sticky: Arc<Target>,
    _direct: Vec<Process>,
    direct: Arc<Target>,
    /// Holds the direct port (bound with SO_REUSEPORT, never listening) while we run.
    _port: socket2::Socket,
}

fn start(workers: u32, options: &Options, scratch: &Path) -> Result<Setups, String> {
    let dispatcher_bin = options.bin_dir.join("sticky-dispatch");
    let demo_bin = options.bin_dir.join("sticky-dispatch-demo");
    for bin in [&dispatcher_bin, &demo_bin] {
        if !bin.exists() {
            return Err(format!(
                "{} not found: run `cargo build --release --bins` first, or pass --bin-dir",
                bin.display()
            ));
        }
    }
    let config = scratch.join("empty.toml");
    std::fs::write(&config, "").map_err(|e| e.to_string())?;
    let prefix = format!("handoff-bench/{}/{workers}/", std::process::id());

    let mut command = Command::new(&dispatcher_bin);
    command
        .arg("--config")
        .arg(&config)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &workers.to_string(),
            "--",
        ])
        .arg(&demo_bin)
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix)
        .env("STICKY_DISPATCH_LOG_LEVEL", "info");
    let dispatcher = Process::spawn(command)?;
    let line = dispatcher
        .log
        .wait_lines(&["listening", "address="], 1, STARTUP)?;
    let address: SocketAddr =
        process::log_field(&line, "address").ok_or_else(|| format!("no address in {line:?}"))?;
    dispatcher
        .log
        .wait_lines(&["worker link up"], workers as usize, STARTUP)?;

    // Reserve a port for the direct set-up: bound with SO_REUSEPORT but never listening,
    // so it takes no connections while the workers join the port.
    let port = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    port.set_reuse_address(true).map_err(|e| e.to_string())?;
    port.set_reuse_port(true).map_err(|e| e.to_string())?;
    port.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| e.to_string())?;
    let direct_address = port
        .local_addr()
        .map_err(|e| e.to_string())?
        .as_socket()
        .ok_or("no IP address")?;
    let direct = (0..workers)
        .map(|index| {
            let mut command = Command::new(&demo_bin);
            command
                .args(["--direct", &direct_address.to_string()])
                .env("STICKY_DISPATCH_INDEX", index.to_string())
                .env("STICKY_DISPATCH_LOG_LEVEL", "info");
            let process = Process::spawn(command)?;
            process
                .log
                .wait_lines(&["listening directly"], 1, STARTUP)?;
            Ok(process)
        })
        .collect::<Result<Vec<_>, String>>()?;

    Ok(Setups {
        sticky: Arc::new(Target {
            address,
            dispatcher: Some(dispatcher.pid()),
            stickiness: Stickiness::new(options.clients),
        }),
        dispatcher,
        _direct: direct,
        direct: Arc::new(Target {
            address: direct_address,
            dispatcher: None,
            stickiness: Stickiness::new(options.clients),
        }),
        _port: port,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians of several runs of one set-up at one concurrency.
struct Summary {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us: f64,
    connections: u64,
    errors: u64,
}

fn summarize(runs: &[Run]) -> Summary {
    let pick = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Summary {
        rate: pick(&|r| r.rate),
        p50_us: pick(&|r| r.p50_us),
        p99_us: pick(&|r| r.p99_us),
        cpu_us: pick(&|r| r.cpu_us_per_connection.unwrap_or(f64::NAN)),
        connections: runs.iter().map(|r| r.connections).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

struct Row {
    workers: u32,
    concurrency: usize,
    sticky: Summary,
    direct: Summary,
    /// Median over repeats of (a)'s rate / (b)'s rate in the same repeat: runs of one
    /// repeat are back to back, so this cancels most of the drift of a shared machine.
    rate_ratio: f64,
    /// Median over repeats of (a)'s p99 - (b)'s p99.
    added_p99_us: f64,
}

/// A (download, upload) pair.
type DownUp = (f64, f64);

struct PerWorkers {
    workers: u32,
    peak_rss_kib: Option<u64>,
    sticky_clients: (usize, usize),
    direct_clients: (usize, usize),
    /// (download, upload) medians in MB/s, for (a) and (b), then the medians of the
    /// per-repeat ratios (a)/(b).
    bulk: Option<(DownUp, DownUp, DownUp)>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("handoff-bench: {err}");
            std::process::exit(2);
        }
    };
    if let Err(err) = bench(&options) {
        eprintln!("handoff-bench: {err}");
        std::process::exit(1);
    }
}

fn bench(options: &Options) -> Result<(), String> {
    let runtime = if options.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.client_threads)
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())?;
    let scratch = std::env::temp_dir().join(format!("handoff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let length = Duration::from_secs_f64(options.seconds);
    let next_client = Arc::new(AtomicU64::new(0));
    let mut rows = Vec::new();
    let mut per_workers = Vec::new();

    for &workers in &options.workers {
        eprintln!("== {workers} workers: starting (a) sticky-dispatch and (b) direct");
        let setups = start(workers, options, &scratch)?;
        for &concurrency in &options.concurrency {
            for target in [&setups.sticky, &setups.direct] {
                run_load(
                    &runtime,
                    target,
                    concurrency,
                    WARM_UP,
                    options,
                    &next_client,
                );
            }
            let (mut sticky_runs, mut direct_runs) = (Vec::new(), Vec::new());
            for repeat in 0..options.repeats {
                // Alternate which goes first, so that drift in the machine's load hits both.
                let order = if repeat % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for sticky in order {
                    let target = if sticky {
                        &setups.sticky
                    } else {
                        &setups.direct
                    };
                    let run =
                        run_load(&runtime, target, concurrency, length, options, &next_client);
                    eprintln!(
                        "  workers {workers} concurrency {concurrency} run {} {}: {:.0} conn/s, p50 {:.0} µs, p99 {:.0} µs{}{}",
                        repeat + 1,
                        if sticky { "(a)" } else { "(b)" },
                        run.rate,
                        run.p50_us,
                        run.p99_us,
                        run.cpu_us_per_connection
                            .map_or_else(String::new, |c| format!(", dispatcher {c:.1} µs CPU/conn")),
                        if run.errors > 0 { format!(", {} errors", run.errors) } else { String::new() },
                    );
                    if sticky {
                        sticky_runs.push(run);
                    } else {
                        direct_runs.push(run);
                    }
                }
            }
            let pairs = sticky_runs.iter().zip(&direct_runs);
            rows.push(Row {
                workers,
                concurrency,
                rate_ratio: median(pairs.clone().map(|(a, b)| a.rate / b.rate).collect()),
                added_p99_us: median(pairs.map(|(a, b)| a.p99_us - b.p99_us).collect()),
                sticky: summarize(&sticky_runs),
                direct: summarize(&direct_runs),
            });
        }
        let bulk = if options.bulk {
            let total = options.bulk_mib << 20;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for repeat in 0..options.repeats {
                let order = if repeat % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for sticky in order {
                    let target = if sticky {
                        &setups.sticky
                    } else {
                        &setups.direct
                    };
                    let source = client_ip(options.clients + repeat as u32);
                    let result = runtime
                        .block_on(async {
                            tokio::time::timeout(BULK_TIMEOUT, bulk(target.address, source, total))
                                .await
                        })
                        .map_err(|_| "bulk transfer timed out".to_owned())??;
                    eprintln!(
                        "  workers {workers} bulk run {} {}: download {:.0} MB/s, upload {:.0} MB/s",
                        repeat + 1,
                        if sticky { "(a)" } else { "(b)" },
                        result.0,
                        result.1
                    );
                    if sticky {
                        a.push(result)
                    } else {
                        b.push(result)
                    }
                }
            }
            let med = |v: &[(f64, f64)]| {
                (
                    median(v.iter().map(|r| r.0).collect()),
                    median(v.iter().map(|r| r.1).collect()),
                )
            };
            let ratios = (
                median(a.iter().zip(&b).map(|(a, b)| a.0 / b.0).collect()),
                median(a.iter().zip(&b).map(|(a, b)| a.1 / b.1).collect()),
            );
            Some((med(&a), med(&b), ratios))
        } else {
            None
        };
        per_workers.push(PerWorkers {
            workers,
            peak_rss_kib: status_kib(setups.dispatcher.pid() as i32, "VmHWM"),
            sticky_clients: setups.sticky.stickiness.summary(),
            direct_clients: setups.direct.stickiness.summary(),
            bulk,
        });
        drop(setups);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print_report(options, &rows, &per_workers);
    Ok(())
}

fn print_report(options: &Options, rows: &[Row], per_workers: &[PerWorkers]) {
    println!("handoff-bench on {}", machine());
    println!(
        "(a) sticky-dispatch standalone, (b) the same demo workers on one SO_REUSEPORT address; medians of {} runs of {} s; {} client addresses; {} client thread(s). (a)/(b) and added p99 are medians of the per-repeat ratios and differences.\n",
        options.repeats, options.seconds, options.clients, options.client_threads
    );
    println!("| workers | concurrency | conn/s (a) | conn/s (b) | (a)/(b) | p50 µs (a) | p50 µs (b) | p99 µs (a) | p99 µs (b) | added p99 µs | dispatcher CPU µs/conn | errors (a)/(b) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let (a, b) = (&row.sticky, &row.direct);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {}/{} of {}/{} |",
            row.workers,
            row.concurrency,
            a.rate,
            b.rate,
            row.rate_ratio,
            a.p50_us,
            b.p50_us,
            a.p99_us,
            b.p99_us,
            row.added_p99_us,
            a.cpu_us,
            a.errors,
            b.errors,
            a.connections,
            b.connections,
        );
    }
    println!();
    println!("| workers | dispatcher peak RSS (VmHWM) | clients answered by >1 worker (a) | (b) | download MB/s (a) | (b) | (a)/(b) | upload MB/s (a) | (b) | (a)/(b) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in per_workers {
        let rss = w.peak_rss_kib.map_or_else(
            || "?".to_owned(),
            |k| format!("{:.1} MiB", k as f64 / 1024.0),
        );
        let bulk = w.bulk.map_or_else(
            || "– | – | – | – | – | –".to_owned(),
            |((ad, au), (bd, bu), (rd, ru))| {
                format!("{ad:.0} | {bd:.0} | {rd:.2} | {au:.0} | {bu:.0} | {ru:.2}")
            },
        );
        println!(
            "| {} | {rss} | {} of {} | {} of {} | {bulk} |",
            w.workers,
            w.sticky_clients.1,
            w.sticky_clients.0,
            w.direct_clients.1,
            w.direct_clients.0,
        );
    }
}
