//! The operators' listener: `GET /metrics` (Prometheus) and `GET /health` (for a balancer
//! in front), on `metrics_listen` or the systemd socket named `metrics`.
//!
//! It must never compete with hand-offs, so every resource it takes is bounded: at most
//! [`MAX_CONNECTIONS`] at once (the next ones get an immediate 503 and are closed), a
//! request head of at most 8 KiB (hyper answers 431 beyond it), [`HEAD_TIMEOUT`] to send
//! it, [`CONNECTION_TIMEOUT`] in all, and no keep-alive. hyper does the HTTP.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use super::hub::Hub;
use super::phase::Phase;
use super::throttle::Throttle;

/// Scrapers and health checkers served at once; a few are expected, dozens is a fault.
pub(super) const MAX_CONNECTIONS: usize = 32;
/// Time to send the request head: a slow or silent client is cut off.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a whole exchange.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's smallest read buffer, and the most a request head may be.
const MAX_HEAD: usize = 8192;
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The Prometheus text exposition format (0.0.4) the `prometheus` crate writes.
const METRICS_TYPE: &str = prometheus::TEXT_FORMAT;

/// Serves `listener` until the task is dropped (at the dispatcher's exit, so that
/// `/health` says "stopping" until the end).
pub(super) async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Hub>,
    phase: watch::Receiver<Phase>,
) {
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(err) => return warn!(%err, %address, "could not serve metrics"),
    };
    info!(%address, "serving /metrics and /health");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut busy_warning = Throttle::new(WARN_EVERY);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                debug!(%err, "metrics accept failed");
                // EMFILE and the like: the client listeners matter more; back off.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if busy_warning.allow() {
                warn!(
                    max = MAX_CONNECTIONS,
                    "too many connections to the metrics listener: refusing"
                );
            }
            // Best effort, never waiting: the socket buffer of a new connection has room.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 21\r\n\r\ntoo many connections\n",
            );
            continue;
        };
        let (shared, phase) = (shared.clone(), phase.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&request, &shared, &phase);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => debug!(%err, "metrics connection failed"),
                Err(_) => debug!("metrics connection timed out"),
            }
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    shared: &Hub,
    phase: &watch::Receiver<Phase>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, shared.metrics.encode());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_TYPE));
            response
        }
        "/health" => {
            let (healthy, reason) = health(shared, *phase.borrow());
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, reason + "\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics or /health\n".into(),
        ),
    }
}

/// Healthy while running with at least `health_min_workers` workers up; the reason in
/// words either way.
pub(super) fn health(shared: &Hub, phase: Phase) -> (bool, String) {
    if phase >= Phase::Stopping {
        return (false, "stopping".into());
    }
    let live = shared.metrics.totals().live;
    let workers = shared.router.workers().get();
    let min = shared.settings().health_min_workers;
    if live >= u64::from(min) {
        (true, format!("ok: {live}/{workers} workers up"))
    } else {
        (
            false,
            format!("{live}/{workers} workers up, health_min_workers {min}"),
        )
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
