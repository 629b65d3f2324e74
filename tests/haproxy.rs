//! Behind a real balancer: HAProxy (Debian's `haproxy`, installed by the test when missing
//! and root; ignored unless asked for, as it may need root) in TCP mode in front of the
//! dispatcher, sending PROXY protocol v2 (`send-proxy-v2`); the dispatcher routes with
//! `routing_key = "proxy-protocol"`. Every connection reaches the dispatcher from HAProxy's
//! address, yet each of 100 clients (distinct 127.x.y.z source addresses) always reaches
//! the same worker, the one its own address maps to, and that worker sees the real client.

mod common;
#[path = "node/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const WORKERS: u32 = 4;
const CLIENTS: u32 = 100;
/// Requests per client, each on a new connection through HAProxy.
const ROUNDS: usize = 3;

/// A TCP-mode HAProxy configuration: `frontend` in, to `dispatcher` with PROXY v2.
/// Two server lines for the one dispatcher, so round-robin alternates between them as it
/// would between hosts.
fn config(frontend: SocketAddr, dispatcher: SocketAddr) -> String {
    format!(
        "global
    maxconn 2000

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend clients
    bind {frontend}
    default_backend dispatchers

backend dispatchers
    balance roundrobin
    server a {dispatcher} send-proxy-v2
    server b {dispatcher} send-proxy-v2
"
    )
}

/// A free port on 127.0.0.1 for HAProxy's frontend (free when we looked).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// HAProxy in the foreground (`-db`) on `config`; killed when dropped. Returns once its
/// frontend accepts connections.
fn start_haproxy(program: &Path, dir: &Path, dispatcher: SocketAddr) -> (Running, SocketAddr) {
    let mut tries = 0;
    loop {
        tries += 1;
        let frontend = free_port();
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config(frontend, dispatcher)).unwrap();
        let mut command = Command::new(program);
        command.arg("-db").arg("-f").arg(&path);
        let mut haproxy = Running::spawn(command, "haproxy");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if TcpStream::connect(frontend).is_ok() {
                return (haproxy, frontend);
            }
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                // Someone took the port between our look and HAProxy's bind: try another.
                assert!(
                    tries < 5,
                    "haproxy exited ({status}); log:\n{}",
                    haproxy.log.text()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy does not accept on {frontend}; log:\n{}",
                haproxy.log.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
#[ignore = "needs root (apt-get install haproxy when missing) or haproxy installed"]
fn behind_haproxy_each_client_stays_on_its_worker_and_is_seen() {
    let program =
        support::debian_program("haproxy", "haproxy").unwrap_or_else(|why| panic!("{why}"));
    let (dispatcher, dispatcher_addr) = standalone(
        "haproxy",
        WORKERS,
        &[("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol")],
    );
    let dispatcher = support::Graceful(dispatcher);
    dispatcher
        .0
        .log
        .wait_count(&["worker link up"], WORKERS as usize);
    let (_haproxy, frontend) = start_haproxy(&program, &scratch_dir("haproxy"), dispatcher_addr);

    let clients: Vec<Ipv4Addr> = (0..CLIENTS).map(client_ip).collect();
    let answers: Vec<(Ipv4Addr, Vec<Answer>)> = parallel(&clients, 4, |&client| {
        let answers = (0..ROUNDS)
            .map(|_| {
                request(client, frontend)
                    .unwrap_or_else(|err| panic!("{client} through haproxy: {err}"))
            })
            .collect();
        (client, answers)
    });

    let mut moved = 0;
    let mut per_worker: BTreeMap<u32, usize> = BTreeMap::new();
    for (client, answers) in &answers {
        let expected = expected_worker(*client, WORKERS);
        if answers.iter().any(|a| a.worker != answers[0].worker) {
            moved += 1;
        }
        for answer in answers {
            assert_eq!(
                answer.worker, expected,
                "{client} is routed by its own address, not HAProxy's: {answer:?}"
            );
            assert_eq!(
                answer.client,
                client.to_string(),
                "the worker sees the real client"
            );
            assert!(
                answer.body.contains(&format!("local={frontend}")),
                "the worker sees the address the client connected to: {}",
                answer.body
            );
        }
        *per_worker.entry(answers[0].worker).or_default() += 1;
    }
    println!(
        "through HAProxy (send-proxy-v2, round-robin over 2 server lines): {CLIENTS} clients x \
         {ROUNDS} requests, {} answered, {moved} clients moved between workers, clients per \
         worker {per_worker:?}",
        answers.len() * ROUNDS
    );
    assert_eq!(moved, 0);
    assert_eq!(
        per_worker.len(),
        WORKERS as usize,
        "every worker has clients"
    );
}
