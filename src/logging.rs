//! Log setup for the binaries: journald (with structured fields) when stderr is connected
//! to the journal, as under systemd; plain stderr otherwise.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (an `EnvFilter` directive such as `info` or
/// `sticky_dispatch=debug`). Returns where logs go, for the first log line.
pub fn init(level: &str) -> &'static str {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            registry.with(journald).init();
            return "journald";
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    "stderr"
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for a service whose stderr is the journal;
/// checking the inode avoids logging to the journal from a shell that merely inherited it.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(stat) => dev == stat.st_dev.to_string() && ino == stat.st_ino.to_string(),
        Err(_) => false,
    }
}
