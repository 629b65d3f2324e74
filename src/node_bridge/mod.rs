//! `sticky-dispatch node-worker [--] COMMAND ARGS...`: worker N for a Node.js app.
//!
//! The bridge starts COMMAND with Node's IPC channel (`NODE_CHANNEL_FD`, JSON lines, as
//! `child_process.fork()` would) and, once the app is ready, passes that channel to the
//! dispatcher: toward the dispatcher it is a worker of role "Node" (it binds
//! `@<prefix><index>`, checks the dispatcher's uid, HELLO, then CHANNEL with the
//! channel's fd), and the dispatcher hands each connection to Node directly as a
//! `net.Socket` handle and counts Node's own ACKs (`crate::dispatcher`'s `worker_link`).
//! The bridge is in no connection's path: per connection, no process but the dispatcher
//! and Node wakes up. A Node process that dies loses nothing it had not acknowledged: the
//! dispatcher still holds those fds and sends them again to the next worker on this index.
//!
//! The bridge holds one [`NodeProcess`] per Node process it started: the `current` one
//! (whose channel the next dispatcher link gets), during a reload the `next` one, and the
//! `retiring` ones, replaced and finishing their requests.
//!
//! Lifecycle:
//! - the link socket is bound, and `READY=1` sent, only when the app says
//!   `{"stickyDispatch":"ready"}` (it called `listen(server)`): until then connections
//!   wait at the dispatcher, and `systemctl start app@3` waits for the app. The reload
//!   socket `@<prefix><index>/reload` ([`crate::reload`]) is bound with it;
//! - one dispatcher at a time has the channel; when its link closes (it stopped or
//!   crashed) the bridge keeps the channel open and passes it to the next dispatcher,
//!   which first syncs with Node (so it skips what its predecessor left unread). A link
//!   that comes while the previous one is closing waits for it to close;
//! - SIGHUP, or `sticky-dispatch reload-worker N` over the reload socket, while serving:
//!   a reload. `RELOADING=1`; the bridge starts a second Node with the same command and a
//!   channel of its own, and waits for its `ready` (at most `--start-timeout`, default
//!   60 s). Then the new process is the current one, `READY=1` with its pid, and the old
//!   one is told to stop (SIGTERM: it asks the dispatcher to drain, or the bridge answers
//!   if no dispatcher is linked) and retires: the dispatcher ends its drained link as soon
//!   as everything sent on it is acknowledged, links again at once and gets the new
//!   channel, so new connections wait milliseconds, not until the old process exits. A
//!   retiring process gets `--stop-timeout` to exit (then SIGKILL), and its exit is
//!   logged, not the bridge's end. A new process that exits, closes its channel or is not
//!   ready in time fails the reload: it is killed, the old one keeps serving, `READY=1`,
//!   and `reload-worker` exits 1 with the reason. A SIGHUP during a reload or a stop is
//!   logged and ignored;
//! - SIGTERM or SIGINT to the bridge: it frees the link socket's name and sends SIGTERM to
//!   Node (to both during a reload), whose package asks the dispatcher to drain
//!   (`drain-request`), gets `drain` once every connection sent is ahead of it in the
//!   channel, finishes its requests and exits (with no dispatcher there, the bridge sends
//!   `drain` itself). Node gets `--stop-timeout` (default 60 s, below the example unit's
//!   `TimeoutStopSec=`) to exit, then SIGKILL and exit status 1. The bridge exits once
//!   every Node process it started has;
//! - the current Node exits (or crashes): the bridge exits too, with Node's exit code, or
//!   re-raising the signal that killed it. It does not restart Node: whatever restarts
//!   workers (systemd's `Restart=`, standalone mode's supervisor) restarts the pair, with
//!   its backoff and its logs, and Node's in-memory state (sessions) is gone either way,
//!   so a restart inside the bridge would only hide the crash;
//! - Node closes its channel (`process.disconnect()`): the bridge notices within a
//!   quarter of `--ack-timeout`, closes the link and waits for Node's exit, bounded;
//! - Node stops reading its channel (blocked event loop, stopped process): when lines sent
//!   to it stay unread, none taken, for `--ack-timeout` (default 10 s: far above any sane
//!   stall of an event loop), the bridge treats it as dead: SIGKILL, exit status 1, and the
//!   dispatcher re-sends what was not acknowledged.

mod channel;
pub(crate) mod node;

use std::ffi::OsString;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::process::{ExitCode, ExitStatus};
use std::task::Poll;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::channel::NodeChannel;
// A missing or bad index is a configuration error: EX_CONFIG, not restarted by the units.
use crate::link::LinkStream;
use crate::reload;
use crate::shared::{LinkError, EX_CONFIG};
use crate::worker::link::{AdmittedLink, LinkServer};
use crate::worker::WorkerOptions;

/// How many times per `--ack-timeout` the bridge looks at what Node has not read.
const STALL_SAMPLES: u32 = 4;
/// How long a reload's new process that closed its channel before it was ready has to
/// exit (its status is the reason the reload fails), before it is killed.
const CLOSED_EXIT_GRACE: Duration = Duration::from_secs(1);

/// Runs the bridge: `command` is Node's command line; `log_level` from `--log-level`,
/// else `STICKY_DISPATCH_LOG_LEVEL`, else `info`. Returns (or re-raises) Node's status.
pub fn main(command: Vec<OsString>, timeouts: Timeouts, log_level: Option<String>) -> ExitCode {
    let level = log_level
        .or_else(|| std::env::var("STICKY_DISPATCH_LOG_LEVEL").ok())
        .unwrap_or_else(|| "info".to_owned());
    let _logs = crate::logging::init(&level);
    let options = match WorkerOptions::from_env() {
        Ok(options) => options,
        Err(err) => {
            error!("{err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // One thread: the bridge wakes only for links, signals and Node's exit.
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
        .block_on(run(options, timeouts, command).instrument(info_span!("node_worker", index)));
    drop(runtime);
    match end {
        End::Node(status) => node::exit_like(status),
        End::Code(code) => ExitCode::from(code),
    }
}

/// The bridge's bounds on waiting for Node (`--ack-timeout`, `--start-timeout`,
/// `--stop-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// How long Node may leave what was sent to it unread.
    pub ack: Duration,
    /// How long a reload's new Node may take to say ready; then the reload fails.
    pub start: Duration,
    /// How long Node may take to exit once told to stop; then SIGKILL.
    pub stop: Duration,
}

/// How the bridge ends.
enum End {
    /// As Node ended.
    Node(ExitStatus),
    /// With this code, for a reason logged.
    Code(u8),
}

/// Where a Node process is in its life (not the dispatcher's `Phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Started; waiting for it to say ready.
    Starting,
    /// Ready: the current process, whose channel dispatchers get.
    Serving,
    /// Told to stop (or gone from its channel): waiting for it to exit.
    Stopping,
}

/// Why a Node process could not be started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("could not create Node's IPC channel: {0}")]
    Channel(#[from] std::io::Error),
    #[error(transparent)]
    Spawn(#[from] node::SpawnError),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Channel(_) => 1,
            StartError::Spawn(err) => err.exit_code(),
        }
    }
}

/// One Node process the bridge started, and the bridge's end of its channel.
struct NodeProcess {
    child: Child,
    pid: u32,
    channel: NodeChannel,
    stage: Stage,
    /// When it must have said ready (a reload's new process) or exited (once stopping).
    deadline: Option<Instant>,
    /// Why the bridge killed it, if it did.
    killed: Option<&'static str>,
    /// How it exited, once it has (kept for the current process until the bridge ends).
    exit: Option<ExitStatus>,
}

impl NodeProcess {
    /// Starts `command` with a channel of its own.
    fn start(command: &[OsString], index: u32) -> Result<NodeProcess, StartError> {
        let (channel, theirs) = channel::pair()?;
        let child = node::spawn(command, index, &theirs)?;
        // Node has its copy; ours would keep the channel open after Node's end.
        drop(theirs);
        Ok(NodeProcess {
            pid: child.id().unwrap_or(0),
            child,
            channel,
            stage: Stage::Starting,
            deadline: None,
            killed: None,
            exit: None,
        })
    }

    fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if let Err(err) = nix::sys::signal::kill(pid, signal) {
            debug!(%err, node_pid = self.pid, "could not signal Node: it is gone");
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
            error!(%err, node_pid = self.pid, "could not kill Node");
        }
    }

    /// Tells it to stop (SIGTERM) and sets the deadline for its exit.
    fn stop(&mut self, within: Duration) {
        self.stage = Stage::Stopping;
        self.signal(Signal::SIGTERM);
        self.exit_by(within);
    }

    /// Sets the deadline for its exit, unless an earlier one is set.
    fn exit_by(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }

    /// Tells it that no more connections will come, when no dispatcher is there to.
    fn tell_to_drain(&self) {
        if let Err(err) = self.channel.send_drain() {
            debug!(%err, node_pid = self.pid, "could not tell Node to drain: it is going anyway");
        }
    }
}

/// A reload in progress: the new process, and who asked, to be answered.
struct Reload {
    node: NodeProcess,
    asked: Option<oneshot::Sender<reload::Answer>>,
    started: Instant,
    /// It closed its channel before saying ready: it is exiting, and its exit status says
    /// why (waited for [`CLOSED_EXIT_GRACE`]).
    channel_closed: bool,
}

/// What a reload's new process did.
enum NextEvent {
    Ready(std::io::Result<bool>),
    Exited(std::io::Result<ExitStatus>),
}

struct Bridge {
    options: WorkerOptions,
    timeouts: Timeouts,
    command: Vec<OsString>,
    current: NodeProcess,
    next: Option<Reload>,
    retiring: Vec<NodeProcess>,
    server: Option<LinkServer>,
    /// The reload socket, bound while serving.
    control: Option<reload::Control>,
    /// Where the reload socket's requests go.
    requests: mpsc::UnboundedSender<reload::Request>,
    /// The dispatcher link that has the channel: at most one task.
    link: JoinSet<Result<(), LinkError>>,
    /// A link that came while the previous one was closing: it gets the channel next.
    waiting_link: Option<AdmittedLink>,
    /// Since when the current Node has left lines unread without reading any, and how
    /// many bytes.
    stall: Option<(Instant, usize)>,
}

async fn run(options: WorkerOptions, timeouts: Timeouts, command: Vec<OsString>) -> End {
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
    let current = match NodeProcess::start(&command, options.index) {
        Ok(node) => node,
        Err(err) => {
            error!("{err}");
            return End::Code(err.exit_code());
        }
    };
    info!(node_pid = current.pid, command = ?command, "node started; waiting for the app to be ready");
    let (requests, mut asked) = mpsc::unbounded_channel();
    let mut bridge = Bridge {
        options,
        timeouts,
        command,
        current,
        next: None,
        retiring: Vec::new(),
        server: None,
        control: None,
        requests,
        link: JoinSet::new(),
        waiting_link: None,
        stall: None,
    };
    let sample = (timeouts.ack / STALL_SAMPLES).max(Duration::from_millis(10));
    let mut stall_check = tokio::time::interval(sample);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(end) = bridge.end() {
            return end;
        }
        let deadline = bridge.next_deadline();
        tokio::select! {
            status = bridge.current.child.wait(), if bridge.current.exit.is_none() => {
                if let Some(end) = bridge.current_exited(status) {
                    return end;
                }
            }
            event = next_event(bridge.next.as_mut().map(|reload| &mut reload.node)) => bridge.next_event(event),
            (at, status) = any_exit(&mut bridge.retiring) => bridge.retired(at, status),
            _ = term.recv() => bridge.stop("SIGTERM"),
            _ = int.recv() => bridge.stop("SIGINT"),
            _ = hup.recv() => bridge.reload("SIGHUP", None),
            Some(request) = asked.recv() => bridge.reload("reload-worker", Some(request.answer)),
            ready = bridge.current.channel.ready(), if bridge.current.stage == Stage::Starting => match ready {
                Ok(true) => bridge.ready(),
                Ok(false) => bridge.unreachable("Node closed its IPC channel before it was ready"),
                Err(err) => bridge.unreachable(&format!("reading Node's channel failed: {err}")),
            },
            accepted = accept(&bridge.server) => match accepted {
                Ok(admitted) => bridge.link_up(admitted),
                Err(err) => {
                    warn!(%err, "accepting a link failed");
                    // Typically EMFILE: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            asking = accept_control(&bridge.control) => match asking {
                Ok(stream) => reload::serve(stream, bridge.requests.clone()),
                Err(err) => {
                    warn!(%err, "accepting on the reload socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = bridge.link.join_next() => bridge.link_down(done),
            _ = stall_check.tick(), if bridge.current.stage == Stage::Serving => bridge.check_node(),
            _ = sleep_until(deadline) => bridge.deadlines_passed(),
        }
    }
}

impl Bridge {
    /// The app listens: bind the link socket (and the reload socket) and tell systemd.
    fn ready(&mut self) {
        self.current.channel.stop_reading();
        let server = match LinkServer::bind(&self.options) {
            Ok(server) => server,
            Err(err) => return self.kill_current("link socket", &format!("{err}: stopping Node")),
        };
        info!(
            index = self.options.index,
            socket = %format!("@{}", server.socket_name()),
            node_pid = self.current.pid,
            "node worker ready"
        );
        self.control = match reload::Control::bind(&self.options) {
            Ok(control) => Some(control),
            Err(err) => {
                warn!(%err, "could not bind the reload socket: SIGHUP still reloads");
                None
            }
        };
        self.server = Some(server);
        self.current.stage = Stage::Serving;
        self.notify_ready();
    }

    /// `READY=1`, with the current Node's pid in `STATUS=`.
    fn notify_ready(&self) {
        let status = format!(
            "worker {} ready: node pid {}",
            self.options.index, self.current.pid
        );
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }

    /// SIGHUP or a reload request: start the next Node process, unless one is starting
    /// or the bridge is not serving.
    fn reload(&mut self, why: &'static str, asked: Option<oneshot::Sender<reload::Answer>>) {
        let refused = match (self.current.stage, &self.next) {
            (Stage::Starting, _) => Some("Node is not ready yet".to_owned()),
            (Stage::Stopping, _) => Some("the worker is stopping".to_owned()),
            (Stage::Serving, Some(reload)) => Some(format!(
                "a reload is in progress (node pid {} starting)",
                reload.node.pid
            )),
            (Stage::Serving, None) => None,
        };
        if let Some(refused) = refused {
            warn!(why, "reload ignored: {refused}");
            return answer(asked, Err(refused));
        }
        let mut reloading = vec![sd_notify::NotifyState::Reloading];
        // systemd 253 and later want the clock reading with RELOADING=1.
        reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        let mut node = match NodeProcess::start(&self.command, self.options.index) {
            Ok(node) => node,
            Err(err) => {
                error!(
                    why,
                    "reload failed: {err}; node pid {} still serves", self.current.pid
                );
                self.notify_ready();
                return answer(asked, Err(err.to_string()));
            }
        };
        node.deadline = Some(Instant::now() + self.timeouts.start);
        info!(
            why,
            node_pid = node.pid,
            serving = self.current.pid,
            "reloading: new node started; waiting for the app to be ready"
        );
        self.next = Some(Reload {
            node,
            asked,
            started: Instant::now(),
            channel_closed: false,
        });
    }

    fn next_event(&mut self, event: NextEvent) {
        match event {
            NextEvent::Ready(Ok(true)) => self.reloaded(),
            NextEvent::Ready(Ok(false)) => {
                let Some(reload) = &mut self.next else { return };
                debug!(
                    node_pid = reload.node.pid,
                    "the new Node process closed its channel: waiting for its exit"
                );
                reload.channel_closed = true;
                reload.node.channel.stop_reading();
                reload.node.exit_by(CLOSED_EXIT_GRACE);
            }
            NextEvent::Ready(Err(err)) => self.reload_failed(&format!(
                "reading the new Node process's channel failed: {err}"
            )),
            NextEvent::Exited(status) => {
                if let (Some(reload), Ok(status)) = (&mut self.next, &status) {
                    // Reaped: nothing left to kill or wait for.
                    reload.node.exit = Some(*status);
                }
                let status = match status {
                    Ok(status) => status.to_string(),
                    Err(err) => format!("lost track of it: {err}"),
                };
                self.reload_failed(&format!(
                    "the new Node process exited before it was ready ({status})"
                ));
            }
        }
    }

    /// The next process is ready: it becomes the current one, the current one retires.
    fn reloaded(&mut self) {
        let Some(Reload {
            mut node,
            asked,
            started,
            ..
        }) = self.next.take()
        else {
            return;
        };
        node.channel.stop_reading();
        node.stage = Stage::Serving;
        node.deadline = None;
        let mut old = std::mem::replace(&mut self.current, node);
        self.stall = None;
        old.stop(self.timeouts.stop);
        if self.link.is_empty() {
            // No dispatcher has its channel to answer its drain request.
            old.tell_to_drain();
        }
        let message = format!("reloaded: node pid {} ready", self.current.pid);
        info!(
            node_pid = self.current.pid,
            old_node_pid = old.pid,
            took = ?started.elapsed(),
            "{message}; the old process is told to stop"
        );
        self.retiring.push(old);
        self.notify_ready();
        answer(asked, Ok(message));
    }

    /// The next process will not become ready: it goes (killed if it lives), the current
    /// one keeps serving.
    fn reload_failed(&mut self, why: &str) {
        let Some(Reload {
            mut node, asked, ..
        }) = self.next.take()
        else {
            return;
        };
        error!(
            node_pid = node.pid,
            serving = self.current.pid,
            "reload failed: {why}; node pid {} still serves",
            self.current.pid
        );
        if node.exit.is_none() {
            node.stage = Stage::Stopping;
            node.kill("reload failed");
            self.retiring.push(node);
        }
        self.notify_ready();
        answer(
            asked,
            Err(format!("{why}; node pid {} still serves", self.current.pid)),
        );
    }

    /// A dispatcher connected: it gets the channel, unless another one has it.
    fn link_up(&mut self, admitted: AdmittedLink) {
        let peer = admitted.peer();
        if !self.link.is_empty() {
            if self.waiting_link.is_none() {
                // Typically the same dispatcher, linking again the moment it ended its link
                // (a drained one, after a reload): that link's task has not been reaped yet.
                debug!(
                    dispatcher_pid = peer.pid,
                    "a link while the previous one closes: it waits"
                );
                self.waiting_link = Some(admitted);
            } else {
                warn!(
                    dispatcher_pid = peer.pid,
                    "a second dispatcher link refused: the channel belongs to the first until its link closes"
                );
            }
            return;
        }
        let channel = match self.current.channel.as_fd().try_clone_to_owned() {
            Ok(channel) => channel,
            Err(err) => return warn!(%err, "could not pass Node's channel: link refused"),
        };
        let node_pid = self.current.pid;
        let task = async move {
            let link = admitted.pass_channel(channel.as_fd()).await?;
            // Our duplicate goes; the dispatcher has its own now.
            drop(channel);
            info!(
                dispatcher_pid = link.dispatcher_pid(),
                node_pid, "link up: Node's channel passed"
            );
            link.closed().await
        };
        self.link
            .spawn(task.instrument(info_span!("dispatcher", pid = peer.pid)));
    }

    fn link_down(&mut self, done: Result<Result<(), LinkError>, tokio::task::JoinError>) {
        match done {
            Ok(Ok(())) => info!("link closed: Node's channel waits for the next dispatcher"),
            Ok(Err(err)) => warn!(%err, "link closed"),
            Err(err) => warn!(%err, "link task failed"),
        }
        // Nobody left to answer the drain requests of the processes that are stopping
        // (one that had its answer ignores a second).
        let current = Some(&self.current).filter(|node| node.stage == Stage::Stopping);
        for node in current.into_iter().chain(&self.retiring) {
            node.tell_to_drain();
        }
        if let Some(waiting) = self.waiting_link.take() {
            self.link_up(waiting);
        }
    }

    /// SIGTERM or SIGINT: stop taking links and tell every Node, which drains with the
    /// dispatcher.
    fn stop(&mut self, why: &str) {
        if self.current.stage == Stage::Stopping {
            debug!(why, "already stopping");
            return;
        }
        info!(
            why,
            node_pid = self.current.pid,
            "stopping: SIGTERM to Node"
        );
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining"),
        ]);
        let was_serving = self.current.stage == Stage::Serving;
        // Free the names now: a replacement may bind them while Node finishes.
        self.server = None;
        self.control = None;
        self.waiting_link = None;
        self.current.stop(self.timeouts.stop);
        if was_serving && self.link.is_empty() {
            self.current.tell_to_drain();
        }
        self.abandon_reload(&format!("the worker is stopping ({why})"));
    }

    /// The worker stops while a reload's new process starts: it stops too, and retires.
    fn abandon_reload(&mut self, why: &str) {
        let Some(Reload {
            mut node, asked, ..
        }) = self.next.take()
        else {
            return;
        };
        info!(
            node_pid = node.pid,
            why, "stopping the reload's new Node too"
        );
        node.stop(self.timeouts.stop);
        // No dispatcher ever had its channel.
        node.tell_to_drain();
        self.retiring.push(node);
        answer(asked, Err(why.to_owned()));
    }

    /// Looks at the current Node's end of the channel: closed (Node can take nothing
    /// more), or lines sent to it unread, none taken, for `--ack-timeout` (kill it).
    fn check_node(&mut self) {
        if self.current.channel.node_closed() {
            warn!(
                node_pid = self.current.pid,
                "Node closed its IPC channel: closing the link, waiting for Node to exit"
            );
            // The link goes too: the dispatcher re-sends what Node had not acknowledged.
            self.server = None;
            self.control = None;
            self.waiting_link = None;
            self.link.abort_all();
            self.current.stage = Stage::Stopping;
            self.abandon_reload("the serving Node process closed its IPC channel");
            return self.current.exit_by(self.timeouts.stop);
        }
        let unread = match self.current.channel.unread_by_node() {
            Ok(unread) => unread,
            Err(err) => return debug!(%err, "could not measure Node's unread lines"),
        };
        self.stall = match self.stall {
            // Nothing taken since the last look (what is unread only grew).
            Some((since, before)) if unread > 0 && unread >= before => Some((since, unread)),
            _ if unread > 0 => Some((Instant::now(), unread)),
            _ => None,
        };
        if let Some((since, unread)) = self.stall {
            if since.elapsed() >= self.timeouts.ack {
                self.kill_current("unresponsive", &format!(
                    "Node did not read its channel within {:?} ({unread} bytes waiting): killing it (the dispatcher re-sends what it had not acknowledged)",
                    self.timeouts.ack
                ));
            }
        }
    }

    /// The current Node exited: the bridge ends, now or once the others it told to stop
    /// have exited too.
    fn current_exited(&mut self, status: std::io::Result<ExitStatus>) -> Option<End> {
        let node = &mut self.current;
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                error!(%err, "lost track of Node");
                return Some(End::Code(1));
            }
        };
        node.exit = Some(status);
        node.deadline = None;
        if let Some(why) = node.killed {
            error!(%status, node_pid = node.pid, why, "Node killed; exiting with status 1");
        } else {
            match node.stage {
                Stage::Starting => {
                    error!(%status, node_pid = node.pid, "Node exited before it was ready")
                }
                Stage::Serving => warn!(
                    %status,
                    node_pid = node.pid,
                    "Node exited; the bridge exits too (the dispatcher re-sends what Node had not acknowledged)"
                ),
                Stage::Stopping => info!(%status, node_pid = node.pid, "Node exited"),
            }
        }
        if node.stage != Stage::Stopping {
            let others: Vec<u32> = self
                .next
                .iter()
                .map(|reload| &reload.node)
                .chain(&self.retiring)
                .map(|node| node.pid)
                .collect();
            if !others.is_empty() {
                warn!(node_pids = ?others, "the bridge exits: killing the Node processes it had started besides");
            }
            return Some(self.current_end());
        }
        None
    }

    /// How the bridge ends, as the current Node did.
    fn current_end(&self) -> End {
        match (self.current.killed, self.current.exit) {
            (None, Some(status)) => End::Node(status),
            _ => End::Code(1),
        }
    }

    /// When stopping: the end, once every Node process has exited.
    fn end(&self) -> Option<End> {
        let all_gone =
            self.current.exit.is_some() && self.next.is_none() && self.retiring.is_empty();
        all_gone.then(|| self.current_end())
    }

    /// A retiring process exited: logged; the bridge goes on.
    fn retired(&mut self, at: usize, status: std::io::Result<ExitStatus>) {
        let node = self.retiring.swap_remove(at);
        match (status, node.killed) {
            (Ok(status), Some(why)) => {
                warn!(%status, node_pid = node.pid, why, "retired Node process killed")
            }
            (Ok(status), None) => {
                info!(%status, node_pid = node.pid, "retired Node process exited")
            }
            (Err(err), _) => {
                warn!(%err, node_pid = node.pid, "lost track of a retired Node process")
            }
        }
    }

    /// Node cannot become ready any more: wait for its exit, bounded.
    fn unreachable(&mut self, why: &str) {
        warn!(why, "waiting for Node to exit");
        self.current.channel.stop_reading();
        self.current.exit_by(self.timeouts.stop);
    }

    /// Kills the current Node (its exit comes through `wait`); the bridge then exits 1.
    fn kill_current(&mut self, reason: &'static str, message: &str) {
        if self.current.killed.is_some() || self.current.exit.is_some() {
            return;
        }
        error!(node_pid = self.current.pid, "{message}");
        self.server = None;
        self.control = None;
        self.current.kill(reason);
    }

    /// The earliest deadline of any process.
    fn next_deadline(&self) -> Option<Instant> {
        let next = self.next.iter().map(|reload| &reload.node);
        std::iter::once(&self.current)
            .chain(next)
            .chain(&self.retiring)
            .filter_map(|node| node.deadline)
            .min()
    }

    /// Each process whose deadline has passed: a reload's new process was not ready in
    /// time; any other did not exit in time.
    fn deadlines_passed(&mut self) {
        let now = Instant::now();
        let passed = |node: &NodeProcess| node.deadline.is_some_and(|at| at <= now);
        match &self.next {
            Some(reload) if passed(&reload.node) && reload.channel_closed => self.reload_failed(
                "the new Node process closed its IPC channel before it was ready, and did not exit",
            ),
            Some(reload) if passed(&reload.node) => self.reload_failed(&format!(
                "the new Node process was not ready within {:?} (--start-timeout)",
                self.timeouts.start
            )),
            _ => {}
        }
        if passed(&self.current) {
            self.kill_current("did not exit", &format!(
                "Node did not exit within {:?} of being told to stop (or of closing its channel): killing it",
                self.timeouts.stop
            ));
        }
        for node in self.retiring.iter_mut().filter(|node| passed(node)) {
            error!(
                node_pid = node.pid,
                "a retired Node process did not exit within {:?} of being told to stop: killing it",
                self.timeouts.stop
            );
            node.kill("did not exit");
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
async fn next_event(node: Option<&mut NodeProcess>) -> NextEvent {
    let Some(NodeProcess { child, channel, .. }) = node else {
        return std::future::pending().await;
    };
    tokio::select! {
        ready = channel.ready() => NextEvent::Ready(ready),
        status = child.wait() => NextEvent::Exited(status),
    }
}

/// The first of `nodes` to exit, and how. Never resolves while there are none.
async fn any_exit(nodes: &mut [NodeProcess]) -> (usize, std::io::Result<ExitStatus>) {
    type Wait<'a> = Pin<Box<dyn Future<Output = std::io::Result<ExitStatus>> + 'a>>;
    let mut waits: Vec<Wait<'_>> = nodes
        .iter_mut()
        .map(|node| Box::pin(node.child.wait()) as Wait<'_>)
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

/// The next link from the server, if bound; never resolves otherwise.
async fn accept(server: &Option<LinkServer>) -> std::io::Result<AdmittedLink> {
    match server {
        Some(server) => server.accept().await,
        None => std::future::pending().await,
    }
}

/// The next connection to the reload socket, if bound; never resolves otherwise.
async fn accept_control(control: &Option<reload::Control>) -> std::io::Result<LinkStream> {
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
