//! Log setup for the binaries: journald (with structured fields) when stderr is connected
//! to the journal, as under systemd; plain stderr otherwise.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter of a running process (on reload).
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    /// Where logs go: "journald" or "stderr".
    pub destination: &'static str,
}

impl LogControl {
    /// Replaces the filter; `level` was validated with the configuration.
    pub fn set_level(&self, level: &str) {
        if let Ok(filter) = EnvFilter::try_new(level) {
            let _ = self.filter.reload(filter);
        }
    }
}

/// Installs the global subscriber at `level` (an `EnvFilter` directive such as `info` or
/// `sticky_dispatch=debug`).
pub fn init(level: &str) -> LogControl {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Fields keep their own names in the journal (`journalctl INDEX=3`), without the
    // default `F_` prefix.
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|layer| layer.with_field_prefix(None));
    let destination = if journald.is_some() {
        "journald"
    } else {
        "stderr"
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    registry.with(journald).with(stderr).init();
    LogControl {
        filter: handle,
        destination,
    }
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
