//! `sticky-dispatch-generator`: a systemd generator that turns the configured worker
//! count into units, so that `workers` in /etc/sticky-dispatch/config.toml is the only
//! place it is set.
//!
//! systemd runs it (from /usr/lib/systemd/system-generators) at boot and at every
//! `systemctl daemon-reload`, with the directories to write to as arguments. For
//! `workers = N` and `worker_unit = "app@.service"` it writes to the first one (the
//! "normal" directory, under /run, so nothing persists):
//!
//! - `sticky-dispatch.service.wants/app@0.service` … `app@<N-1>.service`: starting the
//!   dispatcher starts the workers;
//! - `sticky-dispatch.service.d/50-workers.conf` with `After=` on them: on a full stop
//!   the dispatcher stops first and hands what it holds to live workers, which then
//!   drain;
//! - `sticky-dispatch.socket.d/50-workers.conf` with `PropagatesStopTo=` them: stopping
//!   the socket (taking the service down) stops the workers too. It is on the socket,
//!   not the service, because systemd propagates a stop also when the service crashes,
//!   and a dispatcher crash must not take the workers' open connections down.
//!
//! The configuration is read with [`Settings::load`], exactly as the dispatcher reads it
//! without command-line flags (file, `STICKY_DISPATCH_CONFIG`, `STICKY_DISPATCH_*`
//! variables), so the two cannot disagree on `workers` or `worker_unit`. A broken
//! configuration writes nothing and still exits 0: a generator that fails only adds a
//! warning to the boot, and the dispatcher itself reports the bad key (exit 78).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sticky_dispatch::config::{Overrides, Settings};

/// The units the generated dependencies hang on; they ship in `systemd/`.
const SERVICE: &str = "sticky-dispatch.service";
const SOCKET: &str = "sticky-dispatch.socket";
/// Name of the drop-ins written for them.
const DROP_IN: &str = "50-workers.conf";
/// Where systemd looks for system units, in its order of precedence; the wants
/// symlinks point at the worker template found there (systemd only reads the link's
/// name, but `systemctl` and people read the target).
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];
/// Used as the link target when the template is in none of `UNIT_DIRS`.
const PACKAGED_UNIT_DIR: &str = "/usr/lib/systemd/system";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // systemd passes three directories (normal, early, late); one is enough by hand.
    let [normal, ..] = args.as_slice() else {
        log(
            3,
            "usage: sticky-dispatch-generator NORMAL_DIR [EARLY_DIR LATE_DIR]",
        );
        return ExitCode::FAILURE;
    };
    let overrides = Overrides {
        config_path: std::env::var_os("STICKY_DISPATCH_CONFIG").map(PathBuf::from),
        ..Overrides::default()
    };
    let settings = match Settings::load(&overrides, std::env::vars()) {
        Ok(settings) => settings,
        Err(err) => {
            log(
                3,
                &format!("configuration error, starting no workers: {err} (run `sticky-dispatch check-config`)"),
            );
            return ExitCode::SUCCESS;
        }
    };
    match generate(Path::new(normal), &settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log(
                3,
                &format!(
                    "could not write units to {}: {err}",
                    Path::new(normal).display()
                ),
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes the wants symlinks and drop-ins for `settings.workers` instances of
/// `settings.worker_unit` into `dir`.
fn generate(dir: &Path, settings: &Settings) -> std::io::Result<()> {
    let template = &settings.worker_unit;
    // Validated by Settings: ends in "@.service".
    let prefix = template.trim_end_matches(".service");
    let instances: Vec<String> = (0..settings.workers.get())
        .map(|index| format!("{prefix}{index}.service"))
        .collect();

    let target = template_path(template).unwrap_or_else(|| {
        log(
            4,
            &format!("worker template {template} not found in {UNIT_DIRS:?}: the workers will not start until it is installed"),
        );
        Path::new(PACKAGED_UNIT_DIR).join(template)
    });
    let wants = dir.join(format!("{SERVICE}.wants"));
    std::fs::create_dir_all(&wants)?;
    for instance in &instances {
        let link = wants.join(instance);
        match std::os::unix::fs::symlink(&target, &link) {
            // Another generator run into the same (fresh) directory made it already.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }

    let header = format!(
        "# Generated by sticky-dispatch-generator from {}: workers = {}, worker_unit = \"{}\".\n",
        settings.config_file.escape_debug(),
        settings.workers,
        template
    );
    let mut after = header.clone();
    after.push_str(
        "# Workers start before the dispatcher, and on a full stop the dispatcher stops\n\
         # first, handing what it holds to live workers before they drain.\n[Unit]\n",
    );
    let mut propagate = header;
    propagate.push_str(
        "# Stopping the socket (the whole service) stops the workers; a restart or crash\n\
         # of the dispatcher leaves them running.\n[Unit]\n",
    );
    for instance in &instances {
        let _ = writeln!(after, "After={instance}");
        let _ = writeln!(propagate, "PropagatesStopTo={instance}");
    }
    write_drop_in(dir, SERVICE, &after)?;
    write_drop_in(dir, SOCKET, &propagate)
}

fn write_drop_in(dir: &Path, unit: &str, text: &str) -> std::io::Result<()> {
    let drop_ins = dir.join(format!("{unit}.d"));
    std::fs::create_dir_all(&drop_ins)?;
    std::fs::write(drop_ins.join(DROP_IN), text)
}

/// The worker template's file, where systemd would find it first.
fn template_path(template: &str) -> Option<PathBuf> {
    UNIT_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(template))
        .find(|path| path.exists())
}

/// Logs at syslog `priority` where generator messages can be read: the kernel log (as
/// systemd's own generators do; the journal imports it), else the journal's socket (in a
/// container there is no /dev/kmsg; it exists at `daemon-reload`, not yet at boot), else
/// stderr (which systemd points at /dev/null in a container).
fn log(priority: u8, message: &str) {
    const IDENTIFIER: &str = "sticky-dispatch-generator";
    let kmsg = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| {
            kmsg.write_all(format!("<{priority}>{IDENTIFIER}: {message}\n").as_bytes())
        });
    if kmsg.is_ok() {
        return;
    }
    // The journal's native protocol: one datagram of KEY=value lines, so the message
    // must stay on one line.
    let entry = format!(
        "PRIORITY={priority}\nSYSLOG_IDENTIFIER={IDENTIFIER}\nMESSAGE={}\n",
        message.replace('\n', " ")
    );
    let journal = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|socket| socket.send_to(entry.as_bytes(), "/run/systemd/journal/socket"));
    if journal.is_err() {
        eprintln!("{IDENTIFIER}: {message}");
    }
}
