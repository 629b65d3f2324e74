//! The hosts of tests/multihost.rs: each a booted systemd (tests/container) joined to its
//! host namespace, with sticky-dispatch installed from the .deb and run by the shipped
//! units, exactly as on a real machine.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::container::{self, Container};
use crate::net::{self, Netns};

const SOURCE: &str = env!("CARGO_MANIFEST_DIR");
/// Only to find the target directory: <target>/debug/sticky-dispatch.
const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");
/// Where the .deb is put in each container.
const DEB_DIR: &str = "/root/packages";
/// The port of systemd/sticky-dispatch.socket.
pub const PORT: u16 = 8080;
/// The port of systemd/sticky-dispatch-metrics.socket (`/health`, `/metrics`).
pub const METRICS_PORT: u16 = 9191;

/// One host: its namespace's index and the booted systemd running sticky-dispatch.
pub struct Host {
    pub index: usize,
    pub name: String,
    pub container: Container,
}

impl Host {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((net::host_ip(self.index), PORT))
    }

    pub fn health_addr(&self) -> SocketAddr {
        SocketAddr::from((net::host_ip(self.index), METRICS_PORT))
    }

    /// `systemctl ARGS` inside; panics unless it succeeds.
    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.container.ok(&all)
    }
}

/// Boots one container per namespace in `hosts`, all at once, and installs and starts
/// sticky-dispatch with `config` in each. Every host is named `h<i>`, and so is its
/// listener (`FileDescriptorName=h<i>` in a drop-in): the demo worker's answer
/// (`listener=h<i>`) then says which host served it, since with PROXY protocol its
/// `local=` is the balancer's frontend, the same on every host.
///
/// Call it from the test's own thread: a container powers off when the thread that
/// started it exits.
pub fn boot(hosts: &[&Netns], first: usize, config: &str) -> Vec<Host> {
    let deb = deb();
    let deb_inside = format!("{DEB_DIR}/{}", deb.file_name().unwrap().to_string_lossy());
    let booting: Vec<(String, container::Booting)> = hosts
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let name = format!("h{}", first + i);
            let booting = Container::start_in_netns("multihost", &name, &ns.path(), |dir| {
                container::stage_file(dir, &deb_inside, deb, 0o644);
                container::stage_text(
                    dir,
                    "/etc/systemd/system/sticky-dispatch.socket.d/50-host-name.conf",
                    &format!(
                        "# tests/multihost.rs: the host's name, shown by the demo worker as \
                         listener=.\n[Socket]\nFileDescriptorName={name}\n"
                    ),
                );
            });
            (name, booting)
        })
        .collect();
    // Waiting and installing only run commands in the containers: in parallel.
    let results: Vec<std::thread::Result<Host>> = std::thread::scope(|scope| {
        let handles: Vec<_> = booting
            .into_iter()
            .enumerate()
            .map(|(i, (name, booting))| {
                scope.spawn(move || {
                    let host = Host {
                        index: first + i,
                        name,
                        container: booting.wait(),
                    };
                    install(&host, config);
                    host
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    // All or nothing: a failure powers off the containers that did boot.
    let mut booted = Vec::new();
    let mut failure = None;
    for result in results {
        match result {
            Ok(host) => booted.push(host),
            Err(panic) => failure = failure.or(Some(panic)),
        }
    }
    if let Some(panic) = failure {
        drop(booted);
        std::panic::resume_unwind(panic);
    }
    booted
}

fn install(host: &Host, config: &str) {
    let c = &host.container;
    // dpkg rather than apt: the same maintainer scripts, without apt's resolver (the
    // dependencies are the host's own, already there). Where the image has a
    // policy-rc.d that forbids starting services (Docker images), nothing starts yet;
    // elsewhere the postinst starts the socket with the default config, and the
    // restart below applies ours.
    c.ok(&["sh", "-c", &format!("dpkg -i {DEB_DIR}/*.deb")]);
    c.write_file("/etc/sticky-dispatch/config.toml", config);
    c.ok(&["sticky-dispatch", "check-config"]);
    // The generator reads `workers` at daemon-reload.
    host.systemctl(&["daemon-reload"]);
    // The health endpoint HAProxy checks: the shipped, disabled-by-default metrics
    // socket, enabled before the dispatcher starts so that it receives it.
    host.systemctl(&["enable", "sticky-dispatch-metrics.socket"]);
    host.systemctl(&["stop", "sticky-dispatch.service", "sticky-dispatch.socket"]);
    host.systemctl(&[
        "start",
        "sticky-dispatch-metrics.socket",
        "sticky-dispatch.socket",
        "sticky-dispatch.service",
    ]);
}

/// `GET path` on `addr`: the status code and body. HTTP/1.0: the server closes the
/// connection after the answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("receive: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP reply: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    // HAProxy's stats page is chunked even for HTTP/1.0 requests.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)?));
    }
    Ok((status, body.to_owned()))
}

/// The data of a chunked HTTP body: hex size line, data, CRLF, ..., size 0.
fn dechunk(mut body: &str) -> Result<String, String> {
    let mut data = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(data);
        }
        data.push_str(rest.get(..size).ok_or("truncated chunk")?);
        body = rest.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

/// Polls `check` every 20 ms until it gives a value, for at most `within`; the value and
/// how long it took.
pub fn poll_for<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The .deb in target/packages/, built with packaging/build.sh when there is none (one
/// release build: minutes). Rebuild after changing what goes in: `bash packaging/build.sh`.
pub fn deb() -> &'static Path {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = DEB.get_or_init(|| {
        let dir = Path::new(DISPATCHER)
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .join("packages");
        if let Some(deb) = find_deb(&dir) {
            return Ok(deb);
        }
        eprintln!(
            "[multihost] no .deb in {}: running packaging/build.sh",
            dir.display()
        );
        let status = Command::new("bash")
            .arg(Path::new(SOURCE).join("packaging/build.sh"))
            .current_dir(SOURCE)
            .status()
            .expect("bash runs");
        if !status.success() {
            return Err(format!("packaging/build.sh failed: {status}"));
        }
        find_deb(&dir)
            .ok_or_else(|| format!("packaging/build.sh left no .deb in {}", dir.display()))
    });
    found.as_deref().unwrap_or_else(|err| panic!("{err}"))
}

fn find_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("sticky-dispatch_") && name.ends_with(".deb")
        })
}
