//! Test doubles shared by the dispatcher's unit tests: a [`Hub`] with real settings and
//! the slots' inboxes, and held connections on real loopback sockets.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::held::Held;
use super::hub::Hub;
use crate::config::{Overrides, Settings};

/// Settings for `workers` workers with `vars` as `STICKY_DISPATCH_*` variables (no file).
pub(super) fn settings(workers: u32, vars: &[(&str, &str)]) -> Settings {
    let empty = std::env::temp_dir().join(format!("sd-unit-test-{}.toml", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let overrides = Overrides {
        config_path: Some(empty),
        workers: Some(workers),
        ..Overrides::default()
    };
    let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Settings::load(&overrides, vars).unwrap()
}

/// A hub for `workers` workers with `vars` as configuration, and each slot's inbox.
pub(super) fn hub(
    workers: u32,
    vars: &[(&str, &str)],
) -> (Hub, Vec<mpsc::UnboundedReceiver<Held>>) {
    // No reloads here: the receiver keeps the last value once the sender is gone.
    let (_, settings) = watch::channel(Arc::new(settings(workers, vars)));
    let (inboxes, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    (
        Hub::new(settings, None, inboxes, &["web".into()]),
        receivers,
    )
}

/// A held connection from `ip` (a real loopback stream, which it owns).
pub(super) fn held(hub: &Hub, ip: &str) -> Held {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
    let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    let permit = Arc::new(tokio::sync::Semaphore::new(1))
        .try_acquire_owned()
        .unwrap();
    let key = hub.peer_key(Some(peer));
    Held::new(stream, Some(peer), None, "web".into(), key, permit)
}
