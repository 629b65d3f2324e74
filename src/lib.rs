//! Sticky sessions for multi-process servers, the systemd way.
//!
//! `sticky-dispatch` accepts client connections on sockets systemd passes in, maps each
//! client's IP to a worker index with a consistent hash, and hands the connection's file
//! descriptor to that worker (`app@N.service`) over an abstract Unix socket. The worker
//! serves it directly: after the hand-off the dispatcher is out of the data path.
//!
//! A worker uses only [`worker`]: build with `default-features = false` (plus the `axum`
//! feature to serve with axum) and none of the dispatcher's dependencies are compiled.
//!
//! # Layout
//!
//! - [`worker`] — the worker library: [`worker::WorkerListener`] yields
//!   `(TcpStream, ClientInfo)` and implements `axum::serve::Listener`; [`worker::link`]
//!   is the link underneath, for workers that decide when they are ready or acknowledge
//!   (the Node bridge).
//! - [`shared`] — what both ends of the link know (and the Node and Python packages,
//!   through tests/vectors/constants.json): the socket names, the allowed users and their
//!   parsing, the HELLO exchange, the link's error type, the shared timeouts.
//! - [`wire`] — the hand-off link's message format (pure encode/decode).
//! - [`link`] — the link's socket: abstract `SOCK_SEQPACKET`, SCM_RIGHTS, SO_PEERCRED;
//!   most of the crate's `unsafe` (the rest, at each spawn, is in `supervisor`,
//!   `node_bridge` and `launcher`, each block with its SAFETY note).
//! - `dispatcher` — accept loops, one slot per worker (queue, link, acknowledgements),
//!   shared state and routing, metrics, the `/metrics` and `/health` listener, sd_notify
//!   status, graceful shutdown, the fd store.
//! - `status` — `sticky-dispatch status`: a running dispatcher's per-worker table.
//! - `routing` — routing key, hash, bucket table, failover choice; `routing::cbpf`, the
//!   same mapping as a classic BPF program for the kernel.
//! - `keysource` — keys from the first bytes a client sends: PROXY protocol, HTTP
//!   `X-Forwarded-For`, cookie, query parameter (pure parsers).
//! - `config` — figment layers validated into typed settings.
//! - `supervisor` — standalone mode: spawn and restart the workers (one `unsafe` line: the
//!   parent-death signal set between fork and exec).
//! - `node_bridge` — `sticky-dispatch node-worker -- node app.js`: starts Node with its
//!   IPC channel and passes that channel to the dispatcher, which hands each connection
//!   to Node directly; `node_ipc` — the lines of Node's IPC dialect.
//! - `launcher` — `sticky-dispatch worker-launcher -- COMMAND`: holds a worker's link
//!   socket and runs COMMAND (a Rust or Python worker) with a copy of it, so that the
//!   worker reloads in place; `reload` — the reload socket and `reload-worker`, for the
//!   launcher and the Node bridge.
//! - `sock_diag` — the TCP sockets listening on the host (netlink), to check a lane group
//!   and read its queues.
//! - `logging` — journald when under systemd, stderr otherwise.
//! - `cli`, `manual` — the daemon's command line, and the manual pages generated from it
//!   and from the configuration keys.
//!
//! The modules marked `dispatcher` in Cargo.toml (all but `worker`, `shared`, `wire`,
//! `link`) need the `dispatcher` feature, on by default.
#![warn(missing_docs)]

#[cfg(feature = "dispatcher")]
pub mod cli;
#[cfg(feature = "dispatcher")]
pub mod config;
#[cfg(feature = "dispatcher")]
pub mod dispatcher;
#[cfg(feature = "dispatcher")]
pub mod keysource;
#[cfg(feature = "dispatcher")]
pub mod launcher;
pub mod link;
#[cfg(feature = "dispatcher")]
pub mod logging;
#[cfg(feature = "dispatcher")]
pub mod manual;
#[cfg(feature = "dispatcher")]
pub mod node_bridge;
#[cfg(feature = "dispatcher")]
pub mod node_ipc;
#[cfg(feature = "dispatcher")]
pub mod reload;
#[cfg(feature = "dispatcher")]
pub mod routing;
pub mod shared;
#[cfg(feature = "dispatcher")]
pub mod sock_diag;
#[cfg(feature = "dispatcher")]
pub mod status;
#[cfg(feature = "dispatcher")]
pub mod supervisor;
pub mod wire;
pub mod worker;

/// Resolves once the watched value satisfies `condition` (or its sender is gone), without
/// holding a borrow of it across the caller's next await.
pub(crate) async fn wait_until<T>(
    value: &mut tokio::sync::watch::Receiver<T>,
    condition: impl FnMut(&T) -> bool,
) {
    let _ = value.wait_for(condition).await;
}
