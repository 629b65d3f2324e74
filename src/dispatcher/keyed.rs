//! Connections routed by what they send first (`routing_key` other than `peer-ip`): the
//! key is read in a task of the connection's own, bounded by `key_timeout` and
//! `key_max_bytes`, so a silent or slow client never holds up the others. A PROXY header
//! is consumed (the worker gets the stream after it); an HTTP request head is only
//! peeked at (MSG_PEEK), so the worker reads the whole request.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::debug;

use super::held::Held;
use super::hub::Hub;
use super::metrics::KeyFailure;
use crate::config::{KeySource, Settings};
use crate::keysource::{self, HttpKey, HttpKeySource, Parsed};
use crate::routing::RoutingKey;

/// The first peek buffer of a connection whose key comes from its bytes. It doubles, up
/// to `key_max_bytes`, only when what the client sent fills it: a held connection costs
/// what it sent, not `key_max_bytes` (thousands of slow clients must stay cheap).
const FIRST_PEEK: usize = 512;

/// A connection whose key is not known yet.
pub(super) struct Unkeyed {
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) local: Option<SocketAddr>,
    pub(super) listener: Arc<str>,
    pub(super) permit: OwnedSemaphorePermit,
    /// When it was accepted: its hand-off time counts the key reading too.
    pub(super) accepted: Instant,
}

/// Why a connection was closed before routing.
#[derive(Debug, thiserror::Error)]
enum KeyError {
    #[error("no routing key within key_timeout")]
    Timeout,
    #[error("the client closed the connection before sending its key")]
    Closed,
    #[error("not a valid PROXY protocol header")]
    BadProxyHeader,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What was learnt from the first bytes.
struct Found {
    key: RoutingKey,
    /// The real client and the address it connected to, from a PROXY header.
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

/// Reads the key of `conn` and routes it; closes it if the key does not come in time.
pub(super) async fn route(shared: Arc<Hub>, conn: Unkeyed) {
    let settings = shared.settings();
    let Unkeyed {
        stream,
        peer,
        local,
        listener,
        permit,
        accepted,
    } = conn;
    let found = async {
        let socket = crate::link::register(stream, Interest::READABLE)?;
        let found = find_key(&socket, &shared, &settings, peer).await?;
        Ok::<_, KeyError>((socket.into_inner(), found))
    };
    let (stream, found) = match tokio::time::timeout(settings.key_timeout, found).await {
        Ok(Ok(result)) => result,
        Ok(Err(err)) => return closed(&shared, &listener, peer, err),
        Err(_) => return closed(&shared, &listener, peer, KeyError::Timeout),
    };
    let mut held = Held::new(
        stream,
        found.peer.or(Some(peer)),
        found.local.or(local),
        listener,
        found.key,
        permit,
    );
    held.accepted = accepted;
    let index = shared.route(held);
    debug!(%peer, index, "routed by {}", settings.routing_key);
}

fn closed(shared: &Hub, listener: &Arc<str>, peer: SocketAddr, err: KeyError) {
    let reason = match err {
        KeyError::Timeout => KeyFailure::Timeout,
        KeyError::Closed => KeyFailure::Closed,
        KeyError::BadProxyHeader => KeyFailure::BadProxyHeader,
        KeyError::Io(_) => KeyFailure::Io,
    };
    shared.metrics.listener(listener).key_failure(reason);
    debug!(%peer, %err, "closing a client connection");
}

async fn find_key(
    socket: &AsyncFd<std::net::TcpStream>,
    shared: &Hub,
    settings: &Settings,
    peer: SocketAddr,
) -> Result<Found, KeyError> {
    let by_peer = || Found {
        key: shared.peer_key(Some(peer)),
        peer: None,
        local: None,
    };
    let http = match settings.routing_key {
        KeySource::PeerIp => return Ok(by_peer()),
        KeySource::ProxyProtocol => None,
        KeySource::XForwardedFor => Some(HttpKeySource::ForwardedFor {
            trusted_hops: settings.trusted_hops,
        }),
        KeySource::Cookie => Some(HttpKeySource::Cookie(settings.key_name.clone())),
        KeySource::Query => Some(HttpKeySource::Query(settings.key_name.clone())),
    };
    let mut buf = vec![0u8; FIRST_PEEK.min(settings.key_max_bytes)];
    loop {
        let mut ready = socket.readable().await?;
        let seen = match ready.get_inner().peek(&mut buf) {
            Ok(0) => return Err(KeyError::Closed),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        if seen == buf.len() && buf.len() < settings.key_max_bytes {
            // More may be waiting: look again with room for it before parsing.
            let bigger = (buf.len() * 2).min(settings.key_max_bytes);
            buf.resize(bigger, 0);
            continue;
        }
        let full = seen == settings.key_max_bytes;
        match &http {
            None => match keysource::proxy_header(&buf[..seen]) {
                Parsed::Complete(header) => {
                    // Consume exactly the header: it is in the buffer, so this does not block.
                    let mut header_bytes = vec![0u8; header.len];
                    let mut stream: &std::net::TcpStream = ready.get_inner();
                    stream.read_exact(&mut header_bytes)?;
                    let client = header.source.unwrap_or(peer);
                    return Ok(Found {
                        key: shared.router.key(Some(client.ip())),
                        peer: header.source,
                        local: header.destination,
                    });
                }
                Parsed::Incomplete if !full => {}
                Parsed::Incomplete | Parsed::Invalid => return Err(KeyError::BadProxyHeader),
            },
            Some(source) => match keysource::http_key(&buf[..seen], source) {
                Parsed::Complete(Some(HttpKey::Address(ip))) => {
                    return Ok(Found {
                        key: shared.router.key(Some(ip)),
                        peer: None,
                        local: None,
                    })
                }
                Parsed::Complete(Some(HttpKey::Token(token))) => {
                    return Ok(Found {
                        key: RoutingKey::from_token(&token),
                        peer: None,
                        local: None,
                    })
                }
                Parsed::Incomplete if !full => {}
                // No key in a complete head, a head too long, or not HTTP: by the peer.
                Parsed::Complete(None) | Parsed::Incomplete | Parsed::Invalid => {
                    return Ok(by_peer())
                }
            },
        }
        // Peeking leaves the bytes queued, so wait for more to arrive, not for "readable".
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::testing::hub;
    use std::io::Write;
    use tokio::sync::Semaphore;

    /// A connected pair on loopback: the dispatcher's end (as accepted) and the client's.
    fn accepted() -> (Unkeyed, std::net::TcpStream) {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (stream, peer) = server.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let conn = Unkeyed {
            stream,
            peer,
            local: None,
            listener: "web".into(),
            permit,
            accepted: Instant::now(),
        };
        (conn, client)
    }

    #[tokio::test]
    async fn a_cookie_sent_in_pieces_routes_by_its_value_and_nothing_is_consumed() {
        let cookie = [
            ("STICKY_DISPATCH_ROUTING_KEY", "cookie"),
            ("STICKY_DISPATCH_KEY_NAME", "io"),
        ];
        let (hub, mut inboxes) = hub(4, &cookie);
        let shared = Arc::new(hub);
        let (conn, mut client) = accepted();
        let routing = tokio::spawn(route(shared.clone(), conn));
        let head = b"GET / HTTP/1.1\r\nHost: t\r\nCookie: a=1; io=abc\r\n\r\n";
        client.write_all(&head[..20]).unwrap();
        tokio::task::yield_now().await;
        client.write_all(&head[20..]).unwrap();
        routing.await.unwrap();
        let key = RoutingKey::from_token(b"abc");
        let index = shared.router.worker_for(&key);
        let mut held = inboxes[index as usize]
            .try_recv()
            .expect("routed by the cookie");
        assert_eq!(held.key, key);
        let mut peeked = vec![0u8; head.len()];
        held.stream.set_nonblocking(false).unwrap();
        held.stream.read_exact(&mut peeked).unwrap();
        assert_eq!(peeked, head, "the worker reads the whole request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_key_timeout_and_counted() {
        let vars = [
            ("STICKY_DISPATCH_ROUTING_KEY", "cookie"),
            ("STICKY_DISPATCH_KEY_NAME", "io"),
        ];
        let (hub, mut inboxes) = hub(2, &vars);
        let shared = Arc::new(hub);
        let (conn, _client) = accepted();
        route(shared.clone(), conn).await;
        assert!(inboxes.iter_mut().all(|inbox| inbox.try_recv().is_err()));
        let text = shared.metrics.encode();
        assert!(
            text.contains(
                "sticky_dispatch_key_read_failures_total{listener=\"web\",reason=\"timeout\"} 1"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_proxy_header_is_consumed_and_gives_the_real_client() {
        let (hub, mut inboxes) = hub(4, &[("STICKY_DISPATCH_ROUTING_KEY", "proxy-protocol")]);
        let shared = Arc::new(hub);
        let (conn, mut client) = accepted();
        client
            .write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 443\r\nGET / HTTP/1.1\r\n\r\n")
            .unwrap();
        route(shared.clone(), conn).await;
        let real: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let index = shared.router.worker_for(&shared.peer_key(Some(real)));
        let mut held = inboxes[index as usize]
            .try_recv()
            .expect("routed by the real client");
        assert_eq!(held.peer, Some(real));
        assert_eq!(held.local, Some("192.0.2.1:443".parse().unwrap()));
        let mut rest = [0u8; 18];
        held.stream.set_nonblocking(false).unwrap();
        held.stream.read_exact(&mut rest).unwrap();
        assert_eq!(
            &rest, b"GET / HTTP/1.1\r\n\r\n",
            "the header is gone, the request is not"
        );
    }
}
