//! The distribution packages (issue #5), checked the way users get them: the `.deb` is
//! installed with apt into a freshly booted container (tests/container: systemd-nspawn
//! on an overlay of the host's root), served from, upgraded, removed and purged; lintian
//! judges it; the `.rpm` is inspected and unpacked with Debian's `rpm`. The npm tarball
//! is installed with `npm install <tarball>` into a fresh project, the Python wheel and
//! sdist with `pip install '<file>[extras]'` into fresh venvs (issue #19).
//!
//! The packages are those in target/packages/; when one is missing, packaging/build.sh
//! builds them all first (one release build: minutes). Rebuild after changing what goes
//! into them: `bash packaging/build.sh`.
//!
//! Needs root (it mounts and boots a container, installs lintian and rpm with apt-get
//! when missing): those tests are ignored unless asked for (`-- --include-ignored`), and
//! fail, not pass, when asked for without root. What it checks and finds is
//! printed with the `[packages]` prefix: `cargo test --test packages -- --nocapture`.

use std::collections::BTreeSet;
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
    "/usr/lib/systemd/system/sticky-dispatch@.socket",
    "/usr/lib/systemd/system/sticky-dispatch@.service",
    "/usr/lib/systemd/system/app@.service",
    "/etc/sticky-dispatch/config.toml",
    "/usr/share/man/man8/sticky-dispatch.8.gz",
    "/usr/share/man/man5/sticky-dispatch.toml.5.gz",
    "/usr/share/doc/sticky-dispatch/README.md",
    "/usr/share/doc/sticky-dispatch/operations.md",
    "/usr/share/doc/sticky-dispatch/configuration.md",
    "/usr/share/doc/sticky-dispatch/protocol.md",
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
// The npm package and the Python wheel and sdist, installed as a user would

/// What `npm install <tarball>` puts in node_modules/sticky-dispatch: package.json's
/// "files", plus package.json itself; no tests, no lockfile.
const NPM_FILES: &[&str] = &[
    "LICENSE",
    "README.md",
    "index.d.ts",
    "index.js",
    "package.json",
];

#[test]
fn npm_tarball_installs_into_a_fresh_project_and_requires() {
    let tgz = &packages().npm;
    let project = Scratch::new("npm-project");
    std::fs::write(
        project.0.join("package.json"),
        r#"{ "name": "app", "version": "1.0.0", "private": true }"#,
    )
    .unwrap();
    // --offline: the package has no dependencies, so nothing may need the registry.
    let install = run(Command::new("npm")
        .args(["install", "--offline", "--no-audit", "--no-fund"])
        .arg(tgz)
        .current_dir(&project.0));
    say!(
        "$ npm install {} (in a fresh project)\n{}",
        file_name(tgz),
        install.trim_end()
    );

    let installed = project.0.join("node_modules/sticky-dispatch");
    let files = files_under(&installed);
    say!("node_modules/sticky-dispatch: {files:?}");
    assert_eq!(
        files,
        NPM_FILES
            .iter()
            .map(|f| f.to_string())
            .collect::<BTreeSet<_>>(),
        "the files npm installed"
    );
    for file in ["LICENSE", "index.js", "index.d.ts", "README.md"] {
        let source = if file == "LICENSE" {
            Path::new(SOURCE).join("LICENSE")
        } else {
            Path::new(SOURCE).join("node").join(file)
        };
        // Compared whole, reported by name: the bytes of a whole file would drown the log.
        assert!(
            std::fs::read(installed.join(file)).unwrap() == std::fs::read(&source).unwrap(),
            "{file} differs from {} (rebuild with packaging/build.sh)",
            source.display()
        );
    }

    // As the app would: require('sticky-dispatch') from the project, and the metadata
    // npm shows (npm view, the registry page) from the installed package.json.
    let script = r#"
        const s = require('sticky-dispatch');
        const p = require('sticky-dispatch/package.json');
        console.log(JSON.stringify({
            resolved: require.resolve('sticky-dispatch'),
            listen: typeof s.listen,
            name: p.name, version: p.version, license: p.license, main: p.main,
            types: p.types, engines: p.engines, repository: p.repository,
            homepage: p.homepage, bugs: p.bugs, keywords: p.keywords,
            dependencies: p.dependencies || {},
        }));
    "#;
    let out = run(Command::new("node")
        .args(["-e", script])
        .current_dir(&project.0));
    say!(
        "node -e \"require('sticky-dispatch')\" in the project: {}",
        out.trim()
    );
    let meta: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        meta["resolved"],
        installed.join("index.js").display().to_string()
    );
    assert_eq!(meta["listen"], "function");
    assert_eq!(meta["name"], "sticky-dispatch");
    assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["license"], "MIT");
    assert_eq!(meta["types"], "index.d.ts");
    assert!(meta["engines"]["node"].is_string(), "engines: {meta}");
    assert!(meta["repository"]["url"].is_string(), "repository: {meta}");
    assert_eq!(meta["repository"]["directory"], "node");
    assert!(meta["homepage"].is_string() && meta["bugs"]["url"].is_string());
    assert!(meta["keywords"].as_array().is_some_and(|k| !k.is_empty()));
    assert_eq!(
        meta["dependencies"],
        serde_json::json!({}),
        "no runtime deps"
    );
}

/// The files of the wheel's package directory, from the sources: every module and
/// py.typed (nothing else is in sticky_dispatch/ but byte code).
fn python_module_files() -> BTreeSet<String> {
    std::fs::read_dir(Path::new(SOURCE).join("python/sticky_dispatch"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".py") || n == "py.typed")
        .map(|n| format!("sticky_dispatch/{n}"))
        .collect()
}

#[test]
fn wheel_installs_with_its_extras_into_a_fresh_venv() {
    let wheel = &packages().wheel;
    let venv = Venv::new("wheel");
    let spec = format!("{}[aiohttp,uvicorn]", wheel.display());
    let install = venv.pip(&["install", &spec]);
    say!(
        "$ pip install '{}[aiohttp,uvicorn]' (fresh venv): {}",
        file_name(wheel),
        last_line(&install)
    );
    check_installed(&venv, &["aiohttp", "uvicorn"]);
}

#[test]
fn sdist_builds_and_installs_with_the_aiohttp_extra_into_a_fresh_venv() {
    let sdist = &packages().sdist;
    // What the sdist holds: enough to build the wheel, the readme and the licence; no
    // tests (they read ../tests/vectors), no build junk.
    let listing = run(Command::new("tar").arg("-tzf").arg(sdist));
    let top = format!("sticky_dispatch-{}/", env!("CARGO_PKG_VERSION"));
    let listed: BTreeSet<String> = listing
        .lines()
        .map(|l| {
            l.strip_prefix(&top)
                .unwrap_or_else(|| panic!("{l} is outside {top}"))
                .to_owned()
        })
        .filter(|l| !l.is_empty() && !l.ends_with('/'))
        .collect();
    let mut expected: BTreeSet<String> = ["LICENSE", "README.md", "pyproject.toml", "PKG-INFO"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    expected.extend(python_module_files());
    say!("$ tar -tzf {}: {listed:?}", file_name(sdist));
    assert_eq!(listed, expected, "the files of the sdist");

    // pip builds the wheel from it (flit_core, from the index) and installs that.
    let venv = Venv::new("sdist");
    let spec = format!("{}[aiohttp]", sdist.display());
    let install = venv.pip(&["install", &spec]);
    say!(
        "$ pip install '{}[aiohttp]' (fresh venv): {}",
        file_name(sdist),
        last_line(&install)
    );
    check_installed(&venv, &["aiohttp"]);
}

/// In a venv where sticky-dispatch was installed with `extras`: the adapters import,
/// the extras pulled their web servers, the installed files are the package's and
/// nothing else, and the metadata is complete.
fn check_installed(venv: &Venv, extras: &[&str]) {
    let script = r#"
import json, sys
import importlib.metadata as m
import sticky_dispatch, sticky_dispatch.aiohttp
extras = sys.argv[1:]
if "uvicorn" in extras:
    import sticky_dispatch.uvicorn
md = m.metadata("sticky-dispatch")
files = [str(f) for f in m.files("sticky-dispatch")]
print(json.dumps({
    "file": sticky_dispatch.__file__,
    "version": sticky_dispatch.__version__,
    "pulled": {e: m.version(e) for e in extras},
    "files": sorted(f for f in files if "__pycache__" not in f),
    "meta": {k: md.get_all(k) for k in ["Name", "Version", "Summary", "License-Expression",
        "License-File", "Requires-Python", "Provides-Extra", "Requires-Dist", "Project-URL",
        "Classifier", "Keywords", "Author-email", "Description-Content-Type"]},
    "readme": len(md.get_payload() or ""),
}))
"#;
    let mut args = vec!["-c", script];
    args.extend(extras);
    let out = venv.python(&args);
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    say!(
        "import sticky_dispatch.aiohttp{}: {}, pulled {}",
        if extras.contains(&"uvicorn") {
            ", sticky_dispatch.uvicorn"
        } else {
            ""
        },
        got["file"],
        got["pulled"]
    );
    assert!(
        got["file"]
            .as_str()
            .unwrap()
            .starts_with(&venv.dir.0.display().to_string()),
        "imported from outside the venv: {got}"
    );
    assert_eq!(got["version"], env!("CARGO_PKG_VERSION"));
    for extra in extras {
        assert!(
            got["pulled"][extra].is_string(),
            "{extra} not installed: {got}"
        );
    }

    // Installed files: the package directory and its dist-info, nothing more.
    let dist_info = format!("sticky_dispatch-{}.dist-info/", env!("CARGO_PKG_VERSION"));
    let files: Vec<&str> = got["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    say!("installed files: {files:?}");
    let package: BTreeSet<String> = files
        .iter()
        .filter(|f| !f.starts_with(&dist_info))
        .map(|f| f.to_string())
        .collect();
    assert_eq!(
        package,
        python_module_files(),
        "installed outside the dist-info"
    );
    assert!(
        files.contains(&format!("{dist_info}licenses/LICENSE").as_str()),
        "no licence in the dist-info: {files:?}"
    );

    let meta = &got["meta"];
    let one = |key: &str| meta[key][0].as_str().unwrap_or_default().to_owned();
    let all = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .map(|v| v.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    say!("metadata: {meta}");
    assert_eq!(one("Name"), "sticky-dispatch");
    assert_eq!(one("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(one("License-Expression"), "MIT");
    assert_eq!(one("License-File"), "LICENSE");
    assert_eq!(one("Requires-Python"), ">=3.9");
    assert_eq!(one("Description-Content-Type"), "text/markdown");
    assert!(got["readme"].as_u64().unwrap() > 100, "no long description");
    assert!(!one("Summary").is_empty() && !one("Keywords").is_empty());
    assert!(!one("Author-email").is_empty());
    let provided = all("Provides-Extra");
    for extra in ["aiohttp", "uvicorn"] {
        assert!(
            provided.iter().any(|e| e == extra),
            "no [{extra}] extra: {provided:?}"
        );
    }
    let requires = all("Requires-Dist");
    assert!(
        requires.iter().all(|r| r.contains("extra ==")),
        "a dependency outside the extras (the core is standard library only): {requires:?}"
    );
    let urls = all("Project-URL");
    assert!(
        urls.iter().any(|u| u.starts_with("Repository, ")),
        "no repository URL: {urls:?}"
    );
    let classifiers = all("Classifier");
    for c in [
        "Operating System :: POSIX :: Linux",
        "Typing :: Typed",
        "Framework :: AsyncIO",
    ] {
        assert!(classifiers.iter().any(|x| x == c), "no classifier {c:?}");
    }
}

/// A directory in the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "sticky-dispatch-packages-{label}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh venv of the `python3` on PATH, as a user makes one; pip installs from the
/// package index the machine is set up with.
struct Venv {
    dir: Scratch,
}

impl Venv {
    fn new(label: &str) -> Venv {
        let dir = Scratch::new(&format!("venv-{label}"));
        run(Command::new("python3").arg("-m").arg("venv").arg(&dir.0));
        Venv { dir }
    }

    fn pip(&self, args: &[&str]) -> String {
        run(Command::new(self.dir.0.join("bin/pip"))
            .args(["--disable-pip-version-check", "--no-input"])
            .args(args))
    }

    fn python(&self, args: &[&str]) -> String {
        // From the venv's own directory, so that nothing of this tree is on sys.path.
        run(Command::new(self.dir.0.join("bin/python"))
            .args(args)
            .current_dir(&self.dir.0))
    }
}

/// Runs `cmd`; panics with its output unless it succeeds; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files under `dir`, relative to it, recursively (bounded by the tree's size).
fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                found.insert(
                    path.strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    found
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
    /// `npm pack` of node/.
    npm: PathBuf,
    /// `python -m build` of python/.
    wheel: PathBuf,
    sdist: PathBuf,
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
                "using {}, {}, {}, {} and {} (rebuild with packaging/build.sh)",
                found.deb.display(),
                file_name(&found.rpm),
                file_name(&found.npm),
                file_name(&found.wheel),
                file_name(&found.sdist),
            );
            return Ok(found);
        }
        say!(
            "not every package is in {}: running packaging/build.sh",
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
                "packaging/build.sh left not all of the .deb, .rpm, .tgz, .whl and .tar.gz \
                 of version {} in {}",
                env!("CARGO_PKG_VERSION"),
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
    let version = env!("CARGO_PKG_VERSION");
    Some(Packages {
        deb: find("sticky-dispatch_", ".deb")?,
        rpm: find("sticky-dispatch-", ".rpm")?,
        npm: find(&format!("sticky-dispatch-{version}"), ".tgz")?,
        wheel: find(&format!("sticky_dispatch-{version}-"), "-py3-none-any.whl")?,
        sdist: find(&format!("sticky_dispatch-{version}"), ".tar.gz")?,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// One release, one version: the npm package, the Python package (its metadata and
/// `__version__`) and the .deb's `Provides: node-sticky-dispatch` carry the crate's; the
/// LICENSE copies the npm and Python packages ship are the repository's.
#[test]
fn the_npm_and_python_packages_carry_the_crate_version_and_license() {
    let version = env!("CARGO_PKG_VERSION");
    let read = |path: &str| {
        std::fs::read_to_string(Path::new(SOURCE).join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let package_json: serde_json::Value = serde_json::from_str(&read("node/package.json")).unwrap();
    assert_eq!(package_json["version"], version, "node/package.json");
    let pyproject: toml::Table = toml::from_str(&read("python/pyproject.toml")).unwrap();
    assert_eq!(
        pyproject["project"]["version"].as_str(),
        Some(version),
        "python/pyproject.toml"
    );
    let init = read("python/sticky_dispatch/__init__.py");
    assert!(
        init.lines()
            .any(|l| l == format!("__version__ = \"{version}\"")),
        "python/sticky_dispatch/__init__.py: no __version__ = \"{version}\""
    );
    let provides = format!("provides = \"node-sticky-dispatch (= {version})\"");
    assert!(
        read("Cargo.toml").contains(&provides),
        "Cargo.toml: no {provides}"
    );
    for copy in ["node/LICENSE", "python/LICENSE"] {
        assert_eq!(
            read(copy),
            read("LICENSE"),
            "{copy} is not a copy of LICENSE"
        );
    }
    say!("node/package.json, python/pyproject.toml, __version__, Provides: all {version}");
}
