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
//!
//! [`WorkerListener`] acknowledges each connection as it arrives. A worker that must
//! acknowledge later, or bind only once something else is ready, uses [`link`] directly:
//! `WorkerListener` is built on it.

pub mod link;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Uid;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use self::link::{AdmittedLink, DispatcherLink, LinkServer};
use crate::shared::{self, LinkError, UserError};

/// Environment variable that gives a worker its index (standalone mode sets it).
pub const INDEX_ENV: &str = "STICKY_DISPATCH_INDEX";
/// Environment variable with the link socket prefix; same meaning as the `socket_prefix` key.
pub const SOCKET_PREFIX_ENV: &str = "STICKY_DISPATCH_SOCKET_PREFIX";
/// Environment variable listing the users a worker accepts as its dispatcher (names or
/// uids, separated by commas or spaces); same meaning as the `dispatcher_users` key.
pub const DISPATCHER_USERS_ENV: &str = "STICKY_DISPATCH_DISPATCHER_USERS";
pub use crate::shared::DEFAULT_SOCKET_PREFIX;

/// Connections received but not yet taken by `accept()`. Beyond it the link stops reading,
/// so the dispatcher keeps holding (and can re-send) what the app has not taken.
pub(crate) const ACCEPT_QUEUE: usize = 256;

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
    #[error(
        "the link socket @{name} is in use: worker {index} of socket_prefix \"{prefix}\" is \
         already running, maybe another app's. Stop that worker, or give each app its own \
         socket_prefix: the dispatcher's config key `socket_prefix` and, for its workers, \
         {SOCKET_PREFIX_ENV}"
    )]
    InUse {
        /// The abstract socket name.
        name: String,
        /// The prefix it was made from.
        prefix: String,
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
            Ok(list) if !list.trim().is_empty() => {
                shared::parse_user_list(&list).map_err(|err| match err {
                    UserError::Unknown(name) | UserError::Lookup { name, .. } => {
                        WorkerError::UnknownUser(name)
                    }
                    UserError::Empty => WorkerError::UnknownUser(String::new()),
                })?
            }
            _ => shared::default_peer_users(),
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
        let server = LinkServer::bind(&options)?;
        let name = server.socket_name().to_owned();
        let (incoming_tx, incoming) = mpsc::channel(ACCEPT_QUEUE);
        let (drain, drain_rx) = watch::channel(false);
        let (drained, _) = watch::channel(false);
        let (unread, _) = watch::channel(0);
        let links = Links {
            incoming: incoming_tx,
            drain: drain_rx,
        };
        tokio::spawn(
            links
                .run(server)
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
    incoming: mpsc::Sender<Incoming>,
    drain: watch::Receiver<bool>,
}

impl Links {
    async fn run(self, server: LinkServer) {
        let mut drain = self.drain.clone();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = server.accept() => match accepted {
                    Ok(admitted) => {
                        let span = info_span!("dispatcher", pid = admitted.peer().pid);
                        let session = Session::run(admitted, self.incoming.clone(), self.drain.clone());
                        tasks.spawn(session.instrument(span));
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
        drop(server);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        while tasks.join_next().await.is_some() {}
        debug!("all links closed");
        // Dropping `self.incoming` (the last sender) ends `accept()` once it is emptied.
    }
}

/// One link with one dispatcher, acknowledging each connection on receipt.
struct Session {
    link: DispatcherLink,
    incoming: mpsc::Sender<Incoming>,
    drain: watch::Receiver<bool>,
}

impl Session {
    async fn run(
        admitted: AdmittedLink,
        incoming: mpsc::Sender<Incoming>,
        drain: watch::Receiver<bool>,
    ) {
        let served = async {
            let link = admitted.handshake().await?;
            info!(dispatcher_pid = link.dispatcher_pid(), "link up");
            Session {
                link,
                incoming,
                drain,
            }
            .serve()
            .await
        };
        match served.await {
            Ok(()) => debug!("link closed"),
            Err(err) => warn!(%err, "link closed"),
        }
    }

    async fn serve(&mut self) -> Result<(), LinkError> {
        let mut drain = self.drain.clone();
        // Set when the dispatcher died: nobody to acknowledge to, or to drain with.
        let mut orphaned = false;
        loop {
            let next = tokio::select! {
                next = self.link.recv() => next?,
                _ = crate::wait_until(&mut drain, |set| *set), if !self.link.draining() && !orphaned => {
                    self.link.drain().await?;
                    continue;
                }
            };
            let Some(handoff) = next else {
                return Ok(()); // closed by the dispatcher, or drained
            };
            let seq = handoff.seq();
            // Acknowledge before the app can read a byte: once acknowledged the
            // dispatcher lets go, and what it re-sends after a crash must be connections
            // nobody here has touched.
            if !orphaned {
                if let Err(err) = self.link.ack(seq).await {
                    if !self.link.dispatcher_gone() {
                        return Err(err); // it lives: it sends this one again
                    }
                    // It died with this connection (and maybe more, still queued on the
                    // link) sent but unacknowledged. It left the fd store when it was
                    // sent, so nobody else has it: serve them.
                    warn!(seq, %err, "the dispatcher died before our ACK: serving what it had sent");
                    orphaned = true;
                }
            }
            match handoff.into_tcp_stream() {
                // Waits while the app is behind; meanwhile the link is not read, so the
                // dispatcher holds the next connections.
                Ok(incoming) => {
                    if self.incoming.send(incoming).await.is_err() {
                        return Ok(()); // the listener was dropped
                    }
                }
                Err(err) => warn!(%err, seq, "a handed-over fd is not a usable TCP socket"),
            }
        }
    }
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
}
