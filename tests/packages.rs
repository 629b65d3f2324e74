//! The distribution packages (issue #5), checked the way users get them: the `.deb` is
//! installed with apt into a freshly booted container (tests/container: systemd-nspawn
//! on an overlay of the host's root), served from, upgraded, removed and purged; lintian
//! judges it; the `.rpm` is inspected and unpacked with Debian's `rpm`.
//!
//! The packages are those in target/packages/; when there are none, packaging/build.sh
//! builds them first (one release build: minutes). Rebuild after changing what goes
//! into them: `bash packaging/build.sh`.
//!
//! Needs root (it mounts and boots a container, installs lintian and rpm with apt-get
//! when missing): those tests are ignored unless asked for (`-- --include-ignored`), and
//! fail, not pass, when asked for without root. What it checks and finds is
//! printed with the `[packages]` prefix: `cargo test --test packages -- --nocapture`.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

mod container;
use container::{
    ensure_command, ensure_nspawn, enter_netns, http_get, output_text, poll, stage_file, Container,
    PATIENCE,
};

const SOURCE: &str = env!("CARGO_MANIFEST_DIR");
/// Only to find the target directory: <target>/debug/sticky-dispatch.
const DISPATCHER: &str = env!("CARGO_BIN_EXE_sticky-dispatch");

/// The port of systemd/sticky-dispatch.socket.
const PORT: u16 = 8080;
/// Where the .deb is put in the container.
const DEB_DIR: &str = "/root/packages";
const CONFIG: &str = "/etc/sticky-dispatch/config.toml";
/// The first connection starts the dispatcher and the workers; a worker that is not up
/// yet keeps it waiting up to pending_timeout (30 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);

/// What the packages must install, besides their own metadata (copyright or LICENSE).
const FILES: &[&str] = &[
    "/usr/bin/sticky-dispatch",
    "/usr/bin/sticky-dispatch-demo",
    "/usr/lib/systemd/system-generators/sticky-dispatch-generator",
    "/usr/lib/systemd/system/sticky-dispatch.socket",
    "/usr/lib/systemd/system/sticky-dispatch.service",
    "/usr/lib/systemd/system/app@.service",
    "/etc/sticky-dispatch/config.toml",
    "/usr/share/man/man8/sticky-dispatch.8.gz",
    "/usr/share/man/man5/sticky-dispatch.toml.5.gz",
    "/usr/share/doc/sticky-dispatch/README.md",
    "/usr/share/doc/sticky-dispatch/operations.md",
];

macro_rules! say {
    ($($arg:tt)*) => { eprintln!("[packages] {}", format_args!($($arg)*)) };
}

// ---------------------------------------------------------------------------------------
// The .deb in a booted container

#[test]
#[ignore = "needs root: builds and installs packages, boots systemd with systemd-nspawn"]
fn deb_installs_serves_upgrades_removes_and_purges_under_systemd() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (builds and installs packages, boots systemd with systemd-nspawn)"
    );
    ensure_nspawn();
    let deb = packages().deb.clone();
    let name = file_name(&deb);
    let inside = format!("{DEB_DIR}/{name}");
    let c = Container::boot("packages", |dir| {
        stage_file(dir, &inside, &deb, 0o644);
    });

    // The host is a Docker image whose /usr/sbin/policy-rc.d (exit 101) forbids
    // maintainer scripts to start services; a real Debian system has none. Removed in
    // the container only (the overlay), put back at the end to check it is obeyed.
    let policy = c.run(&["rm", "-v", "/usr/sbin/policy-rc.d"]);
    say!(
        "policy-rc.d in the container: {}",
        if policy.status.success() {
            "removed (the host image's, exit 101)"
        } else {
            "none"
        }
    );

    // --- install
    let install = apt(&c, "install -y ./sticky-dispatch_*.deb");
    say!(
        "$ cd {DEB_DIR} && apt install -y ./sticky-dispatch_*.deb\n{}",
        install.trim_end()
    );
    let status = c.ok(&[
        "dpkg-query",
        "-W",
        "-f",
        "${Status} ${Version}",
        "sticky-dispatch",
    ]);
    say!("dpkg-query: {status}");
    assert!(status.starts_with("install ok installed"), "{status}");
    let listed = c.ok(&["dpkg", "-L", "sticky-dispatch"]);
    for file in FILES
        .iter()
        .chain(&["/usr/share/doc/sticky-dispatch/copyright"])
    {
        assert!(
            listed.lines().any(|l| l == *file),
            "dpkg -L misses {file}:\n{listed}"
        );
        c.ok(&["test", "-e", file]);
    }
    let conffiles = c.ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "sticky-dispatch"]);
    say!("conffiles:{}", conffiles.trim_end());
    assert!(conffiles.contains(CONFIG), "{CONFIG} is not a conffile");
    let check = c.run(&["sticky-dispatch", "check-config"]);
    assert!(check.status.success(), "{}", output_text(&check));
    say!(
        "sticky-dispatch check-config: {}",
        String::from_utf8_lossy(&check.stderr).trim()
    );

    // The Node.js package, found by a plain require() without npm: by Debian's Node in
    // /usr/share/nodejs, by an upstream-built one (the host's) through /usr/lib/node.
    let node = c.run(&[
        "node",
        "-e",
        "const s = require('sticky-dispatch'); console.log(require.resolve('sticky-dispatch'), typeof s.listen)",
    ]);
    say!(
        "node -e \"require('sticky-dispatch')\": {}",
        output_text(&node).trim()
    );
    assert!(
        node.status.success()
            && String::from_utf8_lossy(&node.stdout)
                .trim_end()
                .ends_with("index.js function"),
        "require('sticky-dispatch') after apt install: {}",
        output_text(&node)
    );

    let enabled = c.ok_or_not(&["systemctl", "is-enabled", "sticky-dispatch.socket"]);
    let active = c.ok_or_not(&["systemctl", "is-active", "sticky-dispatch.socket"]);
    say!("sticky-dispatch.socket after install: {enabled}, {active}");
    assert_eq!(enabled, "enabled");
    assert_eq!(active, "active");
    let wants = c.generated_wants();
    say!("the generator wants: {wants:?}");
    assert!(!wants.is_empty(), "the generator made no workers");

    let reply = get(&c).expect("a request to 127.0.0.1:8080 in the container");
    say!("GET http://127.0.0.1:{PORT}/ -> {reply:?}");
    let worker = worker_of(&reply);
    poll("the dispatcher and the worker active", || {
        let units = [
            "sticky-dispatch.service".to_owned(),
            format!("app@{worker}"),
        ];
        units
            .iter()
            .all(|u| c.active_state(u) == "active")
            .then_some(())
    });
    let dispatcher = c.main_pid("sticky-dispatch.service");
    say!(
        "sticky-dispatch.service active (pid {dispatcher}), served by app@{worker} (pid {})",
        c.main_pid(&format!("app@{worker}"))
    );

    // --- upgrade (a reinstall runs the upgrade branches: prerm upgrade, postinst
    // configure <old version>): the dispatcher is restarted, the socket stays.
    let reinstall = apt(&c, "install -y --reinstall ./sticky-dispatch_*.deb");
    say!(
        "$ apt install -y --reinstall ./sticky-dispatch_*.deb: {}",
        last_line(&reinstall)
    );
    let after = poll("the dispatcher restarted", || {
        let pid = c.main_pid("sticky-dispatch.service");
        (pid != 0 && pid != dispatcher).then_some(pid)
    });
    assert_eq!(c.active_state("sticky-dispatch.socket"), "active");
    let reply = get(&c).expect("a request after the upgrade");
    say!("after the upgrade: dispatcher pid {dispatcher} -> {after}, socket active, {reply:?}");
    worker_of(&reply);

    // --- remove: stopped, config kept
    let remove = apt(&c, "remove -y sticky-dispatch");
    say!("$ apt remove -y sticky-dispatch: {}", last_line(&remove));
    for unit in [
        "sticky-dispatch.socket",
        "sticky-dispatch.service",
        &format!("app@{worker}.service"),
    ] {
        let state = c.active_state(unit);
        say!("after remove: {unit} {state}");
        assert_eq!(state, "inactive", "{unit} still runs after apt remove");
    }
    assert!(get(&c).is_err(), "port {PORT} still answers after remove");
    let status = c.ok(&["dpkg-query", "-W", "-f", "${Status}", "sticky-dispatch"]);
    say!("dpkg-query: {status}; {CONFIG} kept");
    assert_eq!(status, "deinstall ok config-files");
    c.ok(&["test", "-f", CONFIG]);
    assert!(!c
        .run(&["test", "-e", "/usr/bin/sticky-dispatch"])
        .status
        .success());

    // --- purge: config and the systemd state gone
    let purge = apt(&c, "purge -y sticky-dispatch");
    say!("$ apt purge -y sticky-dispatch: {}", last_line(&purge));
    for gone in [
        CONFIG,
        "/etc/sticky-dispatch",
        "/etc/systemd/system/sockets.target.wants/sticky-dispatch.socket",
        "/etc/systemd/system/sticky-dispatch.socket",
        "/var/lib/systemd/deb-systemd-helper-enabled/sticky-dispatch.socket.dsh-also",
    ] {
        assert!(
            !c.run(&["test", "-e", gone]).status.success(),
            "{gone} is still there after purge"
        );
    }
    let status = c.run(&["dpkg-query", "-W", "-f", "${Status}", "sticky-dispatch"]);
    say!(
        "after purge: {CONFIG}, /etc/sticky-dispatch and the enablement gone; dpkg-query: {}",
        output_text(&status).trim()
    );
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains("config-files"),
        "still known to dpkg after purge"
    );

    // --- with a policy-rc.d that forbids starting services (Docker images, chroots),
    // the socket is enabled but not started.
    c.write_file("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n");
    c.ok(&["chmod", "755", "/usr/sbin/policy-rc.d"]);
    apt(&c, "install -y ./sticky-dispatch_*.deb");
    let enabled = c.ok_or_not(&["systemctl", "is-enabled", "sticky-dispatch.socket"]);
    let active = c.ok_or_not(&["systemctl", "is-active", "sticky-dispatch.socket"]);
    say!("with policy-rc.d exit 101: sticky-dispatch.socket {enabled}, {active}");
    assert_eq!(enabled, "enabled");
    assert_eq!(active, "inactive", "policy-rc.d was not obeyed");
    apt(&c, "purge -y sticky-dispatch");
}

/// `apt ARGS` inside, in the directory of the .deb, as a user types it (`./` and a
/// glob), non-interactive; panics unless it succeeds; its output. The
/// container has no network (`--private-network`): installing a local .deb whose
/// dependencies the host's root already satisfies downloads nothing.
fn apt(c: &Container, args: &str) -> String {
    let line = format!("cd {DEB_DIR} && DEBIAN_FRONTEND=noninteractive apt {args}");
    let out = c.run(&["sh", "-c", &line]);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "`apt {args}` failed ({}):\n{text}",
        out.status
    );
    // apt's "WARNING: apt does not have a stable CLI interface" is for scripts that
    // parse its output; this one only reads it.
    text.lines()
        .filter(|l| !l.contains("stable CLI interface") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or_default()
}

trait Probe {
    /// stdout of `args` inside, trimmed, whatever its exit status (`systemctl is-*`
    /// exits non-zero for "inactive").
    fn ok_or_not(&self, args: &[&str]) -> String;
}

impl Probe for Container {
    fn ok_or_not(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(args).stdout)
            .trim()
            .to_owned()
    }
}

/// One HTTP request to 127.0.0.1:8080 from inside the container; the reply's body.
fn get(c: &Container) -> Result<String, String> {
    let netns = c.netns();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT));
        let stream =
            TcpStream::connect_timeout(&addr, PATIENCE).map_err(|e| format!("connect: {e}"))?;
        let text = http_get(stream, REPLY_TIMEOUT)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP reply: {text:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("HTTP status: {head:?}"));
        }
        Ok(body.to_owned())
    })
    .join()
    .unwrap()
}

/// The index in the demo worker's `worker=<index> pid=<pid> client=<ip>` line.
fn worker_of(reply: &str) -> u32 {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("worker="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no worker= line in the reply: {reply:?}"))
}

// ---------------------------------------------------------------------------------------
// lintian

#[test]
#[ignore = "needs root: builds the packages, installs lintian with apt-get"]
fn lintian_finds_no_errors_and_no_unexplained_warnings() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (builds the packages, installs lintian with apt-get)"
    );
    ensure_command("lintian", "lintian");
    let deb = &packages().deb;
    // --show-overrides: the overridden tags too (as O:), each explained in
    // packaging/debian/lintian-overrides and packaging/README.md.
    // --fail-on none: with --show-overrides lintian's exit status also counts the
    // overridden tags (an overridden error-level tag exits 2); the E:/W: lines are
    // checked below instead, and the status still reports a failed run.
    let out = Command::new("lintian")
        .args([
            "--display-info",
            "--show-overrides",
            "--fail-on",
            "none",
            "--tag-display-limit",
            "0",
        ])
        .arg(deb)
        .output()
        .expect("lintian runs");
    let text = output_text(&out);
    say!(
        "$ lintian --display-info --show-overrides {} (exit {:?})\n{}",
        file_name(deb),
        out.status.code(),
        text.trim_end()
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        bad.is_empty(),
        "lintian errors or warnings not overridden:\n{}",
        bad.join("\n")
    );
    assert!(out.status.success(), "lintian failed:\n{text}");
}

// ---------------------------------------------------------------------------------------
// The .rpm, with Debian's rpm

#[test]
#[ignore = "needs root: builds the packages, installs rpm with apt-get"]
fn rpm_has_the_files_scriptlets_config_and_dependencies() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (builds the packages, installs rpm with apt-get)"
    );
    ensure_command("rpm", "rpm");
    let rpm = &packages().rpm;
    let query = |args: &[&str]| -> String {
        let out = Command::new("rpm")
            .args(args)
            .arg(rpm)
            .output()
            .expect("rpm runs");
        assert!(
            out.status.success(),
            "rpm {} failed: {}",
            args.join(" "),
            output_text(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        say!(
            "$ rpm {} {}\n{}",
            args.join(" "),
            file_name(rpm),
            text.trim_end()
        );
        text
    };

    let info = query(&["-qpi"]);
    assert!(info.contains("License     : MIT"), "{info}");
    let files = query(&["-qlp"]);
    for file in FILES
        .iter()
        .chain(&["/usr/share/doc/sticky-dispatch/LICENSE"])
    {
        assert!(files.lines().any(|l| l == *file), "rpm -qlp misses {file}");
    }

    let scripts = query(&["-qp", "--scripts"]);
    for (scriptlet, expected) in [
        (
            "postinstall scriptlet",
            "install-system-units sticky-dispatch.socket",
        ),
        (
            "preuninstall scriptlet",
            "remove-system-units sticky-dispatch.socket sticky-dispatch-metrics.socket sticky-dispatch.service",
        ),
        (
            "postuninstall scriptlet",
            "mark-restart-system-units sticky-dispatch.service",
        ),
    ] {
        let body = scripts
            .split_once(scriptlet)
            .unwrap_or_else(|| panic!("no {scriptlet} in rpm --scripts"))
            .1;
        let body = body.split(" scriptlet (using").next().unwrap_or(body);
        assert!(body.contains(expected), "{scriptlet} lacks {expected:?}");
    }

    let config = query(&["-qp", "--configfiles"]);
    assert_eq!(config.trim(), CONFIG, "config files");
    // %config(noreplace): flags c(onfig) and n(oreplace).
    let flags = query(&["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    let config_flags = flags
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{CONFIG} ")))
        .unwrap_or_default();
    assert!(
        config_flags.contains('c') && config_flags.contains('n'),
        "{CONFIG} is not %config(noreplace): flags {config_flags:?}"
    );
    let requires = query(&["-qpR"]);
    assert!(
        requires.lines().any(|l| l.starts_with("libc.so.6")),
        "{requires}"
    );
    assert!(requires.lines().any(|l| l == "/bin/sh"), "{requires}");

    // Unpacked into a scratch root: the files land where rpm -qlp says.
    let root =
        std::env::temp_dir().join(format!("sticky-dispatch-rpm-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let install = Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-i", "--nodeps", "--noscripts"])
        .arg(rpm)
        .output()
        .expect("rpm runs");
    let text = output_text(&install);
    say!(
        "$ rpm --root {} -i --nodeps --noscripts {}: exit {:?} {}",
        root.display(),
        file_name(rpm),
        install.status.code(),
        text.trim()
    );
    assert!(
        install.status.success(),
        "rpm -i into a scratch root: {text}"
    );
    for file in FILES {
        let path = root.join(file.trim_start_matches('/'));
        assert!(path.exists(), "{} did not land", path.display());
    }
    let dispatcher = root.join("usr/bin/sticky-dispatch");
    let version = Command::new(&dispatcher)
        .arg("--version")
        .output()
        .expect("the unpacked dispatcher runs");
    say!(
        "files landed; {} --version: {}",
        dispatcher.display(),
        output_text(&version).trim()
    );
    assert!(version.status.success());
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------
// Versions

/// The .deb's version is the crate's plus the revision (`revision` in
/// `[package.metadata.deb]`, cargo-deb's default "1"): the latest entry of the Debian
/// changelog must name it.
#[test]
fn debian_changelog_names_the_package_version() {
    let manifest = std::fs::read_to_string(Path::new(SOURCE).join("Cargo.toml")).unwrap();
    let deb_section = manifest
        .split("\n[package.metadata.deb]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [package.metadata.deb] section in Cargo.toml");
    let revision = deb_section
        .lines()
        .find_map(|l| l.strip_prefix("revision = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "1".to_owned());
    let changelog = std::fs::read_to_string(Path::new(SOURCE).join("packaging/debian/changelog"))
        .expect("packaging/debian/changelog");
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!(
        "sticky-dispatch ({}-{revision}) ",
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        first.starts_with(&expected),
        "packaging/debian/changelog starts with {first:?}, not {expected:?}...: \
         add an entry for this version (docs/RELEASING.md)"
    );
}

// ---------------------------------------------------------------------------------------
// The packages

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// The .deb and .rpm in target/packages/, built with packaging/build.sh if absent; once
/// for all the tests of this file.
fn packages() -> &'static Packages {
    // A failed build is kept too, so that the other tests fail at once instead of
    // building again.
    static PACKAGES: OnceLock<Result<Packages, String>> = OnceLock::new();
    let found = PACKAGES.get_or_init(|| {
        let dir = Path::new(DISPATCHER)
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .join("packages");
        if let Some(found) = find_packages(&dir) {
            say!(
                "using {} and {} (rebuild with packaging/build.sh)",
                found.deb.display(),
                found.rpm.display()
            );
            return Ok(found);
        }
        say!(
            "no packages in {}: running packaging/build.sh",
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
        find_packages(&dir).ok_or_else(|| {
            format!(
                "packaging/build.sh left no .deb and .rpm in {}",
                dir.display()
            )
        })
    });
    found.as_ref().unwrap_or_else(|err| panic!("{err}"))
}

fn find_packages(dir: &Path) -> Option<Packages> {
    let names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    let find = |prefix: &str, ext: &str| {
        names
            .iter()
            .find(|p| {
                let name = file_name(p);
                name.starts_with(prefix) && name.ends_with(ext)
            })
            .cloned()
    };
    Some(Packages {
        deb: find("sticky-dispatch_", ".deb")?,
        rpm: find("sticky-dispatch-", ".rpm")?,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}
