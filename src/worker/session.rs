//! The background side of [`WorkerListener`](super::WorkerListener): accepting links
//! from the dispatcher, one [`Session`] per link (acknowledging each connection on
//! receipt, serving the lanes it passes), and SIGTERM as a drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use super::lanes::Lanes;
use super::link::{AdmittedLink, DispatcherLink, FromDispatcher, LinkServer};
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

/// How often, at most, the count of connections accepted on lanes is reported.
const ACCEPTED_EVERY: Duration = Duration::from_secs(1);

/// The background side: accepts links from the dispatcher and feeds `incoming`.
pub(super) struct Links {
    pub(super) incoming: mpsc::Sender<Incoming>,
    /// The lanes, which outlive the links that passed them.
    pub(super) lanes: Arc<Lanes>,
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
                        let session = Session::run(admitted, self.incoming.clone(), self.lanes.clone(), self.drain.clone());
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
        // Free the name first: the dispatcher links again the moment our drained link ends,
        // and a connect to a name still bound here would wait for a HELLO that never comes;
        // a replacement worker may bind it at once.
        drop(server);
        // Stop taking clients from the kernel: they wait on the lanes for the next process.
        self.lanes.close_all().await;
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
    lanes: Arc<Lanes>,
    drain: watch::Receiver<bool>,
    /// The lane count last reported.
    reported: u64,
}

impl Session {
    async fn run(
        admitted: AdmittedLink,
        incoming: mpsc::Sender<Incoming>,
        lanes: Arc<Lanes>,
        drain: watch::Receiver<bool>,
    ) {
        let served = async {
            let link = admitted.handshake_with_lanes().await?;
            info!(dispatcher_pid = link.dispatcher_pid(), "link up");
            Session {
                link,
                incoming,
                lanes,
                drain,
                reported: 0,
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
        let mut report = tokio::time::interval(ACCEPTED_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                next = self.link.next() => next?,
                _ = crate::wait_until(&mut drain, |set| *set), if !self.link.draining() && !orphaned => {
                    // The lanes close first: their queues then wait for the next process,
                    // and the count reported before DRAIN is final.
                    self.lanes.close_all().await;
                    self.report_accepted().await?;
                    self.link.drain().await?;
                    continue;
                }
                _ = report.tick(), if !orphaned => {
                    self.report_accepted().await?;
                    continue;
                }
            };
            let handoff = match next {
                None => return Ok(()), // closed by the dispatcher, or drained
                Some(FromDispatcher::Lanes(granted)) => {
                    if !self.link.draining() {
                        self.lanes.serve_exactly(granted);
                    }
                    continue;
                }
                Some(FromDispatcher::Conn(handoff)) => handoff,
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

impl Session {
    /// Sends the lane count if it changed since the last report.
    async fn report_accepted(&mut self) -> Result<(), LinkError> {
        let accepted = self.lanes.accepted();
        if accepted != self.reported {
            self.link.send_accepted(accepted).await?;
            self.reported = accepted;
        }
        Ok(())
    }
}
