//! Keeping connections across a dispatcher restart: connections still waiting for a worker
//! when the dispatcher stops are handed to systemd's fd store (`FDSTORE=1`, which needs
//! `FileDescriptorStoreMax=` in the unit); systemd passes them back to the next instance
//! with `LISTEN_FDS`, named `conn/<listener>`, beside the listening sockets.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use tracing::{info, warn};

use super::state::Held;

/// `FDNAME` prefix that marks a stored client connection (listener names follow it).
const CONNECTION_PREFIX: &str = "conn/";
/// Below the kernel's limit of 253 fds per SCM_RIGHTS message.
const FDS_PER_MESSAGE: usize = 200;

/// A client connection taken back from the fd store, to be routed again.
#[derive(Debug)]
pub struct HeldOver {
    /// The listener it was accepted on.
    pub listener: Arc<str>,
    /// The connection.
    pub stream: std::net::TcpStream,
}

/// Whether systemd can keep fds for us: we run under it (`NOTIFY_SOCKET`). The unit must
/// set `FileDescriptorStoreMax=`; without it systemd refuses the fds and logs why.
pub(super) fn available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The fd name for a connection from `listener`: systemd accepts printable ASCII other
/// than ':' up to 255 bytes.
fn fd_name(listener: &str) -> String {
    let clean: String = listener
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .take(255 - CONNECTION_PREFIX.len())
        .collect();
    format!("{CONNECTION_PREFIX}{clean}")
}

/// Hands `held` to systemd's fd store. Returns how many were stored.
pub(super) fn store(held: Vec<Held>) -> u64 {
    let mut by_name: BTreeMap<String, Vec<Held>> = BTreeMap::new();
    for conn in held {
        by_name
            .entry(fd_name(&conn.listener))
            .or_default()
            .push(conn);
    }
    let mut stored = 0;
    for (name, conns) in by_name {
        for chunk in conns.chunks(FDS_PER_MESSAGE) {
            let fds: Vec<BorrowedFd> = chunk.iter().map(|c| c.stream.as_fd()).collect();
            let state = [
                sd_notify::NotifyState::FdStore,
                sd_notify::NotifyState::FdName(&name),
            ];
            match sd_notify::notify_with_fds(false, &state, &fds) {
                Ok(()) => stored += chunk.len() as u64,
                Err(err) => {
                    warn!(%err, count = chunk.len(), "could not hand connections to the systemd fd store")
                }
            }
        }
    }
    if stored > 0 {
        info!(
            stored,
            "waiting connections kept in the systemd fd store for the next start"
        );
    }
    stored
}

/// Tells systemd to forget stored connections we have taken back, so the next restart
/// does not pass them again.
pub(super) fn forget(taken: &[HeldOver]) {
    let names: std::collections::BTreeSet<String> =
        taken.iter().map(|h| fd_name(&h.listener)).collect();
    for name in names {
        let state = [
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(&name),
        ];
        if let Err(err) = sd_notify::notify(false, &state) {
            warn!(%err, name, "could not remove connections from the systemd fd store");
        }
    }
}

/// If `name` marks a stored connection, the listener it came from.
pub fn stored_connection_listener(name: &str) -> Option<&str> {
    name.strip_prefix(CONNECTION_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_names_are_valid_for_systemd_and_round_trip() {
        assert_eq!(fd_name("web"), "conn/web");
        assert_eq!(stored_connection_listener(&fd_name("web")), Some("web"));
        assert_eq!(fd_name("127.0.0.1:8080"), "conn/127.0.0.1_8080");
        assert_eq!(fd_name("a b\u{e9}"), "conn/a_b_");
        assert!(fd_name(&"x".repeat(400)).len() <= 255);
        assert_eq!(stored_connection_listener("sticky-dispatch.socket"), None);
    }
}
