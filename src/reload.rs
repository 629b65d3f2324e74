//! The reload socket, `@<socket_prefix><index>/reload`: how `sticky-dispatch reload-worker
//! N` (a unit's `ExecReload=`) asks worker N's parent process — the Node bridge
//! (`node-worker`) or the worker launcher (`worker-launcher`) — to reload, and learns
//! whether the new process came up, so that `systemctl reload app@N` fails when it did
//! not. `SOCK_SEQPACKET` in the abstract namespace, like the link; one request
//! ([`REQUEST`]), one answer: `reloaded: ... pid P ready`, or `reload failed: WHY`. The
//! parent binds it while it serves, and answers only a process of its own uid or root
//! (SO_PEERCRED). One implementation for both parents: they differ only in what a reload
//! does.

use std::io;
use std::process::ExitCode;

use nix::unistd::Uid;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::link::{self, LinkListener, LinkStream};
use crate::shared::{link_socket_name, EX_CONFIG, HELLO_TIMEOUT};
use crate::worker::WorkerOptions;

/// What `reload-worker` sends.
const REQUEST: &[u8] = b"reload";
/// The start of a successful answer; any other answer is a failure.
const RELOADED: &str = "reloaded: ";
/// The longest answer.
const MAX_ANSWER: usize = 4096;

/// A reload's outcome: what to print (`reloaded: ...`), or why it failed.
pub(crate) type Answer = Result<String, String>;

/// A reload asked over the socket, for the parent process to answer.
pub(crate) struct Request {
    pub(crate) answer: oneshot::Sender<Answer>,
}

/// The reload socket of worker `index` (without the '@').
pub fn socket_name(prefix: &str, index: u32) -> String {
    format!("{}/reload", link_socket_name(prefix, index))
}

/// The parent's bound reload socket; the name is freed when it is dropped.
pub(crate) struct Control {
    listener: LinkListener,
    /// Who may ask: the parent's own uid (the unit's `ExecReload=` runs as its `User=`).
    uid: Uid,
}

impl Control {
    pub(crate) fn bind(options: &WorkerOptions) -> io::Result<Control> {
        let listener = LinkListener::bind(&socket_name(&options.socket_prefix, options.index))?;
        Ok(Control {
            listener,
            uid: Uid::effective(),
        })
    }

    /// Waits for the next connection from an allowed process; others are refused (closed,
    /// and logged). Cancel-safe.
    pub(crate) async fn accept(&self) -> io::Result<LinkStream> {
        loop {
            let stream = self.listener.accept().await?;
            match stream.peer_cred() {
                Ok(peer) if peer.uid == self.uid || peer.uid.is_root() => return Ok(stream),
                Ok(peer) => warn!(
                    uid = peer.uid.as_raw(),
                    pid = peer.pid,
                    "refused a reload request from a process of another user"
                ),
                Err(err) => {
                    warn!(%err, "refused a reload request whose credentials could not be read")
                }
            }
        }
    }
}

/// Serves one connection to the reload socket in a task of its own: reads the request,
/// passes it to the parent through `requests`, and sends the parent's answer back.
pub(crate) fn serve(stream: LinkStream, requests: mpsc::UnboundedSender<Request>) {
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let asked = tokio::time::timeout(HELLO_TIMEOUT, stream.recv(&mut buf)).await;
        match asked {
            Ok(Ok(received)) if &buf[..received.len] == REQUEST => {}
            other => return debug!(?other, "not a reload request: closed"),
        }
        let (answer, outcome) = oneshot::channel();
        if requests.send(Request { answer }).is_err() {
            return;
        }
        let text = match outcome.await {
            Ok(Ok(reloaded)) => reloaded,
            Ok(Err(why)) => format!("reload failed: {why}"),
            Err(_) => "reload failed: the worker stopped".to_owned(),
        };
        let mut end = text.len().min(MAX_ANSWER);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if let Err(err) = stream.send(&text.as_bytes()[..end], None).await {
            debug!(%err, "could not answer a reload request: the asker is gone");
        }
    });
}

/// `sticky-dispatch reload-worker [INDEX]`: asks worker INDEX's parent process (from
/// `STICKY_DISPATCH_INDEX`, set from the argument by the caller, else the unit's instance
/// name) to reload, and waits for the outcome: printed, exit 0 when the new process is
/// ready; 1 when the reload failed or nothing answers.
pub fn reload_worker() -> ExitCode {
    let options = match WorkerOptions::from_env() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("sticky-dispatch reload-worker: {err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let name = socket_name(&options.socket_prefix, options.index);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sticky-dispatch reload-worker: could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ask(&name)) {
        Ok(answer) if answer.starts_with(RELOADED) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "sticky-dispatch reload-worker: worker {}: {answer}",
                options.index
            );
            ExitCode::FAILURE
        }
        Err(err) if link::is_absent(&err) => {
            eprintln!(
                "sticky-dispatch reload-worker: nothing listens on @{name}: worker {} is not \
                 a running node-worker or worker-launcher that is ready (a worker run \
                 directly cannot reload in place; or it runs with another socket_prefix: \
                 set STICKY_DISPATCH_SOCKET_PREFIX as for the worker)",
                options.index
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("sticky-dispatch reload-worker: asking @{name}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Sends the request to `@name` and waits for the answer: the parent gives one within its
/// `--start-timeout`.
async fn ask(name: &str) -> io::Result<String> {
    let stream = LinkStream::connect(name)?;
    stream.send(REQUEST, None).await?;
    let mut buf = vec![0u8; MAX_ANSWER];
    let received = stream.recv(&mut buf).await?;
    if received.len == 0 {
        return Ok("reload failed: the worker closed the reload socket without an answer (it stopped or crashed)".to_owned());
    }
    Ok(String::from_utf8_lossy(&buf[..received.len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_socket_is_named_after_the_link_socket() {
        assert_eq!(
            socket_name("sticky-dispatch/", 3),
            "sticky-dispatch/3/reload"
        );
    }

    /// A request over the socket reaches the parent's side, and its answer, success or
    /// failure, comes back to the asker.
    #[tokio::test]
    async fn a_request_is_answered_with_the_parents_outcome() {
        let options = WorkerOptions {
            index: 7,
            socket_prefix: format!("sticky-dispatch-unit/{}/reload/", std::process::id()),
            dispatcher_users: Vec::new(),
            drain_on_sigterm: false,
        };
        let name = socket_name(&options.socket_prefix, options.index);
        assert!(link::is_absent(&ask(&name).await.unwrap_err()));
        let control = Control::bind(&options).unwrap();
        let (requests, mut asked) = mpsc::unbounded_channel();
        let parent = tokio::spawn(async move {
            for outcome in [
                Ok("reloaded: node pid 42 ready".to_owned()),
                Err("it exited".to_owned()),
            ] {
                serve(control.accept().await.unwrap(), requests.clone());
                let request: Request = asked.recv().await.unwrap();
                request.answer.send(outcome).unwrap();
            }
        });
        assert_eq!(ask(&name).await.unwrap(), "reloaded: node pid 42 ready");
        assert_eq!(ask(&name).await.unwrap(), "reload failed: it exited");
        parent.await.unwrap();
    }
}
