//! `sticky-dispatch worker-launcher -- sticky-dispatch-demo`: a Rust worker reloaded in
//! place under load (`sticky-dispatch reload-worker N`, the unit's `ExecReload=`), on the
//! kernel's path and on the userspace path, and a reload whose new process fails. Each
//! test prints its figures (run with --nocapture).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const WORKERS: u32 = 4;
/// The longest any new connection of the reloaded worker's clients may wait.
const RELOAD_WAIT_BOUND: Duration = Duration::from_secs(1);

fn expected(ip: Ipv4Addr) -> u32 {
    expected_worker(ip, WORKERS)
}

/// A standalone dispatcher whose workers are `sticky-dispatch worker-launcher [args] --
/// app...`, once every worker is linked.
fn launched_workers(
    test: &'static str,
    extra_env: &[(&str, &str)],
    launcher_args: &[&str],
    app: &[&str],
) -> (Running, SocketAddr) {
    let mut command = vec![DISPATCHER, "worker-launcher"];
    command.extend_from_slice(launcher_args);
    command.push("--");
    command.extend_from_slice(app);
    let (dispatcher, addr) = standalone_with(test, WORKERS, extra_env, &command);
    dispatcher
        .log
        .wait_count(&["worker link up"], WORKERS as usize);
    (dispatcher, addr)
}

/// The process answering `worker`'s clients, asked through the dispatcher.
fn pid_of(worker: u32, addr: SocketAddr) -> i32 {
    request(clients_of(worker, WORKERS, 1)[0], addr)
        .unwrap()
        .pid
}

/// `sticky-dispatch reload-worker <index>`, as the standalone dispatcher of `test` names
/// its link sockets.
fn reload_worker(test: &'static str, index: u32) -> Output {
    Command::new(DISPATCHER)
        .args(["reload-worker", &index.to_string()])
        .env("STICKY_DISPATCH_SOCKET_PREFIX", unique_prefix(test))
        .env_remove("STICKY_DISPATCH_INDEX")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn shown(out: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The pid in `reloaded: pid P ready`.
fn reloaded_pid(out: &Output) -> i32 {
    text(&out.stdout)
        .strip_prefix("reloaded: pid ")
        .and_then(|rest| rest.strip_suffix(" ready"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{}", shown(out)))
}

/// Longest and median of `waits`, in ms.
fn longest_and_p50(mut waits: Vec<Duration>) -> (f64, f64) {
    waits.sort();
    let ms = |wait: Option<&Duration>| wait.map_or(0.0, |w| w.as_secs_f64() * 1000.0);
    (ms(waits.last()), ms(waits.get(waits.len() / 2)))
}

/// Worker 2 reloaded with `reload-worker 2` under load from clients of every worker: exit
/// 0 with the new pid; every request answered by its worker; worker 2's answers from the
/// old process before and the new one after the switch; no new connection of worker 2's
/// clients waiting 1 s or more (longest and p50 printed, with the same clients' figures
/// before the reload); the old process drained and exited 0; no launcher exited.
fn reload_under_load_waits_milliseconds(test: &'static str, extra_env: &[(&str, &str)]) {
    let (dispatcher, addr) = launched_workers(test, extra_env, &[], &[DEMO]);
    let log = &dispatcher.log;
    let kernel_path = log.count(&["listening: kernel path"]) == 1;
    assert_eq!(kernel_path, extra_env.is_empty(), "the path asked for");
    let path = if kernel_path { "kernel" } else { "userspace" };
    let victim = 2;
    let index_field = format!("index={victim}");
    let old_pid = pid_of(victim, addr);
    let ups = log.count(&["worker link up", &index_field]);

    let victims = clients_of(victim, WORKERS, 24);
    let others: Vec<Ipv4Addr> = (0..WORKERS)
        .filter(|&worker| worker != victim)
        .flat_map(|worker| clients_of(worker, WORKERS, 8))
        .collect();
    let ips: Vec<Ipv4Addr> = victims.iter().chain(&others).copied().collect();
    let load = LoadPlan::new(addr, &ips)
        .threads(16)
        .max_each(20_000)
        .max_time(Duration::from_secs(90))
        .reply_timeout(Duration::from_secs(30))
        .start();
    let is_victims = |o: &Outcome| victims.contains(&o.client);
    let started = Instant::now();
    load.wait_until("150 answers to worker 2's clients", |load| {
        load.count(|o| is_victims(o) && o.started >= started && o.answer.is_ok()) >= 150
    });

    let asked = Instant::now();
    let reloaded = reload_worker(test, victim);
    let answered_after = asked.elapsed();
    assert!(reloaded.status.success(), "{}", shown(&reloaded));
    let new_pid = reloaded_pid(&reloaded);
    log.wait_lines(
        &["worker link up", &index_field],
        ups + 1,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    let switched = Instant::now();
    load.wait_until("150 answers from worker 2's new process", |load| {
        load.count(|o| {
            is_victims(o)
                && o.started >= switched
                && o.answer.as_ref().is_ok_and(|a| a.pid == new_pid)
        }) >= 150
    });
    let old_exit = log
        .wait_lines(
            &["retired process exited", &index_field],
            1,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|err| panic!("{err}"));
    let outcomes = load.stop();

    let tally = Tally::of(&outcomes, expected);
    let during: Vec<Duration> = outcomes
        .iter()
        .filter(|o| {
            is_victims(o) && o.started >= asked && o.started <= switched + Duration::from_secs(1)
        })
        .map(|o| o.waited)
        .collect();
    let count = during.len();
    let (longest, p50) = longest_and_p50(during);
    let (base_longest, base_p50) = longest_and_p50(
        outcomes
            .iter()
            .filter(|o| is_victims(o) && o.started >= started && o.started < asked)
            .map(|o| o.waited)
            .collect(),
    );
    let pids_of = |from: Instant, to: Instant| -> std::collections::BTreeSet<i32> {
        outcomes
            .iter()
            .filter(|o| is_victims(o) && o.started >= from && o.started < to)
            .filter_map(|o| o.answer.as_ref().ok().map(|a| a.pid))
            .collect()
    };
    let before = pids_of(started, asked);
    let after = pids_of(switched, Instant::now());
    println!(
        "reload of Rust worker {victim} ({path} path): reload-worker answered {answered_after:.2?} \
         after it was run ({}); worker {victim}'s {count} new connections from the reload to 1 s \
         after the switch: longest wait {longest:.1} ms, p50 {p50:.1} ms (before the reload: \
         longest {base_longest:.1} ms, p50 {base_p50:.1} ms); all clients: {tally}; old process \
         {old_pid}: {}",
        text(&reloaded.stdout),
        old_exit
            .split("retired process exited")
            .nth(1)
            .unwrap_or("")
            .trim(),
    );
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    assert_ne!(new_pid, old_pid);
    assert_eq!(before, [old_pid].into(), "answers before the reload");
    assert_eq!(after, [new_pid].into(), "answers after the switch");
    assert!(count > 0);
    assert!(
        Duration::from_secs_f64(longest / 1000.0) < RELOAD_WAIT_BOUND,
        "longest wait {longest} ms of worker {victim}'s clients during the reload"
    );
    assert!(old_exit.contains("exit status: 0"), "{old_exit}");
    assert_eq!(
        log.count(&["worker exited; restarting"]),
        0,
        "no launcher exited"
    );
    if kernel_path {
        // The new process serves the lanes: the kernel hands it worker 2's clients again.
        assert!(
            log.count(&["worker serves its lanes", &index_field]) > ups,
            "the lanes were granted at the new link"
        );
    }
}

#[test]
fn reload_under_load_waits_milliseconds_on_the_kernel_path() {
    reload_under_load_waits_milliseconds("rust-reload-kernel", &[]);
}

#[test]
fn reload_under_load_waits_milliseconds_on_the_userspace_path() {
    reload_under_load_waits_milliseconds(
        "rust-reload-userspace",
        &[("STICKY_DISPATCH_DISPATCH", "userspace")],
    );
}

/// A reload whose new process fails (it exits before it is ready: a marker file, as a
/// deploy with a broken build would) fails visibly: `reload-worker 2` exits 1 and says
/// why, the old process still serves worker 2, and nobody's request fails; once the marker
/// is gone, the next `reload-worker 2` succeeds and the new process serves. A new process
/// that never says READY=1 fails the reload after --start-timeout, killed. A worker that
/// is not there: exit 1, with what to check.
#[test]
fn a_failed_reload_leaves_the_old_process_serving_and_exits_1() {
    let test = "rust-reload-fails";
    let dir = scratch_dir(test);
    let marker = dir.join("fail-next-start");
    let hang = dir.join("hang-next-start");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&hang);
    let marker_text = marker.display().to_string();
    let hang_text = hang.display().to_string();
    // Exits 3 while the marker exists; never gets ready (sleeps) while `hang` does.
    let script = r#"if [ -e "$APP_FAIL_MARKER" ]; then echo "app: failing on purpose" >&2; exit 3; fi; if [ -e "$APP_HANG_MARKER" ]; then exec sleep 600; fi; exec "$@""#;
    let (dispatcher, addr) = launched_workers(
        test,
        &[
            ("APP_FAIL_MARKER", &marker_text),
            ("APP_HANG_MARKER", &hang_text),
        ],
        &["--start-timeout", "2s"],
        &["sh", "-c", script, "sh", DEMO],
    );
    let log = &dispatcher.log;
    let victim = 2;
    let index_field = format!("index={victim}");
    let old_pid = pid_of(victim, addr);
    let clients: Vec<Ipv4Addr> = (0..200).map(client_ip).collect();
    let load = Load::start(addr, &clients, 4, 100_000);
    load.wait_more(100);

    std::fs::write(&marker, "").unwrap();
    let failed = reload_worker(test, victim);
    println!(
        "reload-worker {victim} with a new process that exits: {}; stderr: {}",
        failed.status,
        text(&failed.stderr)
    );
    assert_eq!(failed.status.code(), Some(1), "{}", shown(&failed));
    let stderr = text(&failed.stderr);
    assert!(stderr.contains("reload failed"), "{stderr}");
    assert!(
        stderr.contains("exited before it was ready (exit status: 3)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {old_pid} still serves")),
        "{stderr}"
    );
    log.wait_for(&["reload failed", &index_field]);
    load.wait_more(100);
    assert_eq!(
        pid_of(victim, addr),
        old_pid,
        "the old process still serves"
    );

    std::fs::remove_file(&marker).unwrap();
    std::fs::write(&hang, "").unwrap();
    let hung = reload_worker(test, victim);
    println!(
        "reload-worker {victim} with a new process that never says READY=1 (--start-timeout 2s): \
         {}; stderr: {}",
        hung.status,
        text(&hung.stderr)
    );
    assert_eq!(hung.status.code(), Some(1), "{}", shown(&hung));
    assert!(
        text(&hung.stderr).contains("did not say READY=1 within 2s (--start-timeout)"),
        "{}",
        shown(&hung)
    );
    log.wait_for(&["retired process killed", "reload failed", &index_field]);
    assert_eq!(
        pid_of(victim, addr),
        old_pid,
        "the old process still serves"
    );

    std::fs::remove_file(&hang).unwrap();
    let ups = log.count(&["worker link up", &index_field]);
    let reloaded = reload_worker(test, victim);
    println!(
        "reload-worker {victim} again, the markers gone: {}; stdout: {}",
        reloaded.status,
        text(&reloaded.stdout)
    );
    assert!(reloaded.status.success(), "{}", shown(&reloaded));
    let new_pid = reloaded_pid(&reloaded);
    assert_ne!(new_pid, old_pid);
    log.wait_count(&["worker link up", &index_field], ups + 1);
    load.wait_more(100);
    assert_eq!(pid_of(victim, addr), new_pid, "the new process serves");
    log.wait_for(&["retired process exited", &index_field]);

    let tally = Tally::of(&load.stop(), expected);
    println!("under load throughout: {tally}");
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    assert_eq!(
        log.count(&["worker exited; restarting"]),
        0,
        "no launcher exited"
    );

    let absent = reload_worker(test, 9);
    println!(
        "reload-worker 9 (no such worker): {}; stderr: {}",
        absent.status,
        text(&absent.stderr)
    );
    assert_eq!(absent.status.code(), Some(1), "{}", shown(&absent));
    assert!(
        text(&absent.stderr).contains("nothing listens on @"),
        "{}",
        shown(&absent)
    );
}

/// SIGTERM to a launcher stops its process (which drains) and exits with its status; a
/// process that exits on its own ends the launcher with its status (the supervisor, or
/// systemd's Restart=, starts the pair again).
#[test]
fn the_launcher_ends_as_its_process_does() {
    let test = "rust-launcher-exits";
    let (dispatcher, addr) = launched_workers(test, &[], &[], &[DEMO]);
    let log = &dispatcher.log;
    let victim = 1;
    let index_field = format!("index={victim}");
    let pid = pid_of(victim, addr);
    let ups = log.count(&["worker link up", &index_field]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exited = log.wait_for(&["worker exited; restarting", &index_field]);
    println!("the launcher after its process was killed: {exited}");
    assert!(
        exited.contains("SIGKILL") || exited.contains("signal: 9"),
        "{exited}"
    );
    log.wait_count(&["worker link up", &index_field], ups + 1);
    assert_ne!(pid_of(victim, addr), pid, "restarted by the supervisor");
}
