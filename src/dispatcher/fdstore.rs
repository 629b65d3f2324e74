//! Keeping waiting connections safe from the dispatcher's own death, in systemd's fd
//! store (`FDSTORE=1`, which needs `FileDescriptorStoreMax=` in the unit).
//!
//! A connection goes into the store when it starts waiting for a worker that is down, and
//! leaves it (`FDSTOREREMOVE=1`) when it is sent to its worker or closed: so whether the
//! dispatcher stops, crashes or is killed, systemd still holds every connection that was
//! waiting and passes it to the next instance (`LISTEN_FDS`), which serves it when the
//! worker is back. Connections whose worker is up are sent at once and never stored: the
//! fast path does not pay for this.
//!
//! Each stored connection has a name of its own (removal is by name), which carries what
//! the next instance needs to treat it as this one would have: the routing key (which may
//! come from a PROXY header or an HTTP header, not the peer address), the real client and
//! local addresses, the listener, and when it started waiting (so its `pending_timeout`
//! deadline survives the restart). The fields reuse the link's CONN encoding
//! ([`crate::wire`]), in hex, since systemd allows only printable ASCII other than ':' in
//! names of at most 255 bytes.
//!
//! The messages go over one socket connected to `NOTIFY_SOCKET` once ([`FdStore`]), not a
//! new socket per message as the sd-notify crate does: a restart of a busy worker stores
//! and removes a connection each, and a send that cannot go through must not stall the
//! dispatcher for ever (a send timeout bounds it).

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::routing::RoutingKey;
use crate::wire::{Conn, Message};

/// `FDNAME` prefix of a stored connection in this format.
const PREFIX: &str = "sd1.";
/// `FDNAME` prefix older versions used (`conn/<listener>`, stored only at exit, without the
/// key): still taken back, routed by the peer address.
const OLD_PREFIX: &str = "conn/";
/// Listener names are cut to this many bytes in a name, to stay under 255 in all.
const MAX_LISTENER: usize = 48;

/// What a stored connection's name records about it: what the next instance needs to
/// hold it as this one did.
#[derive(Debug, Clone, Copy)]
pub(super) struct Description<'a> {
    pub(super) listener: &'a str,
    pub(super) peer: Option<SocketAddr>,
    pub(super) local: Option<SocketAddr>,
    pub(super) key: &'a RoutingKey,
    /// When it started waiting (its `pending_timeout` runs from here).
    pub(super) since: Instant,
}

/// A client connection taken back from the fd store, to be routed again.
#[derive(Debug)]
pub struct HeldOver {
    /// The connection.
    pub stream: std::net::TcpStream,
    /// What its `FDNAME` said about it.
    pub name: String,
}

/// A send to systemd that takes longer than this is given up (logged): PID 1 reads its
/// notification socket at once unless something is badly wrong.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The way to systemd's fd store: a datagram socket connected to `NOTIFY_SOCKET`.
#[derive(Debug)]
pub(super) struct FdStore {
    socket: UnixDatagram,
}

impl FdStore {
    /// `Some` when systemd can keep fds for us: we run under it (`NOTIFY_SOCKET`). The
    /// unit must set `FileDescriptorStoreMax=`; without it systemd refuses the fds and
    /// logs why.
    pub(super) fn connect() -> Option<Arc<FdStore>> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let connected = || -> std::io::Result<UnixDatagram> {
            let socket = UnixDatagram::unbound()?;
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            match bytes.strip_prefix(b"@") {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    let address =
                        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                    socket.connect_addr(&address)?;
                }
                None => socket.connect(&path)?,
            }
            socket.set_write_timeout(Some(SEND_TIMEOUT))?;
            Ok(socket)
        };
        match connected() {
            Ok(socket) => Some(Arc::new(FdStore { socket })),
            Err(err) => {
                warn!(%err, "cannot reach systemd's notification socket: waiting connections will not survive a restart");
                None
            }
        }
    }

    /// Sends `state` (newline-separated assignments) with at most one fd.
    fn send(&self, state: &str, fd: Option<std::os::fd::BorrowedFd>) -> bool {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let raw = fd.map(|fd| [fd.as_raw_fd()]);
        let rights = raw.as_ref().map(|fds| ControlMessage::ScmRights(fds));
        let cmsgs: Vec<ControlMessage> = rights.into_iter().collect();
        let iov = [IoSlice::new(state.as_bytes())];
        match sendmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => true,
            Err(err) => {
                warn!(%err, state, "could not tell systemd's fd store");
                false
            }
        }
    }
}

/// If the `FDNAME` systemd passed marks a stored connection (rather than a listening
/// socket).
pub fn is_stored_connection(name: &str) -> bool {
    name.starts_with(PREFIX) || name.starts_with(OLD_PREFIX)
}

/// A connection's entry in the fd store: removed from the store when dropped, unless
/// [`Stored::keep`] says it must stay for the next instance.
#[derive(Debug)]
pub(super) struct Stored {
    name: String,
    store: Arc<FdStore>,
}

impl Stored {
    /// Stores connection `fd`, as `what` describes it, under a name of its own. `None` if
    /// systemd could not be told (logged); the connection is still served, only not kept
    /// across a crash.
    pub(super) fn store(
        store: &Arc<FdStore>,
        fd: BorrowedFd<'_>,
        what: &Description<'_>,
    ) -> Option<Stored> {
        let name = name_for(what);
        let state = format!("FDSTORE=1\nFDNAME={name}\n");
        store.send(&state, Some(fd)).then(|| Stored {
            name,
            store: store.clone(),
        })
    }

    /// An entry a previous instance made, taken over by this one.
    fn adopt(store: &Arc<FdStore>, name: String) -> Stored {
        Stored {
            name,
            store: store.clone(),
        }
    }

    /// Leaves the entry in the store: the dispatcher exits and the next instance takes it.
    pub(super) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        let state = format!("FDSTOREREMOVE=1\nFDNAME={}\n", self.name);
        self.store.send(&state, None);
    }
}

/// `sd1.<CONN in hex>.<key in hex>.<monotonic µs when it started waiting, hex>`. The
/// CONN's sequence number holds our pid and a counter, so that names are unique across
/// instances (an entry of a previous one may still be in the store).
fn name_for(held: &Description<'_>) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let id =
        u64::from(std::process::id()) << 32 | u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut listener: String = held.listener.to_owned();
    while listener.len() > MAX_LISTENER {
        listener.pop();
    }
    let mut conn = Vec::new();
    Message::Conn(Conn {
        seq: id,
        peer: held.peer,
        local: held.local,
        listener,
    })
    .encode(&mut conn);
    let waited = Instant::now().saturating_duration_since(held.since);
    let since = monotonic_micros().saturating_sub(waited.as_micros() as u64);
    format!(
        "{PREFIX}{}.{}.{since:x}",
        hex(&conn),
        hex(held.key.as_bytes())
    )
}

/// What a stored connection's name says, to hold it again as the previous instance did.
#[derive(Debug, PartialEq)]
pub(super) struct Restored {
    pub(super) key: Option<RoutingKey>,
    pub(super) peer: Option<SocketAddr>,
    pub(super) local: Option<SocketAddr>,
    pub(super) listener: Arc<str>,
    /// How long it has waited already.
    pub(super) waited: Duration,
}

/// Reads a name; `None` if it is not one of ours or is damaged. Names in the old format
/// give the listener only.
pub(super) fn parse(name: &str) -> Option<Restored> {
    if let Some(listener) = name.strip_prefix(OLD_PREFIX) {
        return Some(Restored {
            key: None,
            peer: None,
            local: None,
            listener: listener.into(),
            waited: Duration::ZERO,
        });
    }
    let mut fields = name.strip_prefix(PREFIX)?.split('.');
    let conn = unhex(fields.next()?)?;
    let key = RoutingKey::from_bytes(&unhex(fields.next()?)?)?;
    let since = u64::from_str_radix(fields.next()?, 16).ok()?;
    if fields.next().is_some() {
        return None;
    }
    let Ok(Message::Conn(conn)) = Message::decode(&conn) else {
        return None;
    };
    Some(Restored {
        key: Some(key),
        peer: conn.peer,
        local: conn.local,
        listener: conn.listener.into(),
        waited: Duration::from_micros(monotonic_micros().saturating_sub(since)),
    })
}

/// Rebuilds the entry of a connection taken back, so that it leaves the store when it is
/// sent or closed. Old-format entries share one name per listener: they are forgotten at
/// once (removing one would remove them all).
pub(super) fn adopt(store: Option<&Arc<FdStore>>, name: &str) -> Option<Stored> {
    let store = store?;
    if name.starts_with(PREFIX) {
        return Some(Stored::adopt(store, name.to_owned()));
    }
    drop(Stored::adopt(store, name.to_owned()));
    None
}

/// CLOCK_MONOTONIC in microseconds: the same clock for every process of one boot, so a
/// waiting time survives a dispatcher restart (and the fd store does not outlive a boot).
fn monotonic_micros() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000,
        Err(err) => {
            debug!(%err, "CLOCK_MONOTONIC unreadable");
            0
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held<'a>(listener: &'a str, key: &'a RoutingKey) -> Description<'a> {
        Description {
            listener,
            peer: Some("[2001:db8::7]:40000".parse().unwrap()),
            local: Some("198.51.100.1:443".parse().unwrap()),
            key,
            since: Instant::now(),
        }
    }

    #[test]
    fn names_carry_key_addresses_listener_and_waiting_time_and_fit_systemd() {
        let key = RoutingKey::from_token(b"session-42");
        let held = held("web", &key);
        let name = name_for(&held);
        assert!(name.len() <= 255, "{} bytes", name.len());
        assert!(
            name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
            "{name}"
        );
        assert!(is_stored_connection(&name));
        let restored = parse(&name).unwrap();
        assert_eq!(restored.key, Some(key));
        assert_eq!(restored.peer, held.peer);
        assert_eq!(restored.local, held.local);
        assert_eq!(&*restored.listener, "web");
        assert!(restored.waited < Duration::from_secs(5));
        // Unique per connection: removal is by name.
        assert_ne!(name_for(&held), name);
    }

    #[test]
    fn long_listener_names_are_cut_to_fit() {
        let key = RoutingKey::from_token(b"x");
        let long = "l".repeat(300);
        let name = name_for(&held(&long, &key));
        assert!(name.len() <= 255, "{} bytes", name.len());
        assert_eq!(parse(&name).unwrap().listener.len(), MAX_LISTENER);
    }

    #[test]
    fn old_names_and_damaged_names() {
        let old = parse("conn/web").unwrap();
        assert_eq!((old.key, &*old.listener), (None, "web"));
        assert!(is_stored_connection("conn/web"));
        assert!(!is_stored_connection("http"));
        assert_eq!(parse("sd1.zz.00.0"), None);
        assert_eq!(parse("sd1.0102.0a0b0c0d.10"), None);
        assert_eq!(parse("http"), None);
    }
}
