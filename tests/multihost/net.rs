//! The network of tests/multihost.rs: named network namespaces (`ip netns add`, so that
//! systemd-nspawn can join them by path), veth pairs and a bridge, with addresses only
//! from the benchmarking range 198.18.0.0/15 (RFC 2544), which nothing else on the
//! machine uses. Everything is removed when the [`Topology`] is dropped, also when a
//! test fails.
//!
//! ```text
//!   client ns                    balancer ns                         host ns (one per host)
//!   198.19.0.0/16 local on lo    haproxy / nftables
//!   cl 198.18.0.2/24 ── veth ──  lb 198.18.0.1/24
//!                                br0 198.18.1.1/24 ─┬─ h0 ── veth ── eth0 198.18.1.10/24
//!                                                   ├─ h1 ── veth ── eth0 198.18.1.11/24
//!                                                   └─ ...
//! ```
//!
//! The client namespace routes all of 198.19.0.0/16 to its loopback
//! (`ip route add local`), so a client binds any 198.19.x.y as its source: hundreds of
//! distinct client addresses from one process.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The balancer's address on the clients' side: HAProxy's frontend, nftables' DNAT match.
pub const FRONTEND_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_LINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The balancer's address on the hosts' bridge.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Client source addresses: 198.19.0.0/16.
pub const CLIENT_NET: &str = "198.19.0.0/16";

/// Host `i`'s address: 198.18.1.(10 + i).
pub fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + i as u8)
}

/// The `n`-th client address, spread over several /24s: 198.19.(n / 200).(n % 200 + 10).
pub fn client_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (n / 200) as u8, (n % 200 + 10) as u8)
}

/// A named network namespace (`/run/netns/NAME`), deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates it with loopback up and the sysctls that matter set explicitly, whatever
    /// the machine's defaults: no reverse-path filter (the clients' addresses are not on
    /// any interface), forwarding only where asked, and bridged frames not passed to
    /// iptables/nftables (br_netfilter may be loaded on the host).
    pub fn create(name: String, forward: bool) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        let mut sysctls = vec![
            ("net.ipv4.ip_forward", if forward { "1" } else { "0" }),
            // `default` before any interface exists: each new one inherits 0.
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ];
        // Per namespace since Linux 5.3, and only there when br_netfilter is loaded.
        if ns.exec_status(&["test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"]) {
            sysctls.extend([
                ("net.bridge.bridge-nf-call-iptables", "0"),
                ("net.bridge.bridge-nf-call-ip6tables", "0"),
                ("net.bridge.bridge-nf-call-arptables", "0"),
            ]);
        }
        for (key, value) in sysctls {
            ns.exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
        }
        ns
    }

    /// `/run/netns/NAME`, for `setns` and `systemd-nspawn --network-namespace-path`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip netns exec NAME args...`: a command run in the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec runs");
        assert!(
            out.status.success(),
            "in {}: `{}` failed: {}{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn exec_status(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `f` on a thread that has joined this namespace, and returns its result.
    /// Threads `f` spawns are in the namespace too (they inherit it from their creator).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&path);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its interfaces, hence the veth peers in the others.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
pub fn enter(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: setns(2) on a valid fd we own; it changes only this thread's namespace
    // (CLONE_NEWNET is allowed for one thread of a multithreaded process).
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The client, balancer and host namespaces, wired as in the module's diagram.
pub struct Topology {
    // Hosts first: dropped (deleted) before the balancer that holds their veth peers.
    pub hosts: Vec<Netns>,
    pub client: Netns,
    pub balancer: Netns,
}

impl Topology {
    /// `hosts` host namespaces named `mh<pid>-<tag>-h<i>`, plus `-client` and `-lb`.
    pub fn build(tag: &str, hosts: usize) -> Topology {
        let prefix = format!("mh{}-{tag}", std::process::id());
        // Each namespace is owned by the topology as soon as it exists, so that a failure
        // half-way still removes everything made so far.
        let balancer = Netns::create(format!("{prefix}-lb"), true);
        let client = Netns::create(format!("{prefix}-client"), false);
        let mut topology = Topology {
            hosts: Vec::new(),
            client,
            balancer,
        };
        let lb = topology.balancer.name.clone();
        let cl = topology.client.name.clone();

        // Client <-> balancer: one veth pair, made inside the namespaces (no name in the
        // host's own namespace, where other tests may run).
        ip(&[
            "-n", &lb, "link", "add", "lb", "type", "veth", "peer", "name", "cl", "netns", &cl,
        ]);
        let b = &topology.balancer;
        b.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{FRONTEND_IP}/24"),
            "dev",
            "lb",
        ]);
        b.exec_ok(&["ip", "link", "set", "lb", "up"]);
        b.exec_ok(&[
            "ip",
            "route",
            "add",
            CLIENT_NET,
            "via",
            &CLIENT_LINK_IP.to_string(),
        ]);
        let c = &topology.client;
        c.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_LINK_IP}/24"),
            "dev",
            "cl",
        ]);
        c.exec_ok(&["ip", "link", "set", "cl", "up"]);
        c.exec_ok(&["ip", "route", "add", "local", CLIENT_NET, "dev", "lo"]);
        c.exec_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &FRONTEND_IP.to_string(),
        ]);

        // The hosts' bridge, in the balancer's namespace.
        b.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        b.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            "br0",
        ]);
        b.exec_ok(&["ip", "link", "set", "br0", "up"]);
        for i in 0..hosts {
            topology.add_host(&prefix, i);
        }
        topology
    }

    fn add_host(&mut self, prefix: &str, i: usize) {
        let host = Netns::create(format!("{prefix}-h{i}"), false);
        let port = format!("h{i}");
        ip(&[
            "-n",
            &self.balancer.name,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.name,
        ]);
        self.balancer
            .exec_ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
        host.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", host_ip(i)),
            "dev",
            "eth0",
        ]);
        host.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        // Replies to clients go back through the balancer: needed when it forwards
        // (nftables DNAT), harmless when it proxies (HAProxy talks from BRIDGE_IP).
        host.exec_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &BRIDGE_IP.to_string(),
        ]);
        self.hosts.push(host);
    }
}

/// The HAProxy / nftables frontend for `port`.
pub fn frontend(port: u16) -> SocketAddr {
    SocketAddr::from((FRONTEND_IP, port))
}
