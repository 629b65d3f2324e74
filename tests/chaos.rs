//! What a crash of the dispatcher costs, and what it does not (issue #15): the fd store
//! under a real booted systemd (tests/container), with keys from PROXY and
//! X-Forwarded-For headers; a second SIGTERM during a graceful stop; clients still
//! sending their key when the dispatcher is killed; a chaos soak of every fault in a
//! random (seeded) order under continuous load from 200 client addresses, with every
//! kind of worker (the Rust demo, Node behind `node-worker`, Python on aiohttp and
//! uvicorn: [`Kind`]); and, for comparison, the standalone dispatcher killed under load.
//!
//! Figures are printed with the `[chaos]` prefix: `cargo test --test chaos --
//! --include-ignored --nocapture`. The booted-systemd test needs root, like
//! tests/systemd.rs; `STICKY_DISPATCH_CHAOS_ONLY=p,s` runs only some of its scenarios
//! (`s`, `sn`, `sp`: the soak with Rust, Node, Python workers; `sk`: Rust workers on the
//! kernel's path), `STICKY_DISPATCH_CHAOS_SEED` replays a soak, `STICKY_DISPATCH_CHAOS_SECS`
//! sets the length of each (120 s for `s`, 60 s for the others by default), `STICKY_DISPATCH_CHAOS_DISPATCHER=PATH`
//! installs another dispatcher binary.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "chaos/client.rs"]
mod client;
mod common;
mod container;
#[path = "python/support.rs"]
mod python_support;
#[path = "node/support.rs"]
mod support;

use client::{Client, Mode, Plan, Record};
use common::{expected_worker, status_figure};
use container::{
    ensure_nspawn, enter_netns, field, message, poll, run_scenario, stage_file, stage_product,
    stage_text, stage_tree, Container, Entry, PATIENCE,
};

const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");
const SOURCE: &str = env!("CARGO_MANIFEST_DIR");

const PORT: u16 = 8080;
const WORKERS: u32 = 4;
const SERVICE: &str = "sticky-dispatch.service";
const CONFIG_PATH: &str = "/etc/sticky-dispatch/config.toml";
/// A reply slower than this is a lost connection: above the longest planned worker stop
/// and restart, below pending_timeout + the soak's bounds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(45);
/// Clients kept waiting for a down worker through a fault.
const WAITING: usize = 16;

macro_rules! figure {
    ($($arg:tt)*) => { eprintln!("[chaos] {}", format_args!($($arg)*)) };
}

// ---------------------------------------------------------------------------------------
// Clients

/// The 200 client addresses named in PROXY/X-Forwarded-For headers: 198.51.100.1-100 and
/// 203.0.113.1-100 (documentation ranges), each connecting from its own 127.20.x.y.
fn clients() -> Vec<Client> {
    (0..200u32)
        .map(|i| Client {
            key: if i < 100 {
                Ipv4Addr::new(198, 51, 100, i as u8 + 1)
            } else {
                Ipv4Addr::new(203, 0, 113, (i - 100) as u8 + 1)
            },
            source: Ipv4Addr::new(127, 20, (i / 100) as u8, (i % 100) as u8 + 2),
        })
        .collect()
}

fn expected(ip: Ipv4Addr) -> u32 {
    worker_of(ip, WORKERS)
}

fn worker_of(ip: Ipv4Addr, workers: u32) -> u32 {
    expected_worker(ip, workers)
}

/// `clients` grouped by their worker, `per_worker` threads' worth each.
fn groups(clients: &[Client], per_worker: usize) -> Vec<Vec<Client>> {
    let mut groups = vec![Vec::new(); WORKERS as usize * per_worker];
    let mut next = vec![0usize; WORKERS as usize];
    for client in clients {
        let w = expected(client.key) as usize;
        groups[w * per_worker + next[w] % per_worker].push(*client);
        next[w] += 1;
    }
    groups
}

/// Misrouted: answered by another worker than the key's, or the worker did not see the
/// real client (PROXY mode).
fn misrouted(mode: Mode, record: &Record) -> bool {
    misrouted_of(mode, record, WORKERS)
}

fn misrouted_of(mode: Mode, record: &Record, workers: u32) -> bool {
    match &record.answer {
        Ok(answer) => {
            answer.worker != worker_of(record.client.key, workers)
                || (mode == Mode::Proxy && answer.client != record.client.key.to_string())
        }
        Err(_) => false,
    }
}

/// "N connections: A answered, F failed, M misrouted (errors)".
fn tally(mode: Mode, records: &[Record]) -> String {
    tally_of(mode, records, WORKERS)
}

fn tally_of(mode: Mode, records: &[Record], workers: u32) -> String {
    let ok = records.iter().filter(|r| r.answer.is_ok()).count();
    let bad = records
        .iter()
        .filter(|r| misrouted_of(mode, r, workers))
        .count();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        if let Err(e) = &r.answer {
            *errors.entry(e.as_str()).or_default() += 1;
        }
    }
    format!(
        "{} connections: {ok} answered, {} failed, {bad} misrouted{}",
        records.len(),
        records.len() - ok,
        if errors.is_empty() {
            String::new()
        } else {
            format!(" ({errors:?})")
        }
    )
}

// ---------------------------------------------------------------------------------------
// The booted systemd

#[test]
#[ignore = "needs root: mounts an overlay and boots systemd with systemd-nspawn"]
fn chaos_under_a_booted_systemd() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (mounts an overlay and boots systemd with systemd-nspawn)"
    );
    ensure_nspawn();
    let config = shipped_config(&[
        ("# workers = 4", "workers = 4".to_owned()),
        (
            "routing_key = \"peer-ip\"",
            "routing_key = \"proxy-protocol\"".to_owned(),
        ),
    ]);
    let container = Container::boot("chaos", |dir| {
        stage(dir, &config);
        stage_node_and_python_workers(dir);
    });
    let w = World {
        c: &container,
        config,
        kind: Kind::Rust,
        mode: Mode::Proxy,
    };
    w.c.ok(&["systemctl", "start", "sticky-dispatch.socket", SERVICE]);
    w.restore();

    let scenarios: &[(&str, &str, Scenario)] = &[
        (
            "p",
            "p: systemctl kill -s KILL sticky-dispatch with PROXY-keyed clients waiting",
            |w| p_killed_with_keyed_clients_waiting(w, Mode::Proxy, true),
        ),
        (
            "q",
            "q: the same as p with systemctl restart sticky-dispatch",
            |w| p_killed_with_keyed_clients_waiting(w, Mode::Proxy, false),
        ),
        (
            "t",
            "t: a second SIGTERM during a graceful stop",
            t_second_sigterm,
        ),
        (
            "k",
            "k: SIGKILL while clients are sending their PROXY header",
            k_killed_while_reading_keys,
        ),
        ("s", "s: chaos soak", s_soak),
        ("sn", "sn: chaos soak with Node workers", |w| {
            s_soak(&w.with_kind(Kind::Node))
        }),
        ("sp", "sp: chaos soak with Python workers", |w| {
            s_soak(&w.with_kind(Kind::Python))
        }),
        (
            "sk",
            "sk: chaos soak on the kernel's path (routing_key peer-ip, each worker on its lanes)",
            |w| s_soak(&w.by_peer_ip()),
        ),
        (
            "r",
            "r: systemd-run, a transient socket and service",
            r_systemd_run,
        ),
        (
            "x",
            "x: the same as p, keyed by X-Forwarded-For",
            x_forwarded_for,
        ),
    ];
    let only = std::env::var("STICKY_DISPATCH_CHAOS_ONLY").ok();
    let mut failed = Vec::new();
    let all = Instant::now();
    for (id, name, scenario) in scenarios {
        if only
            .as_deref()
            .is_some_and(|only| !only.split(',').any(|o| o == *id))
        {
            continue;
        }
        figure!("--- {name}");
        match run_scenario(|| scenario(&w)) {
            Ok(took) => figure!("ok: {name} ({took:.1?})"),
            Err(text) => {
                figure!("FAILED: {name}: {text}");
                failed.push(format!("{name}: {text}"));
            }
        }
        w.restore();
    }
    figure!("all scenarios: {:.1?}", all.elapsed());
    drop(container);
    assert!(
        failed.is_empty(),
        "{} scenario(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

type Scenario = fn(&World);

struct World<'c> {
    c: &'c Container,
    config: String,
    kind: Kind,
    /// How its clients name themselves: PROXY headers (the dispatcher's path) or their
    /// source address (`routing_key = "peer-ip"`: the kernel's path, each worker on its lanes).
    mode: Mode,
}

/// What the workers are: the unit template the generator starts (`worker_unit`) and the
/// application in it, staged by [`stage`]. Every kind answers like the demo worker
/// (tests/common's `Answer`), with the client named in the PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// app@.service as shipped: sticky-dispatch-demo.
    Rust,
    /// node-app@.service as shipped (the bridge, `sticky-dispatch node-worker`), running
    /// the socket.io chat tests/node/apps/chat.js with the npm package in node/.
    Node,
    /// python-app@.service, a copy of app@.service whose drop-ins run the venv's Python
    /// with python/'s package: the aiohttp chat on workers 0 and 1, the ASGI chat on
    /// uvicorn on workers 2 and 3 (tests/python/).
    Python,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Rust, Kind::Node, Kind::Python];

    /// The unit template's name, without `@.service`.
    fn name(self) -> &'static str {
        match self {
            Kind::Rust => "app",
            Kind::Node => "node-app",
            Kind::Python => "python-app",
        }
    }

    fn template(self) -> String {
        format!("{}@.service", self.name())
    }

    fn unit(self, index: u32) -> String {
        format!("{}@{index}.service", self.name())
    }

    /// Seconds of faults in its soak unless STICKY_DISPATCH_CHAOS_SECS says: the Rust
    /// run is the long one; the other kinds' stay within CI's time.
    fn soak_secs(self) -> u64 {
        match self {
            Kind::Rust => 120,
            Kind::Node | Kind::Python => 60,
        }
    }
}

impl<'c> World<'c> {
    fn plan(&self, mode: Mode) -> Plan {
        let netns = self.c.netns();
        Plan {
            mode,
            to: SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)),
            reply_timeout: REPLY_TIMEOUT,
            max_time: Duration::from_secs(400),
            max_each: 200_000,
            setup: Some(Arc::new(move || enter_netns(&netns))),
        }
    }

    fn status(&self) -> String {
        self.c.prop(SERVICE, "StatusText")
    }

    /// Polls STATUS= until `check` accepts it.
    fn poll_status(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let last = self.status();
            if check(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; STATUS: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `unit` runs as a process other than `old`; its MainPID.
    fn restarted(&self, unit: &str, old: u32) -> u32 {
        poll(&format!("{unit} running again (was pid {old})"), || {
            let pid = self.c.main_pid(unit);
            (pid != 0 && pid != old && self.c.active_state(unit) == "active").then_some(pid)
        })
    }

    /// Masks and stops app@`index`, so that a restart of the dispatcher (which wants it)
    /// does not start it again.
    fn take_down(&self, index: u32) {
        self.c.ok(&[
            "systemctl",
            "mask",
            "--runtime",
            "--quiet",
            &self.worker(index),
        ]);
        self.c.ok(&["systemctl", "stop", &self.worker(index)]);
    }

    fn bring_up(&self, index: u32) {
        self.c.ok(&[
            "systemctl",
            "unmask",
            "--runtime",
            "--quiet",
            &self.worker(index),
        ]);
        self.c.ok(&["systemctl", "start", &self.worker(index)]);
    }

    /// The unit of worker `index`, of this world's kind.
    fn worker(&self, index: u32) -> String {
        self.kind.unit(index)
    }

    /// This world with workers of `kind` (its config's `worker_unit`), switched to: see
    /// [`World::restore`].
    fn with_kind(&self, kind: Kind) -> World<'c> {
        let switching = Instant::now();
        let from = format!("worker_unit = \"{}\"", self.kind.template());
        assert!(self.config.contains(&from), "no {from:?} in the config");
        let w = World {
            c: self.c,
            config: self
                .config
                .replace(&from, &format!("worker_unit = \"{}\"", kind.template())),
            kind,
            mode: self.mode,
        };
        w.restore();
        figure!(
            "{kind:?} workers ({}) live after {:.1?}",
            kind.template(),
            switching.elapsed()
        );
        for i in 0..WORKERS {
            // ExecStart's `{ path=... ; argv[]=... ; ... }`: the command line.
            let exec = w.c.prop(&w.worker(i), "ExecStart");
            let argv = exec
                .split(" ; ")
                .find_map(|part| part.strip_prefix("argv[]="))
                .unwrap_or(&exec);
            figure!("  {}: {argv}", w.worker(i));
        }
        w
    }

    /// Seconds of faults in its soak unless STICKY_DISPATCH_CHAOS_SECS says: the PROXY run
    /// with Rust workers is the long one; the others stay within CI's time.
    fn soak_secs(&self) -> u64 {
        match self.mode {
            Mode::Peer => 60,
            Mode::Proxy | Mode::Xff => self.kind.soak_secs(),
        }
    }

    /// This world routed by the clients' source addresses (`routing_key = "peer-ip"`): the
    /// generator writes the socket's lanes, and the dispatcher leaves the connections'
    /// path to the kernel. Switched to: see [`World::restore`].
    fn by_peer_ip(&self) -> World<'c> {
        let from = "routing_key = \"proxy-protocol\"";
        assert!(self.config.contains(from), "no {from:?} in the config");
        let w = World {
            c: self.c,
            config: self.config.replace(from, "routing_key = \"peer-ip\""),
            kind: self.kind,
            mode: Mode::Peer,
        };
        w.restore();
        let path =
            w.c.ok(&["journalctl", "-u", SERVICE, "-n", "200", "-o", "cat"]);
        let line = path
            .lines()
            .rev()
            .find(|line| line.starts_with("listening"))
            .unwrap_or("no `listening` line");
        figure!("routing_key peer-ip: {line}");
        assert!(line.contains("kernel path"), "{line}");
        w
    }

    /// The clients of this world's mode.
    fn clients(&self) -> Vec<Client> {
        match self.mode {
            Mode::Peer => clients()
                .into_iter()
                .map(|c| Client {
                    key: c.source,
                    source: c.source,
                })
                .collect(),
            Mode::Proxy | Mode::Xff => clients(),
        }
    }

    /// Back to every unit running: after a scenario, whether it passed or not. Switches
    /// the kind of worker when the config in the container names another `worker_unit`:
    /// the generator makes the dispatcher want this kind's units (daemon-reload), the
    /// other kinds' units stop (they would bind the same @sticky-dispatch/N), and the
    /// dispatcher restarts to start this kind's. A switch of the routing key changes the
    /// socket's lanes (the generator writes them for `peer-ip` only): the socket unit
    /// restarts too, with no worker holding an old lane.
    fn restore(&self) {
        let c = self.c;
        let all: Vec<String> = Kind::ALL
            .iter()
            .flat_map(|k| (0..WORKERS).map(|i| k.unit(i)))
            .collect();
        let others: Vec<String> = Kind::ALL
            .iter()
            .filter(|k| **k != self.kind)
            .flat_map(|k| (0..WORKERS).map(|i| k.unit(i)))
            .collect();
        let mut unmask = vec!["systemctl", "unmask", "--runtime", "--quiet"];
        unmask.extend(all.iter().map(String::as_str));
        c.run(&unmask);
        for i in 0..WORKERS {
            c.run(&["systemctl", "kill", "-s", "CONT", &self.worker(i)]);
        }
        c.run(&["systemctl", "reset-failed"]);
        let switch = c.ok(&["cat", CONFIG_PATH]) != self.config;
        let lanes_change =
            switch && routing_key(&c.ok(&["cat", CONFIG_PATH])) != routing_key(&self.config);
        c.write_file(CONFIG_PATH, &self.config);
        if lanes_change {
            c.ok(&["systemctl", "daemon-reload"]);
            let mut stop = vec!["systemctl", "stop", SERVICE];
            stop.extend(all.iter().map(String::as_str));
            c.ok(&stop);
            c.ok(&["systemctl", "restart", "sticky-dispatch.socket"]);
            c.ok(&["systemctl", "start", SERVICE]);
        } else if switch {
            c.ok(&["systemctl", "daemon-reload"]);
            let mut stop = vec!["systemctl", "stop"];
            stop.extend(others.iter().map(String::as_str));
            c.ok(&stop);
            c.ok(&["systemctl", "restart", SERVICE]);
        } else if c.active_state(SERVICE) != "active" {
            c.ok(&["systemctl", "restart", SERVICE]);
        }
        for i in 0..WORKERS {
            c.ok(&["systemctl", "start", &self.worker(i)]);
        }
        self.poll_status("every worker live", |s| s.contains("4/4 workers live"));
    }

    fn journal_since(&self, cursor: &str) -> Vec<Entry> {
        self.c.journal(&["-u", SERVICE, "--after-cursor", cursor])
    }
}

/// The `routing_key = ...` line of a config.
fn routing_key(config: &str) -> Option<&str> {
    config
        .lines()
        .find(|line| line.trim_start().starts_with("routing_key"))
}

/// The number before `label` in STATUS=, 0 if absent.
fn figure_of(status: &str, label: &str) -> u64 {
    status_figure(status, label).unwrap_or(0)
}

/// p. routing_key = "proxy-protocol" (or x-forwarded-for): app@1 down, WAITING of its
/// clients (by the address in their header) waiting; the dispatcher is killed with
/// SIGKILL and restarted by systemd (Restart=on-failure); app@1 comes back. Every waiting
/// client is served by worker 1, which sees the client named in the header.
///
/// Each waiting client connects from a 127.x address that the peer-IP route sends to
/// another worker than 1: routed by the peer address after the restart (the bug of
/// #15), every one of them would be answered by the wrong worker, and with the
/// connection's own address as `client=`.
fn p_killed_with_keyed_clients_waiting(w: &World, mode: Mode, kill: bool) {
    let c = w.c;
    w.take_down(1);
    let cursor = c.journal_cursor();
    let mut sources = (0..=255u8)
        .flat_map(|b| (2..=250u8).map(move |d| Ipv4Addr::new(127, 30, b, d)))
        .filter(|ip| expected(*ip) != 1);
    let waiting: Vec<Client> = clients()
        .into_iter()
        .filter(|cl| expected(cl.key) == 1)
        .take(WAITING)
        .map(|cl| Client {
            key: cl.key,
            source: sources.next().unwrap(),
        })
        .collect();
    assert_eq!(waiting.len(), WAITING);
    let by_peer: BTreeMap<u32, usize> = waiting.iter().fold(BTreeMap::new(), |mut m, cl| {
        *m.entry(expected(cl.source)).or_default() += 1;
        m
    });
    figure!(
        "{WAITING} clients of worker 1 by their header; routed by their peer address they \
         would go to workers {by_peer:?} (none to 1)"
    );
    let plan = w.plan(mode);
    let others: Vec<Client> = clients()
        .into_iter()
        .filter(|cl| expected(cl.key) != 1)
        .collect();
    let load = plan.start(groups(&others, 1));
    let waiters = plan.once(&waiting, None);
    w.poll_status("the clients waiting for app@1", |s| {
        figure_of(s, "waiting") >= WAITING as u64
    });
    load.wait_answered(200, PATIENCE);
    let old = c.main_pid(SERVICE);
    let restarts: u32 = c.prop(SERVICE, "NRestarts").parse().unwrap();
    let killed = Instant::now();
    if kill {
        c.ok(&["systemctl", "kill", "-s", "KILL", SERVICE]);
    } else {
        c.ok(&["systemctl", "restart", SERVICE]);
    }
    let new = w.restarted(SERVICE, old);
    let back = killed.elapsed();
    // Not asserted here: the verdict is the clients' answers below.
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        let status = w.status();
        if figure_of(&status, "waiting") >= WAITING as u64 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    figure!(
        "{} pid {old} -> {new} after {back:.1?} (NRestarts {restarts} -> {}); STATUS {status:?}",
        if kill {
            "SIGKILL, restarted by systemd:"
        } else {
            "systemctl restart:"
        },
        c.prop(SERVICE, "NRestarts")
    );
    load.wait_answered(200, PATIENCE);
    w.bring_up(1);
    let app1 = c.serving_pid(&w.worker(1));
    let served = waiters.join();
    let rest = load.stop();
    let took_back: Vec<String> = w
        .journal_since(&cursor)
        .iter()
        .filter(|e| message(e).contains("took back"))
        .map(|e| {
            format!(
                "{} (count={}, by_peer={})",
                message(e),
                structured(e, "COUNT").unwrap_or("?"),
                structured(e, "BY_PEER").unwrap_or("?")
            )
        })
        .collect();
    figure!(
        "{mode:?}: waiting clients: {}; other clients through the kill: {}; journal: {took_back:?}",
        tally(mode, &served),
        tally(mode, &rest)
    );
    let seen = |r: &Record| {
        if mode == Mode::Proxy {
            r.client.key
        } else {
            r.client.source
        }
    };
    let right = served
        .iter()
        .filter(|r| {
            r.answer.as_ref().is_ok_and(|a| {
                a.worker == 1 && a.pid as u32 == app1 && a.client == seen(r).to_string()
            })
        })
        .count();
    let answers: Vec<String> = served
        .iter()
        .map(|r| match &r.answer {
            Ok(a) => format!(
                "{} -> worker {} client={}",
                r.client.key, a.worker, a.client
            ),
            Err(e) => format!("{} -> {e}", r.client.key),
        })
        .collect();
    assert_eq!(
        right, WAITING,
        "waiting clients not served by app@1 (pid {app1}) seeing the real client: {answers:?}"
    );
    assert_eq!(
        rest.iter().filter(|r| misrouted(mode, r)).count(),
        0,
        "misrouted"
    );
}

/// x. p with routing_key = "x-forwarded-for" (trusted_hops 1): the key comes from an HTTP
/// header the worker reads itself, so `client=` is the connection's peer.
fn x_forwarded_for(w: &World) {
    let config = w.config.replace(
        "routing_key = \"proxy-protocol\"",
        "routing_key = \"x-forwarded-for\"",
    );
    w.c.write_file(CONFIG_PATH, &config);
    w.c.ok(&["systemctl", "restart", SERVICE]);
    p_killed_with_keyed_clients_waiting(w, Mode::Xff, true);
}

/// t. A second SIGTERM while a graceful stop waits: app@2 frozen (SIGSTOP) with clients
/// in flight, so the stop of `systemctl restart` waits for their acknowledgements
/// (shutdown_timeout, 60 s); app@1 down with WAITING clients waiting. A second SIGTERM
/// ends the stop at once; the waiting clients stay in the fd store and the next instance
/// serves them when app@1 is back.
fn t_second_sigterm(w: &World) {
    let c = w.c;
    w.take_down(1);
    let plan = w.plan(Mode::Proxy);
    let all = clients();
    let waiting: Vec<Client> = all
        .iter()
        .copied()
        .filter(|cl| expected(cl.key) == 1)
        .take(WAITING)
        .collect();
    let frozen_clients: Vec<Client> = all
        .iter()
        .copied()
        .filter(|cl| expected(cl.key) == 2)
        .take(8)
        .collect();
    let waiters = plan.once(&waiting, None);
    w.poll_status("clients waiting for app@1", |s| {
        figure_of(s, "waiting") >= WAITING as u64
    });
    c.ok(&["systemctl", "kill", "-s", "STOP", &w.worker(2)]);
    let frozen = plan.once(&frozen_clients, None);
    w.poll_status("clients in flight to the frozen app@2", |s| {
        figure_of(s, "in flight") >= frozen_clients.len() as u64
    });
    let old = c.main_pid(SERVICE);
    let cursor = c.journal_cursor();
    let first = Instant::now();
    c.ok(&["systemctl", "restart", "--no-block", SERVICE]);
    w.poll_status("the graceful stop under way", |s| s.contains("stopping"));
    // The graceful stop holds (app@2 never acknowledges): still there after a second.
    std::thread::sleep(Duration::from_secs(1));
    let stuck = first.elapsed();
    assert_eq!(c.main_pid(SERVICE), old, "the dispatcher exited already");
    let second = Instant::now();
    c.ok(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "-s",
        "TERM",
        SERVICE,
    ]);
    let new = w.restarted(SERVICE, old);
    let gone = second.elapsed();
    let entries = w.journal_since(&cursor);
    let of_old: Vec<&Entry> = entries
        .iter()
        .filter(|e| field(e, "_PID") == Some(old.to_string().as_str()))
        .collect();
    let at = |text: &str| -> Option<u64> {
        of_old
            .iter()
            .find(|e| message(e).contains(text))
            .and_then(|e| field(e, "__MONOTONIC_TIMESTAMP")?.parse().ok())
    };
    let signalled = at("second stop signal").expect("no 'second stop signal' in the journal");
    let stopped = at("dispatcher stopped").expect("no 'dispatcher stopped' in the journal");
    let kept = of_old
        .iter()
        .find(|e| message(e).contains("kept in the systemd fd store"))
        .map(|e| structured(e, "STORED").unwrap_or("?").to_owned());
    figure!(
        "second SIGTERM {stuck:.1?} into the graceful stop: old pid {old} logged 'second stop \
         signal' and exited {:.1} ms later (journal); new pid {new} running {gone:.1?} after \
         the signal; stored at exit: {kept:?}",
        (stopped - signalled) as f64 / 1000.0
    );
    assert!(
        gone < Duration::from_secs(10),
        "the second SIGTERM did not stop it at once ({gone:?})"
    );
    let status = w.poll_status("the waiting clients taken back", |s| {
        figure_of(s, "waiting") >= WAITING as u64
    });
    figure!("after the restart: STATUS {status:?}");
    c.ok(&["systemctl", "kill", "-s", "CONT", &w.worker(2)]);
    w.bring_up(1);
    let served = waiters.join();
    let frozen = frozen.join();
    figure!(
        "waiting clients (app@1 down): {}; clients in flight to the frozen app@2 (closed by \
         the dispatcher; app@2, resumed, finds it gone and serves them): {}",
        tally(Mode::Proxy, &served),
        tally(Mode::Proxy, &frozen)
    );
    let app1 = c.serving_pid(&w.worker(1));
    for r in &served {
        let answer = r
            .answer
            .as_ref()
            .unwrap_or_else(|e| panic!("waiting client {} lost: {e}", r.client.key));
        assert_eq!((answer.worker, answer.pid as u32), (1, app1));
        assert_eq!(answer.client, r.client.key.to_string());
    }
}

/// The accept queue length of the listening socket on PORT (IPv4).
fn backlog(c: &Container) -> u64 {
    let out = c.ok(&["ss", "-Hltn", "sport", "=", ":8080"]);
    out.lines()
        .filter(|l| l.contains("0.0.0.0:8080"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// k. Clients still sending their PROXY header (split in two writes, 3 s apart) when the
/// dispatcher is killed: accepted, not yet routed, not in the fd store (storing every
/// keyed connection would cost two messages to PID 1 on the fast path). Counted, with the
/// fast clients in flight at the same instant.
fn k_killed_while_reading_keys(w: &World) {
    const SLOW: usize = 40;
    let c = w.c;
    let plan = w.plan(Mode::Proxy);
    let all = clients();
    let load = plan.start(groups(&all[SLOW..], 2));
    load.wait_answered(200, PATIENCE);
    let slow = plan.once(&all[..SLOW], Some(Duration::from_secs(3)));
    poll("slow clients sent the first part of their header", || {
        (slow.paused() == SLOW).then_some(())
    });
    poll("the dispatcher accepted them (empty accept queue)", || {
        (backlog(c) == 0).then_some(())
    });
    let old = c.main_pid(SERVICE);
    let from = Instant::now();
    c.ok(&["systemctl", "kill", "-s", "KILL", SERVICE]);
    let to = Instant::now();
    w.restarted(SERVICE, old);
    load.wait_answered(200, PATIENCE);
    let slow = slow.join();
    let fast = load.stop();
    let straddling: Vec<&Record> = fast
        .iter()
        .filter(|r| r.started <= to && r.ended >= from)
        .collect();
    let fast_lost = straddling.iter().filter(|r| r.answer.is_err()).count();
    let slow_lost = slow.iter().filter(|r| r.answer.is_err()).count();
    figure!(
        "SIGKILL with {SLOW} clients reading their key: {slow_lost} of {SLOW} lost ({}); fast \
         clients open at the kill: {} of {} lost; all fast clients: {}",
        tally(Mode::Proxy, &slow),
        fast_lost,
        straddling.len(),
        tally(Mode::Proxy, &fast)
    );
    assert_eq!(
        slow.iter()
            .chain(fast.iter())
            .filter(|r| misrouted(Mode::Proxy, r))
            .count(),
        0,
        "misrouted"
    );
    // Fast clients open at the kill: at most one per load thread.
    assert!(fast_lost <= 8, "{fast_lost} fast clients lost");
}

// ---------------------------------------------------------------------------------------
// The soak

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    KillDispatcher,
    RestartDispatcher,
    ReloadDispatcher,
    KillWorker(u32),
    RestartWorker(u32),
    /// `systemctl reload`, or `systemctl restart` where the unit has no ExecReload=.
    ReloadWorker(u32),
    StopWorker(u32, Duration),
}

#[derive(Debug)]
struct Event {
    fault: Fault,
    from: Instant,
    to: Instant,
    note: String,
}

/// How a failed connection is explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Loss {
    /// Open when its worker was killed with SIGKILL: acknowledged and being served.
    WorkerKilled,
    /// Open when the dispatcher was killed, its worker up: between accept and the
    /// worker's acknowledgement (reading its key, queued for its slot, or sent and not
    /// acknowledged: see `unacknowledged_connections_survive_a_dispatcher_sigkill`).
    DispatcherKilled,
    /// Started while its worker was stopped: it waited (or was unacknowledged), and such
    /// connections must survive everything.
    Waiting,
    /// None of the above.
    Unexplained,
}

fn explain(record: &Record, events: &[Event]) -> Loss {
    let w = expected(record.client.key);
    let open_at = |e: &Event| record.started <= e.to && record.ended >= e.from;
    let waited = events.iter().any(|e| {
        matches!(e.fault, Fault::StopWorker(i, _) if i == w)
            && record.started >= e.from
            && record.started <= e.to
    });
    if events
        .iter()
        .any(|e| e.fault == Fault::KillWorker(w) && open_at(e))
    {
        Loss::WorkerKilled
    } else if waited {
        Loss::Waiting
    } else if events
        .iter()
        .any(|e| e.fault == Fault::KillDispatcher && open_at(e))
    {
        Loss::DispatcherKilled
    } else {
        Loss::Unexplained
    }
}

/// s. Continuous load from 200 client addresses (PROXY headers; 4 threads per worker)
/// while, in a random order from a printed seed, the dispatcher is killed (SIGKILL),
/// restarted and reloaded, and workers are killed (SIGKILL), restarted, reloaded, and
/// stopped for 2-8 s (below pending_timeout, 30 s). Every connection is counted. The
/// workers are of the world's kind (sn and sp: Node and Python); sk routes by the
/// clients' source addresses (`peer-ip`), on the kernel's path, where a dispatcher SIGKILL
/// loses nothing.
fn s_soak(w: &World) {
    use rand::{Rng, SeedableRng};
    let c = w.c;
    let seed: u64 = std::env::var("STICKY_DISPATCH_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let secs: u64 = std::env::var("STICKY_DISPATCH_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(w.soak_secs())
        .min(600);
    let kind = w.kind;
    figure!(
        "soak with {kind:?} workers ({}): seed {seed} (STICKY_DISPATCH_CHAOS_SEED={seed} \
         replays it), {secs} s of faults",
        kind.template()
    );
    // A worker reload is the unit's ExecReload= where it has one.
    let reloads = c.prop(&w.worker(0), "CanReload") == "yes";
    let reload_is = if reloads {
        "systemctl reload (ExecReload=)"
    } else {
        "systemctl restart (the unit has no ExecReload=)"
    };
    figure!("worker reload: {reload_is}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut plan = w.plan(w.mode);
    plan.max_time = Duration::from_secs(secs + 120);
    let load = plan.start(groups(&w.clients(), 4));
    load.wait_answered(200, PATIENCE);

    let began = Instant::now();
    let end = began + Duration::from_secs(secs);
    let mut events: Vec<Event> = Vec::new();
    // Worker index -> (stopped since, until).
    let mut stopped: BTreeMap<u32, (Instant, Instant)> = BTreeMap::new();
    // Starts per unit, to stay clear of systemd's start limit (5 in 10 s).
    let mut starts: HashMap<String, Vec<Instant>> = HashMap::new();
    let may_start = |starts: &HashMap<String, Vec<Instant>>, unit: &str| {
        starts.get(unit).map_or(0, |s| {
            s.iter()
                .filter(|t| t.elapsed() < Duration::from_secs(10))
                .count()
        }) < 3
    };
    let started = |starts: &mut HashMap<String, Vec<Instant>>, unit: &str| {
        starts
            .entry(unit.to_owned())
            .or_default()
            .push(Instant::now());
    };
    let end_stops = |stopped: &mut BTreeMap<u32, (Instant, Instant)>,
                     events: &mut Vec<Event>,
                     starts: &mut HashMap<String, Vec<Instant>>,
                     all: bool| {
        let due: Vec<u32> = stopped
            .iter()
            .filter(|(_, (_, until))| all || *until <= Instant::now())
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            let (from, _) = stopped.remove(&i).unwrap();
            w.bring_up(i);
            started(starts, &w.worker(i));
            let to = Instant::now();
            events.push(Event {
                fault: Fault::StopWorker(i, to - from),
                from,
                to,
                note: format!("down {:.1?}", to - from),
            });
            figure!(
                "  {:>6.1?} {} back after {:.1?}",
                began.elapsed(),
                w.worker(i),
                to - from
            );
        }
    };

    while Instant::now() < end {
        end_stops(&mut stopped, &mut events, &mut starts, false);
        let up: Vec<u32> = (0..WORKERS)
            .filter(|i| !stopped.contains_key(i) && may_start(&starts, &w.worker(*i)))
            .collect();
        // A kind of fault first, each as likely, then the worker it hits.
        let mut kinds: Vec<u8> = vec![2];
        if may_start(&starts, SERVICE) {
            kinds.extend([0, 1]);
        }
        if !up.is_empty() {
            kinds.extend([3, 4, 6]);
            if stopped.len() < 2 {
                kinds.push(5);
            }
        }
        let kind = kinds[rng.random_range(0..kinds.len())];
        let target = if up.is_empty() {
            0
        } else {
            up[rng.random_range(0..up.len())]
        };
        let fault = match kind {
            0 => Fault::KillDispatcher,
            1 => Fault::RestartDispatcher,
            2 => Fault::ReloadDispatcher,
            3 => Fault::KillWorker(target),
            4 => Fault::RestartWorker(target),
            6 => Fault::ReloadWorker(target),
            _ => Fault::StopWorker(target, Duration::from_millis(rng.random_range(2000..8000))),
        };
        let from = Instant::now();
        let note = match fault {
            Fault::KillDispatcher => {
                let before = w.status();
                let old = c.main_pid(SERVICE);
                c.ok(&["systemctl", "kill", "-s", "KILL", SERVICE]);
                let to = Instant::now();
                let new = w.restarted(SERVICE, old);
                started(&mut starts, SERVICE);
                let note = format!("pid {old} -> {new}; STATUS before: {before:?}");
                events.push(Event {
                    fault,
                    from,
                    to,
                    note: note.clone(),
                });
                note
            }
            Fault::RestartDispatcher => {
                let old = c.main_pid(SERVICE);
                c.ok(&["systemctl", "restart", SERVICE]);
                started(&mut starts, SERVICE);
                format!("pid {old} -> {}", c.main_pid(SERVICE))
            }
            Fault::ReloadDispatcher => {
                c.ok(&["systemctl", "reload", SERVICE]);
                String::new()
            }
            Fault::KillWorker(i) => {
                let old = c.main_pid(&w.worker(i));
                c.ok(&["systemctl", "kill", "-s", "KILL", &w.worker(i)]);
                let to = Instant::now();
                let new = w.restarted(&w.worker(i), old);
                started(&mut starts, &w.worker(i));
                events.push(Event {
                    fault,
                    from,
                    to,
                    note: String::new(),
                });
                format!("pid {old} -> {new}")
            }
            Fault::RestartWorker(i) => {
                c.ok(&["systemctl", "restart", &w.worker(i)]);
                started(&mut starts, &w.worker(i));
                String::new()
            }
            Fault::ReloadWorker(i) => {
                let old = c.main_pid(&w.worker(i));
                if reloads {
                    c.ok(&["systemctl", "reload", &w.worker(i)]);
                } else {
                    c.ok(&["systemctl", "restart", &w.worker(i)]);
                    started(&mut starts, &w.worker(i));
                }
                format!("pid {old} -> {}", c.main_pid(&w.worker(i)))
            }
            Fault::StopWorker(i, d) => {
                w.take_down(i);
                stopped.insert(i, (from, from + d));
                format!("for {d:.1?}")
            }
        };
        // Kills are recorded with the instant of the signal; stops when they end.
        if !matches!(
            fault,
            Fault::KillDispatcher | Fault::KillWorker(_) | Fault::StopWorker(..)
        ) {
            events.push(Event {
                fault,
                from,
                to: Instant::now(),
                note: note.clone(),
            });
        }
        figure!("  {:>6.1?} {fault:?} {note}", from - began);
        // The load goes on between faults (clients of live workers are answered).
        load.wait_answered(20, PATIENCE * 2);
        // The pause before the next fault: the chaos schedule, cut short by a stop due.
        let next = Instant::now() + Duration::from_millis(rng.random_range(500..2500));
        let next = stopped
            .values()
            .map(|(_, until)| *until)
            .fold(next, Instant::min);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    end_stops(&mut stopped, &mut events, &mut starts, true);
    load.wait_answered(400, PATIENCE * 2);
    let records = load.stop();
    let elapsed = began.elapsed();

    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        let name = match e.fault {
            Fault::KillDispatcher => "dispatcher SIGKILL",
            Fault::RestartDispatcher => "dispatcher restart",
            Fault::ReloadDispatcher => "dispatcher reload",
            Fault::KillWorker(_) => "worker SIGKILL",
            Fault::RestartWorker(_) => "worker restart",
            Fault::ReloadWorker(_) => "worker reload",
            Fault::StopWorker(..) => "worker stopped 2-8 s",
        };
        *faults.entry(name).or_default() += 1;
    }
    let mut losses: BTreeMap<Loss, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for r in records.iter().filter(|r| r.answer.is_err()) {
        let loss = explain(r, &events);
        *losses.entry(loss).or_default() += 1;
        if loss >= Loss::Waiting {
            unexplained.push(format!(
                "{:?} {:?} at {:.3?}..{:.3?}: {:?}",
                loss,
                r.client,
                r.started.saturating_duration_since(began),
                r.ended.saturating_duration_since(began),
                r.answer
            ));
        }
    }
    let waited = records
        .iter()
        .filter(|r| {
            events.iter().any(|e| {
                matches!(e.fault, Fault::StopWorker(i, _) if i == expected(r.client.key))
                    && r.started >= e.from
                    && r.started <= e.to
            })
        })
        .count();
    let answered = records.iter().filter(|r| r.answer.is_ok()).count();
    let bad = records.iter().filter(|r| misrouted(w.mode, r)).count();
    let clients: std::collections::BTreeSet<Ipv4Addr> =
        records.iter().map(|r| r.client.key).collect();
    let n = |l: Loss| losses.get(&l).copied().unwrap_or(0);
    let count = |name: &str| faults.get(name).copied().unwrap_or(0);
    let key = match w.mode {
        Mode::Peer => "peer-ip (the kernel's path)",
        Mode::Proxy | Mode::Xff => "proxy-protocol",
    };
    figure!(
        "soak table ({kind:?} workers, seed {seed}, {elapsed:.0?}, 16 load threads, routing_key \
         {key}; worker reload = {reload_is}):"
    );
    figure!("| faults | {faults:?} |");
    figure!(
        "| connections | {} from {} clients |",
        records.len(),
        clients.len()
    );
    figure!("| answered | {answered} |");
    figure!("| misrouted | {bad} |");
    figure!(
        "| started while their worker was stopped (waited) | {waited}, lost {} |",
        n(Loss::Waiting)
    );
    figure!(
        "| lost: open at a worker SIGKILL (acknowledged, being served) | {} over {} kills |",
        n(Loss::WorkerKilled),
        count("worker SIGKILL")
    );
    figure!(
        "| lost: open at a dispatcher SIGKILL (accepted, not yet acknowledged by the worker) | {} over {} kills |",
        n(Loss::DispatcherKilled),
        count("dispatcher SIGKILL")
    );
    figure!("| lost: unexplained | {} |", n(Loss::Unexplained));
    for e in events.iter().filter(|e| e.fault == Fault::KillDispatcher) {
        let lost = records
            .iter()
            .filter(|r| r.answer.is_err() && explain(r, &events) == Loss::DispatcherKilled)
            .filter(|r| r.started <= e.to && r.ended >= e.from)
            .count();
        figure!(
            "  dispatcher SIGKILL at {:.1?}: {lost} lost; {}",
            e.from - began,
            e.note
        );
    }
    for line in unexplained.iter().take(20) {
        figure!("  {line}");
    }
    figure!(
        "soak {kind:?}: seed {seed}, {} connections, {answered} answered, {} lost ({} open at \
         a worker SIGKILL, {} open at a dispatcher SIGKILL, {} waited, {} unexplained), {bad} \
         misrouted",
        records.len(),
        records.len() - answered,
        n(Loss::WorkerKilled),
        n(Loss::DispatcherKilled),
        n(Loss::Waiting),
        n(Loss::Unexplained)
    );
    assert_eq!(bad, 0, "misrouted connections");
    assert_eq!(n(Loss::Waiting), 0, "waiting connections lost");
    assert_eq!(n(Loss::Unexplained), 0, "unexplained losses");
    if w.mode == Mode::Peer {
        // On the kernel's path no connection passes through the dispatcher: its SIGKILL
        // cannot lose one.
        assert_eq!(n(Loss::DispatcherKilled), 0, "lost at a dispatcher SIGKILL");
    }
    // At most one connection per load thread is open at an instant.
    assert!(n(Loss::DispatcherKilled) <= 16 * count("dispatcher SIGKILL"));
    assert!(n(Loss::WorkerKilled) <= 4 * count("worker SIGKILL"));
}

// ---------------------------------------------------------------------------------------
// systemd-run

/// A demo worker that stays down (exits 1, and the dispatcher starts it again after a
/// backoff) while /run/chaos-down-<index> exists.
const DOWN_WORKER: &str = "#!/bin/sh
if [ -e \"/run/chaos-down-$STICKY_DISPATCH_INDEX\" ]; then exit 1; fi
exec /usr/bin/sticky-dispatch-demo
";

/// r. The lossless way to run the dispatcher with workers of its own without installing
/// units: `systemd-run --socket-property=ListenStream=...` makes a transient socket and
/// service, so systemd keeps the listening socket and the fd store. Worker 1 down, clients
/// waiting, the dispatcher killed with SIGKILL: systemd restarts it, its workers are
/// spawned again, and the waiting clients are served.
fn r_systemd_run(w: &World) {
    let c = w.c;
    let unit = "sticky-run";
    let service = format!("{unit}.service");
    c.ok(&["touch", "/run/chaos-down-1"]);
    c.ok(&[
        "systemd-run",
        &format!("--unit={unit}"),
        "--socket-property=ListenStream=127.0.0.1:9090",
        "-p",
        "Type=notify",
        "-p",
        "Restart=on-failure",
        "-p",
        "FileDescriptorStoreMax=1024",
        "-E",
        "STICKY_DISPATCH_SOCKET_PREFIX=sticky-run/",
        "-E",
        "STICKY_DISPATCH_WORKERS=2",
        "/usr/bin/sticky-dispatch",
        "--config",
        "/etc/sticky-dispatch/empty.toml",
        "--",
        "/usr/local/bin/chaos-down-worker",
    ]);
    let netns = c.netns();
    let plan = Plan {
        mode: Mode::Peer,
        to: SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)),
        reply_timeout: REPLY_TIMEOUT,
        max_time: Duration::from_secs(120),
        max_each: 100_000,
        setup: Some(Arc::new(move || enter_netns(&netns))),
    };
    let sources: Vec<Ipv4Addr> = (0..200u32)
        .map(|i| Ipv4Addr::new(127, 40, (i / 100) as u8, (i % 100) as u8 + 2))
        .collect();
    let of = |worker: u32| -> Vec<Client> {
        sources
            .iter()
            .filter(|ip| worker_of(**ip, 2) == worker)
            .map(|&ip| Client {
                key: ip,
                source: ip,
            })
            .collect()
    };
    let waiting: Vec<Client> = of(1).into_iter().take(WAITING).collect();
    let load = plan.start(vec![of(0)]);
    load.wait_answered(50, PATIENCE);
    let waiters = plan.once(&waiting, None);
    let status = |c: &Container| c.prop(&service, "StatusText");
    let wait_status = |what: &str| {
        poll(what, || {
            let s = status(c);
            (figure_of(&s, "waiting") >= WAITING as u64).then_some(s)
        })
    };
    let before = wait_status("clients waiting for the down worker 1");
    let old = c.main_pid(&service);
    c.ok(&["systemctl", "kill", "-s", "KILL", &service]);
    let new = w.restarted(&service, old);
    let after = wait_status("the waiting clients taken back");
    load.wait_answered(50, PATIENCE);
    c.ok(&["rm", "/run/chaos-down-1"]);
    let served = waiters.join();
    let rest = load.stop();
    let mut lines = vec![format!("STATUS before {before:?}, after {after:?}")];
    lines.push(format!(
        "waiting clients: {}; worker 0's clients through the kill: {}",
        tally_of(Mode::Peer, &served, 2),
        tally_of(Mode::Peer, &rest, 2)
    ));
    c.run(&["systemctl", "stop", &format!("{unit}.socket"), &service]);
    figure!(
        "systemd-run transient socket + service, SIGKILL (pid {old} -> {new}): {}",
        lines.join("; ")
    );
    for r in &served {
        let a = r
            .answer
            .as_ref()
            .unwrap_or_else(|e| panic!("waiting client {} lost: {e}", r.client.key));
        assert_eq!(a.worker, 1);
        assert_eq!(a.client, r.client.source.to_string());
    }
    assert_eq!(
        rest.iter()
            .filter(|r| misrouted_of(Mode::Peer, r, 2))
            .count(),
        0,
        "misrouted"
    );
}

// ---------------------------------------------------------------------------------------
// The container

/// config/config.toml with lines replaced.
fn shipped_config(replace: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(Path::new(SOURCE).join("config/config.toml"))
        .expect("config/config.toml");
    for (from, to) in replace {
        assert!(text.contains(from), "no {from:?} in config/config.toml");
        text = text.replace(from, to);
    }
    text
}

fn stage(stage: &Path, config: &str) {
    stage_product(stage, &dispatcher_binary(), config);
    stage_text(stage, "/etc/sticky-dispatch/empty.toml", "");
    stage_text(stage, "/usr/local/bin/chaos-down-worker", DOWN_WORKER);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        stage.join("usr/local/bin/chaos-down-worker"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

/// The units and files of [`Kind::Node`] and [`Kind::Python`]: the apps, the npm package,
/// node_modules (`npm ci`), python/'s package and the venv, copied under /opt/sdt in the
/// repository's layout (ProtectHome= would hide a checkout under /root or /home from the
/// units).
fn stage_node_and_python_workers(stage: &Path) {
    let source = Path::new(SOURCE);
    support::npm_ci();
    let python = python_support::venv_python();
    let venv = python
        .parent()
        .and_then(Path::parent)
        .expect("<venv>/bin/python");
    for (from, to) in [
        ("tests/node/apps", "opt/sdt/tests/node/apps"),
        ("tests/node/node_modules", "opt/sdt/tests/node/node_modules"),
        ("node/index.js", "opt/sdt/node/index.js"),
        ("node/package.json", "opt/sdt/node/package.json"),
        ("python/sticky_dispatch", "opt/sdt/python/sticky_dispatch"),
        ("tests/python", "opt/sdt/app"),
    ] {
        stage_tree(stage, to, &source.join(from));
    }
    stage_tree(stage, "opt/sdt/venv", venv);
    let systemd = source.join("systemd");
    stage_file(
        stage,
        "usr/lib/systemd/system/node-app@.service",
        &systemd.join("node-app@.service"),
        0o644,
    );
    // The shipped worker template, run under another name so that the Rust kind keeps
    // app@.service; only what runs changes (drop-ins), the sandbox stays.
    stage_file(
        stage,
        "usr/lib/systemd/system/python-app@.service",
        &systemd.join("app@.service"),
        0o644,
    );
    let node = program("node");
    stage_text(
        stage,
        "/etc/systemd/system/node-app@.service.d/chaos.conf",
        &format!(
            "[Service]\n\
             WorkingDirectory=/opt/sdt/tests/node/apps\n\
             ExecStart=\n\
             ExecStart=/usr/bin/sticky-dispatch node-worker -- {} \
             /opt/sdt/tests/node/apps/chat.js\n",
            node.display()
        ),
    );
    let python_app = |app: &str| {
        format!(
            "[Service]\n\
             ExecStart=\n\
             ExecStart=/usr/bin/sticky-dispatch worker-launcher -- \
             /opt/sdt/venv/bin/python /opt/sdt/app/{app}\n\
             Environment=PYTHONPATH=/opt/sdt/python\n"
        )
    };
    stage_text(
        stage,
        "/etc/systemd/system/python-app@.service.d/python.conf",
        &python_app("chat_aiohttp.py"),
    );
    // Drop-ins apply in the order of their file names, whatever their directory: the
    // instances' "uvicorn.conf" comes after the template's "python.conf".
    for index in [2, 3] {
        stage_text(
            stage,
            &format!("/etc/systemd/system/python-app@{index}.service.d/uvicorn.conf"),
            &python_app("chat_asgi.py"),
        );
    }
}

/// `name`'s path on the host's PATH; the container, an overlay of the host's root, has it
/// at the same place.
fn program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no {name} on PATH"))
}

/// The dispatcher installed in the container: this build's, or the one
/// `STICKY_DISPATCH_CHAOS_DISPATCHER` names (to run the scenarios against another build,
/// e.g. the one before a fix).
fn dispatcher_binary() -> PathBuf {
    match std::env::var_os("STICKY_DISPATCH_CHAOS_DISPATCHER") {
        Some(path) => {
            figure!("dispatcher under test: {}", Path::new(&path).display());
            path.into()
        }
        None => DISPATCHER.into(),
    }
}

/// A structured field by its name, or with tracing-journald's default `F_` prefix.
fn structured<'e>(entry: &'e Entry, name: &str) -> Option<&'e str> {
    field(entry, name).or_else(|| field(entry, &format!("F_{name}")))
}

// ---------------------------------------------------------------------------------------
// Unacknowledged connections at a dispatcher SIGKILL

/// app@2 frozen (SIGSTOP) with 8 of its clients sent to it but not acknowledged; the
/// dispatcher is killed with SIGKILL; app@2 resumes. The worker reads the 8 CONNs; its
/// ACK fails (the link's other end is gone), it sees the dispatcher process gone
/// (`DispatcherLink::dispatcher_gone`), so nobody will send them again (they left the fd
/// store when sent): it serves them. Before that rule, all 8 were lost.
#[test]
#[ignore = "needs root: boots systemd with systemd-nspawn"]
fn unacknowledged_connections_survive_a_dispatcher_sigkill() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    ensure_nspawn();
    let config = shipped_config(&[
        ("# workers = 4", "workers = 4".to_owned()),
        (
            "routing_key = \"peer-ip\"",
            "routing_key = \"proxy-protocol\"".to_owned(),
        ),
    ]);
    let container = Container::boot("chaos-unacked", |dir| stage(dir, &config));
    let w = World {
        c: &container,
        config,
        kind: Kind::Rust,
        mode: Mode::Proxy,
    };
    let c = w.c;
    c.ok(&["systemctl", "start", "sticky-dispatch.socket", SERVICE]);
    w.restore();
    let plan = w.plan(Mode::Proxy);
    let frozen_clients: Vec<Client> = clients()
        .into_iter()
        .filter(|cl| expected(cl.key) == 2)
        .take(8)
        .collect();
    c.ok(&["systemctl", "kill", "-s", "STOP", &w.worker(2)]);
    let frozen = plan.once(&frozen_clients, None);
    let status = w.poll_status("clients in flight to the frozen app@2", |s| {
        figure_of(s, "in flight") >= frozen_clients.len() as u64
    });
    let old = c.main_pid(SERVICE);
    c.ok(&["systemctl", "kill", "-s", "KILL", SERVICE]);
    let new = w.restarted(SERVICE, old);
    c.ok(&["systemctl", "kill", "-s", "CONT", &w.worker(2)]);
    let served = frozen.join();
    let journal: Vec<String> = c
        .journal(&["-u", &w.worker(2), "-n", "20"])
        .iter()
        .map(|e| message(e).to_owned())
        .collect();
    figure!(
        "SIGKILL (pid {old} -> {new}) with 8 connections unacknowledged by the frozen app@2 \
         (STATUS before {status:?}): {}; app@2's journal: {journal:?}",
        tally(Mode::Proxy, &served)
    );
    let lost = served.iter().filter(|r| r.answer.is_err()).count();
    drop(container);
    assert_eq!(
        lost, 0,
        "unacknowledged connections lost at a dispatcher SIGKILL"
    );
}

// ---------------------------------------------------------------------------------------
// Standalone mode

/// Child processes of `pid` (all its threads').
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|s| {
                    s.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The STICKY_DISPATCH_INDEX of a worker process.
fn index_of(pid: i32) -> Option<u32> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"STICKY_DISPATCH_INDEX="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// The accept queue of the listening socket at `addr`, as `ss` shows it.
fn host_backlog(addr: SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", "sport", "=", &format!(":{}", addr.port())])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn process_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'))
    })
}

/// What a crash costs in standalone mode (`--listen` and a worker command): the standalone
/// dispatcher with 4 demo workers is killed with SIGKILL under load from 200 client
/// addresses, while worker 1 is frozen (its connections held, unacknowledged) and the
/// dispatcher had stalled long enough for clients to sit in its accept queue. Everything
/// it held is lost, its backlog is reset, the workers go with it (PR_SET_PDEATHSIG), and
/// every later client is refused until something starts it again.
#[test]
fn standalone_dispatcher_killed_under_load() {
    // The dispatcher's path, where it holds connections: what the crash costs there.
    let (mut dispatcher, addr) = common::standalone(
        "chaos-standalone",
        WORKERS,
        &[("STICKY_DISPATCH_DISPATCH", "userspace")],
    );
    dispatcher
        .log
        .wait_count(&["worker link up"], WORKERS as usize);
    let pid = dispatcher.pid();
    let workers: BTreeMap<u32, i32> = children(pid)
        .into_iter()
        .filter_map(|p| Some((index_of(p)?, p)))
        .collect();
    assert_eq!(workers.len(), WORKERS as usize, "workers: {workers:?}");
    let plan = Plan {
        mode: Mode::Peer,
        to: addr,
        reply_timeout: Duration::from_secs(10),
        max_time: Duration::from_secs(60),
        max_each: 50_000,
        setup: None,
    };
    let peers: Vec<Client> = (0..200)
        .map(common::client_ip)
        .map(|ip| Client {
            key: ip,
            source: ip,
        })
        .collect();
    let load = plan.start(groups(&peers, 2));
    load.wait_answered(300, PATIENCE);
    // Worker 1 frozen: its connections are held by the dispatcher, unacknowledged.
    common::stop_process(workers[&1]);
    let held: Vec<Client> = (1000..)
        .map(common::client_ip)
        .filter(|ip| expected(*ip) == 1)
        .take(WAITING)
        .map(|ip| Client {
            key: ip,
            source: ip,
        })
        .collect();
    let held = plan.once(&held, None);
    load.wait_answered(100, PATIENCE);
    // A stall: the dispatcher stops accepting; clients queue in its backlog.
    common::stop_process(pid);
    let queued: Vec<Client> = (2000..)
        .map(common::client_ip)
        .filter(|ip| expected(*ip) != 1)
        .take(WAITING)
        .map(|ip| Client {
            key: ip,
            source: ip,
        })
        .collect();
    let queued = plan.once(&queued, None);
    poll("clients in the stalled dispatcher's backlog", || {
        (host_backlog(addr) >= WAITING as u64).then_some(())
    });
    let from = Instant::now();
    dispatcher.signal(nix::sys::signal::Signal::SIGKILL);
    let to = Instant::now();
    dispatcher.wait();
    // The frozen worker must run to see its SIGTERM (PR_SET_PDEATHSIG).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[&1]),
        nix::sys::signal::Signal::SIGCONT,
    );
    let workers_gone = Instant::now();
    poll("every worker gone with the dispatcher", || {
        workers.values().all(|&p| process_gone(p)).then_some(())
    });
    let workers_gone = workers_gone.elapsed();
    // New clients meet a closed port.
    let refused_before = load.count(|r| !r.connected);
    let deadline = Instant::now() + PATIENCE;
    while load.count(|r| !r.connected) < refused_before + 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let records = load.stop();
    let held = held.join();
    let queued = queued.join();
    let open_at_kill: Vec<&Record> = records
        .iter()
        .filter(|r| r.connected && r.started <= to && r.ended >= from)
        .collect();
    let lost = |rs: &[&Record]| rs.iter().filter(|r| r.answer.is_err()).count();
    let refused = records
        .iter()
        .filter(|r| !r.connected && r.started >= from)
        .count();
    let answered_before = records
        .iter()
        .filter(|r| r.ended < from && r.answer.is_ok())
        .count();
    let held: Vec<&Record> = held.iter().collect();
    let queued: Vec<&Record> = queued.iter().collect();
    figure!(
        "standalone SIGKILL under load (4 workers, 8 load threads): held for the frozen \
         worker 1: {} of {} lost; in the backlog of the stalled dispatcher: {} of {} lost; \
         load connections open at the kill: {} of {} lost; after the kill: {refused} refused \
         (nothing listens); {answered_before} answered before; workers gone {workers_gone:.1?} \
         after the dispatcher",
        lost(&held),
        held.len(),
        lost(&queued),
        queued.len(),
        lost(&open_at_kill),
        open_at_kill.len()
    );
    assert_eq!(lost(&held), held.len(), "held connections survived?");
    assert_eq!(lost(&queued), queued.len(), "backlog survived?");
    assert!(refused > 0);
}

/// A second SIGTERM during a graceful stop (standalone, with a NOTIFY_SOCKET stand-in):
/// worker 1 frozen with 8 connections unacknowledged keeps the graceful stop waiting
/// (shutdown_timeout 30 s); 8 connections wait for worker 2, which never came, and are in
/// the "fd store" (FDSTORE=1). The second SIGTERM stops it at once: STOPPING=1 with the
/// status "stopping at once (second stop signal)", and the waiting connections stay
/// stored (no FDSTOREREMOVE=1 for them).
#[test]
fn second_sigterm_stops_at_once_and_keeps_waiting_connections_stored() {
    let dir = common::scratch_dir("chaos-second-stop");
    let mut notify = common::NotifySocket::bind(&dir);
    let notify_path = notify.path.to_str().unwrap().to_owned();
    let mut alone = common::Alone::start(
        "chaos-second-stop",
        3,
        &[
            ("NOTIFY_SOCKET", notify_path.as_str()),
            ("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "30s"),
            ("STICKY_DISPATCH_LOG_LEVEL", "info"),
            // Connections held by the dispatcher, on its path, are what a stop waits for.
            ("STICKY_DISPATCH_DISPATCH", "userspace"),
        ],
    );
    let addr = alone.addr;
    let _w0 = alone.start_worker(0);
    let w1 = alone.start_worker(1);
    common::stop_process(w1.pid());
    let plan = Plan {
        mode: Mode::Peer,
        to: addr,
        reply_timeout: Duration::from_secs(10),
        max_time: Duration::from_secs(60),
        max_each: 1,
        setup: None,
    };
    let of = |worker: u32| -> Vec<Client> {
        common::clients_of(worker, 3, 8)
            .into_iter()
            .map(|ip| Client {
                key: ip,
                source: ip,
            })
            .collect()
    };
    let in_flight = plan.once(&of(1), None);
    let waiting = plan.once(&of(2), None);
    notify.wait_until("STATUS= with 8 in flight and 8 waiting", |l| {
        l.starts_with("STATUS=")
            && status_figure(l, "in flight") >= Some(8)
            && status_figure(l, "waiting") >= Some(8)
    });
    let stored: Vec<String> = notify
        .seen()
        .iter()
        .filter(|d| d.contains("FDSTORE=1"))
        .filter_map(|d| d.lines().find_map(|l| l.strip_prefix("FDNAME=")))
        .map(str::to_owned)
        .collect();
    assert_eq!(stored.len(), 8, "stored: {stored:?}");
    notify.skip_seen();
    let first = Instant::now();
    alone.dispatcher.signal(nix::sys::signal::Signal::SIGTERM);
    notify.wait_for("STOPPING=1");
    alone.dispatcher.log.wait_for(&["stopping"]);
    // The graceful stop holds (the frozen worker never acknowledges): still there after
    // a second.
    std::thread::sleep(Duration::from_secs(1));
    let stuck = first.elapsed();
    assert!(
        alone.dispatcher.child.try_wait().unwrap().is_none(),
        "the graceful stop did not wait for the frozen worker"
    );
    notify.skip_seen();
    let second = Instant::now();
    alone.dispatcher.signal(nix::sys::signal::Signal::SIGTERM);
    let status = alone.dispatcher.wait();
    let took = second.elapsed();
    let after = notify.seen();
    let status_line = notify.wait_until("the second stop's STATUS", |l| {
        l == "STATUS=stopping at once (second stop signal)"
    });
    notify.wait_for("STOPPING=1");
    let removed: Vec<&str> = after
        .iter()
        .filter(|d| d.contains("FDSTOREREMOVE=1"))
        .filter_map(|d| d.lines().find_map(|l| l.strip_prefix("FDNAME=")))
        .collect();
    let kept = stored
        .iter()
        .filter(|name| !removed.contains(&name.as_str()))
        .count();
    let log = alone.dispatcher.log.wait_for(&["second stop signal"]);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w1.pid()),
        nix::sys::signal::Signal::SIGCONT,
    );
    figure!(
        "standalone second SIGTERM {stuck:.1?} into a graceful stop held by a frozen worker \
         (shutdown_timeout 30 s): exited ({status}) {took:.1?} after it; {status_line:?}; \
         {kept} of {} waiting connections left in the store; log: {log:?}",
        stored.len()
    );
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(kept, stored.len(), "removed from the store: {removed:?}");
    figure!(
        "  afterwards: in flight to the frozen worker: {}; waiting (their fds went to the \
         stand-in, which closes them): {}",
        tally_of(Mode::Peer, &in_flight.join(), 3),
        tally_of(Mode::Peer, &waiting.join(), 3)
    );
}
