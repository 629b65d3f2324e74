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
//! Lifecycle:
//! - the link socket is bound, and `READY=1` sent, only when the app says
//!   `{"stickyDispatch":"ready"}` (it called `listen(server)`): until then connections
//!   wait at the dispatcher, and `systemctl start app@3` waits for the app;
//! - one dispatcher at a time has the channel; when its link closes (it stopped or
//!   crashed) the bridge keeps the channel open and passes it to the next dispatcher,
//!   which first syncs with Node (so it skips what its predecessor left unread);
//! - SIGTERM or SIGINT to the bridge: it frees the link socket's name and sends SIGTERM to
//!   Node, whose package asks the dispatcher to drain (`drain-request`), gets `drain` once
//!   every connection sent is ahead of it in the channel, finishes its requests and exits
//!   (with no dispatcher there, the bridge sends `drain` itself). Node gets
//!   `--stop-timeout` (default 60 s, below the example unit's `TimeoutStopSec=`) to exit,
//!   then SIGKILL and exit status 1;
//! - Node exits (or crashes): the bridge exits too, with Node's exit code, or re-raising
//!   the signal that killed it. It does not restart Node: whatever restarts workers
//!   (systemd's `Restart=`, standalone mode's supervisor) restarts the pair, with its
//!   backoff and its logs, and Node's in-memory state (sessions) is gone either way, so a
//!   restart inside the bridge would only hide the crash;
//! - Node closes its channel (`process.disconnect()`): the bridge notices within a
//!   quarter of `--ack-timeout`, closes the link and waits for Node's exit, bounded;
//! - Node stops reading its channel (blocked event loop, stopped process): when lines sent
//!   to it stay unread, none taken, for `--ack-timeout` (default 10 s: far above any sane
//!   stall of an event loop), the bridge treats it as dead: SIGKILL, exit status 1, and the
//!   dispatcher re-sends what was not acknowledged.

mod channel;
mod node;

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::channel::NodeChannel;
// A missing or bad index is a configuration error: EX_CONFIG, not restarted by the units.
use crate::shared::{LinkError, EX_CONFIG};
use crate::worker::link::{AdmittedLink, LinkServer};
use crate::worker::WorkerOptions;

/// How many times per `--ack-timeout` the bridge looks at what Node has not read.
const STALL_SAMPLES: u32 = 4;

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

/// The bridge's bounds on waiting for Node (`--ack-timeout`, `--stop-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// How long Node may leave what was sent to it unread.
    pub ack: Duration,
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

/// Where the bridge is with its Node process (not the dispatcher's `Phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Node started; waiting for it to say ready.
    Starting,
    /// Link socket bound, READY=1 sent.
    Serving,
    /// Node was told to stop: waiting for it to exit.
    Stopping,
}

struct Bridge {
    options: WorkerOptions,
    timeouts: Timeouts,
    node: Child,
    node_pid: u32,
    channel: NodeChannel,
    stage: Stage,
    server: Option<LinkServer>,
    /// The dispatcher link that has the channel: at most one task.
    link: JoinSet<Result<(), LinkError>>,
    /// Since when Node has left lines unread without reading any, and how many bytes.
    stall: Option<(Instant, usize)>,
    /// When Node must have exited; then SIGKILL.
    exit_deadline: Option<Instant>,
    /// Why the bridge killed Node, if it did: then it exits 1 rather than re-raising the
    /// SIGKILL it sent itself.
    killed: Option<&'static str>,
}

async fn run(options: WorkerOptions, timeouts: Timeouts, command: Vec<OsString>) -> End {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            error!(%err, "could not handle SIGTERM/SIGINT");
            return End::Code(1);
        }
    };
    let (channel, theirs) = match channel::pair() {
        Ok(pair) => pair,
        Err(err) => {
            error!(%err, "could not create Node's IPC channel");
            return End::Code(1);
        }
    };
    let node = match node::spawn(&command, options.index, &theirs) {
        Ok(node) => node,
        Err(err) => {
            error!("{err}");
            return End::Code(err.exit_code());
        }
    };
    drop(theirs);
    let node_pid = node.id().unwrap_or(0);
    info!(node_pid, command = ?command, "node started; waiting for the app to be ready");
    let mut bridge = Bridge {
        options,
        timeouts,
        node,
        node_pid,
        channel,
        stage: Stage::Starting,
        server: None,
        link: JoinSet::new(),
        stall: None,
        exit_deadline: None,
        killed: None,
    };
    let sample = (timeouts.ack / STALL_SAMPLES).max(Duration::from_millis(10));
    let mut stall_check = tokio::time::interval(sample);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = bridge.exit_deadline.filter(|_| bridge.killed.is_none());
        tokio::select! {
            status = bridge.node.wait() => return bridge.node_exited(status),
            _ = term.recv() => bridge.stop("SIGTERM"),
            _ = int.recv() => bridge.stop("SIGINT"),
            ready = bridge.channel.ready(), if bridge.stage == Stage::Starting => match ready {
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
            Some(done) = bridge.link.join_next() => bridge.link_down(done),
            _ = stall_check.tick(), if bridge.stage == Stage::Serving => bridge.check_node(),
            _ = sleep_until(deadline) => bridge.kill_node("did not exit", &format!(
                "Node did not exit within {:?} of being told to stop (or of closing its channel): killing it",
                bridge.timeouts.stop
            )),
        }
    }
}

impl Bridge {
    /// The app listens: bind the link socket and tell systemd.
    fn ready(&mut self) {
        self.channel.stop_reading();
        let server = match LinkServer::bind(&self.options) {
            Ok(server) => server,
            Err(err) => return self.kill_node("link socket", &format!("{err}: stopping Node")),
        };
        info!(
            index = self.options.index,
            socket = %format!("@{}", server.socket_name()),
            node_pid = self.node_pid,
            "node worker ready"
        );
        let status = format!(
            "worker {} ready: node pid {}",
            self.options.index, self.node_pid
        );
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ],
        );
        self.server = Some(server);
        self.stage = Stage::Serving;
    }

    /// A dispatcher connected: it gets the channel, unless another one has it.
    fn link_up(&mut self, admitted: AdmittedLink) {
        let peer = admitted.peer();
        if !self.link.is_empty() {
            warn!(
                dispatcher_pid = peer.pid,
                "a second dispatcher link refused: the channel belongs to the first until its link closes"
            );
            return;
        }
        let channel = match self.channel.as_fd().try_clone_to_owned() {
            Ok(channel) => channel,
            Err(err) => return warn!(%err, "could not pass Node's channel: link refused"),
        };
        let task = async move {
            let link = admitted.pass_channel(channel.as_fd()).await?;
            // Our duplicate goes; the dispatcher has its own now.
            drop(channel);
            info!(
                dispatcher_pid = link.dispatcher_pid(),
                "link up: Node's channel passed"
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
        if self.stage == Stage::Stopping {
            // Nobody left to answer Node's drain request.
            self.tell_node_to_drain();
        }
    }

    /// SIGTERM or SIGINT: stop taking links and tell Node, which drains with the dispatcher.
    fn stop(&mut self, why: &str) {
        if self.stage == Stage::Stopping {
            debug!(why, "already stopping");
            return;
        }
        info!(why, node_pid = self.node_pid, "stopping: SIGTERM to Node");
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("draining"),
            ],
        );
        let was_serving = self.stage == Stage::Serving;
        self.stage = Stage::Stopping;
        // Free the name now: a replacement may bind it while Node finishes.
        self.server = None;
        self.signal_node(Signal::SIGTERM);
        if was_serving && self.link.is_empty() {
            self.tell_node_to_drain();
        }
        self.exit_by(why, self.timeouts.stop);
    }

    fn tell_node_to_drain(&self) {
        if let Err(err) = self.channel.send_drain() {
            debug!(%err, "could not tell Node to drain: it is going anyway");
        }
    }

    /// Looks at Node's end of the channel: closed (Node can take nothing more), or lines
    /// sent to it unread, none taken, for `--ack-timeout` (kill it).
    fn check_node(&mut self) {
        if self.channel.node_closed() {
            warn!(
                node_pid = self.node_pid,
                "Node closed its IPC channel: closing the link, waiting for Node to exit"
            );
            // The link goes too: the dispatcher re-sends what Node had not acknowledged.
            self.server = None;
            self.link.abort_all();
            self.stage = Stage::Stopping;
            return self.exit_by("Node closed its IPC channel", self.timeouts.stop);
        }
        let unread = match self.channel.unread_by_node() {
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
                self.kill_node("unresponsive", &format!(
                    "Node did not read its channel within {:?} ({unread} bytes waiting): killing it (the dispatcher re-sends what it had not acknowledged)",
                    self.timeouts.ack
                ));
            }
        }
    }

    fn node_exited(&mut self, status: std::io::Result<ExitStatus>) -> End {
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                error!(%err, "lost track of Node");
                return End::Code(1);
            }
        };
        if let Some(why) = self.killed {
            error!(%status, node_pid = self.node_pid, why, "Node killed; exiting with status 1");
            return End::Code(1);
        }
        match self.stage {
            Stage::Starting => {
                error!(%status, node_pid = self.node_pid, "Node exited before it was ready")
            }
            Stage::Serving => warn!(
                %status,
                node_pid = self.node_pid,
                "Node exited; the bridge exits too (the dispatcher re-sends what Node had not acknowledged)"
            ),
            Stage::Stopping => info!(%status, node_pid = self.node_pid, "Node exited"),
        }
        End::Node(status)
    }

    /// Node cannot become ready any more: wait for its exit, bounded.
    fn unreachable(&mut self, why: &str) {
        warn!(why, "waiting for Node to exit");
        self.channel.stop_reading();
        self.exit_by(why, self.timeouts.stop);
    }

    fn signal_node(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.node_pid as i32);
        if let Err(err) = nix::sys::signal::kill(pid, signal) {
            debug!(%err, "could not signal Node: it is gone");
        }
    }

    /// Kills Node with SIGKILL (its exit comes through `wait`); the bridge then exits 1.
    fn kill_node(&mut self, reason: &'static str, message: &str) {
        if self.killed.is_some() {
            return;
        }
        error!(node_pid = self.node_pid, "{message}");
        self.killed = Some(reason);
        self.server = None;
        if let Err(err) = self.node.start_kill() {
            error!(%err, "could not kill Node");
        }
    }

    /// Sets the deadline for Node's exit, unless an earlier one is set.
    fn exit_by(&mut self, why: &str, within: Duration) {
        debug!(why, ?within, "waiting for Node to exit");
        let deadline = Instant::now() + within;
        self.exit_deadline = Some(self.exit_deadline.map_or(deadline, |d| d.min(deadline)));
    }
}

/// The next link from the server, if bound; never resolves otherwise.
async fn accept(server: &Option<LinkServer>) -> std::io::Result<AdmittedLink> {
    match server {
        Some(server) => server.accept().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
