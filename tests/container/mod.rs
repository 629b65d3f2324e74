//! A booted systemd in a container, shared by the suites that need one
//! (tests/systemd.rs, tests/packages.rs): systemd-nspawn on an overlay of the host's
//! root (tests/container/boot-container.sh, ../shared/REAL-SYSTEMD.md), so that every
//! binary and library of the host is inside and nothing the container writes reaches
//! the host. Commands run inside with nsenter; the container powers off when dropped.
//!
//! Needs root. `mod container;` in a test crate; each uses a different part of it.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SOURCE: &str = env!("CARGO_MANIFEST_DIR");

/// Bound on anything that should take a second: machines are shared.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Prints a line prefixed with the suite's label, e.g. `[systemd] ...`.
fn say(label: &str, line: std::fmt::Arguments) {
    eprintln!("[{label}] {line}");
}

/// A booted container, powered off (and its cgroups removed) when dropped.
pub struct Container {
    /// Prefix of what it prints, and part of its name: the suite it serves.
    label: String,
    nspawn: Child,
    /// The container's systemd, as the host sees it.
    init: i32,
    scratch: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// Boots a container named `sticky-dispatch-<label>-<pid>` to basic.target.
    /// `stage` lays out, in the directory it is given, the files copied over the root
    /// before boot (see [`stage_file`]).
    pub fn boot(label: &str, stage: impl FnOnce(&Path)) -> Container {
        let name = format!("sticky-dispatch-{label}-{}", std::process::id());
        Container::boot_named(label, name, None, stage)
    }

    /// Like [`Container::boot`], but the container joins the prepared network namespace
    /// `netns` (e.g. `/run/netns/NAME` from `ip netns add`) instead of getting a private
    /// network: its services listen on that namespace's interfaces. `host` tells several
    /// containers of one suite apart (`sticky-dispatch-<label>-<host>-<pid>`).
    ///
    /// Returns once systemd-nspawn is started; [`Booting::wait`] waits for the boot, so
    /// that several containers boot at once. Call it from a thread that outlives the
    /// container (the test's own): the container is powered off when the thread that
    /// started it exits (PR_SET_PDEATHSIG is per thread).
    pub fn start_in_netns(
        label: &str,
        host: &str,
        netns: &Path,
        stage: impl FnOnce(&Path),
    ) -> Booting {
        let name = format!("sticky-dispatch-{label}-{host}-{}", std::process::id());
        Container::start_named(label, &name, Some(netns), stage)
    }

    fn boot_named(
        label: &str,
        name: String,
        netns: Option<&Path>,
        stage: impl FnOnce(&Path),
    ) -> Container {
        Container::start_named(label, &name, netns, stage).wait()
    }

    fn start_named(
        label: &str,
        name: &str,
        netns: Option<&Path>,
        stage: impl FnOnce(&Path),
    ) -> Booting {
        let scratch = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let staged = scratch.join("stage");
        make_dirs(&staged, &staged);
        stage(&staged);
        let cgroups = make_cgroups(name);

        let console = File::create(scratch.join("console.log")).unwrap();
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "/bin/sh"])
            .arg(Path::new(SOURCE).join("tests/container/boot-container.sh"))
            .arg(&scratch)
            .arg(name)
            .args(&cgroups)
            .env_remove("NSPAWN_NETNS")
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        if let Some(netns) = netns {
            command.env("NSPAWN_NETNS", netns);
        }
        // SAFETY: prctl is async-signal-safe. If the test process dies without unwinding
        // (killed, Ctrl-C), the container is told to power off rather than left running.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let nspawn = command.spawn().unwrap_or_else(|err| {
            cgroups.iter().for_each(|cgroup| remove_cgroup(cgroup));
            panic!("could not run unshare: {err}")
        });
        let container = Container {
            label: label.to_owned(),
            nspawn,
            init: 0,
            scratch,
            cgroups,
        };
        Booting {
            container,
            name: name.to_owned(),
            started: Instant::now(),
        }
    }

    /// The child of systemd-nspawn that runs systemd.
    pub fn find_init(&self) -> Option<i32> {
        let pid = self.nspawn.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .find(|child| {
                std::fs::read_to_string(format!("/proc/{child}/comm"))
                    .is_ok_and(|comm| comm.trim() == "systemd")
            })
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.scratch.join("console.log")).unwrap_or_default()
    }

    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.init))
    }

    /// `args` run inside the container, with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.init.to_string(), "-a", "--"])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nsenter runs")
    }

    /// Runs `args` inside, panics unless it succeeds; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn write_file(&self, path: &str, contents: &str) {
        let mut child = self
            .command(&["sh", "-c", "cat > \"$0\"", path])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(contents.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "could not write {path}");
    }

    pub fn prop(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-p", property, "--value", unit])
            .trim()
            .to_owned()
    }

    /// The process that serves `unit`'s clients: the worker launcher's (the unit's
    /// MainPID) current child, or MainPID itself for a worker run directly.
    pub fn serving_pid(&self, unit: &str) -> u32 {
        let main = self.main_pid(unit);
        if main == 0 {
            return 0;
        }
        let children = self
            .run(&["cat", &format!("/proc/{main}/task/{main}/children")])
            .stdout;
        let children: Vec<u32> = String::from_utf8_lossy(&children)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect();
        match children.as_slice() {
            [] => main,
            [only] => *only,
            // During a reload: the newest.
            more => *more.iter().max().unwrap(),
        }
    }

    pub fn main_pid(&self, unit: &str) -> u32 {
        self.prop(unit, "MainPID").parse().unwrap()
    }

    pub fn active_state(&self, unit: &str) -> String {
        self.prop(unit, "ActiveState")
    }

    /// The host's pid of the container's process `pid` (as `systemctl` inside shows it):
    /// the process in the container's pid namespace whose innermost NSpid is `pid`.
    pub fn host_pid(&self, pid: u32) -> Option<i32> {
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        let ours = ns(&self.init.to_string())?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|host| {
                let status =
                    std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
                let inner = status
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|p| p.parse::<u32>().ok());
                inner == Some(pid) && ns(&host.to_string()).as_ref() == Some(&ours)
            })
    }

    /// The names in the generator's sticky-dispatch.service.wants.
    pub fn generated_wants(&self) -> BTreeSet<String> {
        let out = self.run(&[
            "ls",
            "-1",
            "/run/systemd/generator/sticky-dispatch.service.wants",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The cursor of the journal's last entry, to read what comes after it.
    pub fn journal_cursor(&self) -> String {
        let entries = self.journal(&["-n", "1"]);
        field(entries.last().expect("a journal entry"), "__CURSOR")
            .expect("__CURSOR")
            .to_owned()
    }

    /// journalctl `args` in export format, parsed.
    pub fn journal(&self, args: &[&str]) -> Vec<Entry> {
        let mut all = vec!["journalctl", "--no-pager", "-o", "export"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        parse_export(&out.stdout)
    }
}

/// A container whose systemd-nspawn is started: [`Booting::wait`] for its boot.
pub struct Booting {
    container: Container,
    name: String,
    started: Instant,
}

impl Booting {
    /// Waits until the container's systemd reports running (or degraded).
    pub fn wait(self) -> Container {
        let Booting {
            mut container,
            name,
            started: booted,
        } = self;
        let label = container.label.clone();
        let label = label.as_str();
        let init = poll("the container's systemd", || {
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited with {status}; console:\n{}",
                    container.console()
                );
            }
            container.find_init()
        });
        container.init = init;
        let state = poll("systemctl is-system-running", || {
            let out = container.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            matches!(state.as_str(), "running" | "degraded").then_some(state)
        });
        say(
            label,
            format_args!(
                "container {name} booted to basic.target in {:.1?} ({state})",
                booted.elapsed()
            ),
        );
        if state == "degraded" {
            say(
                label,
                format_args!(
                    "failed units: {}",
                    container.ok(&["systemctl", "--failed", "--no-legend", "--plain"])
                ),
            );
        }
        container
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM makes systemd-nspawn power the container off cleanly.
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + PATIENCE;
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !exited {
            say(
                &self.label,
                format_args!("the container did not power off: killing it"),
            );
            if self.init > 0 {
                // Killing init ends its whole pid namespace.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.init),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        // The mounts lived in the private mount namespace of the nspawn process and went
        // with it; what remains on the host is the scratch directory and the cgroups.
        for cgroup in &self.cgroups {
            remove_cgroup(cgroup);
        }
        if std::env::var_os("STICKY_DISPATCH_KEEP_CONTAINER_LOG").is_none() {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
    }
}

/// Copies `source` to `path` (relative to the root) in the stage directory, with `mode`.
/// Runs one scenario of a suite that shares one container, catching its panic so that
/// the next scenarios still run: the time it took, or its panic message.
pub fn run_scenario(scenario: impl FnOnce()) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(scenario))
        .map(|()| started.elapsed())
        .map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
}

/// Lays out the product over the container's root as the .deb would, from this build:
/// the dispatcher (`dispatcher`, so a suite can try another build), the demo worker, the
/// generator, the units in `systemd/`, and `config` as /etc/sticky-dispatch/config.toml.
pub fn stage_product(stage: &Path, dispatcher: &Path, config: &str) {
    let unit = |name: &str| Path::new(SOURCE).join("systemd").join(name);
    let files: &[(&str, PathBuf, u32)] = &[
        ("usr/bin/sticky-dispatch", dispatcher.to_owned(), 0o755),
        (
            "usr/bin/sticky-dispatch-demo",
            env!("CARGO_BIN_EXE_sticky-dispatch-demo").into(),
            0o755,
        ),
        (
            "usr/lib/systemd/system-generators/sticky-dispatch-generator",
            env!("CARGO_BIN_EXE_sticky-dispatch-generator").into(),
            0o755,
        ),
        (
            "usr/lib/systemd/system/sticky-dispatch.socket",
            unit("sticky-dispatch.socket"),
            0o644,
        ),
        (
            "usr/lib/systemd/system/sticky-dispatch.service",
            unit("sticky-dispatch.service"),
            0o644,
        ),
        (
            "usr/lib/systemd/system/app@.service",
            unit("app@.service"),
            0o644,
        ),
        (
            "usr/lib/systemd/system/sticky-dispatch@.socket",
            unit("sticky-dispatch@.socket"),
            0o644,
        ),
        (
            "usr/lib/systemd/system/sticky-dispatch@.service",
            unit("sticky-dispatch@.service"),
            0o644,
        ),
    ];
    for (path, source, mode) in files {
        stage_file(stage, path, source, *mode);
    }
    stage_text(stage, "/etc/sticky-dispatch/config.toml", config);
}

pub fn stage_file(stage: &Path, path: &str, source: &Path, mode: u32) {
    let target = stage.join(path.trim_start_matches('/'));
    make_dirs(stage, target.parent().unwrap());
    std::fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Copies the file or tree `source` to `path` (relative to the root) in the stage
/// directory with `cp -a`: modes kept, symlinks as they are (a venv's python ->
/// /usr/bin/python3 stays valid in the container).
pub fn stage_tree(stage: &Path, path: &str, source: &Path) {
    let target = stage.join(path.trim_start_matches('/'));
    make_dirs(stage, target.parent().unwrap());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(source)
        .arg(&target)
        .status()
        .expect("cp runs");
    assert!(
        copied.success(),
        "cp -a {} {}",
        source.display(),
        target.display()
    );
}

/// Writes `contents` to `path` (relative to the root) in the stage directory, 0644.
pub fn stage_text(stage: &Path, path: &str, contents: &str) {
    let target = stage.join(path.trim_start_matches('/'));
    make_dirs(stage, target.parent().unwrap());
    std::fs::write(&target, contents).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Creates `dir` and its parents up to `root`, all 0755: `cp -a` gives the container's
/// /usr and /etc these modes.
pub fn make_dirs(root: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut d = Some(dir);
    while let Some(path) = d {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        if path == root {
            break;
        }
        d = path.parent();
    }
}

/// A cgroup of our own in the host's cgroup v2 hierarchy and systemd's named v1 one
/// (whichever exist), for systemd-nspawn to nest its cgroups in.
fn make_cgroups(name: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut cgroups = Vec::new();
    for line in mountinfo.lines() {
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = mount.split_whitespace().nth(4).unwrap_or_default();
        let mut fs = fs.split_whitespace();
        let (fstype, options) = (fs.next(), fs.nth(1).unwrap_or_default());
        let ours = fstype == Some("cgroup2")
            || (fstype == Some("cgroup") && options.split(',').any(|o| o == "name=systemd"));
        if ours {
            let dir = Path::new(mount_point).join(name);
            match std::fs::create_dir(&dir) {
                Ok(()) => cgroups.push(dir),
                Err(err) => eprintln!("[container] could not create {}: {err}", dir.display()),
            }
        }
    }
    cgroups
}

/// Removes `cgroup` and what systemd-nspawn made in it, deepest first.
fn remove_cgroup(cgroup: &Path) {
    fn dirs(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&entry.path(), out);
                }
            }
        }
        out.push(dir.to_owned());
    }
    let mut all = Vec::new();
    dirs(cgroup, &mut all);
    for dir in all {
        if let Err(err) = std::fs::remove_dir(&dir) {
            eprintln!("[container] could not remove {}: {err}", dir.display());
        }
    }
}
/// systemd-nspawn, from apt-get if missing.
pub fn ensure_nspawn() {
    ensure_command("systemd-nspawn", "systemd-container");
}

/// Makes sure `command` runs (`command --version`), installing the Debian `package` that
/// provides it with apt-get if not. One apt-get at a time, across threads and test
/// processes: the lock file is the one tests/node/support.rs takes for the same purpose.
pub fn ensure_command(command: &str, package: &str) {
    let present = || {
        Command::new(command)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let lock = std::env::temp_dir().join("sticky-dispatch-apt.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap_or_else(|err| panic!("{}: {err}", lock.display()));
    let _one_apt_at_a_time = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, err)| panic!("lock {}: {err}", lock.display()));
    if present() {
        return;
    }
    eprintln!("[container] installing {package} ({command}) with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            // Waits for anyone else's apt or dpkg instead of failing at once.
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = ["install", "-y", "-q", "--no-install-recommends", package];
    if !apt(&install) {
        // Stale or missing package lists: refresh once and retry.
        apt(&["update", "-q"]);
        assert!(apt(&install), "apt-get install {package} failed");
    }
    assert!(
        present(),
        "{command} still missing after installing {package}"
    );
}

// ---------------------------------------------------------------------------------------
// Journal

/// One journal entry: field name to value (binary fields as lossy UTF-8).
pub type Entry = HashMap<String, String>;

/// Parses `journalctl -o export`: `NAME=value` lines, or for binary values `NAME`, a
/// little-endian u64 length, the bytes and a newline; entries end with an empty line.
pub fn parse_export(mut bytes: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut entry = Entry::new();
    while !bytes.is_empty() {
        if bytes[0] == b'\n' {
            if !entry.is_empty() {
                entries.push(std::mem::take(&mut entry));
            }
            bytes = &bytes[1..];
            continue;
        }
        let end = bytes
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(bytes.len());
        let line = &bytes[..end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            entry.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            bytes = &bytes[(end + 1).min(bytes.len())..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &bytes[(end + 1).min(bytes.len())..];
            if rest.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let data = &rest[8..(8 + len).min(rest.len())];
            entry.insert(name, String::from_utf8_lossy(data).into_owned());
            bytes = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    if !entry.is_empty() {
        entries.push(entry);
    }
    entries
}

pub fn field<'e>(entry: &'e Entry, name: &str) -> Option<&'e str> {
    entry.get(name).map(String::as_str)
}

pub fn message(entry: &Entry) -> &str {
    field(entry, "MESSAGE").unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Polls `check` every 50 ms until it gives a value; panics after PATIENCE.
pub fn poll<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_within(PATIENCE, check).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Polls `check` every 50 ms until it gives a value, for at most `within`.
pub fn poll_within<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
/// Moves the calling thread (only it) into the container's network namespace, where
/// 127.0.0.1:8080 is the container's socket and every 127.x.y.z is a local address.
/// Sends the demo's one request on a connected stream and returns the whole reply.
pub fn http_get(
    mut stream: std::net::TcpStream,
    reply_timeout: Duration,
) -> Result<String, String> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(reply_timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: sticky-dispatch\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("receive: {e}"))?;
    Ok(text)
}

pub fn enter_netns(netns: &Path) {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    // SAFETY: setns(2) reads a valid fd we own and changes only this thread's network
    // namespace (CLONE_NEWNET is allowed for one thread of a multithreaded process).
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}
