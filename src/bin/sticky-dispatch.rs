//! `sticky-dispatch`: the daemon. Parses the command line, takes the systemd sockets,
//! loads the configuration, and calls the library.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use listenfd::ListenFd;
use sticky_dispatch::cli::{Action, Cli};
use sticky_dispatch::config::{Overrides, Settings};
use sticky_dispatch::dispatcher::{self, Control, HeldOver, Listener, Sockets};
use sticky_dispatch::shared::EX_CONFIG;
use sticky_dispatch::{logging, supervisor};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// The `FileDescriptorName=` of the socket that serves `/metrics` and `/health`
/// (systemd/sticky-dispatch-metrics.socket).
const METRICS_SOCKET: &str = "metrics";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Action::NodeWorker { .. } | Action::WorkerLauncher { .. }) = &cli.action {
        if !cli.listen.is_empty() || cli.workers.is_some() || !cli.metrics_listen.is_empty() {
            let which = match cli.action {
                Some(Action::NodeWorker { .. }) => "node-worker",
                _ => "worker-launcher",
            };
            eprintln!(
                "sticky-dispatch {which}: --listen, --workers and --metrics-listen are the \
                 dispatcher's: this is one worker, whose index comes from \
                 STICKY_DISPATCH_INDEX or its unit's instance name"
            );
            return ExitCode::from(EX_CONFIG);
        }
    }
    if let Some(Action::WorkerLauncher { command, timeouts }) = &cli.action {
        return sticky_dispatch::launcher::main(command.clone(), *timeouts, cli.log_level.clone());
    }
    if let Some(Action::NodeWorker {
        command,
        ack_timeout,
        timeouts,
    }) = &cli.action
    {
        let timeouts = sticky_dispatch::node_bridge::Timeouts {
            ack: *ack_timeout,
            start: timeouts.start_timeout,
            stop: timeouts.stop_timeout,
        };
        return sticky_dispatch::node_bridge::main(
            command.clone(),
            timeouts,
            cli.log_level.clone(),
        );
    }
    if let Some(Action::ReloadWorker { index }) = &cli.action {
        // The argument wins over the environment; set before any thread exists.
        if let Some(index) = index {
            std::env::set_var(sticky_dispatch::worker::INDEX_ENV, index.to_string());
        }
        return sticky_dispatch::reload::reload_worker();
    }
    // Before any thread exists: reading the systemd variables also unsets them.
    let systemd_sockets = take_systemd_sockets();

    if let Some(Action::Manual { dir }) = &cli.action {
        return match sticky_dispatch::manual::write_pages(dir) {
            Ok(pages) => {
                pages.iter().for_each(|page| println!("{}", page.display()));
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("sticky-dispatch: could not write the manual pages: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let overrides = cli.overrides();
    if let Some(Action::Status { metrics }) = cli.action {
        return status(metrics, &overrides);
    }
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

    let logs = logging::init(&settings.log_level);
    raise_fd_limit();
    info!(config = %settings.config_file, logs = logs.destination, version = env!("CARGO_PKG_VERSION"), "starting");
    let sockets = match systemd_sockets.and_then(|sockets| with_listeners(sockets, &settings)) {
        Ok(sockets) if sockets.listeners.is_empty() => {
            error!("no listening sockets: start sticky-dispatch.socket (socket activation), or pass --listen ADDR");
            return ExitCode::from(EX_CONFIG);
        }
        Ok(sockets) => sockets,
        Err(err) => {
            error!("{err:#}");
            return ExitCode::FAILURE;
        }
    };

    // One thread: the dispatcher's work per connection is a few system calls, and tokio's
    // second thread only added futex wake-ups between the two (docs/performance.md:
    // 12.2 -> 9.9 us of CPU per connection at concurrency 32). Workers are other processes.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(%err, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let control = signals(overrides, logs)?;
        if cli.command.is_empty() {
            dispatcher::run(sockets, settings, control).await
        } else {
            supervisor::run(sockets, settings, cli.command, control).await
        }
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            if err.is::<dispatcher::PrefixInUse>() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `sticky-dispatch status`: the table, and whether every worker is up.
fn status(metrics: Option<std::net::SocketAddr>, overrides: &Overrides) -> ExitCode {
    let address = metrics.unwrap_or_else(|| {
        let configured = Settings::load(overrides, std::env::vars())
            .ok()
            .and_then(|settings| settings.metrics_listen.first().copied());
        let mut address =
            configured.unwrap_or_else(|| sticky_dispatch::status::DEFAULT_METRICS.parse().unwrap());
        // A wildcard bind is asked on loopback.
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        address
    });
    match sticky_dispatch::status::fetch(address) {
        Ok(report) => {
            print!("{}", sticky_dispatch::status::render(&report));
            if report.all_up() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("sticky-dispatch status: {err}");
            ExitCode::from(2)
        }
    }
}

/// Every held connection is an fd: use the hard limit, not the historical soft 1024
/// (what systemd recommends daemons do for themselves).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(%err, soft, hard, "could not raise the fd limit");
            }
        }
    }
}

/// The fds systemd passed (`LISTEN_FDS`), by their `FileDescriptorName=`: listening
/// sockets, and client connections a previous instance left in the fd store.
fn take_systemd_sockets() -> anyhow::Result<Sockets> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    std::env::remove_var("LISTEN_FDNAMES");
    let mut names = names.split(':');
    let mut fds = ListenFd::from_env();
    let mut sockets = Sockets::default();
    for index in 0..fds.len() {
        let name = names.next().filter(|name| !name.is_empty());
        let name = name.map_or_else(|| format!("fd{}", index + 3), str::to_owned);
        if dispatcher::is_stored_connection(&name) {
            match take_connection(&mut fds, index) {
                Some(stream) => sockets.held_over.push(HeldOver { stream, name }),
                None => eprintln!(
                    "sticky-dispatch: stored fd {name:?} is not a TCP connection; closing it"
                ),
            }
            continue;
        }
        let socket = fds
            .take_tcp_listener(index)
            .with_context(|| format!("systemd socket {name:?} is not a TCP listener: only TCP (IPv4/IPv6) is supported"))?
            .with_context(|| format!("systemd socket {name:?} was already taken"))?;
        if name == METRICS_SOCKET {
            sockets.metrics.push(socket);
            continue;
        }
        // Consecutive sockets of one name on one address are one listener's lanes, in the
        // socket unit's order (= the group's).
        let address = socket.local_addr().ok();
        match sockets.listeners.last_mut() {
            Some(last)
                if *last.name == *name
                    && last.sockets.first().and_then(|s| s.local_addr().ok()) == address =>
            {
                last.sockets.push(socket);
            }
            _ => sockets.listeners.push(Listener {
                name: name.into(),
                sockets: vec![socket],
            }),
        }
    }
    Ok(sockets)
}

/// A client connection from the fd store. listenfd accepts an AF_INET6 socket when asked
/// for AF_INET, so one call takes IPv4 and IPv6 connections alike.
fn take_connection(fds: &mut ListenFd, index: usize) -> Option<std::net::TcpStream> {
    use nix::libc::{AF_INET, SOCK_STREAM};
    fds.take_custom(index, AF_INET, SOCK_STREAM, "TCP connection")
        .ok()
        .flatten()
}

/// systemd's sockets if there are any, else the configured `listen` addresses.
fn with_listeners(mut sockets: Sockets, settings: &Settings) -> anyhow::Result<Sockets> {
    for addr in &settings.metrics_listen {
        let socket = std::net::TcpListener::bind(addr)
            .with_context(|| format!("could not listen on {addr} for metrics"))?;
        sockets.metrics.push(socket);
    }
    if !sockets.listeners.is_empty() {
        if !settings.listen.is_empty() {
            warn!("sockets came from systemd: ignoring the `listen` addresses");
        }
        return Ok(sockets);
    }
    // On the kernel's path, a lane per worker; else one socket.
    let lanes = settings.kernel_routing().then(|| settings.workers.get());
    for addr in &settings.listen {
        let lanes = dispatcher::bind_lanes(*addr, lanes)
            .with_context(|| format!("could not listen on {addr}"))?;
        sockets.listeners.push(Listener {
            name: Arc::from(addr.to_string()),
            sockets: lanes,
        });
    }
    Ok(sockets)
}

/// Turns signals into dispatcher controls: SIGTERM (systemd's stop) and SIGINT (Ctrl-C)
/// stop it gracefully, and a second one at once; SIGHUP (`systemctl reload`) re-reads the
/// configuration.
fn signals(
    overrides: Overrides,
    logs: logging::LogControl,
) -> anyhow::Result<mpsc::Receiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("could not handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("could not handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("could not handle SIGHUP")?;
    let (control, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let command = tokio::select! {
                _ = term.recv() => { info!("SIGTERM received"); Control::Shutdown }
                _ = int.recv() => { info!("SIGINT received"); Control::Shutdown }
                _ = hup.recv() => match Settings::load(&overrides, std::env::vars()) {
                    Ok(settings) => {
                        logs.set_level(&settings.log_level);
                        Control::Reload(Box::new(settings))
                    }
                    Err(err) => {
                        error!(%err, "reload refused: keeping the running configuration");
                        continue;
                    }
                },
            };
            // After a first stop, keep listening: a second SIGTERM or SIGINT stops at once.
            if control.send(command).await.is_err() {
                return;
            }
        }
    });
    Ok(receiver)
}
