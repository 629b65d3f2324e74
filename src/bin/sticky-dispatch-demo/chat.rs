//! The demo's socket.io chat (socketioxide) and the page at `/` that shows which worker
//! serves you.
//!
//! - `GET /` from a browser (`Accept: text/html`): an HTML page holding the usual
//!   `worker=<index> pid=<pid> client=<ip>` lines and a small chat. Anything else asking
//!   for `/` (curl, the tests) gets the plain-text lines, like every other path.
//! - `GET /client/socket.io.min.js`: the socket.io browser client, read at start from the file
//!   named by `DEMO_SOCKETIO_CLIENT_JS`: npm's `socket.io-client/dist/socket.io.min.js`.
//!   socketioxide serves no client and the repository vendors none; without the file the
//!   page says the chat is unavailable. (The path cannot start with `/socket.io`, where
//!   socketioxide answers everything; the variable is not named `STICKY_DISPATCH_*`,
//!   which the dispatcher reads, and refuses, as its own configuration.)
//! - socket.io at the standard `/socket.io/`, namespace `/`:
//!   - on connect the server emits `hello` with the `worker=… pid=… client=…` line;
//!   - `join(room)` puts the socket in `room` and acknowledges with that line;
//!   - `message({room, text})` is sent to everyone in `room`, the sender included, as
//!     `message({room, text, from, worker})`.
//!
//! Rooms live in each worker's memory (socketioxide's local adapter): clients in the
//! same room but on different workers do not see each other. That is why a socket.io
//! server behind several processes needs sticky sessions in the first place; rooms that
//! span workers need a shared adapter (Redis and the like), which a demo does without.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;
use tracing::{debug, info, warn};

use super::{describe, Client};

/// Where the socket.io browser client is (a file from npm's `socket.io-client`).
const CLIENT_JS_ENV: &str = "DEMO_SOCKETIO_CLIENT_JS";
/// Room names and message texts longer than this are refused (it is a demo, not storage).
const MAX_TEXT: usize = 1000;
const PAGE: &str = include_str!("page.html");

/// Adds the page, the client script and socket.io to the demo's routes.
pub(super) fn add(routes: Router<u32>, index: u32) -> Router<u32> {
    let (layer, io) = SocketIo::new_layer();
    io.ns("/", move |socket: SocketRef| on_connect(socket, index));
    let client_js = load_client_js(index);
    routes
        .route("/", get(page))
        .route(
            "/client/socket.io.min.js",
            get(move || std::future::ready(serve_client_js(client_js.clone()))),
        )
        .layer(layer)
}

/// `GET /`: the page for browsers, the plain lines for everyone else.
async fn page(
    State(index): State<u32>,
    ConnectInfo(Client(client)): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Response {
    let who = describe(index, &client);
    let wants_html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|kind| kind.trim().starts_with("text/html"));
    if wants_html {
        Html(PAGE.replace("{{WHO}}", &escape_html(&who))).into_response()
    } else {
        who.into_response()
    }
}

/// The socket.io client's bytes, or why there are none.
/// The socket.io browser client. Its absence is normal (the repository ships none) and
/// said once, by worker 0, rather than warned by every worker.
fn load_client_js(index: u32) -> Result<Bytes, String> {
    let Some(path) = std::env::var_os(CLIENT_JS_ENV) else {
        if index == 0 {
            info!(
                "the demo page works; its chat box needs the socket.io browser client, which \
                 this repository does not ship: to enable it, set {CLIENT_JS_ENV} to \
                 socket.io-client/dist/socket.io.min.js (`npm ci --prefix tests/node` puts it \
                 in tests/node/node_modules/)"
            );
        }
        return Err(format!(
            "no socket.io client: set {CLIENT_JS_ENV} to npm's socket.io-client/dist/socket.io.min.js\n"
        ));
    };
    let shown = path.to_string_lossy().into_owned();
    match std::fs::read(&path) {
        Ok(bytes) => {
            info!(path = %shown, "serving the socket.io client");
            Ok(Bytes::from(bytes))
        }
        Err(err) => {
            warn!(%err, path = %shown, "could not read the socket.io client");
            Err(format!(
                "could not read the socket.io client {shown}: {err}\n"
            ))
        }
    }
}

fn serve_client_js(client_js: Result<Bytes, String>) -> Response {
    match client_js {
        Ok(bytes) => (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            bytes,
        )
            .into_response(),
        Err(why) => (StatusCode::NOT_FOUND, why).into_response(),
    }
}

/// What a client sends.
#[derive(Debug, Deserialize)]
struct Incoming {
    room: String,
    text: String,
}

/// What everyone in the room receives.
#[derive(Debug, Serialize)]
struct Outgoing {
    room: String,
    text: String,
    /// The sender's socket.io id.
    from: String,
    /// The worker that relayed it.
    worker: u32,
}

fn on_connect(socket: SocketRef, index: u32) {
    let who = socket
        .req_parts()
        .extensions
        .get::<ConnectInfo<Client>>()
        .map(|ConnectInfo(Client(client))| describe(index, client))
        .and_then(|lines| lines.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("worker={index} pid={} client=-", std::process::id()));
    debug!(sid = %socket.id, %who, "socket.io client connected");
    if let Err(err) = socket.emit("hello", &who) {
        debug!(%err, "could not greet a socket.io client");
    }
    socket.on(
        "join",
        move |socket: SocketRef, Data(room): Data<String>, ack: AckSender| {
            if room.len() <= MAX_TEXT {
                socket.join(room);
                let _ = ack.send(&who);
            }
        },
    );
    socket.on(
        "message",
        move |socket: SocketRef, Data(message): Data<Incoming>| async move {
            if message.room.len() > MAX_TEXT || message.text.len() > MAX_TEXT {
                return;
            }
            let outgoing = Outgoing {
                from: socket.id.to_string(),
                worker: index,
                room: message.room,
                text: message.text,
            };
            let room = outgoing.room.clone();
            if let Err(err) = socket.within(room).emit("message", &outgoing).await {
                debug!(%err, "could not relay a chat message");
            }
        },
    );
}

fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}
