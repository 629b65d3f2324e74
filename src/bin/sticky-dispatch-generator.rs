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
//!   and a dispatcher crash must not take the workers' open connections down;
//! - `sticky-dispatch.socket.d/zz-lanes.conf`, when the kernel routes (`dispatch`,
//!   [`Settings::kernel_routing`]): the socket's lanes, `ReusePort=yes`, an empty
//!   `ListenStream=` that clears the list, then every address of the socket unit `lanes`
//!   times in a row (docs/protocol.md, "Lanes"). The addresses are read from the socket
//!   unit and its drop-ins where systemd finds them ([`UNIT_DIRS`]);
//! - `app@.service.d/50-workers.conf` with `Environment=STICKY_DISPATCH_SOCKET_PREFIX=`
//!   the dispatcher's `socket_prefix`: both ends name the link sockets from one setting.
//!
//! Every other `NAME.toml` in /etc/sticky-dispatch configures a further dispatcher,
//! `sticky-dispatch@NAME.service` (systemd/sticky-dispatch@.service): the same units are
//! written for it and its own `worker_unit`, and its socket prefix, unless configured, is
//! `sticky-dispatch/NAME/` (given to it and to its workers in the drop-ins). Two
//! dispatchers with the same `worker_unit` or prefix would share workers: the later one
//! (in name order, the main one first) gets no workers, and the log says why.
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
use sticky_dispatch::worker::{DEFAULT_SOCKET_PREFIX, SOCKET_PREFIX_ENV};

/// The units the generated dependencies hang on; they ship in `systemd/`.
const SERVICE: &str = "sticky-dispatch.service";
const SOCKET: &str = "sticky-dispatch.socket";
/// Name of the drop-ins written for them.
const DROP_IN: &str = "50-workers.conf";
/// Name of the socket's lanes drop-in: drop-ins apply in file-name order across all
/// directories, and this one must come after the operator's (`override.conf`,
/// `listen.conf`), which could otherwise clear the lanes or append to a group.
const LANES_DROP_IN: &str = "zz-lanes.conf";
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

/// Where the main dispatcher's config is, and the instances' (`NAME.toml`).
const CONFIG_DIR: &str = "/etc/sticky-dispatch";
/// The main dispatcher's config file in [`CONFIG_DIR`]; every other `*.toml` there is an
/// instance's.
const MAIN_CONFIG: &str = "config.toml";

/// One dispatcher's units: the main `sticky-dispatch`, or `sticky-dispatch@NAME`.
struct Dispatcher {
    service: String,
    socket: String,
    /// The instance name, for `sticky-dispatch@NAME`.
    instance: Option<String>,
    settings: Settings,
}

impl Dispatcher {
    /// The prefix this dispatcher and its workers use: an instance without a configured
    /// one gets `sticky-dispatch/NAME/`, so that it never shares the main one's workers.
    fn socket_prefix(&self) -> String {
        match &self.instance {
            Some(name) if !self.settings.is_given("socket_prefix") => {
                format!("{DEFAULT_SOCKET_PREFIX}{name}/")
            }
            _ => self.settings.socket_prefix.clone(),
        }
    }
}

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
    let main_config = std::env::var_os("STICKY_DISPATCH_CONFIG").map(PathBuf::from);
    let config_dir = main_config
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(Path::new(CONFIG_DIR))
        .to_owned();
    let mut dispatchers = Vec::new();
    let main = load(main_config, "sticky-dispatch").map(|settings| Dispatcher {
        service: SERVICE.to_owned(),
        socket: SOCKET.to_owned(),
        instance: None,
        settings,
    });
    dispatchers.extend(main);
    for (name, path) in instance_configs(&config_dir) {
        let unit = format!("sticky-dispatch@{name}");
        if let Some(settings) = load(Some(path), &unit) {
            dispatchers.push(Dispatcher {
                service: format!("{unit}.service"),
                socket: format!("{unit}.socket"),
                instance: Some(name),
                settings,
            });
        }
    }
    let mut failed = false;
    let mut taken: Vec<(String, String, String)> = Vec::new();
    for dispatcher in &dispatchers {
        let prefix = dispatcher.socket_prefix();
        let template = &dispatcher.settings.worker_unit;
        // Two dispatchers sharing workers or their sockets would cross-wire their apps.
        if let Some((other, ..)) = taken.iter().find(|(_, p, t)| *p == prefix || t == template) {
            log(
                3,
                &format!(
                    "{}: worker_unit \"{template}\" or socket_prefix \"{prefix}\" is also {other}'s: \
                     starting no workers for it; give each dispatcher its own worker_unit and socket_prefix",
                    dispatcher.service
                ),
            );
            continue;
        }
        taken.push((dispatcher.service.clone(), prefix, template.clone()));
        if let Err(err) = generate(Path::new(normal), dispatcher) {
            log(
                3,
                &format!(
                    "could not write units for {} to {}: {err}",
                    dispatcher.service,
                    Path::new(normal).display()
                ),
            );
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The settings of one dispatcher, read exactly as it reads them without flags; `None`
/// (said in the log) for a broken configuration: that dispatcher reports the key itself.
fn load(config_path: Option<PathBuf>, unit: &str) -> Option<Settings> {
    let overrides = Overrides {
        config_path,
        ..Overrides::default()
    };
    match Settings::load(&overrides, std::env::vars()) {
        Ok(settings) => Some(settings),
        Err(err) => {
            log(
                3,
                &format!("{unit}: configuration error, starting no workers: {err} (run `sticky-dispatch check-config`)"),
            );
            None
        }
    }
}

/// `(NAME, path)` of every `NAME.toml` in `dir` but the main config, in name order.
fn instance_configs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.file_name().is_some_and(|name| name != MAIN_CONFIG))
        .filter_map(|path| {
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".toml")?
                .to_owned();
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            valid.then_some((name, path))
        })
        .collect();
    found.sort();
    found
}

/// Writes, for `dispatcher`'s `workers` instances of its `worker_unit`: the wants
/// symlinks, its service's `After=` and its socket's `PropagatesStopTo=` drop-ins, and the
/// socket prefix for the worker template (and for an instance dispatcher, whose prefix
/// may be the generated default).
fn generate(dir: &Path, dispatcher: &Dispatcher) -> std::io::Result<()> {
    let settings = &dispatcher.settings;
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
    let wants = dir.join(format!("{}.wants", dispatcher.service));
    std::fs::create_dir_all(&wants)?;
    for instance in &instances {
        let link = wants.join(instance);
        match std::os::unix::fs::symlink(&target, &link) {
            // Another generator run into the same (fresh) directory made it already.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }

    let socket_prefix = dispatcher.socket_prefix();
    let header = format!(
        "# Generated by sticky-dispatch-generator from {}: workers = {}, worker_unit = \"{}\", socket_prefix = \"{}\".\n",
        settings.config_file.escape_debug(),
        settings.workers,
        template,
        socket_prefix.escape_debug(),
    );
    let mut after = header.clone();
    after.push_str(
        "# Workers start before the dispatcher, and on a full stop the dispatcher stops\n\
         # first, handing what it holds to live workers before they drain.\n[Unit]\n",
    );
    let mut propagate = header.clone();
    propagate.push_str(
        "# Stopping the socket (the whole service) stops the workers; a restart or crash\n\
         # of the dispatcher leaves them running.\n[Unit]\n",
    );
    for instance in &instances {
        let _ = writeln!(after, "After={instance}");
        let _ = writeln!(propagate, "PropagatesStopTo={instance}");
    }
    if settings.kernel_routing() {
        let addresses = listen_streams(&unit_dirs(), &dispatcher.socket);
        if addresses.is_empty() {
            log(
                4,
                &format!(
                    "{}: no ListenStream= found in {UNIT_DIRS:?}: no lanes",
                    dispatcher.socket
                ),
            );
        } else {
            let mut lanes = header.clone();
            lanes.push_str(&lanes_section(&addresses, settings.lane_count()));
            write_drop_in_named(dir, &dispatcher.socket, LANES_DROP_IN, &lanes)?;
        }
    }
    // systemd's quoting of an Environment= assignment: the whole of it in double quotes.
    let environment = format!(
        "[Service]\nEnvironment=\"{SOCKET_PREFIX_ENV}={}\"\n",
        socket_prefix.replace('\\', "\\\\").replace('"', "\\\"")
    );
    if dispatcher.instance.is_some() {
        after.push_str("# Its workers' link sockets (configured, or named after this instance).\n");
        after.push_str(&environment);
    }
    write_drop_in(dir, &dispatcher.service, &after)?;
    write_drop_in(dir, &dispatcher.socket, &propagate)?;
    let mut worker = header;
    worker.push_str("# The link socket prefix of this dispatcher, whose workers these are.\n");
    worker.push_str(&environment);
    write_drop_in(dir, template, &worker)
}

/// The `[Socket]` section that makes each of `addresses` a group of `lanes` sockets: the
/// list cleared, then each address `lanes` times in a row, since the dispatcher takes
/// consecutive sockets of one address as one group, in unit order.
fn lanes_section(addresses: &[String], lanes: u32) -> String {
    let mut text = format!(
        "# The kernel routes: {lanes} lanes (one SO_REUSEPORT group) per address, worker k\n\
         # accepting on lane k. The list is cleared and rebuilt from the socket unit's\n\
         # addresses, each repeated, because a group must be consecutive.\n\
         [Socket]\nReusePort=yes\nListenStream=\n"
    );
    for address in addresses {
        for _ in 0..lanes {
            let _ = writeln!(text, "ListenStream={address}");
        }
    }
    text
}

/// [`UNIT_DIRS`] as paths (a function so that tests can give their own).
fn unit_dirs() -> Vec<PathBuf> {
    UNIT_DIRS.iter().map(PathBuf::from).collect()
}

/// The `ListenStream=` addresses `socket` has without our drop-in, as systemd computes
/// them: the unit file where it is found first in `dirs` (for an instance
/// `NAME@INST.socket`, else the template `NAME@.socket`), then the `*.conf` drop-ins of
/// `socket.d/` (and the template's), in file-name order, the first directory winning for
/// one name; an empty `ListenStream=` clears the list. Ours (zz-lanes.conf, in the
/// generator directory under /run, applied last) is not among them; each address appears once.
fn listen_streams(dirs: &[PathBuf], socket: &str) -> Vec<String> {
    let template = socket
        .split_once('@')
        .map(|(name, rest)| format!("{name}@{}", &rest[rest.rfind('.').unwrap_or(0)..]));
    let mut names = vec![socket.to_owned()];
    names.extend(template.filter(|t| t != socket));
    // The instance's own file wins over the template's.
    let main = names
        .iter()
        .find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()));
    let mut files: Vec<PathBuf> = main.into_iter().collect();
    let mut drop_ins: std::collections::BTreeMap<OsString, PathBuf> = Default::default();
    // The template's drop-ins first, so that the instance's of the same name win.
    for name in names.iter().rev() {
        for dir in dirs.iter().rev() {
            let Ok(entries) = std::fs::read_dir(dir.join(format!("{name}.d"))) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "conf") && path.is_file() {
                    drop_ins.insert(entry.file_name(), path);
                }
            }
        }
    }
    files.extend(drop_ins.into_values());
    let mut addresses: Vec<String> = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let mut section = "";
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[Socket]" {
                if let Some(value) = line.strip_prefix("ListenStream=") {
                    match value.trim() {
                        "" => addresses.clear(),
                        value if !addresses.iter().any(|a| a == value) => {
                            addresses.push(value.to_owned())
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    addresses
}

fn write_drop_in(dir: &Path, unit: &str, text: &str) -> std::io::Result<()> {
    write_drop_in_named(dir, unit, DROP_IN, text)
}

fn write_drop_in_named(dir: &Path, unit: &str, name: &str, text: &str) -> std::io::Result<()> {
    let drop_ins = dir.join(format!("{unit}.d"));
    std::fs::create_dir_all(&drop_ins)?;
    std::fs::write(drop_ins.join(name), text)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the target's temp dir, named after the test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sticky-dispatch-generator-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn put(path: PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_shipped_socket_units_addresses() {
        let shipped = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd")];
        assert_eq!(
            listen_streams(&shipped, SOCKET),
            ["0.0.0.0:8080", "[::]:8080"]
        );
        // The instance template has none: its addresses come from a drop-in.
        assert!(listen_streams(&shipped, "sticky-dispatch@chat.socket").is_empty());
    }

    #[test]
    fn lanes_clear_the_list_then_repeat_each_address_in_a_row() {
        let text = lanes_section(&["0.0.0.0:8080".into(), "[::]:8080".into()], 3);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "[Socket]",
                "ReusePort=yes",
                "ListenStream=",
                "ListenStream=0.0.0.0:8080",
                "ListenStream=0.0.0.0:8080",
                "ListenStream=0.0.0.0:8080",
                "ListenStream=[::]:8080",
                "ListenStream=[::]:8080",
                "ListenStream=[::]:8080",
            ]
        );
    }

    #[test]
    fn etc_overrides_and_drop_ins_apply_in_systemds_order() {
        let root = scratch("order");
        let (etc, lib) = (root.join("etc"), root.join("lib"));
        let dirs = vec![etc.clone(), lib.clone()];
        let shipped = "[Socket]\nListenStream=0.0.0.0:8080\nListenStream=[::]:8080\n";
        put(lib.join(SOCKET), shipped);
        // A drop-in that only adds, and one in /etc of the same name that wins over it.
        put(
            lib.join("sticky-dispatch.socket.d/10-add.conf"),
            "[Socket]\nListenStream=127.0.0.1:9000\n",
        );
        put(
            etc.join("sticky-dispatch.socket.d/10-add.conf"),
            "[Socket]\nListenStream=127.0.0.1:9001\n",
        );
        assert_eq!(
            listen_streams(&dirs, SOCKET),
            ["0.0.0.0:8080", "[::]:8080", "127.0.0.1:9001"]
        );
        // `systemctl edit`: an empty ListenStream= clears what came before.
        put(
            etc.join("sticky-dispatch.socket.d/override.conf"),
            "[Unit]\nListenStream=ignored\n[Socket]\nListenStream=\nListenStream=10.0.0.1:80\n",
        );
        assert_eq!(listen_streams(&dirs, SOCKET), ["10.0.0.1:80"]);
        // A full copy in /etc replaces the shipped unit.
        put(etc.join(SOCKET), "[Socket]\nListenStream=[::1]:8443\n");
        std::fs::remove_file(etc.join("sticky-dispatch.socket.d/override.conf")).unwrap();
        assert_eq!(
            listen_streams(&dirs, SOCKET),
            ["[::1]:8443", "127.0.0.1:9001"]
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn an_instance_takes_the_templates_file_and_both_drop_ins() {
        let root = scratch("instance");
        let dirs = vec![root.join("etc"), root.join("lib")];
        put(
            root.join("lib/sticky-dispatch@.socket"),
            "[Socket]\nFileDescriptorName=%i\n",
        );
        put(
            root.join("etc/sticky-dispatch@.socket.d/all.conf"),
            "[Socket]\nListenStream=0.0.0.0:9999\n",
        );
        put(
            root.join("etc/sticky-dispatch@chat.v2.socket.d/listen.conf"),
            "[Socket]\nListenStream=127.0.0.1:8081\n",
        );
        assert_eq!(
            listen_streams(&dirs, "sticky-dispatch@chat.v2.socket"),
            ["0.0.0.0:9999", "127.0.0.1:8081"]
        );
        assert_eq!(
            listen_streams(&dirs, "sticky-dispatch@other.socket"),
            ["0.0.0.0:9999"]
        );
        let _ = std::fs::remove_dir_all(root);
    }
}
