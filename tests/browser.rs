//! A real browser through the dispatcher: headless Chromium (Debian's `chromium`, installed
//! by the test when missing and root; ignored unless asked for, as it may need root) loads the
//! demo's page, whose chat connects with the socket.io browser client, sends a message as a
//! person would (typing, Enter) and sees it come back. `tests/node/browser.js` drives
//! Chromium over the DevTools protocol. The screenshot is kept as
//! `target/test-artifacts/browser.png`.

mod common;
#[path = "node/support.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const WORKERS: u32 = 4;
const MESSAGE: &str = "hello from headless chromium";

/// `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs root (apt-get install chromium when missing) or chromium installed"]
fn a_browser_chats_through_the_dispatcher() {
    let chromium_program =
        support::debian_program("chromium", "chromium").unwrap_or_else(|why| panic!("{why}"));
    support::npm_ci();
    let client_js = support::node_dir().join("node_modules/socket.io-client/dist/socket.io.min.js");
    let client_js = client_js.to_str().unwrap();
    let (dispatcher, addr) = standalone(
        "browser",
        WORKERS,
        &[("DEMO_SOCKETIO_CLIENT_JS", client_js)],
    );
    let dispatcher = support::Graceful(dispatcher);
    dispatcher
        .0
        .log
        .wait_count(&["worker link up"], WORKERS as usize);
    let dir = scratch_dir("browser");
    let (_chromium, endpoint) = support::Chromium::start(&chromium_program, &dir);
    let screenshot = artifacts_dir().join("browser.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = support::node(
        "browser.js",
        &[
            endpoint,
            format!("http://{addr}/?room=browser-test"),
            screenshot.display().to_string(),
            MESSAGE.to_owned(),
        ],
        Duration::from_secs(120),
    );
    let seen = |key: &str| {
        out.stdout
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in\n{}\n{}", out.stdout, out.stderr))
            .to_owned()
    };
    println!("{}", out.stdout.trim_end());
    println!("screenshot: {}", screenshot.display());
    // Chromium connects from 127.0.0.1: the page and the socket.io session are both
    // served by the worker that client maps to.
    let browser = Ipv4Addr::LOCALHOST;
    let worker = format!("worker={}", expected_worker(browser, WORKERS));
    let who = seen("who");
    assert!(who.starts_with(&format!("{worker} ")), "{who}");
    assert!(who.ends_with(&format!(" client={browser}")), "{who}");
    assert!(
        seen("hello").starts_with(&format!("{worker} ")),
        "{}",
        out.stdout
    );
    assert_eq!(seen("state"), "joined", "{}\n{}", out.stdout, out.stderr);
    assert_eq!(seen("echoed"), "true", "{}\n{}", out.stdout, out.stderr);
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
}
