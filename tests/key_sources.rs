//! Routing keys from what the client sends: PROXY protocol v1/v2 (the worker then sees the
//! real client), X-Forwarded-For, a cookie; silent and garbage clients are closed without
//! holding up anyone.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const WORKERS: u32 = 4;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

/// Real clients somewhere on the internet, as a balancer would report them.
fn remote_client(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, (n >> 8) as u8, n as u8)
}

fn proxy_v1(client: Ipv4Addr) -> Vec<u8> {
    let mut bytes = format!("PROXY TCP4 {client} 192.0.2.1 40000 443\r\n").into_bytes();
    bytes.extend_from_slice(REQUEST);
    bytes
}

fn proxy_v2(client: Ipv4Addr) -> Vec<u8> {
    let mut bytes = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    bytes.extend_from_slice(&client.octets());
    bytes.extend_from_slice(&[192, 0, 2, 1, 0x9c, 0x40, 0x01, 0xbb]);
    bytes.extend_from_slice(REQUEST);
    bytes
}

#[test]
fn proxy_protocol_routes_by_the_real_client_and_tells_the_worker() {
    let (_dispatcher, addr) = standalone(
        "proxy",
        WORKERS,
        &[("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol")],
    );
    let balancer = client_ip(0);
    let mut workers = BTreeSet::new();
    for n in 0..100 {
        let client = remote_client(n);
        let header = if n % 2 == 0 {
            proxy_v1(client)
        } else {
            proxy_v2(client)
        };
        for _ in 0..3 {
            let answer = send(balancer, addr, &header).unwrap();
            assert_eq!(
                answer.client,
                client.to_string(),
                "the worker sees the real client"
            );
            assert_eq!(
                answer.worker,
                expected_worker(client, WORKERS),
                "routed by the real client"
            );
            assert!(answer.body.contains("local=192.0.2.1:"), "{}", answer.body);
            workers.insert(answer.worker);
        }
    }
    assert_eq!(
        workers.len(),
        WORKERS as usize,
        "one balancer address, all workers used"
    );
}

#[test]
fn silent_and_garbage_clients_are_closed_and_hold_up_nobody() {
    let (_dispatcher, addr) = standalone(
        "proxy-timeout",
        WORKERS,
        &[
            ("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol"),
            ("STICKY_DISPATCH_KEY_TIMEOUT", "1s"),
        ],
    );
    // 50 silent clients first.
    let silent: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    // Meanwhile everyone else is served at once.
    for n in 0..20 {
        let answer = send(client_ip(n), addr, &proxy_v1(remote_client(n))).unwrap();
        assert_eq!(answer.client, remote_client(n).to_string());
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served while the silent ones wait"
    );
    for mut stream in silent {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after key_timeout: {waited:?}"
    );

    // Garbage is closed at once, not after the timeout.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: no-proxy-header\r\n\r\n")
        .unwrap();
    garbage.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn x_forwarded_for_routes_by_the_client_the_proxy_saw() {
    let (_dispatcher, addr) = standalone(
        "xff",
        WORKERS,
        &[("STICKY_DISPATCH_ROUTING_KEY", "x-forwarded-for")],
    );
    let proxy = client_ip(0);
    for n in 0..100 {
        let client = remote_client(n);
        let request = format!(
            "GET / HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 10.1.1.1, {client}\r\nConnection: close\r\n\r\n"
        );
        let answer = send(proxy, addr, request.as_bytes()).unwrap();
        assert_eq!(
            answer.worker,
            expected_worker(client, WORKERS),
            "client {client}"
        );
        assert_eq!(
            answer.client,
            proxy.to_string(),
            "the peer is still the proxy"
        );
    }
    // No header: the peer address decides.
    let answer = request(proxy, addr).unwrap();
    assert_eq!(answer.worker, expected_worker(proxy, WORKERS));
}

#[test]
fn a_cookie_keeps_a_client_on_one_worker_across_addresses() {
    let (_dispatcher, addr) = standalone(
        "cookie",
        WORKERS,
        &[
            ("STICKY_DISPATCH_ROUTING_KEY", "cookie"),
            ("STICKY_DISPATCH_KEY_NAME", "session"),
        ],
    );
    let mut workers_used = BTreeSet::new();
    for user in 0..40 {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: test\r\nCookie: theme=dark; session=user-{user}\r\nConnection: close\r\n\r\n"
        );
        let answers: BTreeSet<u32> = (0..5)
            .map(|n| {
                send(client_ip(user * 5 + n), addr, request.as_bytes())
                    .unwrap()
                    .worker
            })
            .collect();
        assert_eq!(answers.len(), 1, "user {user} moved: {answers:?}");
        workers_used.extend(answers);
    }
    assert_eq!(workers_used.len(), WORKERS as usize);
}

#[test]
fn a_cookie_key_without_a_name_is_a_config_error() {
    let output = std::process::Command::new(DISPATCHER)
        .args(["check-config", "--config", "/dev/null"])
        .env("STICKY_DISPATCH_ROUTING_KEY", "cookie")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("key_name"));
}

/// `sticky_dispatch_accepted_total`, summed over the listeners, from `/metrics`.
fn accepted_total(metrics: std::net::SocketAddr) -> Option<f64> {
    let mut stream = TcpStream::connect(metrics).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: t\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with("sticky_dispatch_accepted_total{"))
            .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
            .sum(),
    )
}

#[test]
fn a_connection_still_sending_its_proxy_header_at_stop_is_served() {
    // Workers of their own (as under systemd): they outlive the dispatcher's stop.
    let mut alone = Alone::start(
        "proxy-at-stop",
        2,
        &[
            ("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol"),
            ("STICKY_DISPATCH_KEY_TIMEOUT", "15s"),
            ("STICKY_DISPATCH_METRICS_LISTEN", "127.0.0.1:0"),
            ("STICKY_DISPATCH_LOG_LEVEL", "info"),
        ],
    );
    let _workers: Vec<Running> = (0..2).map(|i| alone.start_worker(i)).collect();
    let line = alone
        .dispatcher
        .log
        .wait_for(&["serving /metrics", "address="]);
    let metrics: std::net::SocketAddr =
        log_field(&line, "address").unwrap_or_else(|| panic!("no metrics address in {line:?}"));

    // Half a PROXY v2 header, and the dispatcher has accepted the connection.
    let client = remote_client(7);
    let bytes = proxy_v2(client);
    let mut stream = TcpStream::connect(alone.addr).unwrap();
    stream.write_all(&bytes[..10]).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while accepted_total(metrics) != Some(1.0) {
        assert!(Instant::now() < deadline, "the connection was not accepted");
        std::thread::sleep(Duration::from_millis(10));
    }

    // SIGTERM while it is still sending its key: the dispatcher waits for it (or, before
    // the fix, exited and closed it unread).
    alone.dispatcher.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let exited = alone.dispatcher.child.try_wait().unwrap().is_some();
        let waiting = alone
            .dispatcher
            .log
            .count(&["still sending their routing key", "count=1"])
            > 0;
        if exited || waiting {
            break;
        }
        assert!(Instant::now() < deadline, "neither exited nor waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The rest of the header and the request: routed by the real client, answered.
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = stream.write_all(&bytes[10..]);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(&format!("client={client}\n")),
        "the connection in the middle of its PROXY header at stop was not served: {answer:?}\n{}",
        alone.dispatcher.log.text()
    );
    assert!(alone.dispatcher.wait().success());
}

/// 2,000 slow clients under `routing_key = "cookie"`, each having sent a few hundred
/// bytes of a request head and nothing more: the dispatcher holds them all, at a cost
/// that follows what they sent (≤ 3 KiB each), not `key_max_bytes` (8 KiB).
#[test]
fn thousands_of_held_heads_cost_what_they_sent() {
    const HELD: usize = 2000;
    const MAX_PER_HELD: u64 = 3 * 1024;
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard > HELD as u64 + 200,
        "the fd limit {hard} is too low for {HELD} clients"
    );

    let (dispatcher, addr) = standalone(
        "held-heads",
        2,
        &[
            ("STICKY_DISPATCH_ROUTING_KEY", "cookie"),
            ("STICKY_DISPATCH_KEY_NAME", "io"),
            ("STICKY_DISPATCH_KEY_TIMEOUT", "5m"),
        ],
    );
    dispatcher.log.wait_count(&["worker link up"], 2);
    // A whole request is answered: the dispatcher has routed everything accepted before it
    // (its tasks run in order on one thread), so memory is measured after that.
    let canary = |n: u32| {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: test\r\nCookie: io=canary{n}\r\nConnection: close\r\n\r\n"
        );
        send(client_ip(n), addr, request.as_bytes()).expect("a whole request is answered")
    };
    canary(0);
    let pid = dispatcher.pid();
    let before = status_kib(pid, "VmRSS").unwrap();
    let head = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: test\r\nUser-Agent: a-slow-client\r\nAccept: */*\r\n";
    assert!(head.len() < 1024);
    let held: Vec<TcpStream> = (0..HELD)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(head).unwrap();
            stream
        })
        .collect();
    canary(1);
    let after = status_kib(pid, "VmRSS").unwrap();
    let per_held = after.saturating_sub(before) * 1024 / HELD as u64;
    eprintln!(
        "{HELD} held heads of {} bytes: dispatcher RSS {before} KiB -> {after} KiB, {per_held} bytes each",
        head.len()
    );
    assert!(
        per_held <= MAX_PER_HELD,
        "{per_held} bytes per held connection (at most {MAX_PER_HELD})"
    );
    // A head longer than the first peek buffer is still read whole: a cookie after 3,000
    // bytes of other headers routes a request where the same cookie goes in a short head,
    // from another client address (10 cookies: by the address, they would scatter).
    for n in 0..10 {
        let request = |padding: &str| {
            format!(
                "GET / HTTP/1.1\r\nHost: test\r\nX-Padding: {padding}\r\nCookie: io=long{n}\r\nConnection: close\r\n\r\n"
            )
        };
        let short = send(client_ip(10 + n), addr, request("").as_bytes()).unwrap();
        let long = send(
            client_ip(30 + n),
            addr,
            request(&"p".repeat(3000)).as_bytes(),
        )
        .expect("a long head is answered");
        assert_eq!(
            long.worker, short.worker,
            "cookie io=long{n} past the first buffer"
        );
    }
    // Each still gets its answer once it finishes its head.
    for mut stream in held.into_iter().take(3) {
        stream
            .write_all(b"Cookie: io=late\r\nConnection: close\r\n\r\n")
            .unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
}
