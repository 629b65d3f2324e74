//! `sticky-dispatch-demo`: an HTTP worker that says who served you. Every response holds
//! the line `worker=<index> pid=<pid> client=<client ip>`.
//!
//! ```text
//! sticky-dispatch-demo                 take connections from the dispatcher (the normal case)
//! sticky-dispatch-demo --direct ADDR   accept on ADDR itself, bound with SO_REUSEPORT
//! ```
//!
//! `--direct` is the benchmarks' baseline: N demo workers sharing one SO_REUSEPORT
//! address, so that the kernel spreads connections among them with no dispatcher (and no
//! stickiness). The index still comes from `STICKY_DISPATCH_INDEX` (or the unit instance).
//!
//! Routes besides the answer above (given for any other path):
//!
//! - `GET /bulk?bytes=N` answers with N bytes (at most 64 MiB; ask again on the same
//!   connection for more);
//! - `POST /bulk` reads the whole request body and answers `received=<bytes>` followed by
//!   the usual lines;
//! - `GET /` from a browser, `GET /client/socket.io.min.js` and socket.io at
//!   `/socket.io/`: a chat page, in [`chat`].

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use sticky_dispatch::logging;
use sticky_dispatch::worker::{ClientInfo, WorkerListener, WorkerOptions};
use tokio::net::{TcpListener, TcpSocket};
use tracing::{error, info};

mod chat;

/// Largest `GET /bulk` answer: one zeroed buffer, shared by every answer.
const BULK_MAX: usize = 64 << 20;
/// Backlog of the `--direct` listening socket (the kernel caps it at somaxconn).
const DIRECT_BACKLOG: u32 = 4096;

#[tokio::main]
async fn main() -> ExitCode {
    let level = std::env::var("STICKY_DISPATCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    logging::init(&level);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let served = match args.as_slice() {
        [] => serve_handed_off().await,
        [flag, address] if flag == "--direct" => match address.parse() {
            Ok(address) => serve_direct(address).await,
            Err(err) => Err(format!("--direct {address:?}: {err}")),
        },
        _ => Err("usage: sticky-dispatch-demo [--direct ADDR]".to_owned()),
    };
    match served {
        Ok(index) => {
            info!(index, "worker stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// The normal case: connections come from the dispatcher over the worker's link socket.
async fn serve_handed_off() -> Result<u32, String> {
    let listener = WorkerListener::bind()
        .await
        .map_err(|err| err.to_string())?;
    let index = listener.index();
    let drained = listener.drained();
    axum::serve(
        listener,
        app(index).into_make_service_with_connect_info::<Client>(),
    )
    .with_graceful_shutdown(drained)
    .await
    .map_err(|err| format!("serving failed: {err}"))?;
    Ok(index)
}

/// The baseline: accept on `address` directly, sharing it with the other workers through
/// SO_REUSEPORT.
async fn serve_direct(address: SocketAddr) -> Result<u32, String> {
    let index = WorkerOptions::from_env()
        .map_err(|err| err.to_string())?
        .index;
    let listener = reuseport_listener(address)
        .map_err(|err| format!("could not listen on {address} with SO_REUSEPORT: {err}"))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    info!(index, address = %local, "listening directly (SO_REUSEPORT)");
    axum::serve(
        listener,
        app(index).into_make_service_with_connect_info::<Client>(),
    )
    .with_graceful_shutdown(stop_signal())
    .await
    .map_err(|err| format!("serving failed: {err}"))?;
    Ok(index)
}

fn reuseport_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(DIRECT_BACKLOG)
}

/// SIGTERM or SIGINT: what stops a `--direct` worker (there is no drain to wait for).
fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

fn app(index: u32) -> axum::Router {
    let routes = axum::Router::new()
        .route("/bulk", get(bulk_download).post(bulk_upload))
        .fallback(whoami);
    chat::add(routes, index).with_state(index)
}

/// Who the client is, whichever way its connection arrived.
#[derive(Clone, Debug)]
struct Client(ClientInfo);

impl Connected<IncomingStream<'_, WorkerListener>> for Client {
    fn connect_info(stream: IncomingStream<'_, WorkerListener>) -> Client {
        Client(stream.remote_addr().clone())
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Client {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Client {
        let local = stream.io().local_addr().ok();
        Client(ClientInfo {
            seq: 0,
            peer: Some(*stream.remote_addr()),
            local,
            // Named like the dispatcher names a --listen socket: by its address.
            listener: Arc::from(local.map_or_else(|| "-".to_owned(), |a| a.to_string())),
        })
    }
}

fn describe(index: u32, client: &ClientInfo) -> String {
    let ip = client
        .peer
        .map_or_else(|| "-".to_owned(), |peer| peer.ip().to_string());
    let local = client
        .local
        .map_or_else(|| "-".to_owned(), |local| local.to_string());
    format!(
        "worker={index} pid={} client={ip}\nlistener={} local={local}\n",
        std::process::id(),
        client.listener
    )
}

async fn whoami(
    State(index): State<u32>,
    ConnectInfo(Client(client)): ConnectInfo<Client>,
) -> String {
    describe(index, &client)
}

/// `GET /bulk?bytes=N`: N bytes of zeros.
async fn bulk_download(uri: Uri) -> Response {
    let requested = uri.query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("bytes="))
            .and_then(|n| n.parse::<usize>().ok())
    });
    match requested {
        Some(n) if n <= BULK_MAX => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from(zeros().slice(..n)),
        )
            .into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            format!("GET /bulk?bytes=N with N at most {BULK_MAX}\n"),
        )
            .into_response(),
    }
}

/// The shared zeroed buffer of `GET /bulk`. Allocated zeroed, so pages that are only read
/// cost no memory.
fn zeros() -> Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS
        .get_or_init(|| Bytes::from(vec![0u8; BULK_MAX]))
        .clone()
}

/// `POST /bulk`: counts the body's bytes.
async fn bulk_upload(
    State(index): State<u32>,
    ConnectInfo(Client(client)): ConnectInfo<Client>,
    mut body: Body,
) -> Response {
    let mut received: u64 = 0;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                }
            }
            Some(Err(err)) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("reading the body: {err}\n"),
                )
                    .into_response()
            }
            None => break,
        }
    }
    format!("received={received}\n{}", describe(index, &client)).into_response()
}
