//! socket.io through the dispatcher, with real clients: npm's `socket.io-client` under
//! Node, long-polling only, each client from its own 127.x.y.z address and every polling
//! request on a new TCP connection (`tests/node/socketio-clients.js`).
//!
//! Through sticky-dispatch with 4 demo workers, all 50 clients complete the handshake,
//! join a room and exchange messages. Against the same 4 workers sharing one SO_REUSEPORT
//! port (the kernel spreads connections, no stickiness), most of them fail: the test can
//! fail, and this is the failure sticky sessions exist to prevent.

mod common;
#[path = "node/support.rs"]
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::*;

const CLIENTS: u32 = 50;
const WORKERS: u32 = 4;
/// Bound on one run of the Node clients (each of its phases is bounded by 20 s).
const NODE_LIMIT: Duration = Duration::from_secs(120);

/// One client's outcome, from a `client ...` line of socketio-clients.js.
#[derive(Debug)]
struct Session {
    ip: Ipv4Addr,
    ok: bool,
    /// Messages received in its room / expected (everyone in the room on its worker).
    received: usize,
    expected: usize,
    /// From the server's `hello`: the worker, and the client address it saw.
    worker: Option<u32>,
    client: String,
    error: String,
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

/// Runs the 50 socket.io clients against `addr`; one session per client, in order.
fn run_clients(addr: SocketAddr) -> Vec<Session> {
    support::npm_ci();
    let mut args = vec![format!("http://{addr}")];
    args.extend((0..CLIENTS).map(|n| client_ip(n).to_string()));
    let out = support::node("socketio-clients.js", &args, NODE_LIMIT);
    let sessions: Vec<Session> = out
        .stdout
        .lines()
        .filter(|line| line.starts_with("client "))
        .map(parse_session)
        .collect();
    assert_eq!(sessions.len(), CLIENTS as usize, "{}", out.stdout);
    sessions
}

fn summary(sessions: &[Session]) -> String {
    let ok = sessions.iter().filter(|s| s.ok).count();
    let mut text = format!(
        "{ok}/{} clients completed handshake, join and messages; {} failed",
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

#[test]
fn socketio_sessions_complete_through_the_dispatcher() {
    let (dispatcher, addr) = standalone("socketio", WORKERS, &[]);
    let dispatcher = support::Graceful(dispatcher);
    dispatcher
        .0
        .log
        .wait_count(&["worker link up"], WORKERS as usize);
    let sessions = run_clients(addr);
    println!("sticky-dispatch, {WORKERS} workers: {}", summary(&sessions));
    for session in &sessions {
        assert!(session.ok, "{session:?}");
        assert_eq!(
            session.worker,
            Some(expected_worker(session.ip, WORKERS)),
            "{session:?}"
        );
        assert_eq!(session.client, session.ip.to_string(), "{session:?}");
        assert_eq!(session.received, session.expected, "{session:?}");
    }
    let exchanged: usize = sessions.iter().map(|s| s.received).sum();
    let shared = sessions.iter().filter(|s| s.expected > 1).count();
    println!("{exchanged} messages delivered; {shared} clients shared their room with others");
    assert!(
        shared >= CLIENTS as usize / 2,
        "most clients exchange messages with others"
    );
}

#[test]
fn without_stickiness_socketio_sessions_fail() {
    // The port, reserved with SO_REUSEPORT but never listening, so it takes no
    // connections while the workers join it.
    let port = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    port.set_reuse_address(true).unwrap();
    port.set_reuse_port(true).unwrap();
    port.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = port.local_addr().unwrap().as_socket().unwrap();
    let _workers: Vec<Running> = (0..WORKERS)
        .map(|index| {
            let mut command = Command::new(DEMO);
            command
                .args(["--direct", &addr.to_string()])
                .env("STICKY_DISPATCH_INDEX", index.to_string())
                .env("STICKY_DISPATCH_LOG_LEVEL", "info");
            let worker = Running::spawn(command, "direct");
            worker.log.wait_for(&["listening directly"]);
            worker
        })
        .collect();
    let sessions = run_clients(addr);
    let failed = sessions.iter().filter(|s| !s.ok).count();
    println!(
        "{WORKERS} workers on one SO_REUSEPORT port, no stickiness: {}",
        summary(&sessions)
    );
    assert!(
        failed >= CLIENTS as usize / 2,
        "without stickiness most sessions should break: {}",
        summary(&sessions)
    );
}
