//! The hand-off link's socket: AF_UNIX `SOCK_SEQPACKET` in the abstract namespace, with
//! file descriptors passed as SCM_RIGHTS.
//!
//! Most of the crate's `unsafe` is here (the rest: the `pre_exec` hooks of `supervisor`
//! and `node_bridge::node`, and restoring a signal's default action in the latter):
//! adopting the raw fds that `accept4` and `recvmsg` hand us as `OwnedFd`s,
//! registering owned sockets with tokio, and attaching the kernel's routing program to a
//! reuseport group (`setsockopt` with a pointer). Each block says why it is sound.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use nix::unistd::Uid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Enough backlog for a dispatcher and a few reconnecting peers; links are few and long-lived.
pub(crate) const LISTEN_BACKLOG: i32 = 16;

/// Pause after accept fails for lack of fds or memory: long enough not to spin, short
/// enough that the kernel backlog does not overflow while fds come back.
pub(crate) const RESOURCE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether a failed `accept` failed for lack of fds or memory (pause, the backlog holds),
/// rather than because of that one client (ECONNABORTED and the like: go on).
pub(crate) fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// The process at the other end of a link, as the kernel reports it (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Effective uid of the peer when it connected or listened.
    pub uid: Uid,
    /// Its process id.
    pub pid: i32,
}

/// A worker's listening link socket, `@<name>`.
#[derive(Debug)]
pub struct LinkListener {
    fd: AsyncFd<OwnedFd>,
}

/// One end of an established link.
#[derive(Debug)]
pub struct LinkStream {
    fd: AsyncFd<OwnedFd>,
}

/// One datagram received from a link.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the datagram; 0 means the peer closed the link.
    pub len: usize,
    /// The descriptor that came with it, if any.
    pub fd: Option<OwnedFd>,
}

/// One record received from a peer that is not a link (`recv_record`).
#[derive(Debug)]
pub struct Record {
    /// Bytes of the record in the buffer; 0 means the peer closed.
    pub len: usize,
    /// The record was longer than the buffer (or came with more fds than room).
    pub truncated: bool,
}

/// Sockets that own their fd, and so may be registered with tokio's reactor.
pub(crate) trait OwnsFd: AsRawFd {}
impl OwnsFd for OwnedFd {}
impl OwnsFd for std::net::TcpListener {}
impl OwnsFd for std::net::TcpStream {}

/// Registers an owned socket (a link, or a dispatcher's TCP listener) with tokio's reactor.
pub(crate) fn register<T: OwnsFd>(socket: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `socket`, which owns its fd, so the fd stays open and the
    // same for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|err| err.into_parts().1)
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

fn abstract_addr(name: &str) -> io::Result<UnixAddr> {
    Ok(UnixAddr::new_abstract(name.as_bytes())?)
}

/// Binds the abstract name `@name` without listening: the name is held, and released by
/// the kernel when the returned fd closes (also when the process is killed), so it marks
/// who uses a name. Fails with `AddrInUse` if another process holds it.
pub fn claim(name: &str) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    socket::bind(fd.as_raw_fd(), &abstract_addr(name)?)?;
    Ok(fd)
}

impl LinkListener {
    /// Binds and listens on the abstract name `@name`. Fails with `AddrInUse` if another
    /// process holds the name.
    pub fn bind(name: &str) -> io::Result<LinkListener> {
        let fd = seqpacket_socket()?;
        socket::bind(fd.as_raw_fd(), &abstract_addr(name)?)?;
        socket::listen(&fd, Backlog::new(LISTEN_BACKLOG)?)?;
        Ok(LinkListener {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// Adopts the listening link socket a parent process passed down as fd `raw` (the
    /// worker launcher's, named by `STICKY_DISPATCH_LINK_FD`), once it is checked to be a
    /// listening AF_UNIX `SOCK_SEQPACKET` socket bound to `@name`; it becomes close-on-exec
    /// (the app's children do not inherit it) and non-blocking. A bad fd is left as it was.
    pub fn inherited(raw: RawFd, name: &str) -> io::Result<LinkListener> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if raw <= 2 {
            return Err(invalid(format!(
                "fd {raw} is a standard stream, not a socket"
            )));
        }
        // SAFETY: F_GETFD reads the fd's flags and touches no memory; it only tells whether
        // the number is open in this process.
        if unsafe { nix::libc::fcntl(raw, nix::libc::F_GETFD) } < 0 {
            return Err(invalid(format!("fd {raw} is not open")));
        }
        // SAFETY: the fd is open, and the process was given it to own: nothing else in it
        // knows the number (the variable that named it is read once). If it is not what
        // it should be, it is released again unclosed below.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let checked = (|| {
            let kind = socket::getsockopt(&fd, sockopt::SockType)
                .map_err(|err| invalid(format!("fd {raw} is not a socket ({err})")))?;
            let bound = socket::getsockname::<UnixAddr>(fd.as_raw_fd()).ok();
            let Some(bound) = bound.filter(|_| kind == SockType::SeqPacket) else {
                return Err(invalid(format!(
                    "fd {raw} is not an AF_UNIX SOCK_SEQPACKET socket"
                )));
            };
            if bound.as_abstract() != Some(name.as_bytes()) {
                let bound = match bound.as_abstract() {
                    Some(other) => format!("@{}", String::from_utf8_lossy(other)),
                    None => bound.to_string(),
                };
                return Err(invalid(format!(
                    "fd {raw} is bound to {bound}, not to @{name} (another worker index or \
                     socket_prefix?)"
                )));
            }
            if !socket::getsockopt(&fd, sockopt::AcceptConn)? {
                return Err(invalid(format!("fd {raw} (@{name}) is not listening")));
            }
            nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
            let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
            Ok(())
        })();
        if let Err(err) = checked {
            // Not ours to close: whatever it is, it stays as it was.
            let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
            return Err(err);
        }
        Ok(LinkListener {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// Waits for the next peer to connect.
    pub async fn accept(&self) -> io::Result<LinkStream> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |fd| {
                let raw = socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )?;
                // SAFETY: accept4 just returned this fd; nothing else owns it.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            })
            .await?;
        LinkStream::from_fd(fd)
    }
}

impl LinkStream {
    fn from_fd(fd: OwnedFd) -> io::Result<LinkStream> {
        Ok(LinkStream {
            fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connects to the worker listening on `@name`. Unix-domain connects complete at
    /// once; `ConnectionRefused` means nobody listens (the worker is down).
    pub fn connect(name: &str) -> io::Result<LinkStream> {
        let fd = seqpacket_socket()?;
        socket::connect(fd.as_raw_fd(), &abstract_addr(name)?)?;
        LinkStream::from_fd(fd)
    }

    /// A connected pair, for unit tests.
    #[cfg(test)]
    pub(crate) fn pair() -> io::Result<(LinkStream, LinkStream)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok((LinkStream::from_fd(a)?, LinkStream::from_fd(b)?))
    }

    /// Credentials of the peer process, from the kernel: they cannot be forged.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        let cred = socket::getsockopt(self.fd.get_ref(), sockopt::PeerCredentials)?;
        Ok(PeerCred {
            uid: Uid::from_raw(cred.uid()),
            pid: cred.pid(),
        })
    }

    /// Sends one datagram, with `fd` attached if given. Waits while the socket buffer is full.
    pub async fn send(&self, datagram: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                send_raw(sock.as_raw_fd(), datagram, fd)
            })
            .await
    }

    /// Sends one datagram now, or fails with `WouldBlock` while the socket buffer is full
    /// (then wait for [`LinkStream::writable`]).
    pub fn try_send(&self, datagram: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        self.fd.try_io(Interest::WRITABLE, |sock| {
            send_raw(sock.as_raw_fd(), datagram, fd)
        })
    }

    /// Waits until a send may succeed.
    pub async fn writable(&self) -> io::Result<()> {
        // Dropping the guard keeps the readiness for the try_send that follows.
        self.fd.writable().await.map(drop)
    }

    /// Receives one datagram into `buf`, with the fd it carries. A datagram that does not fit
    /// or carries more than one fd is an error (and the extra fds are closed).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.fd
            .async_io(Interest::READABLE, |sock| recv_raw(sock.as_raw_fd(), buf))
            .await
    }
}

pub(crate) fn send_raw(sock: RawFd, datagram: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let iov = [io::IoSlice::new(datagram)];
    let fds;
    let cmsgs: &[ControlMessage] = match fd {
        Some(fd) => {
            fds = [fd.as_raw_fd()];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    // MSG_NOSIGNAL: a worker that died must give us EPIPE, not kill the dispatcher.
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let sent = socket::sendmsg::<()>(sock, &iov, cmsgs, flags, None)?;
    if sent != datagram.len() {
        return Err(io::Error::other("short write on a SEQPACKET link"));
    }
    Ok(())
}

/// Checks that `fd` received over a link (CHANNEL) is an AF_UNIX `SOCK_SEQPACKET` socket,
/// and makes it non-blocking.
// Only the dispatcher and the Node bridge read Node's channel.
#[cfg(feature = "dispatcher")]
pub(crate) fn check_seqpacket(fd: &OwnedFd) -> io::Result<()> {
    let kind = socket::getsockopt(fd, sockopt::SockType)?;
    if kind != SockType::SeqPacket || socket::getsockname::<UnixAddr>(fd.as_raw_fd()).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the fd passed is not a Unix SOCK_SEQPACKET socket",
        ));
    }
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Receives one record now (`WouldBlock` if none), from a peer that is not a link (Node's
/// IPC channel): fds that come with it are closed, and a record longer than `buf` is cut
/// (`truncated`), not an error. A length of 0 means the peer closed.
// Only the dispatcher and the Node bridge read Node's channel.
#[cfg(feature = "dispatcher")]
pub(crate) fn recv_record(sock: RawFd, buf: &mut [u8]) -> io::Result<Record> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = socket::recvmsg::<()>(sock, &mut iov, Some(&mut cmsg_space), flags)?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw_fds) = cmsg {
            // SAFETY: installed in our table for this call alone; adopted to be closed at
            // once.
            raw_fds
                .into_iter()
                .for_each(|raw| drop(unsafe { OwnedFd::from_raw_fd(raw) }));
        }
    }
    Ok(Record {
        len: msg.bytes,
        truncated: msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
    })
}

fn recv_raw(sock: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    // MSG_CMSG_CLOEXEC: received client fds must not leak into processes we spawn.
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = socket::recvmsg::<()>(sock, &mut iov, Some(&mut cmsg_space), flags)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw_fds) = cmsg {
            // SAFETY: SCM_RIGHTS installed these fds in our table for this call alone;
            // adopting them at once is what makes sure each is closed exactly once.
            fds.extend(
                raw_fds
                    .into_iter()
                    .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
            );
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    if truncated || fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized datagram or more than one fd on the link",
        ));
    }
    Ok(Received {
        len: msg.bytes,
        fd: fds.pop(),
    })
}

mod ioctl {
    // SIOCOUTQ is TIOCOUTQ's number; on AF_UNIX sockets it counts what the peer has not read.
    nix::ioctl_read_bad!(siocoutq, nix::libc::TIOCOUTQ, nix::libc::c_int);
}

/// Bytes sent on `sock` (by any holder of it) that its peer has not read yet.
pub fn unread_by_peer(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut queued: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at `queued`; the
    // fd is open for the call (borrowed).
    unsafe { ioctl::siocoutq(sock.as_raw_fd(), &mut queued) }?;
    Ok(queued.max(0) as usize)
}

/// Attaches `program` to the SO_REUSEPORT group `socket` belongs to
/// (`SO_ATTACH_REUSEPORT_CBPF`): from then on the kernel hands each new connection to the
/// group's socket at the index the program returns (see [`crate::routing::cbpf`]). The
/// program belongs to the group: it outlives `socket`, and attaching another replaces it.
/// Needs no privilege.
#[cfg(feature = "dispatcher")]
pub fn attach_reuseport_cbpf(
    socket: BorrowedFd<'_>,
    program: &[crate::routing::cbpf::Instruction],
) -> io::Result<()> {
    use crate::routing::cbpf::Instruction;
    use nix::libc::{sock_filter, sock_fprog};
    // Instruction is #[repr(C)] with the same fields in the same order as sock_filter.
    const _: () = assert!(std::mem::size_of::<Instruction>() == std::mem::size_of::<sock_filter>());
    const _: () =
        assert!(std::mem::align_of::<Instruction>() == std::mem::align_of::<sock_filter>());
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = sock_fprog {
        len,
        // The kernel only reads through it (the field is *mut in C's declaration).
        filter: program.as_ptr().cast::<sock_filter>().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, `len` instructions of sock_filter's layout
    // (checked above), and both live until the call returns; the kernel copies the program
    // and checks it before attaching. The fd is open for the call (borrowed).
    let rc = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<sock_fprog>() as nix::libc::socklen_t,
        )
    };
    Errno::result(rc)?;
    Ok(())
}

/// Whether a link error means "the worker is not there (yet)", as opposed to a real fault.
pub fn is_absent(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::ECONNREFUSED | Errno::ENOENT | Errno::EAGAIN)
    )
}

impl AsFd for LinkListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsFd for LinkStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker launcher's listening socket is taken by number once checked: the name
    /// must match and it must listen; a bad one stays open, as it was.
    #[tokio::test]
    async fn an_inherited_listener_is_checked_before_it_is_adopted() {
        use std::os::fd::IntoRawFd;
        let name = format!("sticky-dispatch-unit/{}/inherited/0", std::process::id());
        let launcher = LinkListener::bind(&name).unwrap();
        let copy = launcher.as_fd().try_clone_to_owned().unwrap().into_raw_fd();
        let wrong = LinkListener::inherited(copy, "another/0").unwrap_err();
        assert!(
            wrong
                .to_string()
                .contains(&format!("bound to @{name}, not to @another/0")),
            "{wrong}"
        );
        let worker = LinkListener::inherited(copy, &name).unwrap();
        let flags = nix::fcntl::fcntl(worker.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(
            nix::fcntl::FdFlag::from_bits_retain(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
        );
        let _dispatcher = LinkStream::connect(&name).unwrap();
        worker.accept().await.unwrap();
        drop(worker);
        // The launcher's copy still holds the name.
        let _again = LinkStream::connect(&name).unwrap();

        let quiet = claim(&format!("{name}/quiet")).unwrap();
        let not_listening = LinkListener::inherited(quiet.as_raw_fd(), &format!("{name}/quiet"));
        assert!(not_listening
            .unwrap_err()
            .to_string()
            .contains("is not listening"));
        nix::fcntl::fcntl(&quiet, nix::fcntl::FcntlArg::F_GETFD).expect("left open");
        let stdout = LinkListener::inherited(1, &name).unwrap_err();
        assert!(stdout.to_string().contains("standard stream"), "{stdout}");
    }

    #[test]
    fn only_a_lack_of_resources_pauses_accepting() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(is_resource_shortage(&io::Error::from(errno)), "{errno}");
        }
        for errno in [Errno::ECONNABORTED, Errno::EPROTO, Errno::EPERM] {
            assert!(!is_resource_shortage(&io::Error::from(errno)), "{errno}");
        }
    }
    use std::io::{Read, Write};

    fn unique_name(tag: &str) -> String {
        format!("sticky-dispatch-test/{}/{tag}", std::process::id())
    }

    #[tokio::test]
    async fn fd_passes_over_an_abstract_link_with_credentials() {
        let name = unique_name("pass");
        let listener = LinkListener::bind(&name).unwrap();
        let client = LinkStream::connect(&name).unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(client.peer_cred().unwrap().uid, Uid::effective());
        assert_eq!(server.peer_cred().unwrap().pid, std::process::id() as i32);

        let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        client.send(b"hello", Some(theirs.as_fd())).await.unwrap();
        drop(theirs);
        let mut buf = [0u8; 64];
        let got = server.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        let mut passed = std::os::unix::net::UnixStream::from(got.fd.unwrap());
        passed.write_all(b"x").unwrap();
        let mut byte = [0u8];
        mine.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");

        drop(client);
        assert_eq!(server.recv(&mut buf).await.unwrap().len, 0, "EOF");
    }

    #[tokio::test]
    async fn a_name_can_be_held_once_and_absence_is_recognised() {
        let name = unique_name("once");
        let err = LinkStream::connect(&name).unwrap_err();
        assert!(is_absent(&err), "{err}");
        let _held = LinkListener::bind(&name).unwrap();
        let err = LinkListener::bind(&name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn an_oversized_datagram_is_an_error() {
        let (a, b) = LinkStream::pair().unwrap();
        a.send(&[0u8; 100], None).await.unwrap();
        let mut small = [0u8; 10];
        let err = b.recv(&mut small).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
