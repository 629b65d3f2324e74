//! The TCP sockets listening on this host, as the kernel reports them (sock_diag, the
//! netlink interface `ss` uses): which sockets share a lane group's address, and each
//! one's accept queue and drops.
//!
//! The dispatcher trusts a lane group only if the sockets listening on its address are
//! exactly its lanes (a stale or foreign socket there would take some of the clients, or
//! shift the group's order), and shows each lane's queue in `/metrics`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::Socket;

/// One listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The socket's inode number: what `fstat` on an fd of it says (`st_ino`).
    pub inode: u64,
    /// The address it is bound to.
    pub local: SocketAddr,
    /// Its owner's uid.
    pub uid: u32,
    /// Connections waiting in its accept queue.
    pub queued: u32,
    /// Its listen backlog: the most the accept queue holds.
    pub backlog: u32,
    /// Connections the kernel dropped because the queue was full (the socket's drop
    /// count), when the kernel reports it.
    pub drops: Option<u32>,
}

/// Every TCP socket listening on `port` in the family of `family_of` (IPv4 or IPv6).
pub fn listening_on(port: u16, family_of: IpAddr) -> io::Result<Vec<Listening>> {
    let family = if family_of.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let mut found = Vec::new();
    dump(family, |response| {
        let local = SocketAddr::new(
            response.header.socket_id.source_address,
            response.header.socket_id.source_port,
        );
        if local.port() != port {
            return;
        }
        let drops = response.nlas.iter().find_map(|nla| match nla {
            Nla::MemInfo(info) => Some(info.drops),
            _ => None,
        });
        found.push(Listening {
            inode: u64::from(response.header.inode),
            local,
            uid: response.header.uid,
            queued: response.header.recv_queue,
            backlog: response.header.send_queue,
            drops,
        });
    })?;
    Ok(found)
}

/// The inode of the socket behind `socket`, as [`Listening::inode`] names it.
pub fn inode_of(socket: impl AsFd) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(socket.as_fd())?.st_ino)
}

/// Asks the kernel for every listening TCP socket of `family`, with its memory counters,
/// and passes each answer to `each`.
fn dump(family: u8, mut each: impl FnMut(&InetResponse)) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::SKMEMINFO,
            states: StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0)?;

    let mut buf = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response)
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => {
                    return Err(err.to_io());
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
        if size == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_with_its_inode_queue_and_backlog() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::new(77).unwrap()).unwrap();
        let address = socket.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(address).unwrap();
        let found = listening_on(address.port(), address.ip()).unwrap();
        let ours: Vec<_> = found.iter().filter(|l| l.local == address).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].inode, inode_of(&socket).unwrap());
        assert_eq!((ours[0].queued, ours[0].backlog), (1, 77));
        assert_eq!(ours[0].drops, Some(0));
    }
}
