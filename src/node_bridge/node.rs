//! The Node.js process: started with the IPC channel as an inherited fd, and its exit
//! status passed on as the bridge's own.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};

use tokio::process::{Child, Command};

use crate::worker::INDEX_ENV;

/// Variables of the bridge's own unit that Node must not see: with `NotifyAccess=main`
/// systemd would ignore Node's notifications anyway, and the sockets are not Node's.
const PRIVATE_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Why COMMAND could not be started, with the exit status a shell would give.
#[derive(Debug, thiserror::Error)]
#[error("could not start {program}: {source}")]
pub(crate) struct SpawnError {
    pub(crate) program: String,
    pub(crate) source: io::Error,
}

impl SpawnError {
    /// 127 for a command that is not there, 126 for one that cannot be executed, as POSIX
    /// shells exit.
    pub(crate) fn exit_code(&self) -> u8 {
        match self.source.kind() {
            io::ErrorKind::NotFound => 127,
            _ => 126,
        }
    }
}

/// Starts `command` with `channel` as Node's IPC channel (`NODE_CHANNEL_FD`, JSON
/// serialization) and `STICKY_DISPATCH_INDEX=index`.
pub(super) fn spawn(
    command: &[OsString],
    index: u32,
    channel: &OwnedFd,
) -> Result<Child, SpawnError> {
    let (program, args) = command.split_first().expect("clap requires a COMMAND");
    let raw = channel.as_raw_fd();
    let mut node = Command::new(program);
    node.args(args)
        .env("NODE_CHANNEL_FD", raw.to_string())
        .env("NODE_CHANNEL_SERIALIZATION_MODE", "json")
        // Also when the index came from the unit's instance name: the app may want it.
        .env(INDEX_ENV, index.to_string())
        // Its own process group: Ctrl-C in a terminal reaches only the bridge, which
        // tells Node with one SIGTERM. Under systemd both get SIGTERM anyway (the cgroup);
        // Node's package drains once, however many come.
        .process_group(0)
        // If the bridge unwinds without waiting for it, Node must not outlive it holding
        // connections nobody will ever drain.
        .kill_on_drop(true);
    for name in PRIVATE_ENV {
        node.env_remove(name);
    }
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
    // are allowed: fcntl and prctl are plain system calls and touch no memory of ours.
    // The channel's fd is close-on-exec in the bridge (so no other child inherits it);
    // clearing the flag on the child's copy is the only way to hand it to exec'd Node,
    // which finds it by number in NODE_CHANNEL_FD. The parent-death signal stops Node
    // (gracefully) if the bridge is killed without stopping it.
    unsafe {
        node.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            Ok(())
        });
    }
    node.spawn().map_err(|source| SpawnError {
        program: program.to_string_lossy().into_owned(),
        source,
    })
}

/// Exits the way Node did: its exit code, or killed by the same signal (re-raised on the
/// bridge, without a core file: Node's crash is Node's) so that systemd sees a crash as a
/// crash. The worker launcher ends the same way as its worker. Returns only for an exit code, or a signal that did not kill us.
pub(crate) fn exit_like(status: ExitStatus) -> ExitCode {
    if let Some(code) = status.code() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let Some(number) = status.signal() else {
        return ExitCode::FAILURE;
    };
    if let Ok(signal) = nix::sys::signal::Signal::try_from(number) {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_CORE) {
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, hard);
        }
        let default = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::SigDfl,
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: restores the default action; no handler of ours runs afterwards (the
        // runtime that installed SIGTERM/SIGINT handlers is gone), and nothing else in the
        // process relies on the old disposition.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &default) };
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(signal);
        let _ = set.thread_unblock();
        let _ = nix::sys::signal::raise(signal);
    }
    // A signal whose default action is not to terminate: what a shell reports.
    ExitCode::from((128 + number).clamp(0, 255) as u8)
}
