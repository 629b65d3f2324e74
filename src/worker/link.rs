//! The worker's end of the link, one level below [`WorkerListener`]: for a worker that
//! must decide itself when a connection is acknowledged or when it is ready. The Node
//! bridge uses it to bind only once Node is ready, and to hand its link's connections
//! over to Node (with CHANNEL) instead of receiving them.
//!
//! [`LinkServer::bind`] binds the link socket (and says nothing to systemd: send
//! `READY=1` when the whole worker is ready). [`LinkServer::accept`] admits a dispatcher
//! by its credentials; [`AdmittedLink::handshake`] exchanges HELLOs; then
//! [`DispatcherLink::recv`] yields each connection as a [`Handoff`] and
//! [`DispatcherLink::ack`] acknowledges (cumulatively). What is not acknowledged when the
//! link closes, the dispatcher sends again to the next worker on this index.
//!
//! To stop, [`DispatcherLink::drain`] asks the dispatcher to send nothing new; `recv`
//! then returns `None` once every connection sent before its answer has been received.
//! The link stays open until dropped, so what was received can still be acknowledged.
//!
//! ```no_run
//! # async fn bridge() -> Result<(), Box<dyn std::error::Error>> {
//! use sticky_dispatch::worker::{link::LinkServer, WorkerOptions};
//! let server = LinkServer::bind(&WorkerOptions::from_env()?)?;
//! let mut link = server.accept().await?.handshake().await?;
//! while let Some(handoff) = link.recv().await? {
//!     let seq = handoff.seq();
//!     // ... give `handoff.fd` to the app, wait until it has it ...
//!     link.ack(seq).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! [`WorkerListener`]: super::WorkerListener

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::unistd::Uid;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use super::lanes::GrantedLane;
use super::{ClientInfo, WorkerError, WorkerOptions};
use crate::link::{LinkListener, LinkStream, PeerCred};
use crate::shared::{exchange_hello, link_socket_name, LinkError};
use crate::wire::{self, Message, Role};

/// A dispatcher that does not answer a DRAIN within this long (and send what it announced)
/// is not waited for: the worker is stopping and systemd's stop timeout would kill it
/// anyway.
pub const DRAIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker that no dispatcher has linked to within this long says so once: started by
/// hand, it would otherwise wait in silence.
pub const NO_DISPATCHER_HINT_AFTER: Duration = Duration::from_secs(5);

/// A worker's bound link socket, admitting only the allowed dispatcher users.
#[derive(Debug)]
pub struct LinkServer {
    listener: LinkListener,
    index: u32,
    name: String,
    prefix: String,
    allowed: HashSet<Uid>,
    /// When to say that no dispatcher came; cleared once one did, or once said.
    hint_at: std::sync::Mutex<Option<Instant>>,
}

impl LinkServer {
    /// Binds `@<socket_prefix><index>`. Fails with [`WorkerError::InUse`] if another
    /// process holds the name (another instance of this worker).
    ///
    /// Under `sticky-dispatch worker-launcher` ([`LINK_FD_ENV`](super::LINK_FD_ENV) set),
    /// takes the listening socket the launcher passed instead, once it is checked to be
    /// `@<socket_prefix><index>` listening ([`WorkerError::Inherited`] otherwise): the
    /// launcher keeps the name while it replaces this process, and dropping the server
    /// closes only this process's copy.
    pub fn bind(options: &WorkerOptions) -> Result<LinkServer, WorkerError> {
        let name = link_socket_name(&options.socket_prefix, options.index);
        let inherited = take_inherited_fd().map(|fd| {
            fd.and_then(|raw| LinkListener::inherited(raw, &name).map_err(|err| err.to_string()))
                .map_err(|why| WorkerError::Inherited {
                    name: name.clone(),
                    why,
                })
        });
        let listener = match inherited {
            Some(listener) => listener?,
            None => LinkListener::bind(&name).map_err(|source| {
                if source.kind() == io::ErrorKind::AddrInUse {
                    WorkerError::InUse {
                        name: name.clone(),
                        prefix: options.socket_prefix.clone(),
                        index: options.index,
                    }
                } else {
                    WorkerError::Bind {
                        name: name.clone(),
                        source,
                    }
                }
            })?,
        };
        Ok(LinkServer {
            listener,
            index: options.index,
            name,
            prefix: options.socket_prefix.clone(),
            allowed: options.dispatcher_users.iter().copied().collect(),
            hint_at: std::sync::Mutex::new(Some(Instant::now() + NO_DISPATCHER_HINT_AFTER)),
        })
    }

    /// The worker index this socket serves.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The abstract socket name, without the leading '@'.
    pub fn socket_name(&self) -> &str {
        &self.name
    }

    /// Waits for the next link from an allowed user; links from other users are refused
    /// (closed, and logged) before a byte is exchanged. Cancel-safe. An error is one
    /// failed `accept` (typically EMFILE): back off and call again.
    pub async fn accept(&self) -> io::Result<AdmittedLink> {
        loop {
            let hint_at = *self.hint_at.lock().unwrap_or_else(|e| e.into_inner());
            let link = tokio::select! {
                link = self.listener.accept() => link?,
                () = tokio::time::sleep_until(hint_at.unwrap_or_else(Instant::now)), if hint_at.is_some() => {
                    self.say_no_dispatcher();
                    continue;
                }
            };
            self.hint_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            match link.peer_cred() {
                Ok(peer) if self.allowed.contains(&peer.uid) => {
                    return Ok(AdmittedLink {
                        link,
                        index: self.index,
                        peer,
                    })
                }
                Ok(peer) => warn!(
                    uid = peer.uid.as_raw(),
                    pid = peer.pid,
                    "refused a link from a process of a user not in dispatcher_users"
                ),
                Err(err) => warn!(%err, "refused a link whose credentials could not be read"),
            }
        }
    }
}

/// The listening socket itself: the worker launcher passes copies of it to the processes
/// it starts.
impl AsFd for LinkServer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// The fd named by [`LINK_FD_ENV`](super::LINK_FD_ENV), or why its value is no fd number:
/// read once, then taken by the first [`LinkServer::bind`].
static INHERITED_FD: std::sync::Mutex<Option<Result<RawFd, String>>> = std::sync::Mutex::new(None);

/// Reads [`LINK_FD_ENV`](super::LINK_FD_ENV) and unsets it, at the first call only (from
/// [`WorkerOptions::from_env`], else the first [`LinkServer::bind`]): the app's own
/// children must not take the number for a link socket of theirs.
pub(super) fn read_inherited_fd() {
    static READ: std::sync::Once = std::sync::Once::new();
    READ.call_once(|| {
        let Some(text) = std::env::var_os(super::LINK_FD_ENV) else {
            return;
        };
        std::env::remove_var(super::LINK_FD_ENV);
        let fd = text
            .to_str()
            .and_then(|text| text.trim().parse::<RawFd>().ok())
            .ok_or_else(|| format!("{text:?} is not a file descriptor number"));
        *INHERITED_FD.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    });
}

fn take_inherited_fd() -> Option<Result<RawFd, String>> {
    read_inherited_fd();
    INHERITED_FD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

impl LinkServer {
    fn say_no_dispatcher(&self) {
        self.hint_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        warn!(
            socket = %format!("@{}", self.name),
            "no dispatcher has connected to this worker's link socket in {}s. Start one with \
             the same socket_prefix (\"{}\"): `systemctl start sticky-dispatch.socket`, or \
             `sticky-dispatch --listen ADDR --workers N` for workers started by hand, or let \
             `sticky-dispatch --listen ADDR --workers N -- COMMAND` start the workers itself",
            NO_DISPATCHER_HINT_AFTER.as_secs(),
            self.prefix,
        );
    }
}

/// A link from an allowed dispatcher, before the HELLO exchange. The exchange is separate
/// from [`LinkServer::accept`] so that a slow peer holds up only its own task.
#[derive(Debug)]
pub struct AdmittedLink {
    link: LinkStream,
    index: u32,
    peer: PeerCred,
}

impl AdmittedLink {
    /// The dispatcher process, as the kernel reports it.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Exchanges HELLOs (ours first, theirs within [`crate::shared::HELLO_TIMEOUT`]).
    /// Every connection then comes over the link ([`DispatcherLink::recv`]).
    pub async fn handshake(self) -> Result<DispatcherLink, LinkError> {
        self.handshake_as(0).await
    }

    /// Exchanges HELLOs saying this worker serves lanes: the dispatcher then passes its
    /// lanes at once, and [`DispatcherLink::next`] yields them ([`FromDispatcher::Lanes`])
    /// besides the connections. Serve them as docs/protocol.md says (accept, never
    /// `shutdown()`, keep the backlog) and report what was accepted
    /// ([`DispatcherLink::send_accepted`]).
    pub async fn handshake_with_lanes(self) -> Result<DispatcherLink, LinkError> {
        self.handshake_as(wire::FEATURE_LANES).await
    }

    async fn handshake_as(self, features: u8) -> Result<DispatcherLink, LinkError> {
        let dispatcher_pid = exchange_hello(&self.link, Role::Worker, self.index, features)
            .await?
            .pid;
        Ok(DispatcherLink {
            link: self.link,
            dispatcher_pid,
            peer_pid: self.peer.pid,
            last_seq: 0,
            drain: Drain::Off,
            granted: Vec::new(),
            out: Vec::with_capacity(wire::MAX_MESSAGE),
            buf: [0; wire::MAX_MESSAGE],
        })
    }
}

impl AdmittedLink {
    /// For a bridge whose app reads connections from an IPC channel of its own (Node's):
    /// exchanges HELLOs as a [`Role::NodeWorker`] and passes `channel`, a `SOCK_SEQPACKET`
    /// socket whose peer is the app's channel, in CHANNEL. From then on the dispatcher
    /// hands connections to the app directly, in Node's dialect (`crate::node_ipc`), and
    /// the link carries nothing more: it closes when the dispatcher goes.
    pub async fn pass_channel(self, channel: BorrowedFd<'_>) -> Result<ChannelLink, LinkError> {
        let hello = exchange_hello(&self.link, Role::NodeWorker, self.index, 0).await?;
        let mut out = Vec::with_capacity(wire::MAX_MESSAGE);
        Message::Channel.encode(&mut out);
        self.link.send(&out, Some(channel)).await?;
        Ok(ChannelLink {
            link: self.link,
            dispatcher_pid: hello.pid,
        })
    }
}

/// A link on which the app's channel was passed ([`AdmittedLink::pass_channel`]).
#[derive(Debug)]
pub struct ChannelLink {
    link: LinkStream,
    dispatcher_pid: u32,
}

impl ChannelLink {
    /// The dispatcher's pid, as its HELLO said.
    pub fn dispatcher_pid(&self) -> u32 {
        self.dispatcher_pid
    }

    /// Resolves when the dispatcher closes the link (it stopped, or it gave up on this
    /// worker); a message on it is a protocol error. Cancel-safe.
    pub async fn closed(&self) -> Result<(), LinkError> {
        let mut buf = [0u8; wire::MAX_MESSAGE];
        match self.link.recv(&mut buf).await? {
            received if received.len == 0 => Ok(()),
            _ => Err(LinkError::Protocol(
                "a message from the dispatcher after CHANNEL".into(),
            )),
        }
    }
}

/// A client connection received from the dispatcher, not acknowledged yet.
#[derive(Debug)]
pub struct Handoff {
    /// What the dispatcher said about it (`client.seq` is its sequence number).
    pub client: ClientInfo,
    /// The connected TCP socket.
    pub fd: OwnedFd,
}

impl Handoff {
    /// Its sequence number on the link, to acknowledge it with.
    pub fn seq(&self) -> u64 {
        self.client.seq
    }

    /// The socket as a tokio `TcpStream`.
    pub fn into_tcp_stream(self) -> io::Result<(TcpStream, ClientInfo)> {
        let stream = std::net::TcpStream::from(self.fd);
        // The fd shares its file status flags with the dispatcher's copy; tokio needs
        // O_NONBLOCK.
        stream.set_nonblocking(true)?;
        Ok((TcpStream::from_std(stream)?, self.client))
    }
}

/// What [`DispatcherLink::next`] yields.
#[derive(Debug)]
pub enum FromDispatcher {
    /// A connection over the link.
    Conn(Handoff),
    /// The worker's lanes, all of them (none: close any served): sent at every link-up to
    /// a worker that said it serves lanes.
    Lanes(Vec<GrantedLane>),
}

/// Where a link is in the drain protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Off,
    /// DRAIN sent; DRAINED must come by `deadline`.
    Asked {
        deadline: Instant,
    },
    /// DRAINED said `last_seq` is the last CONN; it must be received by the same deadline.
    Answered {
        last_seq: u64,
        deadline: Instant,
    },
}

/// An open link with one dispatcher, after the HELLO exchange.
#[derive(Debug)]
pub struct DispatcherLink {
    link: LinkStream,
    dispatcher_pid: u32,
    /// The dispatcher's pid in our pid namespace (SO_PEERCRED), to tell whether it died.
    peer_pid: i32,
    /// The last CONN received; each must be the next.
    last_seq: u64,
    drain: Drain,
    /// LANEs received since the last LANES.
    granted: Vec<GrantedLane>,
    out: Vec<u8>,
    buf: [u8; wire::MAX_MESSAGE],
}

impl DispatcherLink {
    /// The dispatcher's pid, from its HELLO.
    pub fn dispatcher_pid(&self) -> u32 {
        self.dispatcher_pid
    }

    /// The sequence number of the last connection received (0 before the first).
    pub fn last_received(&self) -> u64 {
        self.last_seq
    }

    /// The next connection. `None` when the link is over: the dispatcher closed it, or a
    /// drain finished (the dispatcher answered the DRAIN and every connection it sent
    /// before has been received). Cancel-safe, so it can be raced in `select!` with
    /// whatever decides when to [`ack`](Self::ack) or [`drain`](Self::drain). For a link
    /// made with [`AdmittedLink::handshake`]; with lanes, use [`next`](Self::next).
    pub async fn recv(&mut self) -> Result<Option<Handoff>, LinkError> {
        match self.next().await? {
            None => Ok(None),
            Some(FromDispatcher::Conn(handoff)) => Ok(Some(handoff)),
            Some(FromDispatcher::Lanes(_)) => Err(LinkError::Protocol(
                "lanes for a worker that did not ask for them".into(),
            )),
        }
    }

    /// The next connection or set of lanes; `None` when the link is over, as for
    /// [`recv`](Self::recv). Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<FromDispatcher>, LinkError> {
        loop {
            let deadline = match self.drain {
                Drain::Off => None,
                Drain::Asked { deadline } => Some(deadline),
                Drain::Answered { last_seq, .. } if self.last_seq >= last_seq => return Ok(None),
                Drain::Answered { deadline, .. } => Some(deadline),
            };
            let received = tokio::select! {
                received = self.link.recv(&mut self.buf) => received?,
                _ = sleep_until(deadline) => {
                    return Err(LinkError::Protocol("no answer to DRAIN".into()));
                }
            };
            if received.len == 0 {
                return Ok(None); // the dispatcher closed the link
            }
            match (Message::decode(&self.buf[..received.len])?, received.fd) {
                (Message::Conn(conn), Some(fd)) => {
                    if conn.seq != self.last_seq + 1 {
                        return Err(LinkError::Protocol(format!(
                            "CONN {} after {}",
                            conn.seq, self.last_seq
                        )));
                    }
                    self.last_seq = conn.seq;
                    let client = ClientInfo {
                        seq: conn.seq,
                        peer: conn.peer,
                        local: conn.local,
                        listener: conn.listener.into(),
                    };
                    return Ok(Some(FromDispatcher::Conn(Handoff { client, fd })));
                }
                (Message::Lane(lane), Some(fd)) => self.granted.push(GrantedLane { fd, lane }),
                (Message::Lanes { count }, None) if usize::from(count) == self.granted.len() => {
                    return Ok(Some(FromDispatcher::Lanes(std::mem::take(
                        &mut self.granted,
                    ))));
                }
                (Message::Drained { last_seq }, None) => match self.drain {
                    Drain::Asked { deadline } => {
                        debug!(until = last_seq, "dispatcher confirmed the drain");
                        self.drain = Drain::Answered { last_seq, deadline };
                    }
                    _ => return Err(unexpected(Message::Drained { last_seq }, false)),
                },
                (message, fd) => return Err(unexpected(message, fd.is_some())),
            }
        }
    }

    /// Acknowledges every connection up to and including `seq`: the dispatcher closes its
    /// copies and will not send them again. Acknowledge only what is safely in hand.
    pub async fn ack(&mut self, seq: u64) -> Result<(), LinkError> {
        if seq > self.last_seq {
            return Err(LinkError::Protocol(format!(
                "ACK {seq} for a CONN not received (the last was {})",
                self.last_seq
            )));
        }
        Message::Ack { seq }.encode(&mut self.out);
        Ok(self.link.send(&self.out, None).await?)
    }

    /// Tells the dispatcher how many connections this worker has accepted on its lanes
    /// since it started (ACCEPTED), for its metrics.
    pub async fn send_accepted(&mut self, count: u64) -> Result<(), LinkError> {
        Message::Accepted { count }.encode(&mut self.out);
        Ok(self.link.send(&self.out, None).await?)
    }

    /// Asks the dispatcher to send nothing new on this link (DRAIN); its answer comes
    /// through [`recv`](Self::recv). Does nothing if already asked.
    pub async fn drain(&mut self) -> Result<(), LinkError> {
        if self.drain != Drain::Off {
            return Ok(());
        }
        Message::Drain.encode(&mut self.out);
        self.link.send(&self.out, None).await?;
        self.drain = Drain::Asked {
            deadline: Instant::now() + DRAIN_ANSWER_TIMEOUT,
        };
        Ok(())
    }

    /// Whether the dispatcher process is gone (exited or killed; a zombie counts as gone).
    /// A link that breaks while the dispatcher lives means it will send the unacknowledged
    /// connections again; a link that breaks because the dispatcher died means nobody
    /// will, so what was received must be served even though the ACK could not be sent.
    pub fn dispatcher_gone(&self) -> bool {
        if self.peer_pid <= 0 {
            return false; // not known in this pid namespace: assume it lives
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.peer_pid)) {
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
            Err(err) => err.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn draining(&self) -> bool {
        self.drain != Drain::Off
    }
}

fn unexpected(message: Message, with_fd: bool) -> LinkError {
    LinkError::Protocol(format!(
        "unexpected {message:?} ({} fd) from the dispatcher",
        if with_fd { "with" } else { "without" }
    ))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
