//! The kernel's own choice of worker equals the documented mapping (`Router::worker_for`):
//! N listening sockets on one port in a SO_REUSEPORT group, the program of
//! `routing::cbpf` attached with `link::attach_reuseport_cbpf`, and real connections from
//! thousands of source addresses; the socket that accepts each one must be its worker's.
//!
//! - IPv4: on 127.0.0.1, sources all over 127.0.0.0/8 (all of it is local on lo); needs
//!   no privilege.
//! - IPv6 and IPv4-mapped: a dual-stack `[::]` group receiving IPv6 clients from all over
//!   2001:db8::/32 (AnyIP: a `local` route on lo, and IPV6_FREEBIND to bind them) and IPv4
//!   clients from 127.0.0.0/8 (which the group sees as `::ffff:127.x.y.z`). That needs a
//!   network namespace of its own (CAP_SYS_ADMIN): a thread unshares one, so nothing
//!   outlives the test, also when it fails. Skipped, saying why, when not root.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use socket2::{Domain, SockAddr, Socket, Type};
use sticky_dispatch::link::attach_reuseport_cbpf;
use sticky_dispatch::routing::{cbpf, Router};

/// Connections opened before the listeners' queues are drained.
const BATCH: usize = 256;

/// A reuseport group: worker `k`'s listening socket at index `k`.
struct Group {
    lanes: Vec<Socket>,
    router: Router,
    port: u16,
}

impl Group {
    /// One socket per worker on `ip` (an unused port), listening in worker order (the
    /// group's order), with the router's program attached.
    fn new(ip: IpAddr, router: Router) -> Group {
        let mut port = 0;
        let mut lanes = Vec::new();
        for _ in 0..router.workers().get() {
            let socket = Socket::new(
                Domain::for_address(SocketAddr::new(ip, 0)),
                Type::STREAM,
                None,
            )
            .unwrap();
            socket.set_reuse_port(true).unwrap();
            if ip.is_ipv6() {
                // Dual stack: IPv4 clients arrive as ::ffff:a.b.c.d.
                socket.set_only_v6(false).unwrap();
            }
            socket.bind(&SocketAddr::new(ip, port).into()).unwrap();
            port = socket.local_addr().unwrap().as_socket().unwrap().port();
            socket.listen(1024).unwrap();
            socket.set_nonblocking(true).unwrap();
            lanes.push(socket);
        }
        let program = cbpf::program(&router).unwrap();
        // Any member will do: the program belongs to the group.
        attach_reuseport_cbpf(lanes[lanes.len() / 2].as_fd(), &program).unwrap();
        Group {
            lanes,
            router,
            port,
        }
    }

    /// Connects from every source to `target` (this group's port) and checks that the
    /// lane that accepts each connection is its worker's. Returns the per-worker counts.
    fn check(&self, target: IpAddr, sources: &[IpAddr]) -> Vec<usize> {
        let target = SockAddr::from(SocketAddr::new(target, self.port));
        let mut per_worker = vec![0; self.lanes.len()];
        for batch in sources.chunks(BATCH) {
            let mut waiting = HashMap::new();
            for &source in batch {
                let client = Socket::new(
                    Domain::for_address(SocketAddr::new(source, 0)),
                    Type::STREAM,
                    None,
                )
                .unwrap();
                if source.is_ipv6() {
                    // AnyIP: the address is local by a route, not on an interface.
                    client.set_freebind_v6(true).unwrap();
                }
                // Closing sends a reset: no TIME_WAIT left behind.
                client.set_linger(Some(Duration::ZERO)).unwrap();
                client
                    .bind(&SocketAddr::new(source, 0).into())
                    .unwrap_or_else(|err| panic!("bind {source}: {err}"));
                client
                    .connect_timeout(&target, Duration::from_secs(5))
                    .unwrap_or_else(|err| panic!("connect from {source}: {err}"));
                let local = client.local_addr().unwrap().as_socket().unwrap();
                waiting.insert(local, client);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !waiting.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{} connections never accepted",
                    waiting.len()
                );
                let mut accepted_any = false;
                for (lane, listener) in self.lanes.iter().enumerate() {
                    while let Ok((_server_side, peer)) = listener.accept() {
                        accepted_any = true;
                        let peer = peer.as_socket().unwrap();
                        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                        assert!(waiting.remove(&peer).is_some(), "unknown peer {peer}");
                        let expected = self.router.worker_for(&self.router.key(Some(peer.ip())));
                        assert_eq!(
                            lane as u32,
                            expected,
                            "{} accepted on lane {lane}, its worker is {expected} (of {})",
                            peer.ip(),
                            self.lanes.len()
                        );
                        per_worker[lane] += 1;
                    }
                }
                if !accepted_any {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        per_worker
    }
}

fn router(workers: u32, ipv4_prefix: u8, ipv6_prefix: u8, seed: u64) -> Router {
    Router::new(
        NonZeroU32::new(workers).unwrap(),
        ipv4_prefix,
        ipv6_prefix,
        seed,
    )
}

/// `count` distinct random sources in 127.0.0.0/8 (not the network or broadcast-looking
/// .0 and .255 hosts).
fn loopback_sources(count: usize, rng: &mut SmallRng) -> Vec<IpAddr> {
    let mut seen = std::collections::HashSet::new();
    std::iter::repeat_with(|| {
        Ipv4Addr::new(127, rng.random(), rng.random(), rng.random_range(1..255))
    })
    .filter(|ip| seen.insert(*ip))
    .take(count)
    .map(IpAddr::V4)
    .collect()
}

/// `count` distinct random sources in 2001:db8::/32.
fn documentation_sources(count: usize, rng: &mut SmallRng) -> Vec<IpAddr> {
    let network = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0));
    let mut seen = std::collections::HashSet::new();
    std::iter::repeat_with(|| Ipv6Addr::from(network | (rng.random::<u128>() >> 32)))
        // Not 2001:db8::1, the address the clients connect to.
        .filter(|ip| u128::from(*ip) & !(u128::MAX << 96) > 1 && seen.insert(*ip))
        .take(count)
        .map(IpAddr::V6)
        .collect()
}

/// Every worker of a small group got some of thousands of clients: the program does not
/// just return one index (or one that the kernel replaces by its own hash).
fn assert_all_used(counts: &[usize]) {
    if counts.len() <= 16 {
        assert!(counts.iter().all(|&c| c > 0), "an idle worker: {counts:?}");
    }
}

/// A network namespace of this thread's own, with lo up and 2001:db8::/32 local on it, or
/// why not.
fn enter_private_network() -> Result<(), String> {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET alone is allowed in one thread of a
    // multithreaded process, and moves only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    // Commands started from this thread run in its namespace.
    for args in [
        &["link", "set", "lo", "up"][..],
        &["-6", "route", "add", "local", "2001:db8::/32", "dev", "lo"],
    ] {
        let status = Command::new("ip")
            .args(args)
            .status()
            .map_err(|err| format!("ip {}: {err}", args.join(" ")))?;
        if !status.success() {
            return Err(format!("ip {}: {status}", args.join(" ")));
        }
    }
    Ok(())
}

#[test]
fn kernel_routes_ipv4_like_the_router() {
    let mut rng = SmallRng::seed_from_u64(21);
    // (workers, ipv4_prefix, seed, clients)
    let cases = [
        (4, 32, 0, 3000),
        (7, 24, 0x5eed, 1500),
        (10, 32, 0xdead_beef_0000_0001, 1500),
        (64, 32, 0, 3000),
        (cbpf::MAX_WORKERS, 30, u64::MAX, 2000),
    ];
    let mut checked = 0;
    for (workers, ipv4_prefix, seed, clients) in cases {
        let group = Group::new(
            Ipv4Addr::LOCALHOST.into(),
            router(workers, ipv4_prefix, 64, seed),
        );
        let counts = group.check(
            Ipv4Addr::LOCALHOST.into(),
            &loopback_sources(clients, &mut rng),
        );
        assert_all_used(&counts);
        checked += clients;
    }
    eprintln!("kernel routing: {checked} IPv4 connections accepted by their worker's socket");
}

#[test]
fn kernel_routes_ipv6_and_mapped_like_the_router() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: a network namespace of the test's own needs root (CAP_SYS_ADMIN)");
        return;
    }
    // One thread does it all: the namespace is this thread's, and ends with it.
    let (v6, mapped) = std::thread::spawn(|| {
        enter_private_network().unwrap();
        let mut rng = SmallRng::seed_from_u64(2101);
        // (workers, ipv4_prefix, ipv6_prefix, seed, clients of each family)
        let cases = [
            (5, 32, 64, 0, 1500),
            (12, 24, 48, 0x5eed, 1000),
            (64, 32, 128, u64::MAX, 2000),
            (33, 20, 56, 0x0123_4567_89ab_cdef, 1000),
        ];
        let (mut v6, mut mapped) = (0, 0);
        for (workers, ipv4_prefix, ipv6_prefix, seed, clients) in cases {
            let router = router(workers, ipv4_prefix, ipv6_prefix, seed);
            let group = Group::new(Ipv6Addr::UNSPECIFIED.into(), router);
            let counts = group.check(
                "2001:db8::1".parse().unwrap(),
                &documentation_sources(clients, &mut rng),
            );
            assert_all_used(&counts);
            v6 += clients;
            // IPv4 clients of the dual-stack group: the kernel sees IPv4 packets, the
            // accepted peer is ::ffff:127.x.y.z, and both must route like 127.x.y.z.
            let counts = group.check(
                Ipv4Addr::LOCALHOST.into(),
                &loopback_sources(clients, &mut rng),
            );
            if ipv4_prefix >= 24 {
                assert_all_used(&counts);
            }
            mapped += clients;
        }
        (v6, mapped)
    })
    .join()
    .unwrap();
    eprintln!(
        "kernel routing: {v6} IPv6 and {mapped} IPv4-mapped connections accepted by their \
         worker's socket"
    );
}
