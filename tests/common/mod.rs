//! Shared by the integration tests: run the real binaries, watch their logs, and talk to
//! them over real sockets from chosen 127.x.y.z source addresses.

#![allow(dead_code)] // each test binary uses a different part of the harness

mod process;
pub use process::*;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");
pub const DEMO: &str = env!("CARGO_BIN_EXE_sticky-dispatch-demo");

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
    log_field(&line, "address").unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// What the demo worker said: `worker=<i> pid=<p> client=<ip>` and
/// `listener=<name> local=<addr>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub worker: u32,
    pub pid: i32,
    pub client: String,
    pub listener: String,
    pub local: String,
    pub body: String,
}

/// One HTTP request from source address `from` to `to`. `Err` if the connection failed or
/// closed without an answer.
pub fn request(from: Ipv4Addr, to: SocketAddr) -> Result<Answer, String> {
    request_within(from.into(), to, PATIENCE)
}

/// [`request`] from any source address, waiting up to `reply_timeout` for the answer.
pub fn request_within(
    from: std::net::IpAddr,
    to: SocketAddr,
    reply_timeout: Duration,
) -> Result<Answer, String> {
    send_within(
        from,
        to,
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        reply_timeout,
    )
}

/// Sends `bytes` (a request, maybe behind a PROXY header) from `from` and reads the answer.
pub fn send(from: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> Result<Answer, String> {
    send_within(from.into(), to, bytes, PATIENCE)
}

fn send_within(
    from: std::net::IpAddr,
    to: SocketAddr,
    bytes: &[u8],
    reply_timeout: Duration,
) -> Result<Answer, String> {
    let source = SocketAddr::new(from, 0);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| e.to_string())?;
    if to.is_ipv4() == from.is_ipv4() {
        socket
            .bind(&source.into())
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    socket
        .connect_timeout(&to.into(), PATIENCE)
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(reply_timeout)).unwrap();
    stream.write_all(bytes).map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    if body.is_empty() {
        return Err("closed without an answer".into());
    }
    parse_answer(&body).ok_or_else(|| format!("no answer (got {body:?})"))
}

/// The demo worker's answer in a whole HTTP response; `None` unless it is a 200 with
/// every field.
pub fn parse_answer(body: &str) -> Option<Answer> {
    if !body.starts_with("HTTP/1.1 200") {
        return None;
    }
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
        local: field("local=")?,
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

/// The default routing (seed 0, /32, /64) for `workers` workers, built once per count:
/// building one makes its 4,096-bucket table, which the tests would otherwise pay for on
/// every connection they check.
pub fn default_router(workers: u32) -> std::sync::Arc<sticky_dispatch::routing::Router> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static ROUTERS: OnceLock<Mutex<HashMap<u32, Arc<sticky_dispatch::routing::Router>>>> =
        OnceLock::new();
    let mut routers = ROUTERS.get_or_init(Default::default).lock().unwrap();
    routers
        .entry(workers)
        .or_insert_with(|| {
            Arc::new(sticky_dispatch::routing::Router::new(
                workers.try_into().unwrap(),
                32,
                64,
                0,
            ))
        })
        .clone()
}

/// Client addresses whose connections the default routing (seed 0, /32) sends to `worker`
/// of `workers`, from the sequence of [`client_ip`].
pub fn clients_of(worker: u32, workers: u32, count: usize) -> Vec<Ipv4Addr> {
    let router = default_router(workers);
    (0..)
        .map(client_ip)
        .filter(|ip| router.worker_for(&router.key(Some((*ip).into()))) == worker)
        .take(count)
        .collect()
}

/// The worker each client is routed to, by the same routing as the dispatcher's defaults.
pub fn expected_worker(ip: Ipv4Addr, workers: u32) -> u32 {
    let router = default_router(workers);
    router.worker_for(&router.key(Some(ip.into())))
}

/// One request of a load run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub client: Ipv4Addr,
    pub answer: Result<Answer, String>,
    /// When the request's connection was opened, and how long it waited for the answer.
    pub started: Instant,
    pub waited: Duration,
}

impl Outcome {
    /// One request from `client` to `to`, timed.
    pub fn of(client: Ipv4Addr, to: SocketAddr, reply_timeout: Duration) -> Outcome {
        let started = Instant::now();
        let answer = request_within(client.into(), to, reply_timeout);
        Outcome {
            client,
            answer,
            started,
            waited: started.elapsed(),
        }
    }
}

/// A source of client connections, one HTTP request per new connection: `threads` threads
/// cycling through their share of the clients until stopped, `max_each` requests per
/// thread, or `max_time`; or, with [`LoadPlan::once`], one request from every client at
/// once. Every run is bounded in count and time.
pub struct LoadPlan {
    to: SocketAddr,
    clients: Vec<Ipv4Addr>,
    threads: usize,
    max_each: usize,
    max_time: Duration,
    reply_timeout: Duration,
    once: bool,
    /// Runs first in every load thread, e.g. to enter a container's network namespace.
    setup: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl LoadPlan {
    pub fn new(to: SocketAddr, clients: &[Ipv4Addr]) -> LoadPlan {
        LoadPlan {
            to,
            clients: clients.to_vec(),
            threads: 8,
            max_each: 100_000,
            max_time: Duration::from_secs(120),
            reply_timeout: PATIENCE,
            once: false,
            setup: None,
        }
    }

    pub fn threads(mut self, threads: usize) -> LoadPlan {
        self.threads = threads;
        self
    }

    pub fn max_each(mut self, max_each: usize) -> LoadPlan {
        self.max_each = max_each;
        self
    }

    pub fn max_time(mut self, max_time: Duration) -> LoadPlan {
        self.max_time = max_time;
        self
    }

    /// How long one request may wait for its answer before it counts as failed.
    pub fn reply_timeout(mut self, reply_timeout: Duration) -> LoadPlan {
        self.reply_timeout = reply_timeout;
        self
    }

    /// One request from every client, all at the same time (a thread each).
    pub fn once(mut self) -> LoadPlan {
        self.once = true;
        self.threads = self.clients.len();
        self.max_each = 1;
        self
    }

    pub fn setup(mut self, setup: impl Fn() + Send + Sync + 'static) -> LoadPlan {
        self.setup = Some(Arc::new(setup));
        self
    }

    pub fn start(self) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let threads = self.threads.clamp(1, self.clients.len().max(1));
        let begun = Instant::now();
        let threads = (0..threads)
            .map(|t| {
                // Thread t takes clients t, t + threads, ... round and round.
                let mine: Vec<Ipv4Addr> = self
                    .clients
                    .iter()
                    .skip(t)
                    .step_by(threads)
                    .copied()
                    .collect();
                let (stop, outcomes, setup) = (stop.clone(), outcomes.clone(), self.setup.clone());
                let (to, max_each, max_time, reply_timeout) =
                    (self.to, self.max_each, self.max_time, self.reply_timeout);
                std::thread::spawn(move || {
                    if let Some(setup) = setup {
                        setup();
                    }
                    for client in mine.iter().cycle().take(max_each) {
                        if stop.load(Ordering::Relaxed) || begun.elapsed() > max_time {
                            break;
                        }
                        let outcome = Outcome::of(*client, to, reply_timeout);
                        outcomes.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            threads,
        }
    }
}

/// A running [`LoadPlan`]; stopped (and joined) when dropped.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `threads` threads of new connections from `clients` to `to`, at most `max_each`
    /// requests per thread.
    pub fn start(to: SocketAddr, clients: &[Ipv4Addr], threads: usize, max_each: usize) -> Load {
        LoadPlan::new(to, clients)
            .threads(threads)
            .max_each(max_each)
            .start()
    }

    /// Requests completed so far.
    pub fn completed(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.count(|o| o.answer.is_ok())
    }

    /// Outcomes so far for which `which` holds.
    pub fn count(&self, which: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| which(o))
            .count()
    }

    /// Waits (bounded) until `n` requests started after `since` have been answered by a
    /// process other than `not_pid`; returns the pid of the last of them.
    pub fn wait_answered_after(&self, since: Instant, not_pid: i32, n: usize) -> i32 {
        let answered_by_others = |load: &Load| -> Vec<i32> {
            load.outcomes
                .lock()
                .unwrap()
                .iter()
                .filter(|o| o.started >= since)
                .filter_map(|o| o.answer.as_ref().ok())
                .filter(|a| a.pid != not_pid)
                .map(|a| a.pid)
                .collect()
        };
        self.wait_until(
            &format!("{n} answers from a process other than {not_pid}"),
            |load| answered_by_others(load).len() >= n,
        );
        *answered_by_others(self).last().expect("n answers")
    }

    /// Waits until `more` requests beyond those completed now have completed.
    pub fn wait_more(&self, more: usize) {
        let target = self.completed() + more;
        self.wait_until(&format!("{target} requests completed"), |load| {
            load.completed() >= target
        });
    }

    /// Waits, up to three times [`PATIENCE`], until `done` holds.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Load) -> bool) {
        let deadline = Instant::now() + PATIENCE * 3;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "load: no {what} within {:?}; {} completed",
                PATIENCE * 3,
                self.completed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the load and returns every outcome.
    pub fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.join()
    }

    /// Waits for the threads to finish (a [`LoadPlan::once`] load ends by itself) and
    /// returns every outcome.
    pub fn join(mut self) -> Vec<Outcome> {
        for thread in self.threads.drain(..) {
            thread.join().expect("load thread");
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The restart tests' load: a thread per client making new connections back to back, each
/// timed, bounded in count and time; the reply timeout is above the apps' 30 s drain
/// default, so that a wait that long (before the fixes) is measured, not counted as a
/// failure.
pub fn restart_load(to: SocketAddr, clients: &[Ipv4Addr]) -> Load {
    LoadPlan::new(to, clients)
        .threads(clients.len())
        .max_each(20_000)
        .max_time(Duration::from_secs(120))
        .reply_timeout(Duration::from_secs(45))
        .start()
}

/// `GET /slow?ms=<ms>` (an app route of the restart tests) from `from`, once the app has
/// sent `started` (the request is in progress); the thread reads the rest and returns the
/// whole response.
pub fn slow_request(
    from: Ipv4Addr,
    to: SocketAddr,
    ms: u64,
) -> std::thread::JoinHandle<Result<String, String>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(from.into(), 0).into())
        .unwrap();
    socket.connect_timeout(&to.into(), PATIENCE).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "GET /slow?ms={ms} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains("started") {
        match stream.read(&mut buf) {
            Ok(0) => panic!("closed before started: {}", String::from_utf8_lossy(&text)),
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(err) => panic!("slow request: {err}"),
        }
    }
    std::thread::spawn(move || {
        stream
            .read_to_end(&mut text)
            .map_err(|err| format!("{err} after {}", String::from_utf8_lossy(&text)))?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    })
}

/// Figures of a load run: requests, answered, failed, and clients answered by the wrong
/// worker.
#[derive(Debug, Default)]
pub struct Tally {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    /// Requests answered by another worker than the client's own.
    pub misrouted: usize,
    /// Distinct clients.
    pub clients: usize,
    /// Failures by error text.
    pub errors: std::collections::BTreeMap<String, usize>,
}

impl Tally {
    /// Counts `outcomes`; `expected` says which worker should answer a client.
    pub fn of(outcomes: &[Outcome], expected: impl Fn(Ipv4Addr) -> u32) -> Tally {
        let mut tally = Tally {
            total: outcomes.len(),
            ..Tally::default()
        };
        let mut clients = std::collections::BTreeSet::new();
        for outcome in outcomes {
            clients.insert(outcome.client);
            match &outcome.answer {
                Ok(answer) => {
                    tally.ok += 1;
                    if answer.worker != expected(outcome.client) {
                        tally.misrouted += 1;
                    }
                }
                Err(err) => {
                    tally.failed += 1;
                    *tally.errors.entry(err.clone()).or_insert(0) += 1;
                }
            }
        }
        tally.clients = clients.len();
        tally
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections from {} clients: {} answered, {} failed, {} misrouted",
            self.total, self.clients, self.ok, self.failed, self.misrouted
        )?;
        if !self.errors.is_empty() {
            write!(f, " (errors: {:?})", self.errors)?;
        }
        Ok(())
    }
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

/// A datagram socket standing in for systemd's NOTIFY_SOCKET. Like systemd, it reads
/// every datagram as it comes (a thread does), so a sender never finds it full.
pub struct NotifySocket {
    received: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub path: PathBuf,
    /// How many datagrams earlier calls have looked at; `wait_*` look at later ones.
    checked: usize,
}

impl NotifySocket {
    pub fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let received: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test process; recv fails only if the socket is gone.
            while let Ok(n) = socket.recv(&mut buf) {
                let (seen, arrived) = &*sink;
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                arrived.notify_all();
            }
        });
        NotifySocket {
            received,
            path,
            checked: 0,
        }
    }

    /// Every datagram received so far.
    pub fn seen(&self) -> Vec<String> {
        self.received.0.lock().unwrap().clone()
    }

    /// Forgets what was received so far: later waits see only what comes next.
    pub fn skip_seen(&mut self) {
        self.checked = self.received.0.lock().unwrap().len();
    }

    /// Waits for a line, in a datagram not skipped, for which `accept` holds; returns it.
    pub fn wait_until(&mut self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let (seen, arrived) = &*self.received;
        let mut guard = seen.lock().unwrap();
        loop {
            if let Some(line) = guard[self.checked..]
                .iter()
                .flat_map(|d| d.lines())
                .find(|l| accept(l))
            {
                return line.to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {PATIENCE:?} in {guard:?}"
            );
            guard = arrived.wait_timeout(guard, left).unwrap().0;
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
