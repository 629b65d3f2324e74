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
    fn drop(&mut self) {
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
            DEMO,
        ])
        .env("STICKY_DISPATCH_SOCKET_PREFIX", unique_prefix(test))
        .env("STICKY_DISPATCH_LOG_LEVEL", "info")
        .envs(extra_env.iter().copied());
    let running = Running::spawn(command, test);
    let addr = listening_address(&running.log);
    (running, addr)
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
    pub client: String,
    pub listener: String,
    pub body: String,
}

/// One HTTP request from source address `from` to `to`. `Err` if the connection failed or
/// closed without an answer.
pub fn request(from: Ipv4Addr, to: SocketAddr) -> Result<Answer, String> {
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
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
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
