//! One dispatcher link, in a task of its own: receives connections and passes them to the
//! bridge, acknowledges (cumulatively) what the bridge says Node has, and drains when told.

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::shared::LinkError;
use crate::worker::link::{AdmittedLink, Handoff};

/// Which link a connection came on; links come and go as dispatchers restart.
pub(super) type LinkId = u64;

/// Serves one link until it is over: closed by the dispatcher, broken, or drained, and in
/// the last two cases with everything received acknowledged (or the bridge gone).
/// `acks` carries the highest sequence number Node has for this link (every lower one
/// too); `drain` turns true when the bridge drains.
pub(super) async fn serve(
    admitted: AdmittedLink,
    id: LinkId,
    handoffs: mpsc::Sender<(LinkId, Handoff)>,
    mut acks: watch::Receiver<u64>,
    mut drain: watch::Receiver<bool>,
) -> LinkId {
    let served = async {
        let mut link = admitted.handshake().await?;
        info!(dispatcher_pid = link.dispatcher_pid(), "link up");
        let mut acked = 0;
        let mut receiving = true;
        loop {
            if !receiving && acked >= link.last_received() {
                return Ok::<(), LinkError>(());
            }
            tokio::select! {
                next = link.recv(), if receiving => match next? {
                    Some(handoff) => {
                        if handoffs.send((id, handoff)).await.is_err() {
                            return Ok(()); // the bridge is exiting
                        }
                    }
                    // Closed by the dispatcher, or drained: what Node has is still
                    // acknowledged, for a drain's sake.
                    None => receiving = false,
                },
                changed = acks.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the bridge forgot this link: it is exiting
                    }
                    let level = *acks.borrow_and_update();
                    if level > acked {
                        link.ack(level).await?;
                        acked = level;
                    }
                }
                _ = crate::wait_until(&mut drain, |set| *set), if !link.draining() => {
                    link.drain().await?;
                }
            }
        }
    };
    match served.await {
        Ok(()) => debug!("link closed"),
        Err(err) => warn!(%err, "link closed"),
    }
    id
}
