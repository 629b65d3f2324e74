//! Shared by the integration tests: run the real binaries, watch their logs, and talk to
//! them over real sockets from chosen 127.x.y.z source addresses.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");
pub const DEMO: &str = env!("CARGO_BIN_EXE_sticky-dispatch-demo");

/// Generous bound for anything that should take milliseconds: machines are shared.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A socket prefix no other test (or test run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("sticky-dispatch-test/{}/{test}/", std::process::id())
}

/// A scratch directory for one test, world-readable so a process of another uid can run
/// binaries copied into it.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sticky-dispatch-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Lines a child wrote to stderr, collected by a thread, waitable.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    /// Starts collecting `child`'s stderr (which must be piped).
    pub fn capture(child: &mut Child, tag: &'static str) -> Log {
        let log = Log::default();
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let (lines, ready) = &*sink.0;
                lines.lock().unwrap().push(line);
                ready.notify_all();
            }
        });
        log
    }

    /// Waits for a line containing every one of `parts`; returns it.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let (lines, ready) = &*self.0;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {parts:?} within {PATIENCE:?}; log:\n{}",
                guard.join("\n")
            );
            guard = ready.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until `n` lines contain every one of `parts`.
    pub fn wait_count(&self, parts: &[&str], n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.count(parts) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} lines with {parts:?}; log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many lines so far contain every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        let lines = self.0 .0.lock().unwrap();
        lines
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().join("\n")
    }
}

/// A running process, killed when dropped so a failing test leaves nothing behind.
pub struct Running {
    pub child: Child,
    pub log: Log,
}

impl Running {
    pub fn spawn(mut command: Command, tag: &'static str) -> Running {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("binary starts");
        let log = Log::capture(&mut child, tag);
        Running { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Sends SIGTERM and waits for the exit status, within PATIENCE.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit; log:\n{}",
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    /// SIGTERM first, so a standalone dispatcher stops its workers; SIGKILL if it has not
    /// exited within a few seconds.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An empty config file, so tests do not depend on what /etc holds.
pub fn empty_config(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("empty.toml");
    std::fs::write(&path, "").unwrap();
    path
}

/// `sticky-dispatch` in standalone mode with `workers` demo workers on 127.0.0.1:0.
/// Returns the process and the address it listens on.
pub fn standalone(
    test: &'static str,
    workers: u32,
    extra_env: &[(&str, &str)],
) -> (Running, SocketAddr) {
    standalone_with(test, workers, extra_env, &[DEMO])
}

/// Like [`standalone`], with another worker command.
pub fn standalone_with(
    test: &'static str,
    workers: u32,
    extra_env: &[(&str, &str)],
    worker_command: &[&str],
) -> (Running, SocketAddr) {
    let dir = scratch_dir(test);
    let mut command = Command::new(DISPATCHER);
    command
        .arg("--config")
        .arg(empty_config(&dir))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &workers.to_string(),
            "--",
        ])
        .args(worker_command)
        .env("STICKY_DISPATCH_SOCKET_PREFIX", unique_prefix(test))
        .env("STICKY_DISPATCH_LOG_LEVEL", "info")
        .envs(extra_env.iter().copied());
    let running = Running::spawn(command, test);
    let addr = listening_address(&running.log);
    (running, addr)
}

/// A dispatcher on 127.0.0.1:0 with no workers of its own: the test starts them, one by
/// one, as systemd would.
pub struct Alone {
    pub dispatcher: Running,
    pub addr: SocketAddr,
    pub prefix: String,
}

impl Alone {
    pub fn start(test: &'static str, workers: u32, extra_env: &[(&str, &str)]) -> Alone {
        let prefix = unique_prefix(test);
        let mut command = Command::new(DISPATCHER);
        command
            .arg("--config")
            .arg(empty_config(&scratch_dir(test)))
            .args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
            .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix)
            .envs(extra_env.iter().copied());
        let dispatcher = Running::spawn(command, test);
        let addr = listening_address(&dispatcher.log);
        Alone {
            dispatcher,
            addr,
            prefix,
        }
    }

    /// A demo worker for `index`, once the dispatcher has linked to it.
    pub fn start_worker(&self, index: u32) -> Running {
        let index_field = format!("index={index}");
        let ups = self.dispatcher.log.count(&["worker link up", &index_field]);
        let worker = Running::spawn(self.worker_command(index), "worker");
        self.dispatcher
            .log
            .wait_count(&["worker link up", &index_field], ups + 1);
        worker
    }

    /// The command that runs demo worker `index` for this dispatcher.
    pub fn worker_command(&self, index: u32) -> Command {
        let mut worker = Command::new(DEMO);
        worker
            .env("STICKY_DISPATCH_INDEX", index.to_string())
            .env("STICKY_DISPATCH_SOCKET_PREFIX", &self.prefix);
        worker
    }
}

/// The address from the dispatcher's `listening ... address=` log line.
pub fn listening_address(log: &Log) -> SocketAddr {
    let line = log.wait_for(&["listening", "address="]);
    let value = line.split("address=").nth(1).unwrap();
    value.split_whitespace().next().unwrap().parse().unwrap()
}

/// The `n`-th distinct client source address: 127.1.0.1, 127.1.0.2, … (never 127.0.0.1).
pub fn client_ip(n: u32) -> Ipv4Addr {
    let n = n + 1;
    Ipv4Addr::new(127, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// What the demo worker said: `worker=` and `client=` from its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub worker: u32,
    pub pid: i32,
    pub client: String,
    pub listener: String,
    pub body: String,
}

/// One HTTP request from source address `from` to `to`. `Err` if the connection failed or
/// closed without an answer.
pub fn request(from: Ipv4Addr, to: SocketAddr) -> Result<Answer, String> {
    send(
        from,
        to,
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
}

/// Sends `bytes` (a request, maybe behind a PROXY header) from `from` and reads the answer.
pub fn send(from: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> Result<Answer, String> {
    let source = SocketAddr::new(from.into(), 0);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| e.to_string())?;
    if to.is_ipv4() {
        socket
            .bind(&source.into())
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    socket
        .connect_timeout(&to.into(), PATIENCE)
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(bytes).map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    parse_answer(&body).ok_or_else(|| format!("no answer (got {body:?})"))
}

fn parse_answer(body: &str) -> Option<Answer> {
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(str::to_owned)
    };
    Some(Answer {
        worker: field("worker=")?.parse().ok()?,
        pid: field("pid=")?.parse().ok()?,
        client: field("client=")?,
        listener: field("listener=")?,
        body: body.to_owned(),
    })
}

/// Runs `f` for every item on `threads` threads; results in input order.
pub fn parallel<T: Send + Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Client addresses whose connections the default routing (seed 0, /32) sends to `worker`
/// of `workers`, from the sequence of [`client_ip`].
pub fn clients_of(worker: u32, workers: u32, count: usize) -> Vec<Ipv4Addr> {
    let router = sticky_dispatch::routing::Router::new(workers.try_into().unwrap(), 32, 64, 0);
    (0..)
        .map(client_ip)
        .filter(|ip| router.worker_for(&router.key(Some((*ip).into()))) == worker)
        .take(count)
        .collect()
}

/// The worker each client is routed to, by the same routing as the dispatcher's defaults.
pub fn expected_worker(ip: Ipv4Addr, workers: u32) -> u32 {
    let router = sticky_dispatch::routing::Router::new(workers.try_into().unwrap(), 32, 64, 0);
    router.worker_for(&router.key(Some(ip.into())))
}

/// One request of a load run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub client: Ipv4Addr,
    pub answer: Result<Answer, String>,
}

/// Continuous load of new connections: `threads` threads, each cycling through its share
/// of the clients with one request per new connection, until stopped, `max_each`
/// requests per thread, or 120 s.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub fn start(to: SocketAddr, clients: &[Ipv4Addr], threads: usize, max_each: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let chunk = clients.len().div_ceil(threads).max(1);
        let threads = clients
            .chunks(chunk)
            .map(|part| {
                let part = part.to_vec();
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut outcomes = Vec::new();
                    for client in part.iter().cycle().take(max_each) {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(120)
                        {
                            break;
                        }
                        outcomes.push(Outcome {
                            client: *client,
                            answer: request(*client, to),
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes
                })
            })
            .collect();
        Load {
            stop,
            done,
            threads,
        }
    }

    /// Requests completed so far.
    pub fn completed(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` requests beyond those completed now have completed.
    pub fn wait_more(&self, more: usize) {
        let target = self.completed() + more;
        let deadline = Instant::now() + PATIENCE * 3;
        while self.completed() < target {
            assert!(
                Instant::now() < deadline,
                "load stalled at {} of {target}",
                self.completed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// Figures of a load run: requests, answered, failed, and answered by the wrong worker.
#[derive(Debug, Default)]
pub struct Tally {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    pub misrouted: usize,
    pub failures: Vec<String>,
}

impl Tally {
    /// Counts `outcomes`; `expected` says which worker should answer a client.
    pub fn of(outcomes: &[Outcome], expected: impl Fn(Ipv4Addr) -> u32) -> Tally {
        let mut tally = Tally {
            total: outcomes.len(),
            ..Tally::default()
        };
        for outcome in outcomes {
            match &outcome.answer {
                Ok(answer) => {
                    tally.ok += 1;
                    if answer.worker != expected(outcome.client) {
                        tally.misrouted += 1;
                    }
                }
                Err(err) => {
                    tally.failed += 1;
                    if tally.failures.len() < 5 {
                        tally.failures.push(format!("{}: {err}", outcome.client));
                    }
                }
            }
        }
        tally
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections: {} answered, {} failed, {} misrouted",
            self.total, self.ok, self.failed, self.misrouted
        )?;
        if !self.failures.is_empty() {
            write!(f, " (first failures: {:?})", self.failures)?;
        }
        Ok(())
    }
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// A `VmHWM`/`VmRSS`-style field of /proc/<pid>/status, in KiB.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap()
}

/// Sends SIGSTOP and waits until every thread of the process is stopped: delivery is
/// asynchronous, and a thread still running could take one more connection.
pub fn stop_process(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .all(|task| {
                let stat =
                    std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                matches!(
                    stat.rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next()),
                    Some('T' | 't')
                )
            });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many fds a process has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
pub struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
    pub seen: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        NotifySocket {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a line for which `accept` holds; returns it. Lines seen before count.
    pub fn wait_until(&mut self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut checked = 0;
        loop {
            if let Some(line) = self.seen[checked..]
                .iter()
                .flat_map(|d| d.lines())
                .find(|l| accept(l))
            {
                return line.to_owned();
            }
            checked = self.seen.len();
            assert!(Instant::now() < deadline, "no {what} in {:?}", self.seen);
            let mut buf = [0u8; 4096];
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(err) => panic!(
                    "no {what} within {PATIENCE:?} ({err}); seen {:?}",
                    self.seen
                ),
            };
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Waits for a line starting with `prefix`.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        self.wait_until(prefix, |line| line.starts_with(prefix))
    }
}

/// The number just before `label` in a STATUS line: `"3 in flight"` → 3.
pub fn status_figure(status: &str, label: &str) -> Option<u64> {
    let before = status.split(label).next()?;
    before
        .split_whitespace()
        .last()?
        .trim_start_matches(';')
        .parse()
        .ok()
}
