//! Standalone mode: where there is no systemd, the dispatcher spawns the N workers itself,
//! restarts any that exits, and stops them all after its own graceful shutdown.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use crate::config::Settings;
use crate::dispatcher::{self, Control, Sockets, Summary};
use crate::worker;

/// First restart delay after a worker exits; doubled up to `RESTART_MAX` while it keeps
/// failing, so a worker that cannot start does not burn a CPU.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long is considered healthy: its next restart is quick again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Variables a worker must not inherit: they belong to the dispatcher's own unit.
const PRIVATE_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Runs the dispatcher with `command` spawned once per worker index, until it stops.
pub async fn run(
    sockets: Sockets,
    settings: Settings,
    command: Vec<OsString>,
    control: mpsc::Receiver<Control>,
) -> anyhow::Result<Summary> {
    let spawner = Spawner::new(&settings, command)?;
    let (stop, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    for index in 0..settings.workers.get() {
        // Spawn the first round here, so a wrong command fails the start, not a loop.
        let child = spawner.spawn(index)?;
        let supervised = supervise(spawner.clone(), index, child, stop_rx.clone());
        workers.spawn(supervised.instrument(info_span!("worker", index)));
    }
    let shutdown_timeout = settings.shutdown_timeout;
    let summary = dispatcher::run(sockets, settings, control).await;
    // Workers stop after the dispatcher has handed them everything it held.
    stop.send_replace(true);
    let stopped = tokio::time::timeout(shutdown_timeout, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        warn!("workers did not stop within shutdown_timeout: killing them");
        workers.shutdown().await;
    }
    summary
}

#[derive(Clone)]
struct Spawner {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(&'static str, String)>,
}

impl Spawner {
    fn new(settings: &Settings, command: Vec<OsString>) -> anyhow::Result<Spawner> {
        let mut command = command.into_iter();
        let program = command.next().context("no worker command given after --")?;
        let mut env = vec![(worker::SOCKET_PREFIX_ENV, settings.socket_prefix.clone())];
        if !settings.dispatcher_users.is_empty() {
            let uids: Vec<String> = settings
                .dispatcher_users
                .iter()
                .map(|uid| uid.to_string())
                .collect();
            env.push((worker::DISPATCHER_USERS_ENV, uids.join(",")));
        }
        Ok(Spawner {
            program,
            args: command.collect(),
            env,
        })
    }

    fn spawn(&self, index: u32) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(worker::INDEX_ENV, index.to_string())
            // Its own process group: Ctrl-C in a terminal reaches only the dispatcher,
            // which then stops the workers in order.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // ours; it runs in the child between fork and exec. If the dispatcher dies without
        // stopping its workers (SIGKILL, a crash), they get SIGTERM and drain, instead of
        // holding their link sockets against the next run.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        for name in PRIVATE_ENV {
            command.env_remove(name);
        }
        let child = command.spawn().with_context(|| {
            format!(
                "could not start worker {index}: {}",
                self.program.to_string_lossy()
            )
        })?;
        info!(index, pid = child.id(), "worker started");
        Ok(child)
    }
}

/// Keeps worker `index` running until `stop`, then stops it with SIGTERM.
async fn supervise(spawner: Spawner, index: u32, first: Child, mut stop: watch::Receiver<bool>) {
    let mut child = Some(first);
    let mut backoff = RESTART_MIN;
    loop {
        let started = Instant::now();
        if let Some(running) = child.as_mut() {
            tokio::select! {
                status = running.wait() => {
                    let ran = started.elapsed();
                    log_exit(index, status, ran);
                    if ran >= HEALTHY_AFTER {
                        backoff = RESTART_MIN;
                    }
                    child = None;
                }
                _ = crate::wait_until(&mut stop, |stop| *stop) => {
                    terminate(index, running).await;
                    return;
                }
            }
        }
        // Down: wait out the backoff, then start it again.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::wait_until(&mut stop, |stop| *stop) => return,
        }
        backoff = (backoff * 2).min(RESTART_MAX);
        match spawner.spawn(index) {
            Ok(started) => child = Some(started),
            Err(err) => {
                warn!(index, err = format!("{err:#}"), retry_in = ?backoff, "restart failed")
            }
        }
    }
}

fn log_exit(index: u32, status: std::io::Result<ExitStatus>, ran: Duration) {
    match status {
        Ok(status) => warn!(index, %status, ran = ?ran, "worker exited; restarting"),
        Err(err) => warn!(index, %err, "lost track of a worker; restarting"),
    }
}

/// SIGTERM (the worker drains), then wait: `run` bounds the wait with shutdown_timeout.
async fn terminate(index: u32, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match child.wait().await {
        Ok(status) => info!(index, %status, "worker stopped"),
        Err(err) => warn!(index, %err, "could not wait for a worker"),
    }
}
