//! `sticky-dispatch worker-launcher [--] COMMAND ARGS...`: worker N for an app that uses
//! the Rust or Python worker library, able to reload in place.
//!
//! A worker process binds its link socket `@<prefix><index>` itself, so a second process
//! of the same worker cannot start while the first serves: the only way to replace it is
//! to stop it first, and its clients wait for the new one's start-up. The launcher instead
//! binds the name itself and holds it for its whole life, and starts COMMAND with a copy of
//! the listening socket (an inherited fd named by `STICKY_DISPATCH_LINK_FD`), which the
//! libraries take instead of binding. Two processes of the same worker can then serve one
//! name: the old one until it drains, the new one from then on.
//!
//! Each process it starts gets `STICKY_DISPATCH_INDEX` and a `NOTIFY_SOCKET` of its own, a
//! datagram socket `notify-<n>` in a directory only the launcher's user can enter
//! (`$RUNTIME_DIRECTORY`, else the temporary directory: the unit's private /tmp), which
//! the launcher reads (only from processes of its own uid or root, SO_PASSCRED): the
//! libraries send `READY=1` there once they can take links. A path, not an abstract name:
//! sd-notify clients as common as the `sd-notify` crate 0.4 only connect to paths. The launcher tells systemd itself (it is the unit's main process):
//! `READY=1` with `STATUS=worker N ready: pid P` when its process is ready, `RELOADING=1`
//! at the start of a reload and `READY=1` at its end, `STOPPING=1` on SIGTERM. Everything
//! else a process sends there (`STATUS=`, `STOPPING=1` when it drains) is logged at debug
//! level and dropped: an old process's `STOPPING=1` during a reload is not the unit's.
//!
//! Lifecycle:
//! - the current process says `READY=1`: the launcher says it to systemd and binds the
//!   reload socket `@<prefix><index>/reload` ([`crate::reload`]);
//! - SIGHUP, or `sticky-dispatch reload-worker N`, while serving: a reload. A second
//!   process of the same command starts, with the same listening socket; once it says
//!   `READY=1` (at most `--start-timeout`, default 60 s) it is the current one, and the
//!   old one gets SIGTERM: its library drains with the dispatcher (DRAIN; the dispatcher
//!   stops sending, ends the drained link as soon as what it sent is acknowledged and links
//!   again at once; the connect lands on the shared listener, where only the new process
//!   still accepts) and closes its copies of the listener and of its lanes (on the
//!   kernel's path the dispatcher grants the lanes to the new process at that link-up;
//!   meanwhile connections wait in the lanes' queues). The old process gets
//!   `--stop-timeout` (default 60 s) to exit, then SIGKILL; its exit is logged. A new
//!   process that exits or is not ready in time fails the reload: it is killed, the old
//!   one keeps serving, and `reload-worker` exits 1 with the reason. A SIGHUP during a
//!   reload or a stop is logged and ignored;
//! - SIGTERM or SIGINT: the launcher frees the link socket's name (the processes' copies
//!   hold it until they drain), sends SIGTERM to every process it started, waits for them
//!   (each at most `--stop-timeout`, then SIGKILL) and exits with the current process's
//!   status;
//! - the current process exits on its own (or crashes): the launcher exits with its status
//!   (or re-raises its signal), like the Node bridge: the unit's `Restart=` restarts both.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, ExitStatus};
use std::task::Poll;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::unistd::Uid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::cli::ProcessTimeouts;
use crate::link::LinkStream;
use crate::node_bridge::node::{exit_like, SpawnError};
use crate::reload;
use crate::shared::EX_CONFIG;
use crate::worker::link::LinkServer;
use crate::worker::{WorkerOptions, INDEX_ENV, LINK_FD_ENV};

/// Variables of the launcher's own unit that its processes must not see: the sockets are
/// not theirs, and the watchdog (if any) is the launcher's.
const PRIVATE_ENV: [&str; 5] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The longest notification read; systemd's own limit is about as large.
const MAX_NOTIFICATION: usize = 4096;

/// Runs the launcher: `command` is the worker's command line; `log_level` from
/// `--log-level`, else `STICKY_DISPATCH_LOG_LEVEL`, else `info`. Returns (or re-raises)
/// the current process's status.
pub fn main(
    command: Vec<OsString>,
    timeouts: ProcessTimeouts,
    log_level: Option<String>,
) -> ExitCode {
    let level = log_level
        .or_else(|| std::env::var("STICKY_DISPATCH_LOG_LEVEL").ok())
        .unwrap_or_else(|| "info".to_owned());
    let _logs = crate::logging::init(&level);
    // Before the runtime's threads: reading the options also unsets variables.
    let options = match WorkerOptions::from_env() {
        Ok(options) => options,
        Err(err) => {
            error!("{err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // One thread: the launcher wakes only for signals, notifications and exits.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(%err, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let index = options.index;
    let end = runtime
        .block_on(run(options, timeouts, command).instrument(info_span!("worker_launcher", index)));
    drop(runtime);
    match end {
        End::Worker(status) => exit_like(status),
        End::Code(code) => ExitCode::from(code),
    }
}

/// How the launcher ends.
enum End {
    /// As its current process ended.
    Worker(ExitStatus),
    /// With this code, for a reason logged.
    Code(u8),
}

/// Where a process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Started; waiting for its `READY=1`.
    Starting,
    /// Ready: the current process.
    Serving,
    /// Told to stop: waiting for it to exit.
    Stopping,
}

/// A process the launcher started, and its notification socket.
struct Process {
    child: Child,
    pid: u32,
    /// Set once it said `READY=1`, by the task reading its notification socket.
    ready: watch::Receiver<bool>,
    /// That task; aborted (and the socket closed) when the process is dropped.
    reader: tokio::task::JoinHandle<()>,
    /// The notification socket's path, removed with the process.
    notify_path: PathBuf,
    stage: Stage,
    /// When it must have said ready (a reload's new process) or exited (once stopping).
    deadline: Option<Instant>,
    /// Why the launcher killed it, if it did.
    killed: Option<&'static str>,
    /// How it exited, once it has.
    exit: Option<ExitStatus>,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

/// The launcher's private directory for its processes' notification sockets, removed
/// when the launcher ends.
struct NotifyDir(PathBuf);

impl NotifyDir {
    /// A new directory of mode 0700 in `$RUNTIME_DIRECTORY` (its first entry), else in the
    /// temporary directory.
    fn create() -> io::Result<NotifyDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("RUNTIME_DIRECTORY")
            .and_then(|dirs| {
                let first = dirs.to_string_lossy().split(':').next()?.to_owned();
                (!first.is_empty()).then(|| PathBuf::from(first))
            })
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        let dir = base.join(format!(
            "sticky-dispatch-launcher.{}.{nanos:x}",
            std::process::id()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(NotifyDir(dir))
    }

    /// The path of the `n`th process's socket.
    fn socket(&self, n: u64) -> PathBuf {
        self.0.join(format!("notify-{n}"))
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("could not make its notification socket {}: {source}", path.display())]
    Notify { path: PathBuf, source: io::Error },
    #[error("could not copy the link socket for it: {0}")]
    Link(io::Error),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Spawn(err) => err.exit_code(),
            _ => 1,
        }
    }
}

impl Process {
    /// Starts `command` with a copy of the listening link socket and a notification socket
    /// of its own at `notify_path`.
    fn start(
        command: &[OsString],
        index: u32,
        link: &LinkServer,
        notify_path: PathBuf,
    ) -> Result<Process, StartError> {
        let notify = NotifySocket::bind(&notify_path).map_err(|source| StartError::Notify {
            path: notify_path.clone(),
            source,
        })?;
        let copy = link
            .as_fd()
            .try_clone_to_owned()
            .map_err(StartError::Link)?;
        let child = match spawn(command, index, &copy, &notify_path) {
            Ok(child) => child,
            Err(err) => {
                let _ = std::fs::remove_file(&notify_path);
                return Err(err.into());
            }
        };
        // The process has its copy; ours would only hold the name longer.
        drop(copy);
        let pid = child.id().unwrap_or(0);
        let (said_ready, ready) = watch::channel(false);
        let reader = tokio::spawn(notify.read(pid, said_ready));
        Ok(Process {
            child,
            pid,
            ready,
            reader,
            notify_path,
            stage: Stage::Starting,
            deadline: None,
            killed: None,
            exit: None,
        })
    }

    fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if let Err(err) = nix::sys::signal::kill(pid, signal) {
            debug!(%err, pid = self.pid, "could not signal the process: it is gone");
        }
    }

    /// SIGKILL (its exit comes through `wait`), once.
    fn kill(&mut self, reason: &'static str) {
        if self.killed.is_some() || self.exit.is_some() {
            return;
        }
        self.killed = Some(reason);
        self.deadline = None;
        if let Err(err) = self.child.start_kill() {
            error!(%err, pid = self.pid, "could not kill the process");
        }
    }

    /// Tells it to stop (SIGTERM: its library drains) and sets the deadline for its exit.
    fn stop(&mut self, within: Duration) {
        if self.stage == Stage::Stopping || self.exit.is_some() {
            return;
        }
        self.stage = Stage::Stopping;
        self.signal(Signal::SIGTERM);
        self.deadline = Some(Instant::now() + within);
    }
}

/// Starts `command` with `link` as the inherited fd named by [`LINK_FD_ENV`],
/// `NOTIFY_SOCKET=notify` and `STICKY_DISPATCH_INDEX=index`.
fn spawn(
    command: &[OsString],
    index: u32,
    link: &OwnedFd,
    notify: &Path,
) -> Result<Child, SpawnError> {
    let (program, args) = command.split_first().expect("clap requires a COMMAND");
    let raw = link.as_raw_fd();
    let mut worker = Command::new(program);
    worker
        .args(args)
        .env(LINK_FD_ENV, raw.to_string())
        .env("NOTIFY_SOCKET", notify)
        // Also when the index came from the unit's instance name: the app may want it.
        .env(INDEX_ENV, index.to_string())
        // Its own process group: Ctrl-C in a terminal reaches only the launcher, which
        // tells the process with one SIGTERM. Under systemd both get SIGTERM anyway (the
        // cgroup); the libraries drain once, however many come.
        .process_group(0)
        // If the launcher unwinds without waiting for it, the process must not outlive it.
        .kill_on_drop(true);
    for name in PRIVATE_ENV {
        worker.env_remove(name);
    }
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
    // are allowed: fcntl and prctl are plain system calls and touch no memory of ours.
    // The copy of the link socket is close-on-exec in the launcher (so no other child
    // inherits it); clearing the flag on the child's copy is the only way to hand it to
    // the exec'd program, which finds it by number in STICKY_DISPATCH_LINK_FD. The
    // parent-death signal stops the process (gracefully) if the launcher is killed.
    unsafe {
        worker.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            Ok(())
        });
    }
    worker.spawn().map_err(|source| SpawnError {
        program: program.to_string_lossy().into_owned(),
        source,
    })
}

/// A process's `NOTIFY_SOCKET`: a datagram socket that sees who sends (SO_PASSCRED).
struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    uid: Uid,
}

impl NotifySocket {
    fn bind(path: &Path) -> io::Result<NotifySocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            fd: crate::link::register(fd, Interest::READABLE)?,
            uid: Uid::effective(),
        })
    }

    /// Reads notifications until the socket is dropped (with the task), and sets `ready`
    /// at the first `READY=1` from a process of our uid or root. Always read, so that a
    /// process that says much never blocks on a full socket.
    async fn read(self, pid: u32, ready: watch::Sender<bool>) {
        let mut buf = vec![0u8; MAX_NOTIFICATION];
        loop {
            let received = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    recv_notification(fd.as_raw_fd(), &mut buf)
                })
                .await;
            let (len, sender) = match received {
                Ok(received) => received,
                Err(err) => {
                    warn!(%err, pid, "reading the process's notification socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match sender {
                Some((uid, _)) if uid == self.uid || uid.is_root() => {}
                other => {
                    warn!(sender = ?other.map(|(uid, pid)| (uid.as_raw(), pid)), "ignored a notification from a process of another user");
                    continue;
                }
            }
            let text = String::from_utf8_lossy(&buf[..len]);
            for line in text.lines().filter(|line| !line.is_empty()) {
                if line == "READY=1" {
                    ready.send_replace(true);
                } else {
                    debug!(pid, line, "notification from the process (not forwarded)");
                }
            }
        }
    }
}

/// One notification now (`WouldBlock` if none): its length and the sender's uid and pid.
/// Fds sent with it (`FDSTORE=1`) do not fit the control buffer: the kernel closes them.
fn recv_notification(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<(Uid, i32)>)> {
    let mut cmsg = nix::cmsg_space!(socket::UnixCredentials);
    let mut iov = [io::IoSliceMut::new(buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), flags)?;
    let sender = msg.cmsgs()?.find_map(|cmsg| match cmsg {
        socket::ControlMessageOwned::ScmCredentials(cred) => {
            Some((Uid::from_raw(cred.uid()), cred.pid()))
        }
        _ => None,
    });
    Ok((msg.bytes, sender))
}

/// A reload in progress: the new process, and who asked, to be answered.
struct Reload {
    process: Process,
    asked: Option<oneshot::Sender<reload::Answer>>,
    started: Instant,
}

/// What a reload's new process did.
enum NextEvent {
    Ready,
    Exited(io::Result<ExitStatus>),
}

struct Launcher {
    options: WorkerOptions,
    timeouts: ProcessTimeouts,
    command: Vec<OsString>,
    /// The listening link socket, held from start to stop.
    server: Option<LinkServer>,
    /// Where the processes' notification sockets are.
    notify_dir: NotifyDir,
    /// How many processes were started, for their notification sockets' names.
    started: u64,
    current: Process,
    next: Option<Reload>,
    retiring: Vec<Process>,
    /// The reload socket, bound while serving.
    control: Option<reload::Control>,
    /// Where the reload socket's requests go.
    requests: mpsc::UnboundedSender<reload::Request>,
}

async fn run(options: WorkerOptions, timeouts: ProcessTimeouts, command: Vec<OsString>) -> End {
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
        (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) => {
            error!(%err, "could not handle SIGTERM/SIGINT/SIGHUP");
            return End::Code(1);
        }
    };
    let server = match LinkServer::bind(&options) {
        Ok(server) => server,
        Err(err) => {
            error!("{err}");
            return End::Code(match err {
                crate::worker::WorkerError::InUse { .. } => EX_CONFIG,
                _ => 1,
            });
        }
    };
    let notify_dir = match NotifyDir::create() {
        Ok(dir) => dir,
        Err(err) => {
            error!(%err, "could not create a directory for the worker's NOTIFY_SOCKET");
            return End::Code(1);
        }
    };
    let current = match Process::start(&command, options.index, &server, notify_dir.socket(1)) {
        Ok(process) => process,
        Err(err) => {
            error!("{err}");
            return End::Code(err.exit_code());
        }
    };
    info!(
        pid = current.pid,
        socket = %format!("@{}", server.socket_name()),
        command = ?command,
        "worker started; waiting for its READY=1"
    );
    let (requests, mut asked) = mpsc::unbounded_channel();
    let mut launcher = Launcher {
        options,
        timeouts,
        command,
        server: Some(server),
        notify_dir,
        started: 1,
        current,
        next: None,
        retiring: Vec::new(),
        control: None,
        requests,
    };
    loop {
        if let Some(end) = launcher.end() {
            return end;
        }
        let deadline = launcher.next_deadline();
        let starting = launcher.current.stage == Stage::Starting;
        tokio::select! {
            status = launcher.current.child.wait(), if launcher.current.exit.is_none() => {
                if let Some(end) = launcher.current_exited(status) {
                    return end;
                }
            }
            _ = crate::wait_until(&mut launcher.current.ready, |ready| *ready), if starting => launcher.ready(),
            event = next_event(launcher.next.as_mut()) => launcher.next_event(event),
            (at, status) = any_exit(&mut launcher.retiring) => launcher.retired(at, status),
            _ = term.recv() => launcher.stop("SIGTERM"),
            _ = int.recv() => launcher.stop("SIGINT"),
            _ = hup.recv() => launcher.reload("SIGHUP", None),
            Some(request) = asked.recv() => launcher.reload("reload-worker", Some(request.answer)),
            asking = accept_control(&launcher.control) => match asking {
                Ok(stream) => reload::serve(stream, launcher.requests.clone()),
                Err(err) => {
                    warn!(%err, "accepting on the reload socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sleep_until(deadline) => launcher.deadlines_passed(),
        }
    }
}

impl Launcher {
    /// The first process said `READY=1`: tell systemd, and take reload requests.
    fn ready(&mut self) {
        self.current.stage = Stage::Serving;
        info!(pid = self.current.pid, "worker ready");
        self.control = match reload::Control::bind(&self.options) {
            Ok(control) => Some(control),
            Err(err) => {
                warn!(%err, "could not bind the reload socket: SIGHUP still reloads");
                None
            }
        };
        self.notify_ready();
    }

    /// `READY=1`, with the current process's pid in `STATUS=`.
    fn notify_ready(&self) {
        let status = format!(
            "worker {} ready: pid {}",
            self.options.index, self.current.pid
        );
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }

    /// SIGHUP or a reload request: start the next process, unless one is starting or the
    /// launcher is not serving.
    fn reload(&mut self, why: &'static str, asked: Option<oneshot::Sender<reload::Answer>>) {
        let refused = match (self.current.stage, &self.next, &self.server) {
            (Stage::Starting, _, _) => Some("the worker is not ready yet".to_owned()),
            (Stage::Stopping, _, _) | (_, _, None) => Some("the worker is stopping".to_owned()),
            (Stage::Serving, Some(reload), _) => Some(format!(
                "a reload is in progress (pid {} starting)",
                reload.process.pid
            )),
            (Stage::Serving, None, Some(_)) => None,
        };
        let Some(server) = self.server.as_ref().filter(|_| refused.is_none()) else {
            let refused = refused.unwrap_or_default();
            warn!(why, "reload ignored: {refused}");
            return answer(asked, Err(refused));
        };
        let mut reloading = vec![sd_notify::NotifyState::Reloading];
        // systemd 253 and later want the clock reading with RELOADING=1.
        reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        self.started += 1;
        let path = self.notify_dir.socket(self.started);
        let mut process = match Process::start(&self.command, self.options.index, server, path) {
            Ok(process) => process,
            Err(err) => {
                error!(
                    why,
                    "reload failed: {err}; pid {} still serves", self.current.pid
                );
                self.notify_ready();
                return answer(
                    asked,
                    Err(format!("{err}; pid {} still serves", self.current.pid)),
                );
            }
        };
        process.deadline = Some(Instant::now() + self.timeouts.start_timeout);
        info!(
            why,
            pid = process.pid,
            serving = self.current.pid,
            "reloading: new process started; waiting for its READY=1"
        );
        self.next = Some(Reload {
            process,
            asked,
            started: Instant::now(),
        });
    }

    fn next_event(&mut self, event: NextEvent) {
        match event {
            NextEvent::Ready => self.reloaded(),
            NextEvent::Exited(status) => {
                if let (Some(reload), Ok(status)) = (&mut self.next, &status) {
                    // Reaped: nothing left to kill or wait for.
                    reload.process.exit = Some(*status);
                }
                let status = match status {
                    Ok(status) => status.to_string(),
                    Err(err) => format!("lost track of it: {err}"),
                };
                self.reload_failed(&format!(
                    "the new process exited before it was ready ({status})"
                ));
            }
        }
    }

    /// The next process is ready: it becomes the current one, the current one drains.
    fn reloaded(&mut self) {
        let Some(Reload {
            mut process,
            asked,
            started,
        }) = self.next.take()
        else {
            return;
        };
        process.stage = Stage::Serving;
        process.deadline = None;
        let mut old = std::mem::replace(&mut self.current, process);
        old.stop(self.timeouts.stop_timeout);
        let message = format!("reloaded: pid {} ready", self.current.pid);
        info!(
            pid = self.current.pid,
            old_pid = old.pid,
            took = ?started.elapsed(),
            "{message}; the old process is told to stop (it drains)"
        );
        self.retiring.push(old);
        self.notify_ready();
        answer(asked, Ok(message));
    }

    /// The next process will not become ready: it goes (killed if it lives), the current
    /// one keeps serving.
    fn reload_failed(&mut self, why: &str) {
        let Some(Reload {
            mut process, asked, ..
        }) = self.next.take()
        else {
            return;
        };
        error!(
            pid = process.pid,
            serving = self.current.pid,
            "reload failed: {why}; pid {} still serves",
            self.current.pid
        );
        if process.exit.is_none() {
            process.stage = Stage::Stopping;
            process.kill("reload failed");
            self.retiring.push(process);
        }
        self.notify_ready();
        answer(
            asked,
            Err(format!("{why}; pid {} still serves", self.current.pid)),
        );
    }

    /// SIGTERM or SIGINT: free the names and tell every process to stop.
    fn stop(&mut self, why: &str) {
        if self.server.is_none() {
            debug!(why, "already stopping");
            return;
        }
        info!(
            why,
            pid = self.current.pid,
            "stopping: SIGTERM to the worker"
        );
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining"),
        ]);
        // The processes' copies hold the link socket's name until they drain; then a
        // replacement may bind it while they finish.
        self.server = None;
        self.control = None;
        self.current.stop(self.timeouts.stop_timeout);
        if let Some(Reload {
            mut process, asked, ..
        }) = self.next.take()
        {
            info!(pid = process.pid, "stopping the reload's new process too");
            process.stop(self.timeouts.stop_timeout);
            self.retiring.push(process);
            answer(asked, Err(format!("the worker is stopping ({why})")));
        }
    }

    /// The current process exited: the launcher ends, now or once the others it told to
    /// stop have exited too.
    fn current_exited(&mut self, status: io::Result<ExitStatus>) -> Option<End> {
        let process = &mut self.current;
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                error!(%err, "lost track of the worker");
                return Some(End::Code(1));
            }
        };
        process.exit = Some(status);
        process.deadline = None;
        if let Some(why) = process.killed {
            error!(%status, pid = process.pid, why, "worker killed; exiting with status 1");
        } else {
            match process.stage {
                Stage::Starting => {
                    error!(%status, pid = process.pid, "the worker exited before it was ready")
                }
                Stage::Serving => warn!(
                    %status,
                    pid = process.pid,
                    "the worker exited; the launcher exits too (the dispatcher re-sends what it had not acknowledged)"
                ),
                Stage::Stopping => info!(%status, pid = process.pid, "worker exited"),
            }
        }
        if process.stage != Stage::Stopping {
            let others: Vec<u32> = self
                .next
                .iter()
                .map(|reload| &reload.process)
                .chain(&self.retiring)
                .map(|process| process.pid)
                .collect();
            if !others.is_empty() {
                warn!(pids = ?others, "the launcher exits: killing the processes it had started besides");
            }
            return Some(self.current_end());
        }
        None
    }

    /// How the launcher ends, as the current process did.
    fn current_end(&self) -> End {
        match (self.current.killed, self.current.exit) {
            (None, Some(status)) => End::Worker(status),
            _ => End::Code(1),
        }
    }

    /// When stopping: the end, once every process has exited.
    fn end(&self) -> Option<End> {
        let all_gone =
            self.current.exit.is_some() && self.next.is_none() && self.retiring.is_empty();
        all_gone.then(|| self.current_end())
    }

    /// A retiring process exited: logged; the launcher goes on.
    fn retired(&mut self, at: usize, status: io::Result<ExitStatus>) {
        let process = self.retiring.swap_remove(at);
        match (status, process.killed) {
            (Ok(status), Some(why)) => {
                warn!(%status, pid = process.pid, why, "retired process killed")
            }
            (Ok(status), None) => info!(%status, pid = process.pid, "retired process exited"),
            (Err(err), _) => warn!(%err, pid = process.pid, "lost track of a retired process"),
        }
    }

    /// The earliest deadline of any process.
    fn next_deadline(&self) -> Option<Instant> {
        let next = self.next.iter().map(|reload| &reload.process);
        std::iter::once(&self.current)
            .chain(next)
            .chain(&self.retiring)
            .filter_map(|process| process.deadline)
            .min()
    }

    /// Each process whose deadline has passed: a reload's new process was not ready in
    /// time; any other did not exit in time.
    fn deadlines_passed(&mut self) {
        let now = Instant::now();
        let passed = |process: &Process| process.deadline.is_some_and(|at| at <= now);
        if self
            .next
            .as_ref()
            .is_some_and(|reload| passed(&reload.process))
        {
            self.reload_failed(&format!(
                "the new process did not say READY=1 within {:?} (--start-timeout)",
                self.timeouts.start_timeout
            ));
        }
        let stop = self.timeouts.stop_timeout;
        for process in std::iter::once(&mut self.current).chain(&mut self.retiring) {
            if passed(process) {
                error!(
                    pid = process.pid,
                    "a process did not exit within {stop:?} of being told to stop: killing it"
                );
                process.kill("did not exit");
            }
        }
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, states);
}

/// Answers a reload request, if there was one (SIGHUP has nobody to answer).
fn answer(asked: Option<oneshot::Sender<reload::Answer>>, outcome: reload::Answer) {
    if let Some(asked) = asked {
        // The asker may have gone (Ctrl-C): the outcome is logged anyway.
        let _ = asked.send(outcome);
    }
}

/// What a reload's new process does next: says ready, or exits. Never resolves without
/// a reload.
async fn next_event(reload: Option<&mut Reload>) -> NextEvent {
    let Some(Reload { process, .. }) = reload else {
        return std::future::pending().await;
    };
    let Process { child, ready, .. } = process;
    tokio::select! {
        // A process that said ready and exited at once: its exit is what counts.
        biased;
        status = child.wait() => NextEvent::Exited(status),
        () = crate::wait_until(ready, |ready| *ready) => NextEvent::Ready,
    }
}

/// The first of `processes` to exit, and how. Never resolves while there are none.
async fn any_exit(processes: &mut [Process]) -> (usize, io::Result<ExitStatus>) {
    type Wait<'a> = Pin<Box<dyn Future<Output = io::Result<ExitStatus>> + 'a>>;
    let mut waits: Vec<Wait<'_>> = processes
        .iter_mut()
        .map(|process| Box::pin(process.child.wait()) as Wait<'_>)
        .collect();
    std::future::poll_fn(|cx| {
        for (at, wait) in waits.iter_mut().enumerate() {
            if let Poll::Ready(status) = wait.as_mut().poll(cx) {
                return Poll::Ready((at, status));
            }
        }
        Poll::Pending
    })
    .await
}

/// The next connection to the reload socket, if bound; never resolves otherwise.
async fn accept_control(control: &Option<reload::Control>) -> io::Result<LinkStream> {
    match control {
        Some(control) => control.accept().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
