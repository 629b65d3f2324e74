//! Standalone mode end to end: the real dispatcher spawns real demo workers, and clients
//! from 200 distinct source addresses always reach the same worker.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// The dispatcher's path, where it passes every connection over the links.
const USERSPACE: (&str, &str) = ("STICKY_DISPATCH_DISPATCH", "userspace");

#[test]
fn every_client_always_reaches_the_same_worker() {
    every_client_always_reaches_the_same_worker_on("sticky", None);
}

#[test]
fn every_client_always_reaches_the_same_worker_userspace() {
    every_client_always_reaches_the_same_worker_on("sticky-userspace", Some(USERSPACE));
}

/// On the kernel's path (no `path`), or the one given.
fn every_client_always_reaches_the_same_worker_on(test: &'static str, path: Option<(&str, &str)>) {
    const WORKERS: u32 = 4;
    const CLIENTS: u32 = 200;
    const CONNECTIONS_EACH: usize = 5;
    let (mut dispatcher, addr) = standalone(test, WORKERS, path.as_slice());

    let clients: Vec<_> = (0..CLIENTS).map(client_ip).collect();
    let answers = parallel(&clients, 8, |&ip| {
        (0..CONNECTIONS_EACH)
            .map(|_| request(ip, addr))
            .collect::<Result<Vec<_>, _>>()
            .map(|answers| (ip, answers))
    });

    let mut per_worker: BTreeMap<u32, usize> = BTreeMap::new();
    for result in answers {
        let (ip, answers) = result.expect("every connection is answered");
        let workers: BTreeSet<u32> = answers.iter().map(|a| a.worker).collect();
        assert_eq!(
            workers.len(),
            1,
            "client {ip} was served by workers {workers:?}"
        );
        for answer in &answers {
            assert_eq!(
                answer.client,
                ip.to_string(),
                "the worker sees the real client address"
            );
            assert_eq!(answer.listener, "127.0.0.1:0");
        }
        *per_worker.entry(answers[0].worker).or_default() += 1;
    }
    eprintln!("clients per worker: {per_worker:?}");
    assert_eq!(
        per_worker.len(),
        WORKERS as usize,
        "all workers used: {per_worker:?}"
    );
    assert!(per_worker.keys().all(|&w| w < WORKERS));

    let status = dispatcher.terminate();
    assert!(status.success(), "dispatcher exit: {status}");
    // Every connection crossed the dispatcher on its path; none on the kernel's.
    let handed_off = if path.is_some() { 1000 } else { 0 };
    let stopped = dispatcher.log.wait_for(&["dispatcher stopped"]);
    assert!(
        stopped.contains(&format!("handed_off={handed_off} ")),
        "{stopped}"
    );
    assert_eq!(
        dispatcher.log.count(&["worker stopped", "exit status: 0"]),
        WORKERS as usize
    );
}

#[test]
fn a_worker_that_exits_is_restarted_and_keeps_its_clients() {
    let (dispatcher, addr) = standalone("restart", 2, &[]);
    let clients: Vec<_> = (0..20).map(client_ip).collect();
    let before: Vec<Answer> = clients
        .iter()
        .map(|&ip| request(ip, addr).unwrap())
        .collect();
    let victim = before[0].clone();
    let pid = victim.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    dispatcher.log.wait_for(&[
        "worker exited; restarting",
        &format!("index={}", victim.worker),
    ]);

    // Requests made while the worker is down wait for it rather than failing or moving.
    let after: Vec<Answer> = clients
        .iter()
        .map(|&ip| request(ip, addr).unwrap())
        .collect();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.worker, a.worker, "client {} moved", b.client);
    }
    assert_ne!(after[0].pid, pid, "served by the restarted process");
}

#[test]
fn shutdown_is_bounded_by_shutdown_timeout() {
    let mut notify = NotifySocket::bind(&scratch_dir("shutdown-timeout-notify"));
    let notify_path = notify.path.display().to_string();
    let (mut dispatcher, addr) = standalone(
        "shutdown-timeout",
        2,
        &[
            ("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "1s"),
            ("NOTIFY_SOCKET", notify_path.as_str()),
            // What the dispatcher holds bounds its stop: on the kernel's path it holds
            // nothing (a stuck worker's clients wait on its lane).
            USERSPACE,
        ],
    );
    let client = clients_of(0, 2, 1)[0];
    let pid = request(client, addr).unwrap().pid;
    // A stuck worker: what the dispatcher sends it is never acknowledged.
    stop_process(pid);
    let stuck = std::thread::spawn(move || request(client, addr));
    notify.wait_until("the request in flight", |line| {
        status_figure(line, "in flight") == Some(1)
    });
    let started = std::time::Instant::now();
    let status = dispatcher.terminate();
    let took = started.elapsed();
    eprintln!("stopped in {took:?} with a stuck worker (shutdown_timeout 1s)");
    assert!(status.success());
    dispatcher.log.wait_for(&["shutdown timeout reached"]);
    // One shutdown_timeout for the hand-offs, one for the workers to stop.
    // Bounded by the two timeouts, far below the default 60 s (generous: machines are shared).
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert!(
        stuck.join().unwrap().is_err(),
        "the stuck worker's client was closed"
    );
}
