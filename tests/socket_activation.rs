//! Socket activation as systemd does it: the listeners arrive as fds 3 and 4 with
//! LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, and the dispatcher reports over NOTIFY_SOCKET.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

#[test]
fn listeners_from_systemd_and_notifications_to_it() {
    let dir = scratch_dir("activation");
    let prefix = unique_prefix("activation");
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = std::net::TcpListener::bind("[::1]:0").ok();
    let v4_addr = v4.local_addr().unwrap();
    let mut notify = NotifySocket::bind(&dir);

    let mut fds: Vec<RawFd> = vec![v4.as_raw_fd()];
    let mut names = vec!["web"];
    if let Some(v6) = &v6 {
        fds.push(v6.as_raw_fd());
        names.push("web6");
    }
    // LISTEN_PID must be the dispatcher's own pid: `exec` from a shell keeps the pid.
    let mut command = Command::new("/bin/sh");
    command
        .args([
            "-c",
            "LISTEN_PID=$$ exec \"$0\" \"$@\"",
            DISPATCHER,
            "--workers",
            "2",
        ])
        .arg("--config")
        .arg(empty_config(&dir))
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
    // Copies above 100 first, so that no source fd is itself 3 or 4 in the child.
    let high: Vec<RawFd> = fds
        .iter()
        .map(|&fd| {
            // SAFETY: plain fcntl on an fd we own; the copy is close-on-exec.
            let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
            assert!(copy >= 100);
            copy
        })
        .collect();
    let targets = high.clone();
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec, placing
    // the listeners at fds 3, 4 as systemd does (dup2 also clears close-on-exec).
    unsafe {
        command.pre_exec(move || {
            for (i, &fd) in targets.iter().enumerate() {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut dispatcher = Running::spawn(command, "dispatcher");
    for fd in high {
        // SAFETY: closing our own copies, made above and used by no one else.
        unsafe { libc::close(fd) };
    }
    assert_eq!(notify.wait_for("READY="), "READY=1");
    let status = notify.wait_for("STATUS=");
    assert!(status.contains("workers live"), "{status}");

    // The workers, started the way systemd starts app@0 and app@1.
    let workers: Vec<Running> = (0..2)
        .map(|index| {
            let mut command = Command::new(DEMO);
            command
                .env("STICKY_DISPATCH_INDEX", index.to_string())
                .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
            Running::spawn(command, "worker")
        })
        .collect();
    for worker in &workers {
        worker.log.wait_for(&["worker ready"]);
    }

    let answer = request(client_ip(7), v4_addr).unwrap();
    assert_eq!(answer.listener, "web", "FileDescriptorName kept");
    assert_eq!(answer.client, client_ip(7).to_string());
    if let Some(v6) = &v6 {
        let answer = request(client_ip(0), v6.local_addr().unwrap()).unwrap();
        assert_eq!(answer.listener, "web6");
        assert_eq!(answer.client, "::1");
    }
    // STATUS follows the counts.
    let status = notify.wait_for("STATUS=2/2 workers live");
    assert!(status.contains("handed off"), "{status}");

    dispatcher.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(notify.wait_for("STOPPING="), "STOPPING=1");
    assert!(dispatcher.wait().success());
    dispatcher.log.wait_for(&["dispatcher stopped"]);
}

#[test]
fn without_sockets_it_says_so_and_exits_78() {
    let dir = scratch_dir("nosockets");
    let output = Command::new(DISPATCHER)
        .arg("--config")
        .arg(empty_config(&dir))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no listening sockets"), "{stderr}");
}
