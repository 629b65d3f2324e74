//! SO_PEERCRED on both ends of the link: a process of another uid that holds a worker's
//! socket name receives no client connection, and one that connects to a worker cannot
//! inject a connection.

mod common;

use std::process::Command;

use common::*;

const NOBODY: &str = "65534";

fn as_nobody(program: &std::path::Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(program);
    command
}

/// A Python uid 65534 can run: a pyenv shim under /root is not reachable for it.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The demo binary, copied where uid 65534 can run it (/root is not searchable).
fn demo_for_nobody(dir: &std::path::Path) -> std::path::PathBuf {
    let copy = dir.join("demo");
    std::fs::copy(DEMO, &copy).unwrap();
    copy
}

#[test]
#[ignore = "needs root: runs an impostor under another uid"]
fn an_impostor_holding_a_worker_name_receives_no_connection() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "changing uid needs root"
    );
    // One worker, so every client belongs to worker 0; a short pending_timeout so the
    // client is closed rather than held while the impostor sits on the name.
    let alone = Alone::start(
        "impostor-listens",
        1,
        &[("STICKY_DISPATCH_PENDING_TIMEOUT", "1s")],
    );
    let (dispatcher, addr) = (&alone.dispatcher, alone.addr);
    let mut impostor = as_nobody(&demo_for_nobody(&scratch_dir("impostor-listens")));
    impostor
        .env("STICKY_DISPATCH_INDEX", "0")
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &alone.prefix)
        .env("STICKY_DISPATCH_DISPATCHER_USERS", "0");
    let impostor = Running::spawn(impostor, "impostor");
    impostor.log.wait_for(&["worker ready"]);
    dispatcher.log.wait_for(&[
        "refused the worker link",
        "uid 65534",
        "not in worker_users",
    ]);

    let refused = request(client_ip(1), addr);
    assert!(refused.is_err(), "the impostor answered: {refused:?}");
    // Closed by the dispatcher for want of its worker: after pending_timeout, or at once
    // when worker 0 (never up) has been down longer than that by the time it arrives
    // (how long the impostor took to start decides which).
    dispatcher
        .log
        .wait_for(&["closing a client connection", "pending_timeout"]);
    assert_eq!(
        impostor.log.count(&["link up"]),
        0,
        "{}",
        impostor.log.text()
    );
    drop(impostor);

    // The real worker (our uid) takes the name and the clients.
    let _real = alone.start_worker(0);
    assert_eq!(request(client_ip(1), addr).unwrap().worker, 0);
}

#[test]
#[ignore = "needs root: runs a process under another uid"]
fn a_process_of_another_uid_cannot_inject_a_connection() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "changing uid needs root"
    );
    let prefix = unique_prefix("impostor-connects");
    let mut worker = Command::new(DEMO);
    worker
        .env("STICKY_DISPATCH_INDEX", "0")
        .env("STICKY_DISPATCH_SOCKET_PREFIX", &prefix);
    let worker = Running::spawn(worker, "worker");
    worker.log.wait_for(&["worker ready"]);

    // A fake dispatcher as uid 65534: it connects, says HELLO and sends a CONN with an fd.
    let script = r#"
import array, socket, sys
link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
link.connect("\0" + sys.argv[1] + "0")
link.send(bytes([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
victim = socket.socket()
conn = bytes([1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
try:
    link.sendmsg([conn], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [victim.fileno()]))])
    print("sent", flush=True)
    print("reply", link.recv(512), flush=True)
except OSError as err:
    print("refused", err, flush=True)
"#;
    let output = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "--",
            python(),
            "-c",
            script,
        ])
        .arg(&prefix)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    worker.log.wait_for(&["refused a link", "uid=65534"]);
    assert!(
        !printed.contains("reply b'\\x01"),
        "the worker answered the impostor: {printed}"
    );
    assert_eq!(worker.log.count(&["link up"]), 0, "{}", worker.log.text());
}
