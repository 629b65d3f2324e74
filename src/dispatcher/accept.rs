//! Acceptor: takes connections off one listening socket and routes each to its slot.
//!
//! With a routing key from what the client sends, each connection reads its key in a
//! task of its own (`keyed`). Those tasks belong to the acceptor: when the dispatcher
//! stops, the acceptor stops accepting, then waits for them to route their connection
//! (or give up, within `key_timeout`) before it returns, so that a connection accepted
//! in the middle of sending its PROXY header is still served or kept, never dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::held::Held;
use super::hub::Hub;
use super::keyed;
use super::metrics::ListenerMetrics;
use super::phase::Phase;
use super::throttle::Throttle;
use crate::config::KeySource;
use crate::link::{is_resource_shortage, RESOURCE_PAUSE};

/// At most one warning per this period about the same resource shortage.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Acceptor {
    name: Arc<str>,
    socket: AsyncFd<std::net::TcpListener>,
    /// The local address when the listener is bound to one address; `None` for a wildcard
    /// bind, where each connection's own address must be asked for.
    fixed_local: Option<SocketAddr>,
    shared: Arc<Hub>,
    permits: Arc<Semaphore>,
    /// The routing key comes from what the client sends: read it in a task of its own.
    keyed: bool,
    metrics: ListenerMetrics,
}

impl Acceptor {
    /// An acceptor for `socket`, one of listener `name`'s.
    pub(super) fn new(
        name: Arc<str>,
        socket: std::net::TcpListener,
        shared: Arc<Hub>,
        permits: Arc<Semaphore>,
    ) -> io::Result<Acceptor> {
        let address = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        info!(listener = %name, %address, "listening");
        Ok(Acceptor {
            socket: crate::link::register(socket, Interest::READABLE)?,
            fixed_local: (!address.ip().is_unspecified()).then_some(address),
            keyed: shared.settings().routing_key != KeySource::PeerIp,
            metrics: shared.metrics.listener(&name),
            name,
            shared,
            permits,
        })
    }

    /// Accepts until the dispatcher stops, then waits for the connections still reading
    /// their key: they are routed (to slots that run until every acceptor returned) or
    /// closed by their own `key_timeout`.
    pub(super) async fn run(self, phase: watch::Receiver<Phase>) {
        let mut key_readers = JoinSet::new();
        self.accept_until_stopped(phase, &mut key_readers).await;
        if !key_readers.is_empty() {
            info!(
                listener = %self.name,
                count = key_readers.len(),
                "stopping: waiting for connections still sending their routing key"
            );
            while key_readers.join_next().await.is_some() {}
        }
    }

    async fn accept_until_stopped(
        &self,
        mut phase: watch::Receiver<Phase>,
        key_readers: &mut JoinSet<()>,
    ) {
        let mut full_warning = Throttle::new(WARN_EVERY);
        let mut shortage_warning = Throttle::new(WARN_EVERY);
        let stopping = |phase: &Phase| *phase >= Phase::Stopping;
        loop {
            if self.permits.available_permits() == 0 {
                self.metrics.paused_max_connections.inc();
                if full_warning.allow() {
                    warn!(listener = %self.name, max_connections = self.shared.settings().max_connections.get(),
                        "connection limit reached: accepting paused until workers take connections");
                }
            }
            let permit = tokio::select! {
                permit = self.permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = crate::wait_until(&mut phase, stopping) => return,
            };
            let accepted = tokio::select! {
                accepted = self.accept() => accepted,
                _ = crate::wait_until(&mut phase, stopping) => return,
            };
            // Forget the key readers that are done, so the set holds only live ones.
            while key_readers.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    self.metrics.accepted.inc();
                    let local = self.fixed_local.or_else(|| stream.local_addr().ok());
                    if self.keyed {
                        let conn = keyed::Unkeyed {
                            stream,
                            peer,
                            local,
                            listener: self.name.clone(),
                            permit,
                            accepted: tokio::time::Instant::now(),
                        };
                        key_readers.spawn(keyed::route(self.shared.clone(), conn));
                        continue;
                    }
                    let key = self.shared.peer_key(Some(peer));
                    let held = Held::new(stream, Some(peer), local, self.name.clone(), key, permit);
                    let index = self.shared.route(held);
                    debug!(%peer, index, "accepted");
                }
                Err(err) if is_resource_shortage(&err) => {
                    self.metrics.paused_fd_limit.inc();
                    if shortage_warning.allow() {
                        warn!(listener = %self.name, %err, "accept failed for lack of resources: pausing; the backlog holds new clients");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RESOURCE_PAUSE) => {}
                        _ = crate::wait_until(&mut phase, stopping) => return,
                    }
                }
                // ECONNABORTED and the like: that client is gone, the listener is fine.
                Err(err) => debug!(listener = %self.name, %err, "accept failed"),
            }
        }
    }

    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        self.socket
            .async_io(Interest::READABLE, |listener| listener.accept())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::testing::hub;

    /// A client's connection reaches the slot of its key, with its address and the
    /// listener's, and is counted; a stop ends the acceptor.
    #[tokio::test]
    async fn a_connection_goes_to_its_slot_with_its_addresses() {
        let (hub, mut inboxes) = hub(3, &[]);
        let shared = Arc::new(hub);
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        let acceptor = Acceptor::new(
            "web".into(),
            socket,
            shared.clone(),
            Arc::new(Semaphore::new(8)),
        )
        .unwrap();
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let running = tokio::spawn(acceptor.run(phase_rx));

        let client = std::net::TcpStream::connect(address).unwrap();
        let peer = client.local_addr().unwrap();
        let index = shared.router.worker_for(&shared.peer_key(Some(peer)));
        let held = inboxes[index as usize].recv().await.unwrap();
        assert_eq!((held.peer, held.local), (Some(peer), Some(address)));
        assert_eq!(&*held.listener, "web");
        assert_eq!(shared.metrics.listener(&"web".into()).accepted.get(), 1);

        phase.send_replace(Phase::Stopping);
        running.await.unwrap();
        drop(held);
    }
}
