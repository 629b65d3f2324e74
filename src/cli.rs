//! The daemon's command line, in the library so that the manual page is generated from
//! the same definition (`sticky-dispatch manual DIR`) and cannot drift from it.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

/// Sticky-session dispatcher: sends every client's TCP connections to the same worker.
///
/// Under systemd it takes its listening sockets from sticky-dispatch.socket and hands
/// connections to app@N.service. With --listen and a COMMAND it runs standalone,
/// spawning COMMAND once per worker with STICKY_DISPATCH_INDEX set.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A subcommand, instead of running the dispatcher.
    #[command(subcommand)]
    pub action: Option<Action>,

    /// Configuration file [default: /etc/sticky-dispatch/config.toml]
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "STICKY_DISPATCH_CONFIG"
    )]
    pub config: Option<PathBuf>,

    /// Listen on ADDR (e.g. 127.0.0.1:8080, `[::1]:8080`, localhost:8080: every address
    /// the name resolves to) instead of taking sockets from systemd (repeatable)
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Number of workers (overrides `workers` in the configuration)
    #[arg(long, global = true, value_name = "N")]
    pub workers: Option<u32>,

    /// Log filter such as `info` or `sticky_dispatch=debug` (overrides `log_level`)
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Serve GET /metrics and GET /health on ADDR (repeatable; overrides `metrics_listen`)
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_listen: Vec<String>,

    /// Standalone mode: the worker command, spawned once per index
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Validate the configuration, print the effective settings, and exit
    CheckConfig,
    /// Show a running dispatcher's workers (from its /metrics and /health). Exit status 0
    /// when every worker is up, 1 when one is down, 2 when the dispatcher cannot be asked
    Status {
        /// Where the dispatcher serves /metrics [default: the first `metrics_listen`
        /// address, else 127.0.0.1:9191, the port of sticky-dispatch-metrics.socket]
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Write the manual pages sticky-dispatch(8) and sticky-dispatch.toml(5) into DIR
    #[command(hide = true)]
    Manual {
        /// Directory to write the pages into
        dir: PathBuf,
    },
    /// Be worker N for a Node.js app: start COMMAND (e.g. `node app.js`) with Node's IPC
    /// channel and pass that channel to the dispatcher, which hands Node each connection;
    /// ready when the app is (docs/node.md)
    NodeWorker {
        /// How long Node may leave connections sent to it unread before it is treated as
        /// dead (killed; the dispatcher re-sends what it had not acknowledged)
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
        ack_timeout: std::time::Duration,
        /// --start-timeout and --stop-timeout
        #[command(flatten)]
        timeouts: ProcessTimeouts,
        /// The Node.js command and its arguments
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<OsString>,
    },
    /// Be worker N for an app that uses the Rust or Python worker library: hold the link
    /// socket and run COMMAND (e.g. `sticky-dispatch-demo`) with a copy of it, so that the
    /// worker can reload in place (SIGHUP or reload-worker N): a new process starts, and
    /// the old one drains once the new one is ready (docs/operations.md)
    WorkerLauncher {
        /// --start-timeout and --stop-timeout
        #[command(flatten)]
        timeouts: ProcessTimeouts,
        /// The worker's command and its arguments
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<OsString>,
    },
    /// Reload worker N in place (the unit's ExecReload=): its node-worker bridge or
    /// worker-launcher starts a new process and retires the old one once the new one is
    /// ready. Prints the outcome; exit status 1 when the new process failed (the old one
    /// keeps serving) or nothing answers
    ReloadWorker {
        /// The worker index [default: STICKY_DISPATCH_INDEX, else the unit's instance name]
        index: Option<u32>,
    },
}

/// How long node-worker and worker-launcher wait for the processes they start.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct ProcessTimeouts {
    /// How long a reload's new process may take to say it is ready; then the reload fails
    /// (the new process is killed) and the old process keeps serving
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub start_timeout: std::time::Duration,
    /// How long a process may take to exit once told to stop (SIGTERM: it drains); then
    /// SIGKILL
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stop_timeout: std::time::Duration,
}

impl Cli {
    /// The command-line layer of the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config_path: self.config.clone(),
            listen: self.listen.clone(),
            workers: self.workers,
            log_level: self.log_level.clone(),
            metrics_listen: self.metrics_listen.clone(),
            spawns_workers: !self.command.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bridge waits for Node longer than Node's own drain default, so a Node app that
    /// drains in its own time is not killed half way.
    #[test]
    fn the_bridge_stop_timeout_outlasts_the_apps_drain() {
        let cli = Cli::try_parse_from(["sticky-dispatch", "node-worker", "--", "node", "app.js"])
            .unwrap();
        let Some(Action::NodeWorker { timeouts, .. }) = cli.action else {
            panic!("parsed as {:?}", cli.action);
        };
        assert!(timeouts.stop_timeout > crate::shared::APP_DRAIN_TIMEOUT);
    }

    /// The launcher takes the same timeouts as the bridge, and everything after `--` is the
    /// worker's command, its flags included.
    #[test]
    fn the_launcher_takes_the_bridges_timeouts_and_a_command() {
        let cli = Cli::try_parse_from([
            "sticky-dispatch",
            "worker-launcher",
            "--start-timeout",
            "5s",
            "--",
            "app",
            "--stop-timeout",
            "1s",
        ])
        .unwrap();
        let Some(Action::WorkerLauncher { timeouts, command }) = cli.action else {
            panic!("parsed as {:?}", cli.action);
        };
        assert_eq!(timeouts.start_timeout, std::time::Duration::from_secs(5));
        assert!(timeouts.stop_timeout > crate::shared::APP_DRAIN_TIMEOUT);
        assert_eq!(command, ["app", "--stop-timeout", "1s"]);
    }
}
