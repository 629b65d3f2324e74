//! Lanes: the kernel's path. A listener whose sockets form one SO_REUSEPORT group with at
//! least a socket per worker (its *lanes*: lane `k` is the group's `k`-th socket) gets the
//! routing program (`routing::cbpf`), and from then on the kernel hands each new
//! connection to the lane of its client's worker, which accepts it itself: no process in
//! between.
//!
//! Before trusting a group, [`plan`] checks it: the sockets listening on that address must
//! be exactly the listener's lanes. A stale socket (one a worker still holds from before a
//! socket-unit restart) or a foreign one there would take some clients, or shift the
//! group's order so that lane `k` is no longer worker `k`'s; such a listener takes the
//! dispatcher's path, with a log line that says why and how to fix it. A group once found
//! so stays suspect for its lifetime (the order cannot be seen, and closing the strangers
//! shuffles it): [`Suspects`] remembers it across dispatcher restarts.
//!
//! Once trusted, the program is attached and whatever the lanes queued before it (the
//! connection that activated the socket, say) is taken once, by [`LaneGroup::take_queued`],
//! for the fd-passing path. Then each slot gets its worker's lane ([`Lane`]), passes it to
//! the worker at every link-up, and accepts on it only while the worker cannot.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::warn;

use super::worker_link::LaneGrant;
use super::Listener;
use crate::routing::{cbpf, Router};
use crate::sock_diag;

/// What a listener's sockets are used for.
pub(super) enum Plan {
    /// The kernel routes: the lanes, checked, with the program attached.
    Kernel(LaneGroup),
    /// The dispatcher accepts on every socket and passes connections over the links.
    Userspace {
        listener: Listener,
        /// Why not the kernel, if it was asked for.
        why: Option<Untrusted>,
    },
}

/// Why a listener's sockets are not trusted as lanes.
#[derive(Debug, thiserror::Error)]
pub(super) enum Untrusted {
    /// Fewer sockets than workers.
    #[error(
        "it has {sockets} listening socket(s) on {local}, the kernel's path needs one per \
         worker ({workers}); under systemd run `systemctl daemon-reload` (the generator \
         writes the lanes into the socket unit) and `systemctl restart sticky-dispatch.socket`"
    )]
    TooFew {
        sockets: usize,
        workers: u32,
        local: SocketAddr,
    },
    /// Other sockets listen on the same address: stale lanes, or another program's.
    #[error(
        "{count} other socket(s) listen on {local} (uids {uids:?}): a stale lane a worker \
         still holds from before the socket unit restarted, or another program's. They \
         would take some of the clients, or shift the lanes' order. Stop what holds them \
         (`ss -ltnpe 'sport = :{port}'` shows it), then restart the socket \
         (`systemctl restart sticky-dispatch.socket`)"
    )]
    Strangers {
        count: usize,
        uids: BTreeSet<u32>,
        local: SocketAddr,
        port: u16,
    },
    /// One of the sockets is not listening where the others are.
    #[error(
        "its sockets are not all listening on {local}: lanes of one listener share one address"
    )]
    Mixed { local: SocketAddr },
    /// The group had strangers earlier in its life: its order cannot be trusted.
    #[error(
        "its lanes were shuffled earlier in their life (strangers listened beside them), so \
         lane k may not be worker k's; restart the socket with every worker's old lanes \
         gone (`systemctl restart sticky-dispatch.socket`)"
    )]
    Shuffled,
    /// The kernel could not be asked, or refused the program.
    #[error("{what}: {err}")]
    Kernel { what: &'static str, err: io::Error },
    /// More workers than the program serves.
    #[error(transparent)]
    TooManyWorkers(#[from] cbpf::TooManyWorkers),
}

/// A listener on the kernel's path: its lanes, in group order.
pub(super) struct LaneGroup {
    pub(super) name: Arc<str>,
    pub(super) local: SocketAddr,
    pub(super) backlog: u32,
    sockets: Vec<std::net::TcpListener>,
}

/// Decides `listener`'s path: the kernel's if `kernel` is asked for and its sockets check
/// out as lanes for `router`'s workers (then the program is attached), else the
/// dispatcher's.
pub(super) fn plan(
    listener: Listener,
    kernel: bool,
    router: &Router,
    suspects: &mut Suspects,
) -> Plan {
    if !kernel {
        return Plan::Userspace {
            listener,
            why: None,
        };
    }
    match check(&listener, router, suspects) {
        Ok(local) => {
            let backlog = listener
                .sockets
                .first()
                .and_then(|socket| backlog_of(socket, local).ok())
                .unwrap_or(0);
            let group = LaneGroup {
                name: listener.name,
                local,
                backlog,
                sockets: listener.sockets,
            };
            match group.attach(router) {
                Ok(()) => Plan::Kernel(group),
                Err(why) => Plan::Userspace {
                    listener: Listener {
                        name: group.name,
                        sockets: group.sockets,
                    },
                    why: Some(why),
                },
            }
        }
        Err(why) => Plan::Userspace {
            listener,
            why: Some(why),
        },
    }
}

/// The listener's sockets are all on one address, at least one per worker, and the only
/// sockets listening there; returns the address.
fn check(
    listener: &Listener,
    router: &Router,
    suspects: &mut Suspects,
) -> Result<SocketAddr, Untrusted> {
    let kernel = |what| move |err| Untrusted::Kernel { what, err };
    let workers = router.workers().get();
    let first = listener
        .sockets
        .first()
        .ok_or(Untrusted::TooFew {
            sockets: 0,
            workers,
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
        })?
        .local_addr()
        .map_err(kernel("its address"))?;
    let mut ours = BTreeSet::new();
    for socket in &listener.sockets {
        if socket.local_addr().map_err(kernel("its address"))? != first {
            return Err(Untrusted::Mixed { local: first });
        }
        ours.insert(sock_diag::inode_of(socket).map_err(kernel("fstat"))?);
    }
    if listener.sockets.len() < workers as usize {
        return Err(Untrusted::TooFew {
            sockets: listener.sockets.len(),
            workers,
            local: first,
        });
    }
    if suspects.holds_any(&ours) {
        return Err(Untrusted::Shuffled);
    }
    let there = sock_diag::listening_on(first.port(), first.ip()).map_err(kernel(
        "asking the kernel which sockets listen there (sock_diag)",
    ))?;
    let overlapping = there.iter().filter(|other| {
        other.local == first || first.ip().is_unspecified() || other.local.ip().is_unspecified()
    });
    let strangers: Vec<_> = overlapping
        .filter(|other| !ours.contains(&other.inode))
        .collect();
    if !strangers.is_empty() {
        suspects.add(&ours);
        return Err(Untrusted::Strangers {
            count: strangers.len(),
            uids: strangers.iter().map(|s| s.uid).collect(),
            local: first,
            port: first.port(),
        });
    }
    Ok(first)
}

/// Binds `lanes` listening sockets on `address` in one SO_REUSEPORT group, in lane order,
/// each with the kernel's largest backlog (as systemd's `Backlog=` gives): a standalone
/// dispatcher's lanes (a group even of one: the routing program needs a group). With
/// `None`, one ordinary listening socket, which no other socket may join.
pub fn bind_lanes(
    address: SocketAddr,
    lanes: Option<u32>,
) -> io::Result<Vec<std::net::TcpListener>> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, Backlog, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    let mut address = address;
    (0..lanes.unwrap_or(1).max(1))
        .map(|_| {
            let family = if address.is_ipv4() {
                nix::sys::socket::AddressFamily::Inet
            } else {
                nix::sys::socket::AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            if lanes.is_some() {
                setsockopt(&fd, sockopt::ReusePort, &true)?;
            }
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            match address {
                SocketAddr::V4(v4) => bind(raw, &SockaddrIn::from(v4))?,
                SocketAddr::V6(v6) => bind(raw, &SockaddrIn6::from(v6))?,
            }
            listen(&fd, Backlog::MAXCONN)?;
            let socket = std::net::TcpListener::from(fd);
            // Port 0 picks a port once: the other lanes join the group on it.
            address = socket.local_addr()?;
            Ok(socket)
        })
        .collect()
}

/// The listen backlog of a socket (sock_diag reports it for listeners).
fn backlog_of(socket: &std::net::TcpListener, local: SocketAddr) -> io::Result<u32> {
    let inode = sock_diag::inode_of(socket)?;
    sock_diag::listening_on(local.port(), local.ip())?
        .into_iter()
        .find(|listening| listening.inode == inode)
        .map(|listening| listening.backlog)
        .ok_or_else(|| io::Error::other("the socket is not listening"))
}

impl LaneGroup {
    /// Attaches the routing program to the group (through any of its sockets: the program
    /// belongs to the group and replaces a previous one).
    fn attach(&self, router: &Router) -> Result<(), Untrusted> {
        let program = cbpf::program(router)?;
        crate::link::attach_reuseport_cbpf(self.sockets[0].as_fd(), &program).map_err(|err| {
            Untrusted::Kernel {
                what: "attaching the routing program (SO_ATTACH_REUSEPORT_CBPF)",
                err,
            }
        })
    }

    /// Adds each lane's series (queue, backlog, drops) to `metrics`.
    pub(super) fn register_metrics(&self, metrics: &super::metrics::Metrics) {
        for (index, socket) in self.sockets.iter().enumerate() {
            if let Ok(inode) = sock_diag::inode_of(socket) {
                metrics.add_lane(&self.name, index, inode, self.local);
            }
        }
    }

    /// How many lanes it has (at least the workers; the rest are spares).
    pub(super) fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Takes, without waiting, what every lane has queued: connections that arrived
    /// before the program was attached went to any lane. Done once, at start; what a
    /// worker's lane queues from then on is that worker's.
    pub(super) fn take_queued(&self) -> Vec<(std::net::TcpStream, SocketAddr)> {
        let mut queued = Vec::new();
        for socket in &self.sockets {
            // The lanes are non-blocking for every holder already (workers serve them from
            // event loops); this makes sure of it for the accept below.
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            while let Ok(accepted) = socket.accept() {
                queued.push(accepted);
            }
        }
        queued
    }

    /// Splits the group into each worker's lane (index order) and the spares.
    pub(super) fn into_lanes(self, workers: u32) -> (Vec<Lane>, Vec<std::net::TcpListener>) {
        let mut sockets = self.sockets;
        let spares = sockets.split_off(workers as usize);
        let lanes = sockets
            .into_iter()
            .enumerate()
            .map(|(index, socket)| Lane {
                listener: self.name.clone(),
                index: index as u32,
                backlog: self.backlog,
                local: self.local,
                socket: LaneSocket::Idle(socket),
            })
            .collect();
        (lanes, spares)
    }
}

/// One worker's lane of one listener, held by its slot.
pub(super) struct Lane {
    pub(super) listener: Arc<str>,
    pub(super) index: u32,
    pub(super) backlog: u32,
    pub(super) local: SocketAddr,
    socket: LaneSocket,
}

/// A lane's socket, watched by the reactor only while the slot accepts on it: a watched
/// lane would wake the dispatcher for every connection its worker accepts.
enum LaneSocket {
    Idle(std::net::TcpListener),
    Watched(AsyncFd<std::net::TcpListener>),
    /// Only while switching.
    Switching,
}

impl Lane {
    fn fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            LaneSocket::Idle(socket) => socket.as_fd(),
            LaneSocket::Watched(socket) => socket.get_ref().as_fd(),
            LaneSocket::Switching => unreachable!("a lane is switched in one call"),
        }
    }

    /// What its worker is passed.
    pub(super) fn grant(&self) -> LaneGrant<'_> {
        LaneGrant {
            listener: &self.listener,
            socket: self.fd(),
            backlog: self.backlog,
            local: Some(self.local),
        }
    }

    /// Starts or stops watching it, for [`accept_any`].
    pub(super) fn watch(&mut self, on: bool) {
        let socket = std::mem::replace(&mut self.socket, LaneSocket::Switching);
        self.socket = match (socket, on) {
            (LaneSocket::Idle(socket), true) => {
                let _ = socket.set_nonblocking(true);
                match crate::link::register(socket, Interest::READABLE) {
                    Ok(watched) => LaneSocket::Watched(watched),
                    Err(err) => {
                        // Not registered means dropped with it: a lane must never go.
                        // tokio fails to register only when out of memory or fds, and the
                        // error hands nothing back; abort rather than lose the lane.
                        panic!(
                            "could not watch lane {} of {}: {err}",
                            self.index, self.listener
                        )
                    }
                }
            }
            (LaneSocket::Watched(watched), false) => LaneSocket::Idle(watched.into_inner()),
            (same, _) => same,
        };
    }

    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(std::net::TcpStream, SocketAddr)>> {
        let LaneSocket::Watched(watched) = &self.socket else {
            return Poll::Pending;
        };
        loop {
            let mut ready = match watched.poll_read_ready(cx) {
                Poll::Ready(Ok(ready)) => ready,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            };
            match ready.try_io(|socket| socket.get_ref().accept()) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Accepts the next connection on any watched lane; never resolves if none is watched.
pub(super) async fn accept_any(
    lanes: &[Lane],
) -> (usize, io::Result<(std::net::TcpStream, SocketAddr)>) {
    std::future::poll_fn(|cx| {
        for (at, lane) in lanes.iter().enumerate() {
            if let Poll::Ready(result) = lane.poll_accept(cx) {
                return Poll::Ready((at, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// Lane groups found with strangers beside them, by their sockets' inodes: their order is
/// not to be trusted for as long as they exist. Kept in a file of the runtime directory
/// (`RuntimeDirectory=`, kept across restarts of the dispatcher) when there is one, so a
/// dispatcher that restarts after the strangers left does not trust the shuffled group.
pub(super) struct Suspects {
    file: Option<PathBuf>,
    inodes: BTreeSet<u64>,
}

/// The file's name in `$RUNTIME_DIRECTORY`.
const SUSPECTS_FILE: &str = "suspect-lanes";

impl Suspects {
    /// Reads the list of the runtime directory systemd gives the service, if any.
    pub(super) fn load() -> Suspects {
        let file =
            std::env::var_os("RUNTIME_DIRECTORY").map(|dir| PathBuf::from(dir).join(SUSPECTS_FILE));
        let inodes = file
            .as_ref()
            .and_then(|file| std::fs::read_to_string(file).ok())
            .map(|text| {
                text.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        Suspects { file, inodes }
    }

    fn holds_any(&self, inodes: &BTreeSet<u64>) -> bool {
        !self.inodes.is_disjoint(inodes)
    }

    fn add(&mut self, inodes: &BTreeSet<u64>) {
        self.inodes.extend(inodes);
        let Some(file) = &self.file else {
            return;
        };
        let text: String = self
            .inodes
            .iter()
            .map(|inode| format!("{inode}\n"))
            .collect();
        if let Err(err) = std::fs::write(file, text) {
            warn!(file = %file.display(), %err, "could not remember suspect lanes: a restart of the dispatcher after their strangers are gone would trust them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn reuseport_group(count: u32) -> Vec<std::net::TcpListener> {
        bind_lanes("127.0.0.1:0".parse().unwrap(), Some(count)).unwrap()
    }

    fn router(workers: u32) -> Router {
        Router::new(NonZeroU32::new(workers).unwrap(), 32, 64, 0)
    }

    fn listener(sockets: Vec<std::net::TcpListener>) -> Listener {
        Listener {
            name: "web".into(),
            sockets,
        }
    }

    #[test]
    fn a_clean_group_goes_to_the_kernel_and_routes_by_the_documented_function() {
        let router = router(3);
        let mut suspects = Suspects {
            file: None,
            inodes: BTreeSet::new(),
        };
        let Plan::Kernel(group) = plan(listener(reuseport_group(4)), true, &router, &mut suspects)
        else {
            panic!("not trusted");
        };
        assert_eq!(group.len(), 4);
        assert!(
            group.backlog >= 128,
            "the kernel's largest backlog, {}",
            group.backlog
        );
        let local = group.local;
        let queued = group.take_queued();
        assert!(queued.is_empty());
        let (lanes, spares) = group.into_lanes(3);
        assert_eq!((lanes.len(), spares.len()), (3, 1));
        for host in 1..=20u8 {
            let client = socket2_from(format!("127.0.3.{host}"), local);
            let peer = client.local_addr().unwrap();
            let expected = router.worker_for(&router.key(Some(peer.ip())));
            let got: Vec<usize> = lanes
                .iter()
                .enumerate()
                .filter_map(|(k, lane)| {
                    let LaneSocket::Idle(socket) = &lane.socket else {
                        unreachable!()
                    };
                    socket.accept().ok().map(|_| k)
                })
                .collect();
            assert_eq!(got, vec![expected as usize], "client {peer}");
        }
    }

    /// A connection from `source` (a loopback address) to `to`, established: it is in
    /// the accept queue of the lane the kernel chose when this returns.
    fn socket2_from(source: String, to: SocketAddr) -> std::net::TcpStream {
        use nix::sys::socket::{
            bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let ip: std::net::Ipv4Addr = source.parse().unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(std::net::SocketAddrV4::new(ip, 0)),
        )
        .unwrap();
        let SocketAddr::V4(to) = to else {
            unreachable!()
        };
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)).unwrap();
        std::net::TcpStream::from(fd)
    }

    #[test]
    fn one_worker_has_a_group_of_one_lane() {
        let mut suspects = Suspects {
            file: None,
            inodes: BTreeSet::new(),
        };
        assert!(matches!(
            plan(
                listener(reuseport_group(1)),
                true,
                &router(1),
                &mut suspects
            ),
            Plan::Kernel(_)
        ));
    }

    #[test]
    fn a_stranger_on_the_address_keeps_the_listener_on_the_dispatchers_path_for_good() {
        let router = router(2);
        let mut group = reuseport_group(3);
        let stranger = group.remove(0);
        let mut suspects = Suspects {
            file: None,
            inodes: BTreeSet::new(),
        };
        let Plan::Userspace {
            listener: back,
            why: Some(Untrusted::Strangers { count: 1, .. }),
        } = plan(listener(group), true, &router, &mut suspects)
        else {
            panic!("trusted with a stranger beside it");
        };
        drop(stranger);
        let Plan::Userspace {
            why: Some(Untrusted::Shuffled),
            ..
        } = plan(back, true, &router, &mut suspects)
        else {
            panic!("trusted a group that had a stranger");
        };
    }

    #[test]
    fn too_few_sockets_or_userspace_asked_for_take_the_dispatchers_path() {
        let mut suspects = Suspects {
            file: None,
            inodes: BTreeSet::new(),
        };
        let Plan::Userspace {
            why:
                Some(Untrusted::TooFew {
                    sockets: 1,
                    workers: 2,
                    ..
                }),
            ..
        } = plan(
            listener(reuseport_group(1)),
            true,
            &router(2),
            &mut suspects,
        )
        else {
            panic!("one socket for two workers trusted");
        };
        let Plan::Userspace { why: None, .. } = plan(
            listener(reuseport_group(2)),
            false,
            &router(2),
            &mut suspects,
        ) else {
            panic!("dispatch = userspace ignored");
        };
    }
}
