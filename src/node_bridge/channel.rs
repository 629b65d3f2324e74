//! Node.js's IPC channel, the bridge's end: a `SOCK_SEQPACKET` pair, one end inherited by
//! Node as `NODE_CHANNEL_FD` (Node reads it as it reads its usual stream socket: every
//! line is one record), the other kept by the bridge and passed to each dispatcher in turn
//! (CHANNEL), which speaks Node's dialect on it (`crate::node_ipc`).
//!
//! The bridge itself reads the channel only until the app says `ready`; from then on the
//! channel is the dispatcher's to read and write. The bridge's copy only keeps it open
//! between two dispatchers (so that a dispatcher restart does not look like the end to
//! Node), tells Node to drain when no dispatcher can, and watches that Node keeps reading.
//! Each Node process has a channel of its own: during a reload the new process's is read
//! until it says ready, and a retired process's stays open until that process exits, so
//! that the dispatcher ending its link does not look like the end to it either.

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::debug;

use crate::node_ipc::{self, FromNode, ReadEnd};

/// What the bridge reads before `ready`: ours are short; longer records are the app's.
const MAX_RECORD: usize = 4096;

/// The bridge's end of the channel.
#[derive(Debug)]
pub(super) struct NodeChannel {
    /// Registered for readability until the app is ready; then out of the reactor, so
    /// that nothing Node says to the dispatcher wakes the bridge. Declared before `fd`:
    /// deregistered before the fd closes.
    reading: Option<AsyncFd<OwnedFd>>,
    fd: OwnedFd,
}

/// A connected pair: the bridge's end, and Node's end (close-on-exec; the child clears
/// the flag on its copy only).
pub(super) fn pair() -> io::Result<(NodeChannel, OwnedFd)> {
    let (ours, theirs) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // A duplicate, owned by the registration: same socket, so the same readiness.
    let reading = crate::link::register(ours.try_clone()?, Interest::READABLE)?;
    Ok((
        NodeChannel {
            reading: Some(reading),
            fd: ours,
        },
        theirs,
    ))
}

impl NodeChannel {
    /// Waits until the app says `ready` (`Ok(true)`) or Node closes the channel
    /// (`Ok(false)`: it is exiting). Other lines are logged and dropped. Cancel-safe.
    pub(super) async fn ready(&self) -> io::Result<bool> {
        let Some(reading) = &self.reading else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; MAX_RECORD];
        loop {
            let mut guard = reading.readable().await?;
            let end = node_ipc::read_lines(self.fd.as_raw_fd(), &mut buf, |line| match line {
                FromNode::Ready => ControlFlow::Break(()),
                other => {
                    debug!(line = ?other, "message from Node before ready ignored");
                    ControlFlow::Continue(())
                }
            })?;
            match end {
                ReadEnd::Stopped => return Ok(true),
                ReadEnd::Closed(_) => return Ok(false),
                ReadEnd::Empty => guard.clear_ready(),
            }
        }
    }

    /// The app is ready: from now on the dispatcher reads the channel.
    pub(super) fn stop_reading(&mut self) {
        self.reading = None;
    }

    /// Bytes sent to Node that it has not read yet.
    pub(super) fn unread_by_node(&self) -> io::Result<usize> {
        crate::link::unread_by_peer(self.fd.as_fd())
    }

    /// Whether Node has closed its end (it exited, or called `process.disconnect()`):
    /// seen without reading, which would take lines meant for the dispatcher.
    pub(super) fn node_closed(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        // POLLHUP, reported whatever the events asked: the peer's close shuts both
        // directions of a SEQPACKET socket.
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
    }

    /// Tells Node that no more connections will come, when no dispatcher is there to.
    pub(super) fn send_drain(&self) -> io::Result<()> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        socket::send(self.fd.as_raw_fd(), node_ipc::DRAIN_ANSWER_LINE, flags)?;
        Ok(())
    }
}

impl AsFd for NodeChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[tokio::test]
    async fn ready_is_found_among_other_lines_and_eof_is_reported() {
        let (mut ours, theirs) = pair().unwrap();
        // A SOCK_SEQPACKET end; UnixDatagram's send/recv keep records whole the same way.
        let node = UnixDatagram::from(theirs);
        node.send(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n").unwrap();
        node.send(b"{\"stickyDispatch\":\"ready\"}\n").unwrap();
        assert!(ours.ready().await.unwrap());
        assert_eq!(ours.unread_by_node().unwrap(), 0);
        ours.send_drain().unwrap();
        assert!(ours.unread_by_node().unwrap() > 0);
        let mut buf = [0u8; 64];
        let len = node.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], node_ipc::DRAIN_ANSWER_LINE);
        assert_eq!(ours.unread_by_node().unwrap(), 0);
        ours.stop_reading();
        assert!(!ours.node_closed());
        drop(node);
        assert!(ours.node_closed());
        let (other, theirs) = pair().unwrap();
        drop(theirs);
        assert!(!other.ready().await.unwrap());
    }
}
