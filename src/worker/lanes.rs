//! The worker's lanes: listening sockets the dispatcher passed (LANE), on which the
//! kernel queues this worker's clients directly. The worker accepts on them itself and
//! feeds what it accepts to the same queue as the connections that come over the link.
//!
//! Lanes outlive links: when the dispatcher restarts (or is killed) the kernel still
//! routes, so the worker keeps accepting; the next link passes the same sockets again and
//! those already served are kept ([`Lanes::serve_exactly`]). A lane is only ever closed,
//! never `shutdown()` (that would close it for every holder and reorder the group), and
//! never `listen()`ed again (that would change its backlog for every holder). On drain the
//! worker stops accepting and closes its copies ([`Lanes::close_all`]): what is queued
//! waits in the kernel for the next process of this index.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{ClientInfo, Incoming};

/// A lane the dispatcher passed: the socket, and what the LANE message said of it.
#[derive(Debug)]
pub struct GrantedLane {
    /// The listening socket.
    pub fd: OwnedFd,
    /// Its listener's name, address and backlog.
    pub lane: crate::wire::Lane,
}

/// Which socket a lane is: an fd passed again is the same socket if this is.
type SocketId = (u64, u64);

fn socket_id(fd: impl AsFd) -> std::io::Result<SocketId> {
    let stat = nix::sys::stat::fstat(fd.as_fd())?;
    Ok((stat.st_dev, stat.st_ino))
}

/// One lane being served.
struct Served {
    id: SocketId,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The lanes this worker serves.
pub(super) struct Lanes {
    served: Mutex<Vec<Served>>,
    incoming: mpsc::Sender<Incoming>,
    /// Connections accepted on lanes since the worker started (ACCEPTED).
    accepted: Arc<AtomicU64>,
}

impl Lanes {
    pub(super) fn new(incoming: mpsc::Sender<Incoming>) -> Lanes {
        Lanes {
            served: Mutex::new(Vec::new()),
            incoming,
            accepted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connections accepted on lanes so far.
    pub(super) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Serves exactly `granted`: keeps serving a socket already served (closing the
    /// duplicate fd), starts the new ones, stops and closes the ones not granted.
    pub(super) fn serve_exactly(&self, granted: Vec<GrantedLane>) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep = Vec::new();
        for GrantedLane { fd, lane } in granted {
            let id = match socket_id(&fd) {
                Ok(id) => id,
                Err(err) => {
                    warn!(%err, listener = lane.listener, "a lane's fd cannot be inspected: not serving it");
                    continue;
                }
            };
            keep.push(id);
            if served.iter().any(|lane| lane.id == id) {
                continue; // the same socket, passed again by a new link: dropping the copy
            }
            match self.start(fd, &lane) {
                Ok((stop, task)) => {
                    info!(listener = lane.listener, local = ?lane.local, "serving a lane: the kernel hands this worker its clients");
                    served.push(Served { id, stop, task });
                }
                Err(err) => {
                    warn!(%err, listener = lane.listener, "could not serve a lane: its clients wait until the dispatcher takes them")
                }
            }
        }
        served.retain(|lane| {
            let kept = keep.contains(&lane.id);
            if !kept {
                debug!("a lane no longer granted: closing our copy");
                lane.stop.send_replace(true);
            }
            kept
        });
    }

    fn start(
        &self,
        fd: OwnedFd,
        lane: &crate::wire::Lane,
    ) -> std::io::Result<(watch::Sender<bool>, JoinHandle<()>)> {
        let socket = std::net::TcpListener::from(fd);
        socket.set_nonblocking(true)?;
        // from_std registers the socket; it does not listen() again.
        let socket = tokio::net::TcpListener::from_std(socket)?;
        let (stop, stopped) = watch::channel(false);
        let accept = AcceptLoop {
            socket,
            listener: lane.listener.as_str().into(),
            fixed_local: lane.local.filter(|local| !local.ip().is_unspecified()),
            incoming: self.incoming.clone(),
            accepted: self.accepted.clone(),
        };
        Ok((stop, tokio::spawn(accept.run(stopped))))
    }

    /// Stops accepting on every lane and closes our copies, once what each had accepted is
    /// queued for the app.
    pub(super) async fn close_all(&self) {
        let served = std::mem::take(&mut *self.served.lock().unwrap_or_else(|e| e.into_inner()));
        for lane in &served {
            lane.stop.send_replace(true);
        }
        for lane in served {
            let _ = lane.task.await;
        }
    }
}

/// Accepting on one lane until told to stop.
struct AcceptLoop {
    socket: tokio::net::TcpListener,
    listener: Arc<str>,
    /// The lane's address when it is bound to one; `None` for a wildcard bind.
    fixed_local: Option<SocketAddr>,
    incoming: mpsc::Sender<Incoming>,
    accepted: Arc<AtomicU64>,
}

impl AcceptLoop {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            // Only the accept is raced with the stop: a connection accepted is always
            // queued for the app, never dropped.
            let accepted = tokio::select! {
                accepted = self.socket.accept() => accepted,
                _ = crate::wait_until(&mut stop, |stop| *stop) => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    debug!(%err, listener = %self.listener, "accept on a lane failed");
                    if crate::link::is_resource_shortage(&err) {
                        // Let fds come back rather than spin; the backlog holds the clients.
                        tokio::time::sleep(crate::link::RESOURCE_PAUSE).await;
                    }
                    continue;
                }
            };
            self.accepted.fetch_add(1, Ordering::Relaxed);
            let client = ClientInfo {
                seq: 0,
                peer: Some(peer),
                local: self.fixed_local.or_else(|| stream.local_addr().ok()),
                listener: self.listener.clone(),
            };
            if self.incoming.send((stream, client)).await.is_err() {
                return; // the listener was dropped
            }
        }
    }
}
