//! Shared by the real-client tests (socket.io, browser, HAProxy): the npm packages in
//! `tests/node/`, bounded runs of Node scripts, and Debian packages installed on demand.
//! Used as `#[path = "node/support.rs"] mod support;`.

#![allow(dead_code)] // each test binary uses a different part

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `tests/node/`: package.json, package-lock.json and the scripts.
pub fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Holds an exclusive lock on `path` (created if missing) while alive: one installer at a
/// time, across the threads of a test binary (each opens the file anew, and flock treats
/// separate opens independently) and across test processes (nextest).
fn exclusive(path: &Path) -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, err)| panic!("lock {}: {err}", path.display()))
}

/// Installs the locked npm packages with `npm ci` unless they are there, so that
/// `cargo test` works from a fresh clone. npm uses the registry the machine is set up with.
pub fn npm_ci() {
    let _one_install = exclusive(&std::env::temp_dir().join("sticky-dispatch-npm-ci.lock"));
    let dir = node_dir();
    // npm writes this after a complete install; a half-done one has none.
    if dir.join("node_modules/.package-lock.json").exists() {
        return;
    }
    eprintln!("tests/node: node_modules missing, running npm ci");
    let mut npm = Command::new("npm");
    npm.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir);
    let out = run(npm, Duration::from_secs(600))
        .unwrap_or_else(|err| panic!("npm ci in {}: {err} (is Node installed?)", dir.display()));
    assert!(
        out.status.success(),
        "npm ci in {} failed ({}):\n{}\n{}",
        dir.display(),
        out.status,
        out.stdout,
        out.stderr
    );
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` to completion, killing it if it takes longer than `limit`.
pub fn run(mut command: Command, limit: Duration) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("could not start {shown}: {err}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|err| err.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{shown} did not finish within {limit:?}; stderr:\n{}",
                stderr.join().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// `node tests/node/<script> args...`, bounded by `limit`; panics unless it exits 0.
pub fn node(script: &str, args: &[String], limit: Duration) -> Output {
    let mut command = Command::new("node");
    command.arg(node_dir().join(script)).args(args);
    let out = run(command, limit).unwrap_or_else(|err| panic!("{err}"));
    assert!(
        out.status.success(),
        "node {script} failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// The path of `program`, installing Debian package `package` for it when it is missing
/// and we are root. `Err` (not root) says why not, for a test to print when it skips; a
/// failed install as root fails the test.
pub fn debian_program(program: &str, package: &str) -> Result<PathBuf, String> {
    let _one_apt_at_a_time = exclusive(&std::env::temp_dir().join("sticky-dispatch-apt.lock"));
    if let Some(path) = find_program(program) {
        return Ok(path);
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err(format!(
            "{program} is not installed and we are not root to apt-get install {package}"
        ));
    }
    eprintln!("installing Debian package {package} for {program}");
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command
            // Wait for anyone else's apt or dpkg instead of failing at once.
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(command, Duration::from_secs(900)).unwrap_or_else(|err| panic!("{err}"))
    };
    let install = ["install", "-y", "-q", "--no-install-recommends", package];
    let first = apt(&install);
    if !first.status.success() {
        // Stale or missing package lists: refresh once and retry.
        apt(&["update", "-q"]);
        let second = apt(&install);
        assert!(
            second.status.success(),
            "apt-get install {package} failed:\n{}",
            second.stderr
        );
    }
    Ok(find_program(program)
        .unwrap_or_else(|| panic!("{package} installed but no {program} on PATH")))
}

fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A dispatcher stopped with SIGTERM when dropped, even when the test panics, so that it
/// stops its workers (the harness's SIGKILL would leave them running, orphaned).
pub struct Graceful(pub crate::common::Running);

impl Drop for Graceful {
    fn drop(&mut self) {
        let child = &mut self.0.child;
        if matches!(child.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Then Running's own drop kills whatever is left.
    }
}

/// One socket.io client's outcome, from a `client ...` line of socketio-clients.js.
#[derive(Debug)]
pub struct Session {
    pub ip: std::net::Ipv4Addr,
    pub ok: bool,
    /// Messages received in its room / expected (everyone in the room on its worker).
    pub received: usize,
    pub expected: usize,
    /// From the server's `hello`: the worker, and the client address it saw.
    pub worker: Option<u32>,
    pub client: String,
    pub error: String,
}

fn parse_session(line: &str) -> Session {
    let (fields, error) = line.split_once(" error=").unwrap_or((line, ""));
    let field = |name: &str| {
        fields
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    Session {
        ip: field("ip").parse().unwrap(),
        ok: field("ok") == "true",
        received: field("received").parse().unwrap(),
        expected: field("expected").parse().unwrap(),
        worker: field("worker").parse().ok(),
        client: field("client").to_owned(),
        error: error.to_owned(),
    }
}

/// Runs real socket.io clients (tests/node/socketio-clients.js: long-polling, every
/// request a new connection from the client's own address) against `addr`, one per
/// address in `ips`; `phase_ms` bounds each phase of a client. One session per client,
/// in order.
pub fn socketio_clients(
    addr: std::net::SocketAddr,
    ips: &[std::net::Ipv4Addr],
    phase_ms: u32,
) -> Vec<Session> {
    npm_ci();
    let mut command = Command::new("node");
    command
        .arg(node_dir().join("socketio-clients.js"))
        .arg(format!("http://{addr}"))
        .args(ips.iter().map(|ip| ip.to_string()))
        .env("PHASE_MS", phase_ms.to_string());
    // Each of the client's four phases is bounded by phase_ms.
    let limit = Duration::from_millis(u64::from(phase_ms) * 4) + Duration::from_secs(30);
    let out = run(command, limit).unwrap_or_else(|err| panic!("{err}"));
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let sessions: Vec<Session> = out
        .stdout
        .lines()
        .filter(|line| line.starts_with("client "))
        .map(parse_session)
        .collect();
    assert_eq!(sessions.len(), ips.len(), "{}", out.stdout);
    sessions
}

/// "N/M sessions completed ...; K failed (first failures: ...)".
pub fn session_summary(sessions: &[Session]) -> String {
    let ok = sessions.iter().filter(|s| s.ok).count();
    let mut text = format!(
        "{ok}/{} socket.io sessions completed handshake, join and messages; {} failed",
        sessions.len(),
        sessions.len() - ok
    );
    let errors: Vec<String> = sessions
        .iter()
        .filter(|s| !s.ok)
        .take(3)
        .map(|s| format!("{}: {}", s.ip, s.error))
        .collect();
    if !errors.is_empty() {
        text.push_str(&format!(" (first failures: {errors:?})"));
    }
    text
}

/// A `redis-server` (Debian's package, installed when missing and we are root) on a
/// loopback port of its own, with no persistence; stopped when dropped.
pub struct Redis {
    _process: crate::common::Running,
    pub url: String,
}

impl Redis {
    pub fn start() -> Redis {
        let program =
            debian_program("redis-server", "redis-server").unwrap_or_else(|err| panic!("{err}"));
        // A free port, then redis binds it: another process may take it in between, so a
        // start that fails on the address is tried again (bounded).
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut command = Command::new(&program);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                // Its log to stderr, where Running collects it.
                .args(["--logfile", "/dev/stderr"]);
            let mut redis = crate::common::Running::spawn(command, "redis");
            let started =
                redis
                    .log
                    .wait_lines(&["Ready to accept connections"], 1, crate::common::PATIENCE);
            if started.is_ok() {
                return Redis {
                    _process: redis,
                    url: format!("redis://127.0.0.1:{port}"),
                };
            }
            let status = redis.child.try_wait().unwrap();
            assert!(
                status.is_some() && redis.log.text().contains("in use"),
                "redis-server did not start:\n{}",
                redis.log.text()
            );
        }
        panic!("redis-server found no free port in 5 tries");
    }
}

/// One client's outcome, from a `client ...` line of tests/node/chat-clients.js.
#[derive(Debug)]
pub struct ChatClient {
    pub ip: std::net::Ipv4Addr,
    pub ok: bool,
    /// From the app's `login`, where it says (`None` otherwise).
    pub worker: Option<u32>,
    pub client: String,
    pub transport: String,
    /// The largest participant count it saw (`None` for the tutorial protocol).
    pub users: Option<usize>,
    /// How many times the first client's message reached it.
    pub received: usize,
    pub ticks: Vec<u64>,
    pub error: String,
}

/// Runs `tests/node/chat-clients.js` against `addr`, one real socket.io client per address
/// in `ips`; `env` picks the protocol and phases (PROTOCOL, TRANSPORTS, USERS, TICKS).
pub fn chat_clients(
    addr: std::net::SocketAddr,
    ips: &[std::net::Ipv4Addr],
    env: &[(&str, &str)],
) -> Vec<ChatClient> {
    npm_ci();
    let mut command = Command::new("node");
    command
        .arg(node_dir().join("chat-clients.js"))
        .arg(format!("http://{addr}"))
        .args(ips.iter().map(|ip| ip.to_string()))
        .env("PHASE_MS", "20000")
        .envs(env.iter().copied());
    // Four phases, each bounded by PHASE_MS.
    let out = run(command, Duration::from_secs(4 * 20 + 30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let clients: Vec<ChatClient> = out
        .stdout
        .lines()
        .filter(|line| line.starts_with("client "))
        .map(|line| {
            let (field, error) = client_line(line);
            ChatClient {
                ip: field("ip").parse().unwrap(),
                ok: field("ok") == "true",
                worker: field("worker").parse().ok(),
                client: field("client").to_owned(),
                transport: field("transport").to_owned(),
                users: field("users").parse().ok(),
                received: field("received").parse().unwrap(),
                ticks: field("ticks")
                    .split(',')
                    .filter_map(|t| t.parse().ok())
                    .collect(),
                error: error.to_owned(),
            }
        })
        .collect();
    assert_eq!(clients.len(), ips.len(), "{}", out.stdout);
    clients
}

/// A `client ip=… ok=… … error=<rest of the line>` line of the socket.io client runners
/// (chat-clients.js, tests/python/broadcast-clients.js): a getter of its `name=value`
/// fields (panicking, naming the line, on a missing one) and its error text.
pub fn client_line<'l>(line: &'l str) -> (impl Fn(&str) -> &'l str + 'l, &'l str) {
    let (fields, error) = line.split_once(" error=").unwrap_or((line, ""));
    let field = move |name: &str| {
        fields
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    (field, error)
}

/// Headless Chromium and everything it started (its own process group), killed when
/// dropped: for the demo's page (tests/browser.rs) and the Node chat's (tests/node_worker.rs).
pub struct Chromium {
    child: std::process::Child,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Chromium {
    /// Starts headless Chromium (`program`) with a fresh profile in `dir`; returns it and
    /// its DevTools browser endpoint (`ws://127.0.0.1:PORT/devtools/browser/ID`).
    pub fn start(program: &Path, dir: &Path) -> (Chromium, String) {
        use std::os::unix::process::CommandExt;
        let profile = dir.join("profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        let child = Command::new(program)
            .args([
                "--headless",
                // Root has no user namespace sandbox to drop into.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                // Loopback only: nothing leaves the machine.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-pings",
                "--proxy-server=http://127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let chromium = Chromium { child };
        // Chromium writes the port it took and the browser's path once it listens.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + crate::common::PATIENCE * 3;
        let endpoint = loop {
            let text = std::fs::read_to_string(&active).unwrap_or_default();
            if let [port, path, ..] = text.lines().collect::<Vec<_>>()[..] {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            assert!(
                Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort; its log:\n{}",
                std::fs::read_to_string(dir.join("chromium.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (chromium, endpoint)
    }
}

/// Checks that `guide` (a page under the repository, e.g. docs/converting-node.md) shows
/// each conversion as exactly the `diff -u` of `<converting>/before/<app>` and
/// `<converting>/after/<app>` (labelled `a/<app>` and `b/<app>`), in a `diff` block: the
/// guide's diffs are the apps the tests run.
pub fn assert_guide_shows_conversions(guide: &str, converting: &str, apps: &[&str]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join(guide)).unwrap();
    let dir = repo.join(converting);
    for app in apps {
        let out = Command::new("diff")
            .args([
                "-u",
                "--label",
                &format!("a/{app}"),
                "--label",
                &format!("b/{app}"),
            ])
            .arg(dir.join("before").join(app))
            .arg(dir.join("after").join(app))
            .output()
            .unwrap();
        // Status 1: the files differ, as they must.
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let block = format!("```diff\n{}```\n", String::from_utf8(out.stdout).unwrap());
        assert!(
            text.contains(&block),
            "{guide} lacks the diff of {app}; it is:\n{block}"
        );
    }
}
