//! `systemctl reload` (SIGHUP): live keys apply at once; a changed restart-only key keeps
//! its running value, and the log and `STATUS=` say a restart is needed for it.

mod common;

use std::process::Command;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn reload_reports_restart_only_keys_in_status_until_they_match_again() {
    let dir = scratch_dir("reload");
    let config = dir.join("config.toml");
    std::fs::write(&config, "workers = 2\npending_timeout = \"30s\"\n").unwrap();
    let mut notify = NotifySocket::bind(&dir);
    let mut command = Command::new(DISPATCHER);
    command
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("STICKY_DISPATCH_SOCKET_PREFIX", unique_prefix("reload"));
    let mut dispatcher = Running::spawn(command, "dispatcher");
    notify.wait_for("READY=1");
    let first = notify.seen.len();

    std::fs::write(&config, "workers = 3\npending_timeout = \"5s\"\n").unwrap();
    dispatcher.signal(Signal::SIGHUP);
    let status = notify.wait_until("STATUS= naming workers", |line| {
        line.starts_with("STATUS=") && line.contains("restart needed for workers")
    });
    assert!(status.starts_with("STATUS=0/2 workers live"), "{status}");
    let reloading = notify.seen[first..]
        .iter()
        .flat_map(|d| d.lines())
        .any(|l| l == "RELOADING=1");
    assert!(reloading, "no RELOADING=1 in {:?}", notify.seen);
    let warned = dispatcher
        .log
        .wait_for(&["takes effect at the next restart"]);
    assert!(warned.contains("workers"), "{warned}");
    let applied = dispatcher.log.wait_for(&["configuration reloaded"]);
    assert!(applied.contains("pending_timeout"), "{applied}");

    // Back to the running value: the note goes away (only notifications from now count).
    notify.seen.clear();
    std::fs::write(&config, "workers = 2\npending_timeout = \"5s\"\n").unwrap();
    dispatcher.signal(Signal::SIGHUP);
    dispatcher.log.wait_count(&["configuration reloaded"], 2);
    let status = notify.wait_until("STATUS= without the note", |line| {
        line.starts_with("STATUS=") && !line.contains("restart needed")
    });
    assert!(status.starts_with("STATUS=0/2 workers live"), "{status}");

    dispatcher.signal(Signal::SIGTERM);
    assert!(dispatcher.wait().success());
}
