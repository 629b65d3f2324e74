//! A newcomer's mistakes are loud, and two apps on one host never cross: two standalone
//! dispatchers with default settings each serve only their own workers; two dispatchers
//! (or two workers) configured with the same `socket_prefix` fail naming the key; a worker
//! started without a dispatcher says how to start one; a host name listens; a mistyped
//! key gets a suggestion.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use common::*;

/// A standalone dispatcher with `workers` demo workers and no `socket_prefix` anywhere:
/// the defaults a newcomer runs with.
fn default_standalone(test: &'static str, workers: u32) -> (Running, SocketAddr) {
    let mut command = Command::new(DISPATCHER);
    command
        .arg("--config")
        .arg(empty_config(&scratch_dir(test)))
        .args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
        .args(["--", DEMO])
        .env_remove("STICKY_DISPATCH_SOCKET_PREFIX")
        .env("STICKY_DISPATCH_LOG_LEVEL", "info");
    let running = Running::spawn(command, test);
    let addr = listening_address(&running.log);
    running
        .log
        .wait_count(&["worker link up"], workers as usize);
    (running, addr)
}

/// The parent of process `pid`, from /proc/<pid>/stat.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn two_standalone_dispatchers_with_default_settings_serve_only_their_own_workers() {
    const WORKERS: u32 = 2;
    let (a, a_addr) = default_standalone("two-apps-a", WORKERS);
    let (b, b_addr) = default_standalone("two-apps-b", WORKERS);
    for (dispatcher, addr) in [(&a, a_addr), (&b, b_addr)] {
        let answers: Vec<Answer> = (0..40)
            .map(|n| request(client_ip(n), addr).expect("answered"))
            .collect();
        let parents: BTreeSet<i32> = answers.iter().map(|a| parent_of(a.pid)).collect();
        assert_eq!(
            parents,
            BTreeSet::from([dispatcher.pid()]),
            "every answer on {addr} comes from a worker this dispatcher spawned"
        );
        let workers: BTreeSet<u32> = answers.iter().map(|a| a.worker).collect();
        assert_eq!(workers.len(), WORKERS as usize);
    }
    for (dispatcher, name) in [(&a, "a"), (&b, "b")] {
        let prefix = format!("sticky-dispatch/{}/", dispatcher.pid());
        assert_eq!(
            dispatcher.log.count(&["worker link up", &prefix]),
            WORKERS as usize,
            "dispatcher {name} linked to its own sockets {prefix}N:\n{}",
            dispatcher.log.text()
        );
        assert_eq!(dispatcher.log.count(&["in use"]), 0);
    }
}

#[test]
fn a_second_dispatcher_with_the_same_socket_prefix_exits_78_naming_the_key() {
    let first = Alone::start("same-prefix", 1, &[]);
    let _worker = first.start_worker(0);
    let mut command = Command::new(DISPATCHER);
    command
        .arg("--config")
        .arg(empty_config(&scratch_dir("same-prefix-2")))
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &first.prefix);
    let mut second = Running::spawn(command, "second");
    assert_eq!(second.wait().code(), Some(78), "{}", second.log.text());
    let line = second
        .log
        .wait_for(&["another dispatcher", "socket_prefix"]);
    assert!(line.contains(&first.prefix), "{line}");
    assert!(line.contains("STICKY_DISPATCH_SOCKET_PREFIX"), "{line}");
    assert_eq!(second.log.count(&["worker link up"]), 0);
    // The first one still serves its own worker.
    let answer = request(client_ip(1), first.addr).expect("the first dispatcher answers");
    assert_eq!(answer.worker, 0);
}

#[test]
fn a_worker_whose_socket_is_taken_names_socket_prefix_and_what_to_do() {
    let prefix = unique_prefix("taken");
    let worker = |tag| {
        let mut command = Command::new(DEMO);
        command
            .env("STICKY_DISPATCH_INDEX", "0")
            .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
        Running::spawn(command, tag)
    };
    let first = worker("first");
    first.log.wait_for(&["worker ready"]);
    let mut second = worker("second");
    assert!(!second.wait().success());
    let text = second.log.text();
    assert!(
        text.contains(&format!("@{prefix}0 is in use")),
        "names the socket: {text}"
    );
    assert!(
        text.contains(&format!("socket_prefix \"{prefix}\"")),
        "names the prefix: {text}"
    );
    assert!(
        text.contains("STICKY_DISPATCH_SOCKET_PREFIX"),
        "says what to set: {text}"
    );
}

#[test]
fn a_worker_started_without_a_dispatcher_says_how_to_start_one() {
    let prefix = unique_prefix("alone-worker");
    let mut command = Command::new(DEMO);
    command
        .env("STICKY_DISPATCH_INDEX", "2")
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
    let worker = Running::spawn(command, "alone-worker");
    worker.log.wait_for(&["worker ready"]);
    let started = std::time::Instant::now();
    let line = worker
        .log
        .wait_for(&["no dispatcher has connected to this worker's link socket"]);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "said after the grace period, not at once"
    );
    assert!(line.contains(&format!("@{prefix}2")), "{line}");
    assert!(
        line.contains("systemctl start sticky-dispatch.socket"),
        "{line}"
    );
    assert!(line.contains("sticky-dispatch --listen"), "{line}");
    // Once is enough; a dispatcher that comes later links as usual.
    let mut dispatcher = Command::new(DISPATCHER);
    dispatcher
        .arg("--config")
        .arg(empty_config(&scratch_dir("alone-worker")))
        .args(["--listen", "127.0.0.1:0", "--workers", "3"])
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
    let dispatcher = Running::spawn(dispatcher, "late-dispatcher");
    dispatcher.log.wait_for(&["worker link up", "index=2"]);
    worker.log.wait_for(&["link up"]);
    assert_eq!(worker.log.count(&["no dispatcher has connected"]), 1);
}

#[test]
fn listen_takes_a_host_name_and_a_typo_gets_a_suggestion() {
    let dir = scratch_dir("newcomer-check");
    let check = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(DISPATCHER)
            .arg("check-config")
            .arg("--config")
            .arg(empty_config(&dir))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    // A free port, then a dispatcher on localhost:<port> that answers on 127.0.0.1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(DISPATCHER);
    command
        .arg("--config")
        .arg(empty_config(&dir))
        .args(["--listen", &format!("localhost:{port}"), "--workers", "1"])
        .args(["--", DEMO])
        .env("STICKY_DISPATCH_SOCKET_PREFIX", unique_prefix("localhost"));
    let dispatcher = Running::spawn(command, "localhost");
    dispatcher.log.wait_for(&["worker link up"]);
    let to: SocketAddr = ([127, 0, 0, 1], port).into();
    let answer = request(client_ip(7), to).expect("answered on localhost's 127.0.0.1");
    assert_eq!(answer.worker, 0);
    drop(dispatcher);

    let output = check(&[], &[("STICKY_DISPATCH_WORKER", "4")]);
    assert_eq!(output.status.code(), Some(78));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("STICKY_DISPATCH_WORKER: unknown key `worker`: did you mean `workers`?"),
        "{message}"
    );
}

#[test]
fn the_node_bridge_refuses_the_dispatchers_flags() {
    let output = Command::new(DISPATCHER)
        .args(["node-worker", "--workers", "4", "--", "node", "app.js"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("--listen, --workers and --metrics-listen are the dispatcher's"),
        "{message}"
    );
}
