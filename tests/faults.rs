//! Nothing lost: faults under continuous load of new connections from many client
//! addresses, in standalone mode. Each test prints its figures (run with --nocapture).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const WORKERS: u32 = 4;
const THREADS: usize = 8;

/// The dispatcher's path (the default, `auto`, is the kernel's for `peer-ip`): the
/// scenarios that hold on both paths run on each.
const USERSPACE: (&str, &str) = ("STICKY_DISPATCH_DISPATCH", "userspace");
const KERNEL: (&str, &str) = ("STICKY_DISPATCH_DISPATCH", "kernel");

fn clients() -> Vec<Ipv4Addr> {
    (0..200).map(client_ip).collect()
}

fn expected(ip: Ipv4Addr) -> u32 {
    expected_worker(ip, WORKERS)
}

fn kill(pid: i32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

/// The pid of the process serving `worker`, asked through the dispatcher.
fn pid_of(worker: u32, addr: SocketAddr) -> i32 {
    request(clients_of(worker, WORKERS, 1)[0], addr)
        .unwrap()
        .pid
}

/// A worker command that stays down (exits 3 at once) while `<dir>/down-<index>` exists.
fn holdable_worker(dir: &std::path::Path) -> Vec<String> {
    let script = r#"[ -e "$0/down-$STICKY_DISPATCH_INDEX" ] && exit 3; exec "$1""#;
    vec![
        "/bin/sh".into(),
        "-c".into(),
        script.into(),
        dir.display().to_string(),
        DEMO.into(),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Scenario 1: SIGTERM a worker and let it restart: it drains, nothing is lost or moved.
#[test]
fn graceful_worker_restart_loses_nothing() {
    graceful_worker_restart("graceful", KERNEL);
}

#[test]
fn graceful_worker_restart_loses_nothing_userspace() {
    graceful_worker_restart("graceful-userspace", USERSPACE);
}

fn graceful_worker_restart(test: &'static str, path: (&str, &str)) {
    let (dispatcher, addr) = standalone(test, WORKERS, &[path]);
    let load = Load::start(addr, &clients(), THREADS, 100_000);
    load.wait_more(300);
    let victim = 3;
    let pid = pid_of(victim, addr);
    let ups = dispatcher.log.count(&["worker link up", "index=3"]);
    kill(pid, Signal::SIGTERM);
    dispatcher.log.wait_for(&["worker is draining", "index=3"]);
    dispatcher
        .log
        .wait_count(&["worker link up", "index=3"], ups + 1);
    load.wait_more(600);
    let tally = Tally::of(&load.stop(), expected);
    eprintln!(
        "graceful restart of worker 3 under load ({}): {tally}",
        path.1
    );
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    assert_ne!(pid_of(victim, addr), pid, "a new process serves worker 3");
}

/// Scenario 2: SIGKILL a worker that holds unacknowledged connections (it is stopped
/// first, so connections pile up unacknowledged): the dispatcher survives and re-sends
/// every one of them to the restarted worker. (The dispatcher's path: on the kernel's,
/// nothing is unacknowledged, see the next test.)
#[test]
fn killed_worker_gets_its_unacknowledged_connections_again() {
    let dir = scratch_dir("sigkill");
    let mut notify = NotifySocket::bind(&dir);
    let notify_path = notify.path.display().to_string();
    let (mut dispatcher, addr) = standalone(
        "sigkill",
        WORKERS,
        &[("NOTIFY_SOCKET", notify_path.as_str()), USERSPACE],
    );
    let load = Load::start(addr, &clients(), THREADS, 100_000);
    load.wait_more(300);
    let victim = 2;
    let pid = pid_of(victim, addr);
    stop_process(pid);
    // Connections for worker 2 are now sent but never acknowledged; one by one the load
    // threads get stuck on one (a thread whose request the worker took just before it
    // stopped is stuck too, but not on an unacknowledged connection).
    let status = notify.wait_until("load threads stuck", |line| {
        status_figure(line, "in flight").is_some_and(|n| n >= THREADS as u64 / 2)
    });
    eprintln!("worker 2 stopped: {status}");
    kill(pid, Signal::SIGKILL);
    let down = notify.wait_until("connections re-sent", |line| {
        status_figure(line, "re-sent").is_some_and(|n| n > 0)
    });
    let resent = status_figure(&down, "re-sent").unwrap();
    dispatcher
        .log
        .wait_for(&["worker exited; restarting", "index=2"]);
    load.wait_more(600);
    let tally = Tally::of(&load.stop(), expected);
    eprintln!("SIGKILL of worker 2 holding {resent} unacknowledged connections: {tally}");
    assert!(
        resent >= THREADS as u64 / 2,
        "the stuck connections were re-sent: {down}"
    );
    assert_eq!(tally.misrouted, 0, "{tally}");
    // Only connections the worker had already acknowledged (taken) can die with it: at
    // most one per load thread, since each thread has one request open at a time.
    assert!(tally.failed <= THREADS, "{tally}");
    assert!(
        dispatcher.child.try_wait().unwrap().is_none(),
        "the dispatcher survives"
    );
    assert_ne!(pid_of(victim, addr), pid);
}

/// Scenario 2 on the kernel's path: SIGKILL a worker (stopped first, so its clients pile
/// up in its lane's accept queue): the queue outlives it, and the restarted worker serves
/// every connection queued there.
#[test]
fn killed_worker_leaves_its_lane_queue_to_the_next_one() {
    let (mut dispatcher, addr) = standalone("sigkill-lane", WORKERS, &[KERNEL]);
    let load = Load::start(addr, &clients(), THREADS, 100_000);
    load.wait_more(300);
    let victim = 2;
    let pid = pid_of(victim, addr);
    stop_process(pid);
    // Its clients now queue in its lane; one by one the load threads get stuck there.
    let queued_on_lanes = || -> u32 {
        sticky_dispatch::sock_diag::listening_on(addr.port(), addr.ip())
            .unwrap()
            .iter()
            .map(|lane| lane.queued)
            .sum()
    };
    let deadline = Instant::now() + PATIENCE;
    while queued_on_lanes() < THREADS as u32 / 2 {
        assert!(
            Instant::now() < deadline,
            "the load threads never queued on worker 2's lane"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued = queued_on_lanes();
    kill(pid, Signal::SIGKILL);
    dispatcher
        .log
        .wait_for(&["worker exited; restarting", "index=2"]);
    load.wait_more(600);
    let tally = Tally::of(&load.stop(), expected);
    eprintln!("SIGKILL of worker 2 with {queued} connections queued on its lane: {tally}");
    assert_eq!(tally.misrouted, 0, "{tally}");
    // Only connections the worker had already accepted can die with it: at most one per
    // load thread.
    assert!(tally.failed <= THREADS, "{tally}");
    assert!(
        dispatcher.child.try_wait().unwrap().is_none(),
        "the dispatcher survives"
    );
    assert_ne!(pid_of(victim, addr), pid);
}

/// Takes worker `index` down for good (until `<dir>/down-<index>` is removed).
fn hold_down(dir: &std::path::Path, dispatcher: &Running, addr: SocketAddr, index: u32) {
    // Served first: the worker is up, so the file cannot stop its first start.
    let pid = pid_of(index, addr);
    std::fs::write(dir.join(format!("down-{index}")), "").unwrap();
    kill(pid, Signal::SIGTERM);
    let index_field = format!("index={index}");
    dispatcher.log.wait_for(&["worker link down", &index_field]);
    dispatcher
        .log
        .wait_for(&["worker exited; restarting", &index_field, "exit status: 3"]);
}

/// Scenario 3, `wait`: a worker down longer than pending_timeout: its clients are closed
/// after the timeout (never hung), everyone else is unaffected, and it gets its clients
/// back when it returns.
#[test]
fn worker_down_longer_than_pending_timeout_with_wait() {
    down_longer_than_pending_timeout_with_wait("down-wait", KERNEL);
}

#[test]
fn worker_down_longer_than_pending_timeout_with_wait_userspace() {
    down_longer_than_pending_timeout_with_wait("down-wait-userspace", USERSPACE);
}

fn down_longer_than_pending_timeout_with_wait(test: &'static str, path: (&str, &str)) {
    let dir = scratch_dir(test);
    let command = holdable_worker(&dir);
    let (dispatcher, addr) = standalone_with(
        test,
        WORKERS,
        &[("STICKY_DISPATCH_PENDING_TIMEOUT", "1s"), path],
        &as_strs(&command),
    );
    let victim = 1;
    hold_down(&dir, &dispatcher, addr, victim);
    let started = Instant::now();
    let load = Load::start(addr, &clients(), THREADS, 100_000);
    load.wait_more(800);
    let outcomes = load.stop();
    let elapsed = started.elapsed();

    let (theirs, others): (Vec<Outcome>, Vec<Outcome>) = outcomes
        .into_iter()
        .partition(|o| expected(o.client) == victim);
    let theirs_tally = Tally::of(&theirs, expected);
    let others_tally = Tally::of(&others, expected);
    eprintln!("worker 1 down ({}), wait, pending_timeout 1s, {elapsed:?}: its clients: {theirs_tally}; others: {others_tally}", path.1);
    assert_eq!(
        (others_tally.failed, others_tally.misrouted),
        (0, 0),
        "{others_tally}"
    );
    assert_eq!(
        theirs_tally.ok, 0,
        "nobody else answers worker 1's clients: {theirs_tally}"
    );
    assert!(theirs_tally.failed > 0);
    for outcome in &theirs {
        let err = outcome.answer.as_ref().unwrap_err();
        assert!(
            !err.contains("timed out") && !err.contains("temporarily"),
            "hung, not closed: {err}"
        );
    }

    let ups = dispatcher.log.count(&["worker link up", "index=1"]);
    std::fs::remove_file(dir.join(format!("down-{victim}"))).unwrap();
    dispatcher
        .log
        .wait_count(&["worker link up", "index=1"], ups + 1);
    let back = request(clients_of(victim, WORKERS, 1)[0], addr).unwrap();
    assert_eq!(back.worker, victim);
}

/// Scenario 3, `failover`: the down worker's clients are served by another worker, the
/// same one every time for a given client, and the others stay where they are.
#[test]
fn worker_down_longer_than_pending_timeout_with_failover() {
    down_longer_than_pending_timeout_with_failover("down-failover", KERNEL);
}

#[test]
fn worker_down_longer_than_pending_timeout_with_failover_userspace() {
    down_longer_than_pending_timeout_with_failover("down-failover-userspace", USERSPACE);
}

fn down_longer_than_pending_timeout_with_failover(test: &'static str, path: (&str, &str)) {
    let dir = scratch_dir(test);
    let command = holdable_worker(&dir);
    let (dispatcher, addr) = standalone_with(
        test,
        WORKERS,
        &[
            ("STICKY_DISPATCH_PENDING_TIMEOUT", "1s"),
            ("STICKY_DISPATCH_ON_WORKER_DOWN", "failover"),
            path,
        ],
        &as_strs(&command),
    );
    let victim = 1;
    hold_down(&dir, &dispatcher, addr, victim);
    let load = Load::start(addr, &clients(), THREADS, 100_000);
    load.wait_more(800);
    let outcomes = load.stop();

    let router = sticky_dispatch::routing::Router::new(WORKERS.try_into().unwrap(), 32, 64, 0);
    let failover_target = |ip: Ipv4Addr| {
        router
            .failover_for(&router.key(Some(ip.into())), |w| w != victim)
            .unwrap()
    };
    let expected_now = |ip: Ipv4Addr| {
        if expected(ip) == victim {
            failover_target(ip)
        } else {
            expected(ip)
        }
    };
    let tally = Tally::of(&outcomes, expected_now);
    let mut answered_by: BTreeMap<Ipv4Addr, BTreeSet<u32>> = BTreeMap::new();
    for outcome in &outcomes {
        if let Ok(answer) = &outcome.answer {
            answered_by
                .entry(outcome.client)
                .or_default()
                .insert(answer.worker);
        }
    }
    let failed_over = answered_by
        .keys()
        .filter(|ip| expected(**ip) == victim)
        .count();
    eprintln!(
        "worker 1 down ({}), failover: {tally}; {failed_over} of its clients failed over",
        path.1
    );
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    assert!(failed_over > 0);
    assert!(
        answered_by.values().all(|workers| workers.len() == 1),
        "a client moved between workers"
    );
}

/// Scenario 5: 10,000 connections at once toward a worker that is down, with a small
/// max_pending: bounded memory and fds, the other workers keep serving, no spinning.
#[test]
fn overload_toward_a_down_worker_stays_bounded() {
    const FLOOD: usize = 10_000;
    let dir = scratch_dir("overload");
    let mut notify = NotifySocket::bind(&dir);
    let notify_path = notify.path.display().to_string();
    let command = holdable_worker(&dir);
    let (mut dispatcher, addr) = standalone_with(
        "overload",
        WORKERS,
        &[
            USERSPACE,
            ("STICKY_DISPATCH_MAX_PENDING", "100"),
            ("STICKY_DISPATCH_PENDING_TIMEOUT", "60s"),
            ("NOTIFY_SOCKET", notify_path.as_str()),
        ],
        &as_strs(&command),
    );
    let pid = dispatcher.pid();
    let victim = 0;
    hold_down(&dir, &dispatcher, addr, victim);
    let others: Vec<Ipv4Addr> = clients()
        .into_iter()
        .filter(|ip| expected(*ip) != victim)
        .collect();
    let rss_before = status_kib(pid, "VmRSS").unwrap();
    let cpu_before = cpu_time(pid).unwrap();
    let started = Instant::now();

    // Light load on the other workers throughout.
    let load = Load::start(addr, &others, 2, 50_000);
    // The flood: 10,000 connections from 500 addresses of worker 0, in waves of 1,000
    // (the kernel's SYN backlog here is 2,048: a bigger burst would only test its retries).
    let sources = clients_of(victim, WORKERS, 500);
    let mut flood = Vec::with_capacity(FLOOD);
    let mut peak_fds = 0;
    let mut status = String::new();
    for wave in 0..FLOOD / 1000 {
        for i in wave * 1000..(wave + 1) * 1000 {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket
                .bind(&SocketAddr::new(sources[i % 500].into(), 0).into())
                .unwrap();
            socket.set_nonblocking(true).unwrap();
            let _ = socket.connect(&addr.into()); // EINPROGRESS: completes in the background
            flood.push(socket);
        }
        // The dispatcher has dealt with a wave when all but 100 were turned away.
        let turned_away = (flood.len() - 100) as u64;
        status = notify.wait_until("the wave turned away", |line| {
            status_figure(line, "turned away").is_some_and(|n| n >= turned_away)
        });
        peak_fds = peak_fds.max(open_fds(pid));
    }
    peak_fds = peak_fds.max(open_fds(pid));
    let flood_time = started.elapsed();
    let cpu = cpu_time(pid).unwrap() - cpu_before;
    let tally = Tally::of(&load.stop(), expected);

    // At rest with 100 connections waiting: no spinning.
    let idle_before = cpu_time(pid).unwrap();
    let idle_start = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = cpu_time(pid).unwrap() - idle_before;
    let idle_wall = idle_start.elapsed();

    let closed = flood
        .iter()
        .filter(|socket| {
            let mut byte = [std::mem::MaybeUninit::new(0u8)];
            match socket.recv(&mut byte) {
                Ok(0) => true,
                Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .count();
    let peak_rss = status_kib(pid, "VmHWM").unwrap();
    let handled = FLOOD + tally.total;
    eprintln!(
        "overload: {FLOOD} connections in waves of 1000 toward down worker 0 (max_pending 100): {closed} closed at once, {} waiting; \
         dispatcher peak fds {peak_fds}, RSS {rss_before} KiB before, peak {peak_rss} KiB; CPU {cpu:?} over {flood_time:?} \
         for {handled} connections ({:.1} us each); at rest {idle_cpu:?} in {idle_wall:?}; other workers meanwhile: {tally}; {status}",
        FLOOD - closed,
        cpu.as_secs_f64() * 1e6 / handled as f64
    );
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    assert!(
        tally.ok > 0,
        "the other workers were served during the flood"
    );
    assert!(
        peak_fds < 100 + 200,
        "fds bounded by max_pending: {peak_fds}"
    );
    assert_eq!(
        closed,
        FLOOD - 100,
        "beyond max_pending, connections are closed at once"
    );
    assert!(peak_rss < 64 * 1024, "memory bounded: {peak_rss} KiB");
    assert!(idle_cpu < idle_wall / 5, "spinning at rest: {idle_cpu:?}");
    assert!(
        dispatcher.child.try_wait().unwrap().is_none(),
        "the dispatcher survives"
    );
}

/// Scenario 5, EMFILE: with the fd limit lowered under it, accept fails with EMFILE; the
/// dispatcher pauses instead of spinning or crashing, and serves everyone once fds return.
#[test]
fn running_out_of_fds_pauses_accepting_without_spinning() {
    // The dispatcher's own accept: on the kernel's path it accepts nothing.
    let alone = Alone::start("emfile", WORKERS, &[USERSPACE]);
    let (dispatcher, addr) = (&alone.dispatcher, alone.addr);
    let pid = dispatcher.pid();
    let _workers: Vec<Running> = (1..WORKERS).map(|i| alone.start_worker(i)).collect();

    // Leave the dispatcher a handful of fds above what it has open now.
    let limit = open_fds(pid) + 8;
    // The soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE.
    let prlimit = |limit: usize| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
            .status()
            .unwrap();
        assert!(status.success());
    };
    prlimit(limit);
    // 60 clients of the absent worker 0: the first few hold the last fds, the rest meet EMFILE.
    let waiting: Vec<Ipv4Addr> = clients_of(0, WORKERS, 60);
    let handle = std::thread::spawn(move || parallel(&waiting, 60, |ip| request(*ip, addr)));
    dispatcher
        .log
        .wait_for(&["accept failed for lack of resources"]);
    let cpu_before = cpu_time(pid).unwrap();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_time(pid).unwrap() - cpu_before;
    let wall = wall.elapsed();

    prlimit(limit * 100);
    let _worker0 = alone.start_worker(0);
    let answers = handle.join().unwrap();
    let served = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|a| a.worker == 0))
        .count();
    eprintln!("EMFILE with a limit of {limit} fds: dispatcher CPU {cpu:?} over {wall:?}; once fds returned, {served} of 60 waiting clients served by worker 0");
    assert!(
        cpu < wall / 4,
        "accept loop spins on EMFILE: {cpu:?} in {wall:?}"
    );
    assert_eq!(served, 60, "{answers:?}");
    assert!(dispatcher.log.count(&["panicked"]) == 0);
}

/// Scenario 6: peers speaking a wrong protocol version or garbage are refused with a log
/// line, and nothing else is disturbed.
#[test]
fn wrong_protocol_peers_are_refused_and_nothing_else_is_disturbed() {
    let alone = Alone::start("garbage", WORKERS, &[]);
    let (dispatcher, addr, prefix) = (&alone.dispatcher, alone.addr, alone.prefix.clone());
    let workers: Vec<Running> = (1..WORKERS).map(|i| alone.start_worker(i)).collect();

    // A "worker 0" that answers HELLO with protocol version 2.
    let fake_worker = r#"
import socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind("\0" + sys.argv[1] + "0")
srv.listen(4)
print("listening", flush=True)
while True:
    link, _ = srv.accept()
    link.send(bytes([2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]))
    link.close()
"#;
    let mut fake = Command::new("python3");
    fake.args(["-c", fake_worker, &prefix]);
    let _fake = Running::spawn(fake, "fake-worker");
    dispatcher.log.wait_for(&[
        "refused the worker link",
        "index=0",
        "unsupported protocol version 2",
    ]);

    // A "dispatcher" that sends garbage to the real worker 1.
    let fake_dispatcher = r#"
import socket, sys
link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
link.connect("\0" + sys.argv[1] + "1")
link.send(b"\xde\xad\xbe\xef")
print(link.recv(512))
"#;
    let status = Command::new("python3")
        .args(["-c", fake_dispatcher, &prefix])
        .status()
        .unwrap();
    assert!(status.success());
    workers[0]
        .log
        .wait_for(&["link closed", "unsupported protocol version 222"]);

    // Everyone else is served as before.
    let others: Vec<Ipv4Addr> = clients()
        .into_iter()
        .filter(|ip| expected(*ip) != 0)
        .collect();
    let outcomes: Vec<Outcome> = others
        .iter()
        .map(|&client| Outcome::of(client, addr, PATIENCE))
        .collect();
    let tally = Tally::of(&outcomes, expected);
    eprintln!("with a wrong-version worker 0 and a garbage-speaking client of worker 1: {tally}");
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
}
