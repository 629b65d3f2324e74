//! A bad configuration stops the daemon with status 78 (EX_CONFIG), naming the key and
//! where it came from, so that systemd's RestartPreventExitStatus=78 ends a restart loop.

mod common;

use std::process::{Command, Output};

use common::*;

fn run(args: &[&str], config: &str, env: &[(&str, &str)]) -> (Output, String) {
    let dir = scratch_dir("config");
    let path = dir.join(format!("config-{}.toml", config.len()));
    std::fs::write(&path, config).unwrap();
    let output = Command::new(DISPATCHER)
        .args(args)
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (output, path.display().to_string())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_value_exits_78_naming_key_and_file() {
    for args in [&["check-config"][..], &["--listen", "127.0.0.1:0"][..]] {
        let (output, path) = run(args, "workers = \"many\"\n", &[]);
        assert_eq!(
            output.status.code(),
            Some(78),
            "{args:?}: {}",
            stderr(&output)
        );
        let message = stderr(&output);
        assert!(message.contains("`workers`"), "{message}");
        assert!(message.contains(&path), "{message}");
    }
}

#[test]
fn an_unknown_key_exits_78_naming_it() {
    let (output, path) = run(&["--listen", "127.0.0.1:0"], "wrokers = 4\n", &[]);
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert!(
        message.contains("wrokers") && message.contains(&path),
        "{message}"
    );
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let (output, _) = run(
        &["check-config"],
        "",
        &[("STICKY_DISPATCH_IPV4_PREFIX", "33")],
    );
    assert_eq!(output.status.code(), Some(78));
    let message = stderr(&output);
    assert!(message.contains("STICKY_DISPATCH_IPV4_PREFIX"), "{message}");
}

#[test]
fn a_missing_config_file_is_named() {
    let output = Command::new(DISPATCHER)
        .args(["check-config", "--config", "/nonexistent/sticky.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("/nonexistent/sticky.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_config_prints_the_effective_settings() {
    let (output, _) = run(
        &["check-config", "--workers", "7"],
        "on_worker_down = \"failover\"\nworkers = 3\n",
        &[("STICKY_DISPATCH_PENDING_TIMEOUT", "5s")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("workers = 7"),
        "command line wins: {printed}"
    );
    assert!(
        printed.contains("on_worker_down = \"failover\""),
        "{printed}"
    );
    assert!(printed.contains("pending_timeout = \"5s\""), "{printed}");
}

#[test]
fn the_shipped_config_file_checks_clean() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/config.toml");
    let output = Command::new(DISPATCHER)
        .args(["check-config", "--config", shipped])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}
