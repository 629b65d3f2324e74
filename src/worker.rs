//! The worker side: receive client connections from the dispatcher as ordinary
//! `tokio::net::TcpStream`s.
//!
//! ```no_run
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let mut listener = sticky_dispatch::worker::WorkerListener::bind().await?;
//! while let Some((stream, client)) = listener.accept().await {
//!     tokio::spawn(async move {
//!         // serve `stream`; `client.peer` is the real client address
//!         # drop((stream, client));
//!     });
//! }
//! // accept() returned None: SIGTERM arrived and every connection in flight was taken.
//! # Ok(()) }
//! ```
//!
//! With the `axum` feature, [`WorkerListener`] is an `axum::serve::Listener`; serve with
//! `with_graceful_shutdown(listener.drained())` so that a SIGTERM drains before stopping.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Uid, User};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::link::{LinkListener, LinkStream, PeerCred};
use crate::wire::{self, Message, Role};

/// Environment variable that gives a worker its index (standalone mode sets it).
pub const INDEX_ENV: &str = "STICKY_DISPATCH_INDEX";
/// Environment variable with the link socket prefix; same meaning as the `socket_prefix` key.
pub const SOCKET_PREFIX_ENV: &str = "STICKY_DISPATCH_SOCKET_PREFIX";
/// Environment variable listing the users a worker accepts as its dispatcher (names or
/// uids, separated by commas or spaces); same meaning as the `dispatcher_users` key.
pub const DISPATCHER_USERS_ENV: &str = "STICKY_DISPATCH_DISPATCHER_USERS";
/// The default link socket prefix, shared with the dispatcher's configuration.
pub const DEFAULT_SOCKET_PREFIX: &str = "sticky-dispatch/";

/// A dispatcher that does not answer a DRAIN within this long is not waited for: the
/// worker is stopping and systemd's stop timeout would kill it anyway.
const DRAIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections received but not yet taken by `accept()`. Beyond it the link stops reading,
/// so the dispatcher keeps holding (and can re-send) what the app has not taken.
const ACCEPT_QUEUE: usize = 256;

/// What the dispatcher knows about a connection it handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Sequence number of the hand-off on its link.
    pub seq: u64,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The address the client connected to.
    pub local: Option<SocketAddr>,
    /// The name of the dispatcher's listener that accepted it (`FileDescriptorName=`).
    pub listener: Arc<str>,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Neither `STICKY_DISPATCH_INDEX` nor a unit instance name gave an index.
    #[error("no worker index: set {INDEX_ENV}, or run as an instance of a template unit such as app@3.service")]
    NoIndex,
    /// The index was given but is not a number.
    #[error("worker index {0:?} is not a non-negative integer")]
    BadIndex(String),
    /// A user in the allowed-dispatcher list does not exist.
    #[error("{DISPATCHER_USERS_ENV}: unknown user {0:?}")]
    UnknownUser(String),
    /// Another process holds this worker's link socket name.
    #[error("the link socket @{name} is in use: is worker {index} already running?")]
    InUse {
        /// The abstract socket name.
        name: String,
        /// The worker index.
        index: u32,
    },
    /// Any other failure to bind the link socket.
    #[error("could not bind the link socket @{name}")]
    Bind {
        /// The abstract socket name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How a worker finds its link socket and whom it trusts.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// This worker's index.
    pub index: u32,
    /// Link socket prefix; the socket is `@<prefix><index>`.
    pub socket_prefix: String,
    /// Uids accepted as the dispatcher.
    pub dispatcher_users: Vec<Uid>,
    /// Drain when SIGTERM arrives (the default). Turn off to drain only through
    /// [`WorkerListener::drain_trigger`].
    pub drain_on_sigterm: bool,
}

impl WorkerOptions {
    /// Options from the environment: the index from `STICKY_DISPATCH_INDEX`, else the
    /// systemd unit's instance name; prefix and users from their variables or defaults.
    pub fn from_env() -> Result<WorkerOptions, WorkerError> {
        let index = match std::env::var(INDEX_ENV) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| WorkerError::BadIndex(text))?,
            Err(_) => {
                let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                match instance_from_cgroup(&cgroup) {
                    Some(instance) => instance
                        .parse()
                        .map_err(|_| WorkerError::BadIndex(instance.to_owned()))?,
                    None => return Err(WorkerError::NoIndex),
                }
            }
        };
        let socket_prefix =
            std::env::var(SOCKET_PREFIX_ENV).unwrap_or_else(|_| DEFAULT_SOCKET_PREFIX.to_owned());
        let dispatcher_users = match std::env::var(DISPATCHER_USERS_ENV) {
            Ok(list) if !list.trim().is_empty() => parse_users(&list)?,
            _ => default_users(),
        };
        Ok(WorkerOptions {
            index,
            socket_prefix,
            dispatcher_users,
            drain_on_sigterm: true,
        })
    }
}

/// The instance name of the `.service` unit whose cgroup this process is in:
/// `0::/system.slice/system-app.slice/app@3.service` → `3`.
fn instance_from_cgroup(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(|unit| {
            let (_, instance) = unit.strip_suffix(".service")?.split_once('@')?;
            (!instance.is_empty()).then_some(instance)
        })
    })
}

/// Our own uid and root: who may be the dispatcher unless configured otherwise.
fn default_users() -> Vec<Uid> {
    let mut users = vec![Uid::effective(), Uid::from_raw(0)];
    users.dedup();
    users
}

/// Parses `"app, 0 www-data"` or the TOML-looking `[0, "app"]` into uids.
fn parse_users(list: &str) -> Result<Vec<Uid>, WorkerError> {
    list.split(|c: char| c == ',' || c.is_whitespace() || "[]\"'".contains(c))
        .filter(|word| !word.is_empty())
        .map(|word| match word.parse::<u32>() {
            Ok(uid) => Ok(Uid::from_raw(uid)),
            Err(_) => match User::from_name(word) {
                Ok(Some(user)) => Ok(user.uid),
                _ => Err(WorkerError::UnknownUser(word.to_owned())),
            },
        })
        .collect()
}

type Incoming = (TcpStream, ClientInfo);

/// Receives the connections the dispatcher hands to this worker.
#[derive(Debug)]
pub struct WorkerListener {
    index: u32,
    incoming: mpsc::Receiver<Incoming>,
    drain: watch::Sender<bool>,
    drained: watch::Sender<bool>,
    /// Connections yielded to axum that it has not read from yet.
    unread: watch::Sender<usize>,
}

impl WorkerListener {
    /// Binds this worker's link socket with options from the environment, then tells
    /// systemd `READY=1`.
    pub async fn bind() -> Result<WorkerListener, WorkerError> {
        WorkerListener::bind_with(WorkerOptions::from_env()?).await
    }

    /// Binds with explicit options, then tells systemd `READY=1`.
    pub async fn bind_with(options: WorkerOptions) -> Result<WorkerListener, WorkerError> {
        let name = format!("{}{}", options.socket_prefix, options.index);
        let link_listener = LinkListener::bind(&name).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                WorkerError::InUse {
                    name: name.clone(),
                    index: options.index,
                }
            } else {
                WorkerError::Bind {
                    name: name.clone(),
                    source,
                }
            }
        })?;
        let (incoming_tx, incoming) = mpsc::channel(ACCEPT_QUEUE);
        let (drain, drain_rx) = watch::channel(false);
        let (drained, _) = watch::channel(false);
        let (unread, _) = watch::channel(0);
        let links = Links {
            index: options.index,
            allowed: options.dispatcher_users.into_iter().collect(),
            incoming: incoming_tx,
            drain: drain_rx,
        };
        tokio::spawn(
            links
                .run(link_listener)
                .instrument(info_span!("link", index = options.index)),
        );
        if options.drain_on_sigterm {
            tokio::spawn(drain_on_sigterm(drain.clone()));
        }
        info!(index = options.index, socket = %format!("@{name}"), "worker ready");
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!("worker {} ready", options.index)),
            ],
        );
        Ok(WorkerListener {
            index: options.index,
            incoming,
            drain,
            drained,
            unread,
        })
    }

    /// This worker's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The next connection, or `None` once a drain has finished and every connection
    /// received has been returned.
    pub async fn accept(&mut self) -> Option<(TcpStream, ClientInfo)> {
        let next = self.incoming.recv().await;
        if next.is_none() {
            self.drained.send_replace(true);
        }
        next
    }

    /// Starts a drain, as SIGTERM does: the dispatcher is told to send nothing new, what
    /// is in flight is received, then `accept()` ends.
    pub fn drain_trigger(&self) -> impl Fn() + Send + Sync + 'static {
        let drain = self.drain.clone();
        move || {
            drain.send_replace(true);
        }
    }

    /// Resolves once a drain has finished and `accept()` has returned every connection:
    /// the moment to stop serving new connections and finish the open ones. With axum, it
    /// also waits (up to [`FIRST_READ_TIMEOUT`]) until axum has read from every connection
    /// it got, because a graceful shutdown closes a connection that has not yet started a
    /// request: the client would lose it.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut drained = self.drained.subscribe();
        let mut unread = self.unread.subscribe();
        async move {
            crate::wait_until(&mut drained, |done| *done).await;
            let _ = tokio::time::timeout(FIRST_READ_TIMEOUT, unread.wait_for(|n| *n == 0)).await;
        }
    }
}

/// How long [`WorkerListener::drained`] waits for the app to start reading the last
/// connections it was given: a client that connects and says nothing is not waited for.
pub const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection as axum gets it: a `TcpStream` that reports its first read, so that a
/// drain does not end before axum has started serving it.
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct WorkerStream {
    inner: TcpStream,
    unread: Option<UnreadMark>,
}

/// Counts a connection as unread until dropped.
#[cfg(feature = "axum")]
#[derive(Debug)]
struct UnreadMark(watch::Sender<usize>);

#[cfg(feature = "axum")]
impl UnreadMark {
    fn new(unread: &watch::Sender<usize>) -> UnreadMark {
        unread.send_modify(|n| *n += 1);
        UnreadMark(unread.clone())
    }
}

#[cfg(feature = "axum")]
impl Drop for UnreadMark {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(feature = "axum")]
impl WorkerStream {
    /// The TCP stream inside.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

#[cfg(feature = "axum")]
impl tokio::io::AsyncRead for WorkerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.unread = None;
        }
        polled
    }
}

#[cfg(feature = "axum")]
impl tokio::io::AsyncWrite for WorkerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for WorkerListener {
    type Io = WorkerStream;
    type Addr = ClientInfo;

    async fn accept(&mut self) -> (WorkerStream, ClientInfo) {
        match WorkerListener::accept(self).await {
            Some((inner, client)) => {
                let unread = Some(UnreadMark::new(&self.unread));
                (WorkerStream { inner, unread }, client)
            }
            // Drained: axum's graceful shutdown (on `drained()`) stops calling us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<ClientInfo> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a worker has no address of its own: connections arrive from the dispatcher",
        ))
    }
}

#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, WorkerListener>>
    for ClientInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, WorkerListener>) -> ClientInfo {
        stream.remote_addr().clone()
    }
}

async fn drain_on_sigterm(drain: watch::Sender<bool>) {
    let mut closed = drain.subscribe();
    let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        warn!("could not install a SIGTERM handler; the worker will not drain on SIGTERM");
        return;
    };
    tokio::select! {
        _ = sigterm.recv() => {
            info!("SIGTERM: draining");
            drain.send_replace(true);
        }
        // Already draining for another reason.
        _ = crate::wait_until(&mut closed, |set| *set) => {}
    }
}

/// The background side: accepts links from the dispatcher and feeds `incoming`.
struct Links {
    index: u32,
    allowed: HashSet<Uid>,
    incoming: mpsc::Sender<Incoming>,
    drain: watch::Receiver<bool>,
}

impl Links {
    async fn run(self, link_listener: LinkListener) {
        let mut drain = self.drain.clone();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = link_listener.accept() => match accepted {
                    Ok(link) => {
                        if let Some(peer) = self.admit(&link) {
                            let span = info_span!("dispatcher", pid = peer.pid);
                            let session = Session {
                                index: self.index,
                                link,
                                incoming: self.incoming.clone(),
                                drain: self.drain.clone(),
                            };
                            tasks.spawn(session.run().instrument(span));
                        }
                    }
                    Err(err) => {
                        warn!(%err, "accepting a link failed");
                        // Typically EMFILE: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = crate::wait_until(&mut drain, |set| *set) => break,
                Some(_) = tasks.join_next() => {}
            }
        }
        // Free the name now: a replacement worker may bind it as soon as we exit.
        drop(link_listener);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        while tasks.join_next().await.is_some() {}
        debug!("all links closed");
        // Dropping `self.incoming` (the last sender) ends `accept()` once it is emptied.
    }

    fn admit(&self, link: &LinkStream) -> Option<PeerCred> {
        match link.peer_cred() {
            Ok(peer) if self.allowed.contains(&peer.uid) => Some(peer),
            Ok(peer) => {
                warn!(
                    uid = peer.uid.as_raw(),
                    pid = peer.pid,
                    "refused a link from a process of a user not in dispatcher_users"
                );
                None
            }
            Err(err) => {
                warn!(%err, "refused a link whose credentials could not be read");
                None
            }
        }
    }
}

/// One link with one dispatcher.
struct Session {
    index: u32,
    link: LinkStream,
    incoming: mpsc::Sender<Incoming>,
    drain: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Decode(#[from] wire::DecodeError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl Session {
    async fn run(mut self) {
        match self.serve().await {
            Ok(()) => debug!("link closed"),
            Err(err) => warn!(%err, "link closed"),
        }
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        let mut out = Vec::with_capacity(wire::MAX_MESSAGE);
        let mut buf = [0u8; wire::MAX_MESSAGE];
        Message::Hello {
            role: Role::Worker,
            index: self.index,
            pid: std::process::id(),
        }
        .encode(&mut out);
        self.link.send(&out, None).await?;

        let mut said_hello = false;
        let mut last_seq = 0u64;
        // Some(n) once the dispatcher answered our DRAIN: stop after CONN n.
        let mut drain_until: Option<u64> = None;
        let mut drain_sent = false;
        let mut drain = self.drain.clone();
        let mut drain_deadline = std::pin::pin!(tokio::time::sleep(Duration::MAX));
        loop {
            if drain_until.is_some_and(|until| last_seq >= until) {
                return Ok(());
            }
            let received = tokio::select! {
                received = self.link.recv(&mut buf) => received?,
                _ = crate::wait_until(&mut drain, |set| *set), if !drain_sent && said_hello => {
                    drain_sent = true;
                    Message::Drain.encode(&mut out);
                    self.link.send(&out, None).await?;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_ANSWER_TIMEOUT);
                    continue;
                }
                _ = &mut drain_deadline => {
                    return Err(SessionError::Protocol("no answer to DRAIN".into()));
                }
            };
            if received.len == 0 {
                return Ok(()); // the dispatcher closed the link
            }
            let message = Message::decode(&buf[..received.len])?;
            match (message, received.fd) {
                (
                    Message::Hello {
                        role: Role::Dispatcher,
                        index,
                        pid,
                    },
                    None,
                ) if !said_hello => {
                    if index != self.index {
                        return Err(SessionError::Protocol(format!(
                            "dispatcher addressed worker {index}, this is worker {}",
                            self.index
                        )));
                    }
                    info!(dispatcher_pid = pid, "link up");
                    said_hello = true;
                }
                (Message::Conn(conn), Some(fd)) if said_hello => {
                    if conn.seq != last_seq + 1 {
                        return Err(SessionError::Protocol(format!(
                            "CONN {} after {last_seq}",
                            conn.seq
                        )));
                    }
                    last_seq = conn.seq;
                    // Acknowledge before the app can read a byte: once acknowledged the
                    // dispatcher lets go, and what it re-sends after a crash must be
                    // connections nobody here has touched.
                    Message::Ack { seq: last_seq }.encode(&mut out);
                    self.link.send(&out, None).await?;
                    match tcp_stream(fd) {
                        Ok(stream) => {
                            let info = ClientInfo {
                                seq: conn.seq,
                                peer: conn.peer,
                                local: conn.local,
                                listener: conn.listener.into(),
                            };
                            // Waits while the app is behind; meanwhile the link is not
                            // read, so the dispatcher holds the next connections.
                            if self.incoming.send((stream, info)).await.is_err() {
                                return Ok(()); // the listener was dropped
                            }
                        }
                        Err(err) => {
                            warn!(%err, seq = conn.seq, "a handed-over fd is not a usable TCP socket")
                        }
                    }
                }
                (Message::Drained { last_seq: until }, None) if drain_sent => {
                    debug!(until, "dispatcher confirmed the drain");
                    drain_until = Some(until);
                }
                (message, fd) => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected {message:?} ({} fd) from the dispatcher",
                        if fd.is_some() { "with" } else { "without" }
                    )));
                }
            }
        }
    }
}

fn tcp_stream(fd: OwnedFd) -> io::Result<TcpStream> {
    let stream = std::net::TcpStream::from(fd);
    // The fd shares its file status flags with the dispatcher's copy; tokio needs O_NONBLOCK.
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_comes_from_the_unit_in_the_cgroup() {
        let v2 = "0::/system.slice/system-app.slice/app@3.service\n";
        assert_eq!(instance_from_cgroup(v2), Some("3"));
        let hybrid = "12:pids:/system.slice/system-app.slice/app@11.service\n1:name=systemd:/system.slice/system-app.slice/app@11.service\n0::/system.slice/system-app.slice/app@11.service\n";
        assert_eq!(instance_from_cgroup(hybrid), Some("11"));
        assert_eq!(
            instance_from_cgroup("0::/user.slice/session-1.scope\n"),
            None
        );
        assert_eq!(instance_from_cgroup("0::/system.slice/app.service\n"), None);
        assert_eq!(instance_from_cgroup(""), None);
    }

    #[test]
    fn users_parse_from_names_and_uids() {
        assert_eq!(
            parse_users("root, 1000 2").unwrap(),
            [0, 1000, 2].map(Uid::from_raw)
        );
        assert_eq!(
            parse_users("[0, \"root\"]").unwrap(),
            [0, 0].map(Uid::from_raw)
        );
        assert!(matches!(
            parse_users("no-such-user-here"),
            Err(WorkerError::UnknownUser(_))
        ));
    }
}
