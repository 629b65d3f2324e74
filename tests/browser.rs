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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WORKERS: u32 = 4;
const MESSAGE: &str = "hello from headless chromium";

/// Chromium and everything it started (its own process group), killed when dropped.
struct Chromium {
    child: Child,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Chromium {
    /// Starts headless Chromium with a fresh profile in `dir`; returns it and its DevTools
    /// browser endpoint (`ws://127.0.0.1:PORT/devtools/browser/ID`).
    fn start(program: &Path, dir: &Path) -> (Chromium, String) {
        let profile = dir.join("profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        let child = Command::new(program)
            .args([
                "--headless",
                // Root has no user namespace sandbox to drop into.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                // Loopback only: no background fetches; anything not on 127.0.0.0/8 would go
                // to a dead proxy and no other name resolves, so nothing leaves the machine.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-pings",
                "--proxy-server=http://127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let chromium = Chromium { child };
        // Chromium writes the port it took and the browser's path once it listens.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + PATIENCE * 3;
        let endpoint = loop {
            let text = std::fs::read_to_string(&active).unwrap_or_default();
            if let [port, path, ..] = text.lines().collect::<Vec<_>>()[..] {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            assert!(
                Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort; its log:\n{}",
                std::fs::read_to_string(dir.join("chromium.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (chromium, endpoint)
    }
}

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
    let (_chromium, endpoint) = Chromium::start(&chromium_program, &dir);
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
