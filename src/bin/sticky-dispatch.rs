//! `sticky-dispatch`: the daemon. Parses the command line, takes the systemd sockets,
//! loads the configuration, and calls the library.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use listenfd::ListenFd;
use sticky_dispatch::config::{Overrides, Settings};
use sticky_dispatch::dispatcher::{self, Listener};
use sticky_dispatch::{logging, supervisor};
use tracing::{error, info, warn};

/// EX_CONFIG from sysexits.h: systemd's unit uses `RestartPreventExitStatus=78`, so a bad
/// configuration fails once instead of restart-looping.
const EX_CONFIG: u8 = 78;

/// Sticky-session dispatcher: sends every client's TCP connections to the same worker.
///
/// Under systemd it takes its listening sockets from sticky-dispatch.socket and hands
/// connections to app@N.service. With --listen and a COMMAND it runs standalone,
/// spawning COMMAND once per worker with STICKY_DISPATCH_INDEX set.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    action: Option<Action>,

    /// Configuration file [default: /etc/sticky-dispatch/config.toml]
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "STICKY_DISPATCH_CONFIG"
    )]
    config: Option<PathBuf>,

    /// Listen on ADDR instead of taking sockets from systemd (repeatable)
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Vec<SocketAddr>,

    /// Number of workers (overrides `workers` in the configuration)
    #[arg(long, global = true, value_name = "N")]
    workers: Option<u32>,

    /// Log filter such as `info` or `sticky_dispatch=debug` (overrides `log_level`)
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    /// Standalone mode: the worker command, spawned once per index
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Validate the configuration, print the effective settings, and exit
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: reading the systemd variables also unsets them.
    let systemd_sockets = take_systemd_sockets();

    let overrides = Overrides {
        config_path: cli.config.clone(),
        listen: cli.listen.clone(),
        workers: cli.workers,
        log_level: cli.log_level.clone(),
    };
    let settings = match Settings::load(&overrides, std::env::vars()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("sticky-dispatch: configuration error: {err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Some(Action::CheckConfig) = cli.action {
        print!("{settings}");
        eprintln!("configuration OK ({})", settings.config_file);
        return ExitCode::SUCCESS;
    }

    let destination = logging::init(&settings.log_level);
    info!(config = %settings.config_file, logs = destination, version = env!("CARGO_PKG_VERSION"), "starting");
    let listeners = match systemd_sockets.and_then(|sockets| listeners(sockets, &settings)) {
        Ok(listeners) if listeners.is_empty() => {
            error!("no listening sockets: start sticky-dispatch.socket (socket activation), or pass --listen ADDR");
            return ExitCode::from(EX_CONFIG);
        }
        Ok(listeners) => listeners,
        Err(err) => {
            error!("{err:#}");
            return ExitCode::FAILURE;
        }
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(%err, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        if cli.command.is_empty() {
            dispatcher::run(listeners, settings, shutdown).await
        } else {
            supervisor::run(listeners, settings, cli.command, shutdown).await
        }
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sockets systemd passed (`LISTEN_FDS`), with their `FileDescriptorName=`s.
fn take_systemd_sockets() -> anyhow::Result<Vec<Listener>> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    std::env::remove_var("LISTEN_FDNAMES");
    let mut names = names.split(':');
    let mut fds = ListenFd::from_env();
    (0..fds.len())
        .map(|index| {
            let name = names.next().filter(|name| !name.is_empty());
            let name = name.map_or_else(|| format!("fd{}", index + 3), str::to_owned);
            let socket = fds
                .take_tcp_listener(index)
                .with_context(|| format!("systemd socket {name:?} is not a TCP listener: only TCP (IPv4/IPv6) is supported"))?
                .with_context(|| format!("systemd socket {name:?} was already taken"))?;
            Ok(Listener {
                name: name.into(),
                socket,
            })
        })
        .collect()
}

/// systemd's sockets if there are any, else the configured `listen` addresses.
fn listeners(systemd: Vec<Listener>, settings: &Settings) -> anyhow::Result<Vec<Listener>> {
    if !systemd.is_empty() {
        if !settings.listen.is_empty() {
            warn!("sockets came from systemd: ignoring the `listen` addresses");
        }
        return Ok(systemd);
    }
    settings
        .listen
        .iter()
        .map(|addr| {
            let socket = std::net::TcpListener::bind(addr)
                .with_context(|| format!("could not listen on {addr}"))?;
            Ok(Listener {
                name: Arc::from(addr.to_string()),
                socket,
            })
        })
        .collect()
}

/// Resolves on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("could not handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("could not handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}
