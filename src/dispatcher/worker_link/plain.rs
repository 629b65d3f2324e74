//! The link protocol (`crate::wire`), as the dispatcher speaks it: the worker's lanes
//! (LANE, LANES) if it serves them, CONN with the fd on the link; the worker's cumulative
//! ACKs, its lane counts (ACCEPTED), its DRAIN, and our DRAINED.

use std::io;
use std::os::fd::AsFd;

use super::{Event, LaneGrant};
use crate::dispatcher::held::Held;
use crate::link::{LinkStream, Received};
use crate::shared::LinkError;
use crate::wire::{Conn, Lane, Message};

pub(in crate::dispatcher) struct PlainLink {
    link: LinkStream,
    pub(super) pid: u32,
    /// Its HELLO set the lanes feature.
    pub(super) takes_lanes: bool,
}

impl PlainLink {
    pub(super) fn new(link: LinkStream, pid: u32, takes_lanes: bool) -> PlainLink {
        PlainLink {
            link,
            pid,
            takes_lanes,
        }
    }

    /// A LANE per lane, then LANES. Sent right after the HELLOs, when the link's buffer is
    /// empty: a few short datagrams always fit.
    pub(super) fn send_lanes(&mut self, out: &mut Vec<u8>, lanes: &[LaneGrant]) -> io::Result<()> {
        for lane in lanes {
            Message::Lane(Lane {
                backlog: lane.backlog,
                local: lane.local,
                listener: lane.listener.to_owned(),
            })
            .encode(out);
            self.link.try_send(out, Some(lane.socket))?;
        }
        let count = u8::try_from(lanes.len()).expect("a worker has a lane per listener, few");
        Message::Lanes { count }.encode(out);
        self.link.try_send(out, None)
    }

    pub(super) fn try_send_conn(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        held: &Held,
    ) -> io::Result<()> {
        Message::Conn(Conn {
            seq,
            peer: held.peer,
            local: held.local,
            listener: held.listener.to_string(),
        })
        .encode(out);
        self.link.try_send(out, Some(held.stream.as_fd()))
    }

    pub(super) fn send_drained(&mut self, out: &mut Vec<u8>, last_seq: u64) -> io::Result<()> {
        Message::Drained { last_seq }.encode(out);
        self.link.try_send(out, None)
    }

    pub(super) async fn next(
        &mut self,
        buf: &mut [u8],
        events: &mut Vec<Event>,
        want_writable: bool,
    ) -> Result<(), LinkError> {
        tokio::select! {
            received = self.link.recv(buf) => {
                let Received { len, fd } = received?;
                events.push(heard(&buf[..len], fd.is_some())?);
            }
            writable = self.link.writable(), if want_writable => {
                writable?;
                events.push(Event::Writable);
            }
        }
        Ok(())
    }
}

/// What one datagram from the worker means; `with_fd`: an fd came with it (never right).
fn heard(datagram: &[u8], with_fd: bool) -> Result<Event, LinkError> {
    if datagram.is_empty() {
        return Ok(Event::Closed("the worker closed the link"));
    }
    if with_fd {
        return Err(LinkError::Protocol("the worker sent an fd".into()));
    }
    match Message::decode(datagram)? {
        Message::Ack { seq } => Ok(Event::Acked(seq)),
        Message::Drain => Ok(Event::Drain),
        Message::Accepted { count } => Ok(Event::Accepted(count)),
        other => Err(LinkError::Protocol(format!("unexpected {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(message: Message) -> Vec<u8> {
        let mut out = Vec::new();
        message.encode(&mut out);
        out
    }

    #[test]
    fn worker_datagrams_become_events() {
        assert_eq!(
            heard(&encoded(Message::Ack { seq: 7 }), false).unwrap(),
            Event::Acked(7)
        );
        assert_eq!(
            heard(&encoded(Message::Drain), false).unwrap(),
            Event::Drain
        );
        assert_eq!(
            heard(&[], false).unwrap(),
            Event::Closed("the worker closed the link")
        );
        assert!(heard(&encoded(Message::Ack { seq: 7 }), true).is_err());
        assert!(heard(&encoded(Message::Drained { last_seq: 1 }), false).is_err());
        assert!(heard(b"\x09garbage", false).is_err());
    }
}
