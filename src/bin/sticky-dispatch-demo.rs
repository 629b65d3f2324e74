//! `sticky-dispatch-demo`: an HTTP worker that says who served you. Every response holds
//! the line `worker=<index> pid=<pid> client=<client ip>`.

use std::process::ExitCode;

use axum::extract::{ConnectInfo, State};
use axum::Router;
use sticky_dispatch::logging;
use sticky_dispatch::worker::{ClientInfo, WorkerListener};
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    let level = std::env::var("STICKY_DISPATCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    logging::init(&level);
    let listener = match WorkerListener::bind().await {
        Ok(listener) => listener,
        Err(err) => {
            error!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let index = listener.index();
    let drained = listener.drained();
    let app = Router::new().fallback(whoami).with_state(index);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ClientInfo>(),
    )
    .with_graceful_shutdown(drained)
    .await;
    match served {
        Ok(()) => {
            info!(index, "worker stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!(%err, "serving failed");
            ExitCode::FAILURE
        }
    }
}

async fn whoami(State(index): State<u32>, ConnectInfo(client): ConnectInfo<ClientInfo>) -> String {
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
