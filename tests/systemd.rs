//! The product under a real, booted systemd (issue #4): the units in `systemd/`, the
//! generator and the binaries are installed into a container (systemd-nspawn on an
//! overlay of the host's root, tests/container), and operated the way an
//! operator would, with `systemctl` and `journalctl`, while clients connect from 200
//! distinct 127.x.y.z addresses.
//!
//! One container is booted and the scenarios run in sequence; a failing scenario is
//! reported and the next ones still run, so one run tells which of them fail. Figures
//! (connections ok/failed, clients misrouted) are printed with the `[systemd]` prefix:
//! `cargo test --test systemd -- --nocapture` shows them.
//!
//! Needs root (it mounts and boots a container): ignored unless asked for
//! (`-- --include-ignored`), and it fails, not passes, when asked for without root. It installs `systemd-container` (systemd-nspawn) with apt-get if missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
mod container;
use common::{expected_worker, request_within, Answer, Load, LoadPlan, Outcome, Tally};
use container::{
    ensure_nspawn, enter_netns, field, message, output_text, parse_export, poll, run_scenario,
    stage_product, Container, Entry,
};

const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");
const SOURCE: &str = env!("CARGO_MANIFEST_DIR");

/// The port of systemd/sticky-dispatch.socket.
const PORT: u16 = 8080;
/// Distinct client addresses.
const CLIENTS: usize = 200;
/// Workers in the installed config (then 5 in scenario g).
const WORKERS: u32 = 4;
/// A reply slower than this is a lost connection. Above the default pending_timeout
/// (30 s), so that a connection the dispatcher gives up on shows as closed, not as ours.
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);
/// Threads of the load generator, each a stream of sequential connections.
const LOAD_THREADS: usize = 8;
/// Bounds on one load run.
const LOAD_MAX_CONNECTIONS: usize = 100_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(90);
/// Clients waiting for a stopped worker through a dispatcher restart (scenario d).
const WAITING: usize = 16;
/// Lanes per address of the socket unit: the shipped `lanes = 0` is max(workers, 16).
const LANES: usize = 16;
/// The addresses of systemd/sticky-dispatch.socket, each a group of [`LANES`] sockets.
const ADDRESSES: [&str; 2] = ["0.0.0.0:8080", "[::]:8080"];

/// Prints a figure to quote; `--nocapture` shows them as they come.
macro_rules! figure {
    ($($arg:tt)*) => { eprintln!("[systemd] {}", format_args!($($arg)*)) };
}

#[test]
#[ignore = "needs root: mounts an overlay and boots systemd with systemd-nspawn"]
fn units_generator_and_dispatcher_under_a_booted_systemd() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (mounts an overlay and boots systemd with systemd-nspawn)"
    );
    ensure_nspawn();
    let config = Config::shipped_with_workers(WORKERS);
    let container = Container::boot("systemd", |dir| {
        stage_product(dir, Path::new(DISPATCHER), &config.text)
    });
    let mut world = World::new(&container, config);

    let scenarios: &[(&str, Scenario)] = &[
        ("units: verify, security, generator output", units),
        (
            "a: socket activation and sticky routing",
            a_socket_activation,
        ),
        ("b: systemctl restart app@3 under load", b_restart_worker),
        ("m: systemctl reload app@2 under load", m_reload_worker),
        ("c: systemctl kill -s KILL app@2 under load", c_kill_worker),
        (
            "d: systemctl restart sticky-dispatch under load",
            d_restart_dispatcher,
        ),
        ("e: systemctl reload sticky-dispatch", e_reload),
        (
            "j: systemctl kill -s KILL sticky-dispatch under load, twice",
            j_kill_dispatcher,
        ),
        ("k: systemctl daemon-reload under load", k_daemon_reload),
        ("f: a broken config", f_broken_config),
        ("g: workers 4 -> 5", g_more_workers),
        (
            "i: a second app beside it, sticky-dispatch@chat",
            i_second_app,
        ),
        (
            "l: a socket restart while a stale lane is held",
            l_stale_lane,
        ),
        ("h: systemctl stop sticky-dispatch.socket", h_stop),
    ];
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        figure!("--- {name}");
        match run_scenario(|| scenario(&mut world)) {
            Ok(took) => figure!("ok: {name} ({took:.1?})"),
            Err(message) => {
                figure!("FAILED: {name}: {message}");
                failed.push(format!("{name}: {message}"));
            }
        }
    }
    drop(world);
    drop(container);
    assert!(
        failed.is_empty(),
        "{} scenario(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// A step of the suite; it panics when something is wrong.
type Scenario = fn(&mut World);

/// Shared by the scenarios: the container, the clients and where they should go.
struct World<'c> {
    c: &'c Container,
    config: Config,
    clients: Vec<Ipv4Addr>,
    /// The configured worker count, which says where each client should go.
    workers: u32,
}

impl<'c> World<'c> {
    fn new(c: &'c Container, config: Config) -> World<'c> {
        // 127.16.0.2 ... 127.16.1.101: distinct /32s, all on the container's loopback.
        let clients: Vec<Ipv4Addr> = (0..CLIENTS)
            .map(|i| Ipv4Addr::new(127, 16, (i / 100) as u8, (i % 100) as u8 + 2))
            .collect();
        World {
            c,
            config,
            clients,
            workers: WORKERS,
        }
    }

    /// The worker a client should reach with the shipped routing settings (ipv4_prefix
    /// 32, hash_seed 0).
    fn expected(&self, client: Ipv4Addr) -> u32 {
        expected_worker(client, self.workers)
    }

    fn clients_of(&self, worker: u32) -> Vec<Ipv4Addr> {
        self.clients
            .iter()
            .copied()
            .filter(|&ip| self.expected(ip) == worker)
            .collect()
    }

    /// Requests to the unit's IPv4 socket from inside the container's network namespace.
    fn plan(&self, clients: Vec<Ipv4Addr>) -> LoadPlan {
        let netns = self.c.netns();
        LoadPlan::new(SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)), &clients)
            .reply_timeout(REPLY_TIMEOUT)
            .max_time(LOAD_MAX_TIME)
            .setup(move || enter_netns(&netns))
    }

    /// Connections from `clients` until stopped.
    fn load(&self, clients: Vec<Ipv4Addr>) -> Load {
        self.plan(clients)
            .threads(LOAD_THREADS)
            .max_each(LOAD_MAX_CONNECTIONS / LOAD_THREADS)
            .start()
    }

    /// One connection from each of `clients`, all at once.
    fn load_once(&self, clients: Vec<Ipv4Addr>) -> Load {
        self.plan(clients).once().start()
    }

    /// The pids serving app@0 .. app@<n-1> (the launchers' children).
    fn worker_pids(&self, n: u32) -> Vec<u32> {
        (0..n).map(|i| self.c.serving_pid(&worker(i))).collect()
    }

    fn tally(&self, outcomes: &[Outcome]) -> Tally {
        Tally::of(outcomes, |ip| self.expected(ip))
    }

    /// One request from every client, in parallel; the figures and every reply.
    fn round(&self, label: &str) -> Vec<Outcome> {
        let outcomes = self.load_once(self.clients.clone()).join();
        figure!("{label}: {}", self.tally(&outcomes));
        outcomes
    }
}

/// Waits until `count` connections in all have been answered.
fn wait_answered(load: &Load, what: &str, count: usize) {
    load.wait_until(&format!("{what}: {count} connections answered"), |l| {
        l.answered() >= count
    });
}

/// Waits until worker `index` with `pid` has answered `count` connections.
fn wait_served_by(load: &Load, index: u32, pid: u32, count: usize) {
    load.wait_until(
        &format!("{count} connections answered by worker {index} pid {pid}"),
        |l| l.count(|o| served_by(o, index, pid)) >= count,
    );
}

fn served_by(outcome: &Outcome, worker: u32, pid: u32) -> bool {
    outcome
        .answer
        .as_ref()
        .is_ok_and(|a| a.worker == worker && a.pid as u32 == pid)
}

fn count_pid(outcomes: &[Outcome], worker: u32, pid: u32) -> usize {
    outcomes
        .iter()
        .filter(|o| served_by(o, worker, pid))
        .count()
}

fn worker(index: u32) -> String {
    format!("app@{index}.service")
}

/// systemd-analyze verify and security inside the container, and what the generator
/// wrote at boot.
fn units(w: &mut World) {
    let c = w.c;
    let verify = c.run(&[
        "systemd-analyze",
        "verify",
        "sticky-dispatch.socket",
        "sticky-dispatch.service",
        "app@0.service",
    ]);
    let text = output_text(&verify);
    figure!(
        "systemd-analyze verify: exit {:?}, output: {:?}",
        verify.status.code(),
        text.trim()
    );
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sticky-dispatch") || l.contains("app@"))
        .collect();
    assert!(
        verify.status.success() && ours.is_empty(),
        "systemd-analyze verify complains: {text}"
    );

    for unit in ["sticky-dispatch.service", "app@0.service"] {
        let out = c.run(&["systemd-analyze", "security", "--no-pager", unit]);
        let text = output_text(&out);
        let exposure: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for").nth(1))
            .and_then(|rest| rest.split(':').nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"));
        let problems: Vec<&str> = text.lines().filter(|l| l.starts_with('✗')).collect();
        figure!(
            "systemd-analyze security {unit}: exposure {exposure} (open: {})",
            problems
                .iter()
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(exposure <= 2.0, "{unit}: exposure {exposure} > 2.0\n{text}");
    }

    let wants = c.generated_wants();
    figure!("generator: sticky-dispatch.service.wants = {wants:?}");
    let expected: BTreeSet<String> = (0..WORKERS).map(worker).collect();
    assert_eq!(wants, expected);

    // The lanes: each address of the shipped unit LANES times in a row, in unit order.
    let listen = socket_listens(c);
    let runs = runs_of(&listen);
    figure!("sticky-dispatch.socket Listen= (as systemd reads it): {runs:?}");
    let expected: Vec<(String, usize)> = ADDRESSES.iter().map(|a| (a.to_string(), LANES)).collect();
    assert_eq!(runs, expected, "the socket's lanes");
    assert_eq!(
        c.prop("sticky-dispatch.socket", "ReusePort"),
        "yes",
        "ReusePort= of the socket"
    );
}

/// The socket unit's `Listen=` addresses, in unit order (`systemctl show` writes one
/// `Listen=ADDRESS (Stream)` line per socket).
fn socket_listens(c: &Container) -> Vec<String> {
    c.ok(&[
        "systemctl",
        "show",
        "-p",
        "Listen",
        "sticky-dispatch.socket",
    ])
    .lines()
    .flat_map(|l| l.strip_prefix("Listen=").unwrap_or("").split(" (Stream)"))
    .map(str::trim)
    .filter(|a| !a.is_empty())
    .map(str::to_owned)
    .collect()
}

/// Consecutive equal addresses counted: `[(address, how many in a row)]`.
fn runs_of(listen: &[String]) -> Vec<(String, usize)> {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for address in listen {
        match runs.last_mut() {
            Some((last, n)) if last == address => *n += 1,
            _ => runs.push((address.clone(), 1)),
        }
    }
    runs
}

/// The dispatcher's "listening: kernel path" lines after `cursor`: (address, lanes).
fn kernel_path_lines(c: &Container, cursor: Option<&str>) -> Vec<(String, String)> {
    let mut args = vec!["-u", "sticky-dispatch.service"];
    if let Some(cursor) = cursor {
        args.extend(["--after-cursor", cursor]);
    }
    c.journal(&args)
        .iter()
        .filter(|e| message(e).starts_with("listening: kernel path"))
        .map(|e| {
            (
                structured(e, "ADDRESS").unwrap_or("?").to_owned(),
                structured(e, "LANES").unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

/// a. The first connection starts the dispatcher and the 4 workers; every client is
/// always served by the same app@N, and the reply's pid is that unit's worker (its
/// MainPID's child: app@.service runs the worker under `sticky-dispatch worker-launcher`).
fn a_socket_activation(w: &mut World) {
    let c = w.c;
    c.ok(&["systemctl", "start", "sticky-dispatch.socket"]);
    assert_eq!(c.active_state("sticky-dispatch.service"), "inactive");
    assert_eq!(c.active_state(&worker(0)), "inactive");

    let first = w.load_once(vec![w.clients[0]]).join();
    let reply = first[0]
        .answer
        .as_ref()
        .unwrap_or_else(|err| panic!("the first connection failed: {err}"));
    figure!(
        "first connection (it activated the socket): worker {} pid {} for {}",
        reply.worker,
        reply.pid,
        reply.client
    );
    assert_eq!(
        reply.worker,
        w.expected(w.clients[0]),
        "the activating connection is not on the worker its hash gives"
    );
    // A worker answered, so the dispatcher runs; systemd may still be taking READY=1 in.
    poll("the dispatcher and the workers active", || {
        let units =
            std::iter::once("sticky-dispatch.service".to_owned()).chain((0..WORKERS).map(worker));
        units
            .map(|unit| c.active_state(&unit))
            .all(|state| state == "active")
            .then_some(())
    });
    let pids = w.worker_pids(WORKERS);
    figure!("workers' serving pids: {pids:?}");
    assert_eq!(
        reply.pid as u32, pids[reply.worker as usize],
        "the activating connection was not answered by the worker of app@{}",
        reply.worker
    );
    let lines = poll("\"listening: kernel path\" for both addresses", || {
        let lines = kernel_path_lines(c, None);
        (lines.len() >= ADDRESSES.len()).then_some(lines)
    });
    figure!("journal: listening: kernel path (address, lanes): {lines:?}");
    for (address, lanes) in &lines {
        assert_eq!(lanes, &LANES.to_string(), "lanes of {address}");
    }

    let mut seen: HashMap<Ipv4Addr, (u32, i32)> = HashMap::new();
    for round in 1..=3 {
        let outcomes = w.round(&format!("round {round} over {CLIENTS} clients"));
        for outcome in &outcomes {
            let reply = outcome
                .answer
                .as_ref()
                .unwrap_or_else(|err| panic!("client {}: {err}", outcome.client));
            let client = outcome.client;
            assert_eq!(reply.client, client.to_string());
            assert_eq!(reply.listener, "http", "FileDescriptorName= of the socket");
            assert_eq!(reply.local, format!("127.0.0.1:{PORT}"));
            assert_eq!(
                reply.worker,
                w.expected(outcome.client),
                "client {client} is not on the worker its hash gives"
            );
            assert_eq!(
                reply.pid as u32, pids[reply.worker as usize],
                "client {client}: pid {} is not the worker of app@{}",
                reply.pid, reply.worker
            );
            if let Some(before) = seen.insert(outcome.client, (reply.worker, reply.pid)) {
                assert_eq!(before, (reply.worker, reply.pid), "client {client} moved");
            }
        }
    }
    let mut per_worker = BTreeMap::new();
    for (worker, _) in seen.values() {
        *per_worker.entry(*worker).or_insert(0) += 1;
    }
    figure!("clients per worker: {per_worker:?}");
    assert_eq!(
        per_worker.len(),
        WORKERS as usize,
        "every worker has clients"
    );

    // The IPv6 socket of the unit.
    let v6 = request_v6(c);
    figure!("IPv6: {v6:?}");
    let v6 = v6.expect("a request to [::1]:8080");
    assert_eq!(v6.client, "::1");
    assert_eq!(v6.local, format!("[::1]:{PORT}"));

    let status_line = poll("STATUS= with 4/4 live workers", || {
        let text = c.prop("sticky-dispatch.service", "StatusText");
        text.contains("4/4").then_some(text)
    });
    figure!("STATUS: {status_line}");
    let shown = c.ok(&[
        "systemctl",
        "status",
        "--no-pager",
        "sticky-dispatch.service",
    ]);
    assert!(
        shown.contains("Status: \""),
        "no Status: line in systemctl status:\n{shown}"
    );
}

/// b. `systemctl restart app@3` under load: nothing lost, nobody misrouted, and the
/// journal shows worker 3 leaving and coming back with the structured field INDEX=3.
fn b_restart_worker(w: &mut World) {
    let c = w.c;
    let old = c.serving_pid(&worker(3));
    let cursor = c.journal_cursor();
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    c.ok(&["systemctl", "restart", &worker(3)]);
    let new = c.serving_pid(&worker(3));
    assert_ne!(old, new, "app@3 was not restarted");
    wait_served_by(&load, 3, new, 20);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    figure!(
        "restart app@3 (pid {old} -> {new}): {figures}; worker 3 served by old pid {}, new pid {}",
        count_pid(&outcomes, 3, old),
        count_pid(&outcomes, 3, new)
    );
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");

    // Worker 3 leaving (drain, link down) then back (link up), in the dispatcher's log.
    let entries = poll("worker 3 leaving and coming back in the journal", || {
        let entries = c.journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor]);
        let about_3: Vec<&Entry> = entries
            .iter()
            .filter(|e| index_field(e).is_some_and(|(_, v)| v == "3"))
            .collect();
        let left = about_3.iter().position(|e| {
            let m = message(e);
            m.contains("drain") || m.contains("down")
        })?;
        about_3[left..]
            .iter()
            .any(|e| message(e).contains("up"))
            .then(|| about_3.iter().map(|e| (*e).clone()).collect::<Vec<_>>())
    });
    for e in &entries {
        let (key, value) = index_field(e).unwrap();
        let reason = structured(e, "REASON").map(|r| format!(", reason: {r}"));
        figure!(
            "journal -u sticky-dispatch: {} ({key}={value}{})",
            message(e),
            reason.unwrap_or_default()
        );
    }
    let worker_side: Vec<String> = c
        .journal(&["-u", &worker(3), "--after-cursor", &cursor])
        .iter()
        .map(|e| message(e).to_owned())
        .collect();
    figure!("journal -u app@3: {worker_side:?}");
    let names: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| index_field(e))
        .map(|(k, _)| k)
        .collect();
    assert!(
        names.contains("INDEX"),
        "the worker index is logged as {names:?}, not INDEX=3: tracing-journald prefixes fields \
         with F_ unless the layer is built with .with_field_prefix(None)"
    );
}

/// m. `systemctl reload app@2` under load (ExecReload=, `sticky-dispatch reload-worker
/// %i`, the launcher under the unit's sandbox): the command succeeds, MainPID (the
/// launcher) stays, a new process serves worker 2, nothing is lost or misrouted, and
/// worker 2's new connections wait milliseconds (longest and p50 printed).
fn m_reload_worker(w: &mut World) {
    let c = w.c;
    let unit = worker(2);
    let main = c.main_pid(&unit);
    let old = c.serving_pid(&unit);
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    let asked = Instant::now();
    c.ok(&["systemctl", "reload", &unit]);
    let reloaded = asked.elapsed();
    let new = c.serving_pid(&unit);
    assert_ne!(old, new, "app@2 runs the same process after the reload");
    assert_eq!(c.main_pid(&unit), main, "the launcher (MainPID) stays");
    assert_eq!(c.active_state(&unit), "active");
    wait_served_by(&load, 2, new, 20);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let mut waits: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.started >= asked && w.expected(o.client) == 2)
        .map(|o| o.waited)
        .collect();
    waits.sort();
    let ms = |wait: Option<&Duration>| wait.map_or(0.0, |w| w.as_secs_f64() * 1000.0);
    let status = c.prop(&unit, "StatusText");
    figure!(
        "systemctl reload app@2 ({reloaded:.2?}; MainPID {main}, worker pid {old} -> {new}): \
         {figures}; worker 2's {} new connections since: longest wait {:.1} ms, p50 {:.1} ms; \
         old pid answered {}, new pid {}; STATUS {status:?}",
        waits.len(),
        ms(waits.last()),
        ms(waits.get(waits.len() / 2)),
        count_pid(&outcomes, 2, old),
        count_pid(&outcomes, 2, new)
    );
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
    assert!(
        status.contains(&format!("pid {new}")),
        "STATUS= names the new pid: {status:?}"
    );
    assert!(
        waits.last().is_some_and(|w| *w < Duration::from_secs(1)),
        "worker 2's longest wait: {:?}",
        waits.last()
    );
}

/// c. `systemctl kill -s KILL app@2` under load: systemd restarts it, what it had not
/// acknowledged is re-sent; only its own clients can see a failure, nobody is misrouted.
fn c_kill_worker(w: &mut World) {
    let c = w.c;
    let old = c.serving_pid(&worker(2));
    let restarts_before: u32 = c.prop(&worker(2), "NRestarts").parse().unwrap();
    let cursor = c.journal_cursor();
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    c.ok(&["systemctl", "kill", "-s", "KILL", &worker(2)]);
    let new = poll("app@2 restarted by systemd", || {
        let pid = c.serving_pid(&worker(2));
        (pid != 0 && pid != old && c.active_state(&worker(2)) == "active").then_some(pid)
    });
    wait_served_by(&load, 2, new, 20);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let restarts: u32 = c.prop(&worker(2), "NRestarts").parse().unwrap();
    let resent: u64 = c
        .journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
        .iter()
        .filter(|e| index_field(e).is_some_and(|(_, v)| v == "2"))
        .filter_map(|e| structured(e, "RESEND"))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    figure!(
        "kill -9 app@2 (pid {old} -> {new}, NRestarts {restarts_before} -> {restarts}): {figures}; \
         unacknowledged connections re-sent: {resent}"
    );
    assert!(restarts > restarts_before, "systemd did not restart app@2");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
    let others_failed = outcomes
        .iter()
        .filter(|o| o.answer.is_err() && w.expected(o.client) != 2)
        .count();
    assert_eq!(
        others_failed, 0,
        "clients of other workers lost connections: {figures}"
    );
}

/// d. `systemctl restart sticky-dispatch` under load: the socket stays with systemd,
/// the workers are not touched, and connections waiting for a stopped worker survive
/// the restart through the fd store.
fn d_restart_dispatcher(w: &mut World) {
    let c = w.c;
    // d1: every worker up.
    let workers = w.worker_pids(WORKERS);
    let old = c.main_pid("sticky-dispatch.service");
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    let before = load.answered();
    c.ok(&["systemctl", "restart", "sticky-dispatch.service"]);
    let new = c.main_pid("sticky-dispatch.service");
    wait_answered(&load, "load after the restart", before + 300);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    figure!("restart sticky-dispatch (pid {old} -> {new}), all workers up: {figures}");
    assert_ne!(old, new, "the dispatcher was not restarted");
    assert_eq!(w.worker_pids(WORKERS), workers, "a worker was restarted");
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");

    // d2: app@1 down, WAITING of its clients wait in the dispatcher; the dispatcher
    // restarts (they go to the fd store and come back), then app@1 serves them. Masked,
    // because the restart would otherwise start it again (the dispatcher wants it).
    c.ok(&["systemctl", "mask", "--runtime", &worker(1)]);
    c.ok(&["systemctl", "stop", &worker(1)]);
    let cursor = c.journal_cursor();
    let others: Vec<Ipv4Addr> = w
        .clients
        .iter()
        .copied()
        .filter(|&ip| w.expected(ip) != 1)
        .collect();
    let load = w.load(others);
    let waiting: Vec<Ipv4Addr> = w.clients_of(1).into_iter().take(WAITING).collect();
    assert_eq!(waiting.len(), WAITING, "not enough clients of worker 1");
    let waiters = w.load_once(waiting);
    let old = c.main_pid("sticky-dispatch.service");
    // On the kernel path they wait in app@1's lanes' queues (in the kernel), which
    // outlive the dispatcher; they are taken over only after pending_timeout (30 s).
    let queued = poll("clients waiting in app@1's lanes", || {
        let queued = lane_queues(c);
        (queued >= WAITING as u64).then_some(queued)
    });
    wait_answered(&load, "load running", 300);
    let before = load.answered();
    c.ok(&["systemctl", "restart", "sticky-dispatch.service"]);
    let new = c.main_pid("sticky-dispatch.service");
    let status = c.prop("sticky-dispatch.service", "StatusText");
    figure!(
        "after the restart (pid {old} -> {new}): {} queued on the lanes; STATUS {status:?}",
        lane_queues(c)
    );
    assert!(queued >= WAITING as u64);
    wait_answered(&load, "load after the restart", before + 300);
    c.ok(&["systemctl", "unmask", "--runtime", &worker(1)]);
    c.ok(&["systemctl", "start", &worker(1)]);
    let served = waiters.join();
    let app1 = c.serving_pid(&worker(1));
    let waiting_figures = w.tally(&served);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let stored: Vec<String> = c
        .journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
        .iter()
        .map(message)
        .filter(|m| m.contains("fd store"))
        .map(str::to_owned)
        .collect();
    figure!(
        "restart sticky-dispatch with app@1 down: {WAITING} waiting clients: {waiting_figures}; \
         other clients: {figures}; journal: {stored:?}"
    );
    assert_eq!(
        waiting_figures.failed, 0,
        "waiting connections lost across the restart: {waiting_figures}"
    );
    assert_eq!(waiting_figures.misrouted, 0, "{waiting_figures}");
    assert!(
        served
            .iter()
            .all(|o| o.answer.as_ref().unwrap().pid as u32 == app1),
        "the waiting clients were not served by the restarted app@1"
    );
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
}

/// e. `systemctl reload sticky-dispatch` with a new pending_timeout: same process, the
/// journal shows the new value, no connection dropped, and the new timeout applies.
fn e_reload(w: &mut World) {
    let c = w.c;
    let pid = c.main_pid("sticky-dispatch.service");
    let cursor = c.journal_cursor();
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    let before = load.answered();
    w.config.set("pending_timeout", "\"7s\"");
    c.write_file(CONFIG_PATH, &w.config.text);
    c.ok(&["systemctl", "reload", "sticky-dispatch.service"]);
    poll("the dispatcher active again after the reload", || {
        (c.prop("sticky-dispatch.service", "SubState") == "running").then_some(())
    });
    wait_answered(&load, "load after the reload", before + 300);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let after = c.main_pid("sticky-dispatch.service");
    figure!("reload (pid {pid} -> {after}): {figures}");
    assert_eq!(pid, after, "the dispatcher restarted instead of reloading");
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
    let (line, key) = poll("the new pending_timeout in the journal", || {
        c.journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
            .into_iter()
            .filter(|e| field(e, "_PID") == Some(pid.to_string().as_str()))
            .filter(|e| message(e).contains("reload"))
            .find_map(|e| {
                let key = e.iter().find(|(_, v)| *v == "7s")?.0.clone();
                Some((message(&e).to_owned(), key))
            })
    });
    figure!("journal: {line:?} with {key}=7s");

    // The timeout applies: a client of a stopped worker is let go after 7 s, not 30 s.
    c.ok(&["systemctl", "stop", &worker(0)]);
    let started = Instant::now();
    let probe = w.load_once(vec![w.clients_of(0)[0]]).join();
    let waited = started.elapsed();
    c.ok(&["systemctl", "start", &worker(0)]);
    figure!(
        "client of stopped app@0 after the reload: {:?} after {waited:.1?}",
        probe[0].answer
    );
    assert!(
        probe[0].answer.is_err(),
        "served although app@0 was stopped"
    );
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(20),
        "pending_timeout 7s did not apply: the client waited {waited:?}"
    );

    w.config.set("pending_timeout", "\"30s\"");
    c.write_file(CONFIG_PATH, &w.config.text);
    c.ok(&["systemctl", "reload", "sticky-dispatch.service"]);
}

/// f. A broken config: the dispatcher fails with 78 and a journal line naming the key,
/// without a restart loop; the generator writes nothing and says why.
fn f_broken_config(w: &mut World) {
    let c = w.c;
    let cursor = c.journal_cursor();
    let mut broken = w.config.clone();
    broken.set("pending_timeout", "\"soon\"");
    c.write_file(CONFIG_PATH, &broken.text);
    let restart = c.run(&["systemctl", "restart", "sticky-dispatch.service"]);
    assert!(!restart.status.success(), "started with a broken config");
    poll("the dispatcher failed", || {
        (c.active_state("sticky-dispatch.service") == "failed").then_some(())
    });
    let status = c.prop("sticky-dispatch.service", "ExecMainStatus");
    let result = c.prop("sticky-dispatch.service", "Result");
    let sub = c.prop("sticky-dispatch.service", "SubState");
    let restarts = c.prop("sticky-dispatch.service", "NRestarts");
    let line = poll("a journal line naming the key", || {
        c.journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
            .iter()
            .map(message)
            .find(|m| m.contains("pending_timeout"))
            .map(str::to_owned)
    });
    figure!("broken config: ExecMainStatus={status} Result={result} SubState={sub} NRestarts={restarts}; journal: {line:?}");
    assert_eq!(status, "78");
    assert_eq!(result, "exit-code");
    // "failed", not "auto-restart": systemd will not try again.
    assert_eq!(sub, "failed");
    assert_eq!(restarts, "0");

    // The generator: nothing generated, the key named in the journal.
    c.ok(&["systemctl", "daemon-reload"]);
    let wants = c.generated_wants();
    let line = poll("the generator's complaint in the journal", || {
        c.journal(&["--after-cursor", &cursor])
            .iter()
            .filter(|e| field(e, "SYSLOG_IDENTIFIER") == Some("sticky-dispatch-generator"))
            .map(message)
            .find(|m| m.contains("pending_timeout"))
            .map(str::to_owned)
    });
    figure!("generator with the broken config: wants {wants:?}; journal: {line:?}");
    assert!(wants.is_empty(), "the generator wrote {wants:?}");
    assert_eq!(
        c.active_state(&worker(0)),
        "active",
        "a daemon-reload stopped the workers"
    );

    // Back to the good config.
    c.write_file(CONFIG_PATH, &w.config.text);
    c.ok(&["systemctl", "daemon-reload"]);
    let listening = c
        .ok(&["ss", "-Hltn", &format!("sport = :{PORT}")])
        .lines()
        .count();
    figure!(
        "after fixing the config: Listen= {:?}, {listening} sockets listening on :{PORT}",
        runs_of(&socket_listens(c))
    );
    // The reload with the broken config took the lanes out of the running socket (systemd
    // closed all but one socket per address): restart it, as the dispatcher's log says,
    // once the workers (and the old lanes they hold) are gone.
    c.ok(&["systemctl", "stop", "sticky-dispatch.socket"]);
    poll("the workers stopped with the socket", || {
        (0..w.workers)
            .all(|i| c.active_state(&worker(i)) == "inactive")
            .then_some(())
    });
    c.ok(&["systemctl", "start", "sticky-dispatch.socket"]);
    c.ok(&["systemctl", "start", "sticky-dispatch.service"]);
    let outcomes = w.round("after fixing the config");
    let figures = w.tally(&outcomes);
    assert_eq!((figures.failed, figures.misrouted), (0, 0), "{figures}");
}

/// g. workers 4 -> 5: the generator adds app@4, which starts with the dispatcher; about
/// 1/5 of the clients move, all of them to worker 4, the rest stay.
fn g_more_workers(w: &mut World) {
    let c = w.c;
    let before: HashMap<Ipv4Addr, u32> = w
        .round("before: 4 workers")
        .into_iter()
        .filter_map(|o| Some((o.client, o.answer.ok()?.worker)))
        .collect();
    w.config.set("workers", "5");
    c.write_file(CONFIG_PATH, &w.config.text);
    c.ok(&["systemctl", "daemon-reload"]);
    let wants = c.generated_wants();
    assert!(wants.contains(&worker(4)), "generator wrote {wants:?}");
    c.ok(&["systemctl", "restart", "sticky-dispatch.service"]);
    assert_eq!(
        c.active_state(&worker(4)),
        "active",
        "app@4 was not started"
    );
    w.workers = 5;
    let pids = w.worker_pids(5);
    let after = w.round("after: 5 workers");
    let mut moved = 0;
    let mut moved_elsewhere = 0;
    for o in &after {
        let reply = o.answer.as_ref().expect("served");
        assert_eq!(reply.pid as u32, pids[reply.worker as usize]);
        if before.get(&o.client) != Some(&reply.worker) {
            moved += 1;
            if reply.worker != 4 {
                moved_elsewhere += 1;
            }
        }
    }
    let bound = CLIENTS as f64 * (1.0 / 5.0 + 0.05);
    figure!(
        "workers 4 -> 5: {moved} of {CLIENTS} clients moved ({:.1}%, bound {bound:.0}), {moved_elsewhere} to a worker other than 4",
        100.0 * moved as f64 / CLIENTS as f64
    );
    let figures = w.tally(&after);
    assert_eq!((figures.failed, figures.misrouted), (0, 0), "{figures}");
    assert!(moved > 0, "no client moved to app@4");
    assert!(moved as f64 <= bound, "{moved} clients moved");
    assert_eq!(moved_elsewhere, 0);
}

/// Connections queued in the accept queues of the sockets listening on [`PORT`] inside
/// the container (`ss`: Recv-Q of a listening socket): on the kernel path, those waiting
/// for a worker that is down.
fn lane_queues(c: &Container) -> u64 {
    c.ok(&["ss", "-Hltn", &format!("sport = :{PORT}")])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// j. `systemctl kill -s KILL sticky-dispatch` under load, twice: systemd restarts it
/// (Restart=on-failure), the workers keep accepting on their lanes meanwhile, the new
/// dispatcher takes the lanes over; no connection is lost, nobody is misrouted.
fn j_kill_dispatcher(w: &mut World) {
    let c = w.c;
    let workers = w.worker_pids(w.workers);
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    for round in 1..=2 {
        // Two restarts more must not reach the unit's start rate limit.
        c.run(&["systemctl", "reset-failed", "sticky-dispatch.service"]);
        let old = c.main_pid("sticky-dispatch.service");
        let cursor = c.journal_cursor();
        let before = load.answered();
        c.ok(&["systemctl", "kill", "-s", "KILL", "sticky-dispatch.service"]);
        let new = poll("the dispatcher restarted by systemd", || {
            let pid = c.main_pid("sticky-dispatch.service");
            let up = pid != 0
                && pid != old
                && c.prop("sticky-dispatch.service", "SubState") == "running";
            up.then_some(pid)
        });
        let lines = poll("the new dispatcher on the kernel path", || {
            let lines = kernel_path_lines(c, Some(&cursor));
            (lines.len() >= ADDRESSES.len()).then_some(lines)
        });
        wait_answered(&load, "load after the kill", before + 300);
        figure!(
            "kill -9 sticky-dispatch #{round}: pid {old} -> {new}, {} answered meanwhile; {lines:?}",
            load.answered() - before
        );
    }
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let restarts = c.prop("sticky-dispatch.service", "NRestarts");
    figure!("kill -9 sticky-dispatch twice (NRestarts={restarts}): {figures}");
    assert_eq!(w.worker_pids(w.workers), workers, "a worker was restarted");
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
}

/// k. `systemctl daemon-reload` under load (the generator runs again and rewrites the
/// socket's lanes drop-in, the same): the socket keeps its lanes, the dispatcher runs on,
/// nothing is lost or misrouted.
fn k_daemon_reload(w: &mut World) {
    let c = w.c;
    let pid = c.main_pid("sticky-dispatch.service");
    let listen = socket_listens(c);
    let load = w.load(w.clients.clone());
    wait_answered(&load, "load running", 300);
    let before = load.answered();
    c.ok(&["systemctl", "daemon-reload"]);
    wait_answered(&load, "load after the daemon-reload", before + 300);
    let outcomes = load.stop();
    let figures = w.tally(&outcomes);
    let after = c.main_pid("sticky-dispatch.service");
    figure!("daemon-reload (dispatcher pid {pid} -> {after}): {figures}");
    assert_eq!(pid, after, "the dispatcher restarted");
    assert_eq!(socket_listens(c), listen, "the socket's lanes changed");
    assert_eq!(figures.failed, 0, "connections lost: {figures}");
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
    let round = w.round("a round after the daemon-reload");
    let figures = w.tally(&round);
    assert_eq!((figures.failed, figures.misrouted), (0, 0), "{figures}");
}

/// l. A stale lane: a process (this test, with a copy of one of the dispatcher's
/// 0.0.0.0:8080 lanes) still holds a socket of the old group when the socket unit
/// restarts. The new dispatcher sees the stranger with sock_diag, says so in the journal
/// and puts that listener on its own path; nobody is misrouted (what the stale socket
/// takes, it closes: those are the only failures). Once it is gone and the socket
/// restarts again, nothing is lost or misrouted.
fn l_stale_lane(w: &mut World) {
    let c = w.c;
    let pid = c.main_pid("sticky-dispatch.service");
    let host = c.host_pid(pid).expect("the dispatcher's pid on the host");
    let stale = steal_listener(host, SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)));
    let stolen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let (stolen, stop) = (stolen.clone(), stop.clone());
        stale.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match stale.accept() {
                    Ok(_) => {
                        stolen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let cursor = c.journal_cursor();
    c.ok(&["systemctl", "restart", "sticky-dispatch.socket"]);
    let outcomes = w.round("socket restarted beside a stale lane");
    let figures = w.tally(&outcomes);
    // journald may write the dispatcher's start lines after the round's answers.
    let warning = container::poll_within(common::PATIENCE, || {
        c.journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
            .iter()
            .filter(|e| message(e).starts_with("dispatcher path for this listener"))
            .filter_map(|e| structured(e, "WHY"))
            .find(|why| why.contains("other socket(s) listen on"))
            .map(str::to_owned)
    });
    let kernel = kernel_path_lines(c, Some(&cursor));
    let taken = stolen.load(std::sync::atomic::Ordering::Relaxed);
    figure!(
        "stale lane: {figures}; taken by the stale socket: {taken}; kernel path: {kernel:?}; \
         journal: {warning:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().unwrap();
    assert!(
        warning.is_some(),
        "no \"other socket(s) listen on\" warning"
    );
    assert!(
        !kernel.iter().any(|(address, _)| address == "0.0.0.0:8080"),
        "0.0.0.0:8080 stayed on the kernel path beside a stale lane"
    );
    assert_eq!(figures.misrouted, 0, "clients misrouted: {figures}");
    assert_eq!(
        figures.failed, taken,
        "failures other than the stale socket's: {figures}"
    );

    // The stale socket is gone (the holder's thread closed it): after a socket restart
    // nothing is lost or misrouted.
    let cursor = c.journal_cursor();
    c.ok(&["systemctl", "restart", "sticky-dispatch.socket"]);
    let outcomes = w.round("socket restarted without the stale lane");
    let figures = w.tally(&outcomes);
    // Not asserted: the workers of the old socket may still hold their lanes when the new
    // one binds (they are stopping), which makes the new group suspect too.
    let why: Vec<String> = c
        .journal(&["-u", "sticky-dispatch.service", "--after-cursor", &cursor])
        .iter()
        .filter_map(|e| structured(e, "WHY"))
        .map(str::to_owned)
        .collect();
    let kernel = kernel_path_lines(c, Some(&cursor));
    figure!(
        "after the stale lane is gone: {figures}; kernel path: {kernel:?}; dispatcher path \
         because: {why:?}"
    );
    assert_eq!((figures.failed, figures.misrouted), (0, 0), "{figures}");
}

/// A copy (pidfd_getfd) of a listening socket bound to `local` from process `pid`.
fn steal_listener(pid: i32, local: SocketAddr) -> std::net::TcpListener {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the dispatcher's fds");
    for entry in fds.flatten() {
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd takes a pidfd, a target fd and flags; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let socket = socket2::Socket::from(fd);
        let listening = socket.is_listener().unwrap_or(false);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
        if listening && bound == Some(local) {
            return socket.into();
        }
    }
    panic!("no listening socket on {local} among pid {pid}'s fds");
}

/// The chat app's port and worker count in [`i_second_app`].
const CHAT_PORT: u16 = 8081;
const CHAT_WORKERS: u32 = 2;

/// i. A second app on the same host, as docs/operations.md sets it up: its own config
/// (/etc/sticky-dispatch/chat.toml: `worker_unit = "chat@.service"`, no socket_prefix),
/// its socket in a drop-in of sticky-dispatch@chat.socket. Its clients reach only chat@N
/// and the main app's only app@N, while both serve; the generator named chat's link
/// sockets after the instance.
fn i_second_app(w: &mut World) {
    let c = w.c;
    let app_unit = std::fs::read_to_string(Path::new(SOURCE).join("systemd/app@.service")).unwrap();
    c.write_file(
        "/etc/sticky-dispatch/chat.toml",
        &format!("workers = {CHAT_WORKERS}\nworker_unit = \"chat@.service\"\n"),
    );
    c.write_file("/etc/systemd/system/chat@.service", &app_unit);
    c.ok(&[
        "mkdir",
        "-p",
        "/etc/systemd/system/sticky-dispatch@chat.socket.d",
    ]);
    c.write_file(
        "/etc/systemd/system/sticky-dispatch@chat.socket.d/listen.conf",
        &format!("[Socket]\nListenStream=127.0.0.1:{CHAT_PORT}\n"),
    );
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", "sticky-dispatch@chat.socket"]);

    let netns = c.netns();
    let chat = LoadPlan::new(
        SocketAddr::from((Ipv4Addr::LOCALHOST, CHAT_PORT)),
        &w.clients,
    )
    .reply_timeout(REPLY_TIMEOUT)
    .max_time(LOAD_MAX_TIME)
    .setup(move || enter_netns(&netns))
    .once()
    .start()
    .join();
    let main = w.round("the main app meanwhile");
    let chat_pids: Vec<u32> = (0..CHAT_WORKERS)
        .map(|i| c.serving_pid(&format!("chat@{i}.service")))
        .collect();
    let app_pids = w.worker_pids(w.workers);
    figure!("chat@N serving pids {chat_pids:?}, app@N serving pids {app_pids:?}");
    if chat.iter().any(|o| o.answer.is_err()) {
        let log: Vec<String> = c
            .journal(&["-u", "sticky-dispatch@chat.service", "-u", "chat@0.service"])
            .iter()
            .map(|e| message(e).to_owned())
            .collect();
        figure!("chat clients failed; journal of sticky-dispatch@chat and chat@0: {log:?}");
    }
    let mut chat_per_worker = BTreeMap::new();
    for outcome in &chat {
        let reply = outcome
            .answer
            .as_ref()
            .unwrap_or_else(|err| panic!("chat client {}: {err}", outcome.client));
        assert_eq!(
            reply.listener, "chat",
            "FileDescriptorName=%i of the instance socket"
        );
        assert_eq!(reply.worker, expected_worker(outcome.client, CHAT_WORKERS));
        assert_eq!(
            reply.pid as u32, chat_pids[reply.worker as usize],
            "chat client {} was answered by pid {}, not chat@{}",
            outcome.client, reply.pid, reply.worker
        );
        *chat_per_worker.entry(reply.worker).or_insert(0) += 1;
    }
    for outcome in &main {
        let reply = outcome.answer.as_ref().expect("the main app answers");
        assert_eq!(reply.pid as u32, app_pids[reply.worker as usize]);
    }
    figure!(
        "chat: {} clients answered by chat@N {chat_per_worker:?}; main app: {}",
        chat.len(),
        w.tally(&main)
    );
    let entries = c.journal(&["-u", "sticky-dispatch@chat.service"]);
    let named: BTreeSet<&str> = entries
        .iter()
        .filter(|e| message(e) == "worker link up")
        .filter_map(|e| structured(e, "SOCKET"))
        .collect();
    figure!("sticky-dispatch@chat linked to {named:?}");
    let expected: Vec<String> = (0..CHAT_WORKERS)
        .map(|i| format!("@sticky-dispatch/chat/{i}"))
        .collect();
    assert_eq!(named, expected.iter().map(String::as_str).collect());
    c.ok(&["systemctl", "stop", "sticky-dispatch@chat.socket"]);
    assert_eq!(c.active_state("chat@0.service"), "inactive");
    assert_eq!(
        c.active_state(&worker(0)),
        "active",
        "the main app is untouched"
    );
}

/// h. Stopping the socket takes the whole service down: dispatcher and workers.
fn h_stop(w: &mut World) {
    let c = w.c;
    let workers = w.workers;
    c.ok(&["systemctl", "stop", "sticky-dispatch.socket"]);
    let mut states = vec![(
        "sticky-dispatch.service".to_owned(),
        c.active_state("sticky-dispatch.service"),
    )];
    for i in 0..workers {
        states.push((worker(i), c.active_state(&worker(i))));
    }
    figure!("after stopping the socket: {states:?}");
    for (unit, state) in states {
        assert_eq!(state, "inactive", "{unit}");
    }
}

// ---------------------------------------------------------------------------------------
// Requests

/// A request from ::1 to the unit's IPv6 socket, from inside the container.
fn request_v6(c: &Container) -> Result<Answer, String> {
    let netns = c.netns();
    std::thread::spawn(move || {
        enter_netns(&netns);
        request_within(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), PORT),
            REPLY_TIMEOUT,
        )
    })
    .join()
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// The container

const CONFIG_PATH: &str = "/etc/sticky-dispatch/config.toml";

/// The config installed in the container: the shipped, commented one, edited by key.
#[derive(Clone)]
struct Config {
    text: String,
}

impl Config {
    fn shipped_with_workers(workers: u32) -> Config {
        let text = std::fs::read_to_string(Path::new(SOURCE).join("config/config.toml"))
            .expect("config/config.toml");
        assert!(
            text.contains("\n# workers = "),
            "config/config.toml has no commented-out workers line"
        );
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("# workers = ") {
                    format!("workers = {workers}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        Config { text }
    }

    /// Replaces the line `key = ...`.
    fn set(&mut self, key: &str, value: &str) {
        let prefix = format!("{key} = ");
        assert!(
            self.text.lines().any(|l| l.starts_with(&prefix)),
            "no {key} in the config"
        );
        self.text = self
            .text
            .lines()
            .map(|l| {
                if l.starts_with(&prefix) {
                    format!("{prefix}{value}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
    }
}

// ---------------------------------------------------------------------------------------
// Journal

/// The worker index field of a dispatcher log entry: `INDEX`, or tracing-journald's
/// default-prefixed `F_INDEX` (so that the test can say which one it found).
fn index_field(entry: &Entry) -> Option<(&'static str, &str)> {
    field(entry, "INDEX")
        .map(|v| ("INDEX", v))
        .or_else(|| field(entry, "F_INDEX").map(|v| ("F_INDEX", v)))
}

/// A structured field by its name, or with tracing-journald's default `F_` prefix.
fn structured<'e>(entry: &'e Entry, name: &str) -> Option<&'e str> {
    field(entry, name).or_else(|| field(entry, &format!("F_{name}")))
}

/// sticky-dispatch@.service is sticky-dispatch.service for another config: the two keep
/// the same sandbox, line for line.
#[test]
fn the_instance_template_has_the_main_units_sandbox() {
    let sandbox = |unit: &str| {
        let text = std::fs::read_to_string(Path::new(SOURCE).join("systemd").join(unit)).unwrap();
        let from = text
            .find("# --- Who it runs as ---")
            .expect("a sandbox section");
        let to = text.find("\n[Install]").expect("an [Install] section");
        text[from..to].to_owned()
    };
    assert_eq!(
        sandbox("sticky-dispatch@.service"),
        sandbox("sticky-dispatch.service")
    );
}

#[test]
fn export_format_parses() {
    let mut bytes = b"__CURSOR=s=1\nMESSAGE=hello\nINDEX=3\n\n".to_vec();
    bytes.extend_from_slice(b"MESSAGE\n");
    bytes.extend_from_slice(&5u64.to_le_bytes());
    bytes.extend_from_slice(b"a\nb c\nPRIORITY=6\n\n");
    let entries = parse_export(&bytes);
    assert_eq!(entries.len(), 2);
    assert_eq!(field(&entries[0], "INDEX"), Some("3"));
    assert_eq!(message(&entries[1]), "a\nb c");
    assert_eq!(field(&entries[1], "PRIORITY"), Some("6"));
}
