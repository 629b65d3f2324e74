//! The background side of [`WorkerListener`](super::WorkerListener): accepting links
//! from the dispatcher, one [`Session`] per link (acknowledging each connection on
//! receipt), and SIGTERM as a drain.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use super::link::{AdmittedLink, DispatcherLink, LinkServer};
use super::Incoming;
use crate::shared::LinkError;

pub(super) async fn drain_on_sigterm(drain: watch::Sender<bool>) {
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
pub(super) struct Links {
    pub(super) incoming: mpsc::Sender<Incoming>,
    pub(super) drain: watch::Receiver<bool>,
}

impl Links {
    pub(super) async fn run(self, server: LinkServer) {
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
