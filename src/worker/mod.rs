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
//!
//! Layout: `options` (index, socket prefix and allowed dispatchers from the environment;
//! why a start fails), `session` (the links from the dispatcher, acknowledging each
//! connection; SIGTERM as a drain), `axum_adapter` (the `axum::serve::Listener`), and
//! [`link`], the link one level below.

#[cfg(feature = "axum")]
mod axum_adapter;
mod lanes;
pub mod link;
mod options;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{info, info_span, Instrument};

use self::link::LinkServer;
use self::session::{drain_on_sigterm, Links};

#[cfg(feature = "axum")]
pub use self::axum_adapter::WorkerStream;
pub use self::options::{WorkerError, WorkerOptions};

/// Environment variable that gives a worker its index (standalone mode sets it).
pub const INDEX_ENV: &str = "STICKY_DISPATCH_INDEX";
/// Environment variable with the link socket prefix; same meaning as the `socket_prefix` key.
pub const SOCKET_PREFIX_ENV: &str = "STICKY_DISPATCH_SOCKET_PREFIX";
/// Environment variable listing the users a worker accepts as its dispatcher (names or
/// uids, separated by commas or spaces); same meaning as the `dispatcher_users` key.
pub const DISPATCHER_USERS_ENV: &str = "STICKY_DISPATCH_DISPATCHER_USERS";
pub use crate::shared::DEFAULT_SOCKET_PREFIX;
/// Environment variable naming an inherited fd that is this worker's link socket, bound
/// and listening: `sticky-dispatch worker-launcher` holds the name across reloads and
/// passes each process it starts a copy. The library then uses it instead of binding
/// (and unsets the variable, so the app's own children do not take it for theirs).
pub const LINK_FD_ENV: &str = "STICKY_DISPATCH_LINK_FD";

/// Connections received but not yet taken by `accept()`. Beyond it the link stops reading,
/// so the dispatcher keeps holding (and can re-send) what the app has not taken.
pub(crate) const ACCEPT_QUEUE: usize = 256;

/// What is known about a connection: from the dispatcher, for one it handed over; from
/// the socket, for one accepted on a lane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Sequence number of the hand-off on its link; 0 for a connection accepted on a lane.
    pub seq: u64,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The address the client connected to.
    pub local: Option<SocketAddr>,
    /// The name of the listener it came through (`FileDescriptorName=`).
    pub listener: Arc<str>,
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
    /// Binds this worker's link socket with options from the environment (or takes the one
    /// a worker launcher passed, [`LINK_FD_ENV`]), then tells systemd `READY=1`.
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
            lanes: Arc::new(lanes::Lanes::new(incoming_tx.clone())),
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
