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

use common::*;

const CLIENTS: u32 = 50;
const WORKERS: u32 = 4;

/// Runs the 50 socket.io clients against `addr`; one session per client, in order.
fn run_clients(addr: SocketAddr) -> Vec<support::Session> {
    let ips: Vec<Ipv4Addr> = (0..CLIENTS).map(client_ip).collect();
    support::socketio_clients(addr, &ips, 20_000)
}

fn summary(sessions: &[support::Session]) -> String {
    support::session_summary(sessions)
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
