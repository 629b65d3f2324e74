//! `sticky-dispatch node-worker [--] COMMAND ARGS...`: worker N for a Node.js app.
//!
//! Toward the dispatcher the bridge is an ordinary worker (it binds `@<prefix><index>`,
//! checks the dispatcher's uid, speaks HELLO/CONN/ACK/DRAIN through [`crate::worker::link`]).
//! Toward Node it is the parent of a `child_process.fork()`: it starts COMMAND with Node's
//! IPC channel (`NODE_CHANNEL_FD`, JSON lines) and passes each connection's fd to Node as
//! a `net.Socket` handle, out of the data path. It acknowledges a connection to the
//! dispatcher only once Node has acknowledged the handle, so a Node process that dies
//! loses nothing it had not taken: the dispatcher still holds those fds and sends them
//! again to the next worker on this index.
//!
//! Lifecycle:
//! - the link socket is bound, and `READY=1` sent, only when the app says
//!   `{"stickyDispatch":"ready"}` (it called `listen(server)`): until then connections
//!   wait at the dispatcher, and `systemctl start app@3` waits for the app;
//! - SIGTERM or SIGINT to the bridge, or `{"stickyDispatch":"drain-request"}` from Node
//!   (it got SIGTERM itself): DRAIN to every dispatcher, pass on what is in flight, wait
//!   for Node's ACKs, then `{"stickyDispatch":"drain"}` to Node, which finishes its
//!   requests and exits; the bridge exits with Node's status. Node gets `--stop-timeout`
//!   (default 60 s, below the example unit's `TimeoutStopSec=`) to exit after that, then
//!   SIGKILL and exit status 1;
//! - Node exits (or crashes): the bridge exits too, with Node's exit code, or re-raising
//!   the signal that killed it. It does not restart Node: whatever restarts workers
//!   (systemd's `Restart=`, standalone mode's supervisor) restarts the pair, with its
//!   backoff and its logs, and Node's in-memory state (sessions) is gone either way, so a
//!   restart inside the bridge would only hide the crash;
//! - Node stops reading (blocked event loop, stopped process): after `--ack-timeout`
//!   (default 10 s: Node acknowledges from its event loop, so this bounds how long that
//!   loop may stay blocked, far above any sane stall) without an ACK for a connection
//!   sent, the bridge treats it as dead: SIGKILL, exit status 1, and the dispatcher
//!   re-sends what was not acknowledged;
//! - Node closes its channel, or the channel fails: Node cannot be given connections any
//!   more, so the links close at once (the dispatcher holds and re-sends what was not
//!   acknowledged) and the bridge waits for Node's exit, bounded as above.
//!
//! Several dispatcher links are served over time (a dispatcher restarted while Node
//! lives), each in a task of its own ([`links`]); the Node channel and the order of its
//! ACKs belong to this module's single loop.

mod channel;
mod links;
mod node;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use tokio::process::Child;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::channel::{FromNode, NodeChannel};
use self::links::LinkId;
use crate::worker::link::{Handoff, LinkServer};
use crate::worker::WorkerOptions;

/// Connections sent to Node and not yet acknowledged, at most. Node keeps one received fd
/// until the line it came with is complete, and a read that brings a second fd replaces
/// it: a line must never be split across two of Node's reads. The kernel ends a read after
/// the first message carrying fds, so a line is split only if the socket took part of it
/// (a full send buffer) or Node's 64 KiB read buffer ended inside it. Lines are under
/// 1 KiB (the listener name is at most 255 bytes), so 32 of them stay under 32 KiB: far
/// below the socket's send buffer and Node's read buffer, with neither case possible,
/// while Node still acknowledges a batch per event-loop turn instead of one connection
/// per round trip.
const WINDOW: usize = 32;
/// How long Node's acknowledgements may wait in the channel while the bridge sleeps, and
/// so how late the dispatcher may hear of them. The bridge reads the channel whenever it
/// wakes for another reason (the next connection) and forwards the acknowledgements in
/// one cumulative ACK at most this long after the oldest of them arrived: under load one
/// wake-up per connection (the dispatcher's CONN) instead of two (and Node's ACK), and one
/// ACK to the dispatcher per batch. Nothing waits on it but the dispatcher's copies of
/// the fds (and its `max_in_flight`, 256: see `MAX_UNFORWARDED`).
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Acknowledgements forwarded at once when this many have been read, whatever their age:
/// far below the dispatcher's default `max_in_flight` (256), so that it never stops
/// sending for want of ACKs while the bridge waits for `ACK_DELAY`.
const MAX_UNFORWARDED: usize = 64;
/// Times a connection is sent again after Node answered NACK (it got the line without the
/// fd, e.g. out of fds), as Node's own `child.send` does; then it is dropped.
const MAX_RETRANSMISSIONS: u8 = 3;
/// EX_CONFIG: a missing or bad index is a configuration error (the units'
/// `RestartPreventExitStatus=78` stops a restart loop).
const EX_CONFIG: u8 = 78;

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
    // One thread: per connection the bridge does a few system calls; a second thread
    // would only add wake-ups between the two (as measured for the dispatcher).
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
    /// How long Node may take to acknowledge a connection sent to it.
    pub ack: Duration,
    /// How long Node may take to exit once told to drain, or once its channel closed.
    pub stop: Duration,
}

/// How the bridge ends.
enum End {
    /// As Node ended.
    Node(ExitStatus),
    /// With this code, for a reason logged.
    Code(u8),
}

/// A connection sent to Node, not yet acknowledged by it.
struct InFlight {
    link: LinkId,
    handoff: Handoff,
    sent: Instant,
    retransmissions: u8,
}

/// What the bridge knows about one dispatcher link.
struct LinkEntry {
    /// The acknowledgement level for the link's task (everything up to it is Node's).
    acks: watch::Sender<u64>,
    /// The last sequence number sent to Node from this link.
    last_sent: u64,
    /// Connections of this link sent again after a NACK and not yet acknowledged: while
    /// there are any, the link's connections in flight are not in sequence order.
    retransmitted: usize,
    /// A new level to publish after the current batch of ACKs.
    level: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Node started; waiting for it to say ready.
    Starting,
    /// Link socket bound, READY=1 sent.
    Serving,
    /// Draining: links told to DRAIN; waiting until every link is over and Node has
    /// acknowledged everything.
    Draining,
    /// `drain` sent to Node: waiting for it to exit.
    Stopping,
}

struct Bridge {
    options: WorkerOptions,
    timeouts: Timeouts,
    node: Child,
    node_pid: u32,
    channel: NodeChannel,
    /// Whether Node's end is still open (reads not at EOF).
    channel_open: bool,
    /// Connections Node has that the link tasks have not been told of yet.
    unforwarded: usize,
    /// When to read Node's channel and forward its ACKs, while anything is outstanding.
    flush_at: Option<Instant>,
    /// When Node must have exited (set once it was told to drain, closed its channel, or
    /// was killed); then SIGKILL.
    exit_deadline: Option<Instant>,
    phase: Phase,
    server: Option<LinkServer>,
    in_flight: VecDeque<InFlight>,
    links: HashMap<LinkId, LinkEntry>,
    next_link: LinkId,
    tasks: JoinSet<LinkId>,
    handoffs_tx: mpsc::Sender<(LinkId, Handoff)>,
    handoffs: mpsc::Receiver<(LinkId, Handoff)>,
    drain: watch::Sender<bool>,
    /// Why the bridge killed Node, if it did: then it exits 1 rather than re-raising the
    /// SIGKILL it sent itself.
    killed: Option<&'static str>,
    /// Connections in flight when Node became unreachable (for the log).
    unacknowledged_at_exit: usize,
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
    let (handoffs_tx, handoffs) = mpsc::channel(1024);
    let mut bridge = Bridge {
        options,
        timeouts,
        node,
        node_pid,
        channel,
        channel_open: true,
        unforwarded: 0,
        flush_at: None,
        exit_deadline: None,
        phase: Phase::Starting,
        server: None,
        in_flight: VecDeque::with_capacity(256),
        links: HashMap::new(),
        next_link: 0,
        tasks: JoinSet::new(),
        handoffs_tx,
        handoffs,
        drain: watch::channel(false).0,
        killed: None,
        unacknowledged_at_exit: 0,
    };
    bridge.serve(&mut term, &mut int).await
}

impl Bridge {
    async fn serve(&mut self, term: &mut Signal, int: &mut Signal) -> End {
        loop {
            self.arrange();
            let ack_deadline = self.in_flight.front().map(|f| f.sent + self.timeouts.ack);
            let stop_deadline = self.exit_deadline.filter(|_| self.killed.is_none());
            tokio::select! {
                status = self.node.wait() => return self.node_exited(status).await,
                _ = term.recv() => self.start_drain("SIGTERM").await,
                _ = int.recv() => self.start_drain("SIGINT").await,
                readable = self.channel.readable(), if self.channel_open => {
                    if let Err(err) = readable {
                        self.node_broken(&format!("reading Node's channel failed: {err}"));
                        continue;
                    }
                    self.read_node().await;
                }
                accepted = accept(&self.server) => match accepted {
                    Ok(admitted) => self.link_up(admitted),
                    Err(err) => {
                        warn!(%err, "accepting a link failed");
                        // Typically EMFILE: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                // While the window is full the links wait, and so does the dispatcher.
                Some((link, handoff)) = self.handoffs.recv(), if self.in_flight.len() < WINDOW => {
                    // Awake anyway: collect what Node acknowledged meanwhile.
                    self.read_node().await;
                    self.hand_to_node(link, handoff).await;
                    // Every connection that came with this wake-up, up to the window.
                    while self.in_flight.len() < WINDOW {
                        let Ok((link, handoff)) = self.handoffs.try_recv() else { break };
                        self.hand_to_node(link, handoff).await;
                    }
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok(link) = done {
                        self.links.remove(&link);
                    }
                }
                _ = sleep_until(self.flush_at) => {
                    self.flush_at = None;
                    self.read_node().await;
                    self.forward();
                }
                _ = sleep_until(ack_deadline) => {
                    // Its ACK may be waiting unread in the channel.
                    self.read_node().await;
                    if self.in_flight.front().is_some_and(|f| f.sent + self.timeouts.ack <= Instant::now()) {
                        let seq = self.in_flight.front().map_or(0, |f| f.handoff.seq());
                        self.kill_node("unresponsive", &format!(
                            "Node did not acknowledge connection {seq} within {:?}: killing it (the dispatcher re-sends what it had not acknowledged)",
                            self.timeouts.ack
                        ));
                    }
                }
                _ = sleep_until(stop_deadline) => {
                    self.kill_node("did not exit", &format!(
                        "Node did not exit within {:?} of being told to drain (or of closing its channel): killing it",
                        self.timeouts.stop
                    ));
                }
            }
            self.maybe_finish_drain().await;
        }
    }

    /// Before sleeping: forward ACKs if due, set the flush timer, and register Node's
    /// channel for readability only when nothing else would wake the bridge in time for
    /// what Node says: idle (nothing in flight), the window full, starting or draining.
    /// While connections are in flight to Node the bridge reads the channel when the next
    /// one arrives or the flush timer fires, so Node's ACKs do not wake it.
    fn arrange(&mut self) {
        if self.unforwarded >= MAX_UNFORWARDED
            || (self.unforwarded > 0 && self.phase != Phase::Serving)
        {
            self.forward();
        }
        let outstanding = !self.in_flight.is_empty() || self.unforwarded > 0;
        if !outstanding {
            self.flush_at = None;
        } else if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + ACK_DELAY);
        }
        let armed = self.channel_open
            && (self.phase != Phase::Serving || !outstanding || self.in_flight.len() >= WINDOW);
        if armed != self.channel.is_armed() {
            if let Err(err) = self.channel.arm(armed) {
                self.node_broken(&format!("registering Node's channel failed: {err}"));
            }
        }
    }

    /// Tells the link tasks what Node has (their cumulative ACK levels).
    fn forward(&mut self) {
        self.unforwarded = 0;
        for entry in self.links.values_mut() {
            if entry.level > *entry.acks.borrow() {
                entry.acks.send_replace(entry.level);
            }
        }
    }

    /// Reads what Node sent, without waiting, and acts on each message. The new ACK levels
    /// are forwarded later, in a batch ([`arrange`](Self::arrange), the flush timer).
    async fn read_node(&mut self) {
        if !self.channel_open {
            return;
        }
        match self.channel.read_available() {
            Ok(true) => {}
            Ok(false) => {
                // Node is exiting (its status comes through `wait`), or disconnected. What
                // it acknowledged before is still forwarded below.
                self.handle_messages().await;
                self.forward();
                self.node_unreachable("Node closed its IPC channel", self.timeouts.stop);
                return;
            }
            Err(err) => {
                self.node_broken(&format!("reading Node's channel failed: {err}"));
                return;
            }
        }
        self.handle_messages().await;
    }

    async fn handle_messages(&mut self) {
        while let Some(message) = self.channel.next_message() {
            match message {
                FromNode::Ack => self.acknowledged(),
                FromNode::Nack => self.not_received().await,
                FromNode::Ready => self.ready(),
                FromNode::DrainRequest => self.start_drain("drain request from Node").await,
                FromNode::Other(line) => debug!(message = %line, "message from Node ignored"),
            }
        }
    }

    /// Node has the oldest connection in flight.
    fn acknowledged(&mut self) {
        let Some(done) = self.in_flight.pop_front() else {
            warn!("Node acknowledged a handle the bridge never sent; ignored");
            return;
        };
        self.settled(done);
    }

    /// Node is done with `done` (has it, or it was given up): raise its link's level.
    fn settled(&mut self, done: InFlight) {
        let Some(entry) = self.links.get_mut(&done.link) else {
            return; // the link is gone: its dispatcher will not hear of it
        };
        let seq = done.handoff.seq();
        if done.retransmissions > 0 {
            entry.retransmitted -= 1;
        }
        let level = if entry.retransmitted == 0 {
            // Sent in sequence order and acknowledged in the order sent: everything
            // before it is Node's too.
            seq
        } else {
            // An earlier one may still be on its way again.
            let lowest = self
                .in_flight
                .iter()
                .filter(|f| f.link == done.link)
                .map(|f| f.handoff.seq())
                .min();
            lowest.map_or(entry.last_sent, |lowest| (lowest - 1).min(entry.last_sent))
        };
        entry.level = entry.level.max(level);
        self.unforwarded += 1;
    }

    /// Node got the oldest line in flight without its fd: send it again, as Node's own
    /// `send` does, a few times; then give the connection up.
    async fn not_received(&mut self) {
        let Some(mut again) = self.in_flight.pop_front() else {
            warn!("Node refused a handle the bridge never sent; ignored");
            return;
        };
        let seq = again.handoff.seq();
        if again.retransmissions >= MAX_RETRANSMISSIONS {
            error!(seq, "Node did not receive a connection's fd after {MAX_RETRANSMISSIONS} retransmissions: closing it");
            self.settled(again);
            return;
        }
        warn!(
            seq,
            "Node received a connection without its fd (out of fds?): sending it again"
        );
        if again.retransmissions == 0 {
            if let Some(entry) = self.links.get_mut(&again.link) {
                entry.retransmitted += 1;
            }
        }
        again.retransmissions += 1;
        self.send_in_flight(again).await;
    }

    /// The app listens: bind the link socket and tell systemd.
    fn ready(&mut self) {
        if self.phase != Phase::Starting {
            debug!("Node said ready again; ignored");
            return;
        }
        let server = match LinkServer::bind(&self.options) {
            Ok(server) => server,
            Err(err) => {
                self.kill_node("link socket", &format!("{err}: stopping Node"));
                return;
            }
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
        self.phase = Phase::Serving;
    }

    fn link_up(&mut self, admitted: crate::worker::link::AdmittedLink) {
        let id = self.next_link;
        self.next_link += 1;
        let (acks, acks_rx) = watch::channel(0);
        self.links.insert(
            id,
            LinkEntry {
                acks,
                last_sent: 0,
                retransmitted: 0,
                level: 0,
            },
        );
        let span = info_span!("dispatcher", pid = admitted.peer().pid);
        let task = links::serve(
            admitted,
            id,
            self.handoffs_tx.clone(),
            acks_rx,
            self.drain.subscribe(),
        );
        self.tasks.spawn(task.instrument(span));
    }

    /// Sends a connection from link `link` to Node.
    async fn hand_to_node(&mut self, link: LinkId, handoff: Handoff) {
        let Some(entry) = self.links.get_mut(&link) else {
            // Its link broke: the dispatcher holds it and sends it again.
            return;
        };
        entry.last_sent = handoff.seq();
        let in_flight = InFlight {
            link,
            handoff,
            sent: Instant::now(),
            retransmissions: 0,
        };
        self.send_in_flight(in_flight).await;
    }

    async fn send_in_flight(&mut self, mut in_flight: InFlight) {
        use std::os::fd::AsFd;
        if !self.channel_open {
            return; // Node is going: the dispatcher re-sends what it had not acknowledged
        }
        // Bounded like an ACK: a Node that does not read does not acknowledge either.
        let sent = tokio::time::timeout(
            self.timeouts.ack,
            self.channel
                .send_connection(&in_flight.handoff.client, in_flight.handoff.fd.as_fd()),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                in_flight.sent = Instant::now();
                self.in_flight.push_back(in_flight);
            }
            Ok(Err(err)) => {
                self.node_broken(&format!("sending a connection to Node failed: {err}"))
            }
            Err(_) => self.kill_node(
                "unresponsive",
                &format!(
                    "Node did not read its channel within {:?}: killing it",
                    self.timeouts.ack
                ),
            ),
        }
    }

    /// SIGTERM, SIGINT or Node's drain request: stop taking connections, drain the links.
    async fn start_drain(&mut self, why: &str) {
        match self.phase {
            Phase::Starting | Phase::Serving => {}
            Phase::Draining | Phase::Stopping => {
                debug!(why, "already draining");
                return;
            }
        }
        info!(
            why,
            links = self.tasks.len(),
            in_flight = self.in_flight.len(),
            "draining"
        );
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("draining"),
            ],
        );
        self.phase = Phase::Draining;
        // Free the name now: a replacement may bind it while we finish.
        self.server = None;
        self.drain.send_replace(true);
        self.maybe_finish_drain().await;
    }

    /// Once every link is over and Node has everything: tell Node.
    async fn maybe_finish_drain(&mut self) {
        if self.phase != Phase::Draining || !self.tasks.is_empty() || !self.in_flight.is_empty() {
            return;
        }
        info!("drained: every connection handed to Node; telling it to finish");
        self.phase = Phase::Stopping;
        self.exit_by(self.timeouts.stop);
        if self.channel_open {
            if let Err(err) = self.channel.send_drain().await {
                debug!(%err, "could not tell Node to drain: it is going anyway");
            }
        }
    }

    async fn node_exited(&mut self, status: std::io::Result<ExitStatus>) -> End {
        // What Node acknowledged before it exited may still be unread: the dispatcher must
        // hear of it rather than send those connections again. Give the link tasks a few
        // turns to pass it on.
        if self.channel_open && self.killed.is_none() {
            self.read_node().await;
            self.forward();
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
        }
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                error!(%err, "lost track of Node");
                return End::Code(1);
            }
        };
        let unacknowledged = self.in_flight.len() + self.unacknowledged_at_exit;
        if let Some(why) = self.killed {
            error!(%status, node_pid = self.node_pid, unacknowledged, why, "Node killed; exiting with status 1");
            return End::Code(1);
        }
        match self.phase {
            Phase::Starting => {
                error!(%status, node_pid = self.node_pid, "Node exited before it was ready")
            }
            Phase::Serving | Phase::Draining => warn!(
                %status,
                node_pid = self.node_pid,
                unacknowledged,
                "Node exited; the bridge exits too (the dispatcher re-sends what Node had not acknowledged)"
            ),
            Phase::Stopping => info!(%status, node_pid = self.node_pid, "Node exited"),
        }
        End::Node(status)
    }

    /// The channel failed: Node is dead or dying (its status comes through `wait`).
    fn node_broken(&mut self, why: &str) {
        self.node_unreachable(why, self.timeouts.ack);
    }

    /// Node can be given nothing more: stop being a worker at once (close the links, so
    /// the dispatcher holds, and later re-sends, what Node had not acknowledged), then
    /// wait up to `within` for Node to exit.
    fn node_unreachable(&mut self, why: &str, within: Duration) {
        if self.channel_open {
            if self.phase == Phase::Stopping {
                debug!(why, "Node's channel closed");
            } else {
                warn!(
                    why,
                    unacknowledged = self.in_flight.len(),
                    "Node's channel closed: closing the links"
                );
            }
        }
        self.channel_open = false;
        self.server = None;
        self.tasks.abort_all();
        self.links.clear();
        self.unacknowledged_at_exit += self.in_flight.len();
        self.in_flight.clear();
        self.unforwarded = 0;
        self.exit_by(within);
    }

    /// Kills Node with SIGKILL (its exit comes through `wait`); the bridge then exits 1.
    fn kill_node(&mut self, reason: &'static str, message: &str) {
        if self.killed.is_some() {
            return;
        }
        error!(node_pid = self.node_pid, "{message}");
        self.killed = Some(reason);
        if let Err(err) = self.node.start_kill() {
            error!(%err, "could not kill Node");
        }
        // Our copies of what is in flight go; the dispatcher holds its own.
        self.node_unreachable("Node killed", self.timeouts.stop);
    }

    /// Sets the exit deadline, unless an earlier one is set.
    fn exit_by(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        self.exit_deadline = Some(self.exit_deadline.map_or(deadline, |d| d.min(deadline)));
    }
}

/// The next link from the server, if bound; never resolves otherwise.
async fn accept(server: &Option<LinkServer>) -> std::io::Result<crate::worker::link::AdmittedLink> {
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
