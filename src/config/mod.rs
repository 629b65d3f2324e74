//! Configuration of the dispatcher daemon.
//!
//! Settings come from four layers, each overriding the one before: built-in defaults,
//! the config file ([`DEFAULT_CONFIG_PATH`] or the one given with `--config`),
//! `STICKY_DISPATCH_<KEY>` environment variables and command-line [`Overrides`].
//!
//! As in zincati, the module is split by stage:
//! - `keys` — every key defined once: typed value, check, default, reload class, docs;
//!   the [`Settings`] struct, the raw struct and [`KEYS`] are generated from it;
//! - `inputs` — the figment layers, each with metadata naming where a value came from;
//! - `values` — the raw value types and the checks that turn them into typed values.
//!
//! Loading merges the layers into the raw struct (unknown keys and wrong types rejected,
//! naming the layer), checks every key ([`KEYS`]), then the rules across keys. The rest of
//! the daemon only ever sees validated [`Settings`].

mod inputs;
mod keys;
mod values;

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;

pub use keys::{Default, Key, Reload, Settings, KEYS};
pub use values::{Dispatch, EnvKind, KeySource, OnWorkerDown, MAX_WORKERS};

/// Where the config file is read from when no `--config` is given. It may be absent: then
/// the built-in defaults apply.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sticky-dispatch/config.toml";
/// `lanes = 0` gives at least this many lanes under systemd: room for `workers` to grow
/// without restarting the socket unit, at one idle socket per spare lane and address.
pub const DEFAULT_MIN_LANES: u32 = 16;

/// Values given on the command line; they override every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config PATH`: read this file instead of [`DEFAULT_CONFIG_PATH`]. Unlike the
    /// default path, it must exist.
    pub config_path: Option<PathBuf>,
    /// `--listen ADDR` (repeatable), as typed: checked and resolved like the `listen`
    /// key; empty means "not given".
    pub listen: Vec<String>,
    /// `--workers N`.
    pub workers: Option<u32>,
    /// `--log-level FILTER`.
    pub log_level: Option<String>,
    /// `--metrics-listen ADDR` (repeatable), as typed; empty means "not given".
    pub metrics_listen: Vec<String>,
    /// A worker command after `--`: the dispatcher spawns its own workers (standalone),
    /// so no one else needs to know their link sockets' names.
    pub spawns_workers: bool,
}

/// The `socket_prefix` of a standalone dispatcher (process `pid`) that spawns its own
/// workers and has no `socket_prefix` configured: `sticky-dispatch/<pid>/`.
pub fn own_socket_prefix(pid: u32) -> String {
    format!("{}{pid}/", crate::shared::DEFAULT_SOCKET_PREFIX)
}

/// A configuration error: which key was wrong (if one was), in which layer, and why. The
/// daemon exits with status 78 (`EX_CONFIG`) on it.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {}{message}", key_part(.key))]
pub struct ConfigError {
    /// The config key at fault, if the error is about one key. `None` for errors about a
    /// whole source, such as an unreadable file, a TOML syntax error or an unknown key
    /// (whose name is in the message).
    pub key: Option<String>,
    /// The layer that set the bad value: the config file's path, the environment
    /// variable's name (e.g. `STICKY_DISPATCH_WORKERS`), "command line" or "built-in
    /// defaults".
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

/// The "key `name`: " part of a [`ConfigError`]'s message.
fn key_part(key: &Option<String>) -> String {
    key.as_ref()
        .map(|key| format!("key `{key}`: "))
        .unwrap_or_default()
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// The settings to run with: the new values of the live keys, the running values of
    /// the restart-only ones.
    pub settings: Settings,
    /// Live keys whose value changed.
    pub applied: Vec<&'static str>,
    /// Restart-only keys whose new value waits for a restart.
    pub kept: Vec<&'static str>,
}

impl Settings {
    /// Load with the layering described in the [module docs](self). `env` is injected for
    /// tests: an iterator of (name, value) pairs; the binary passes `std::env::vars()`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key and the layer at fault for: an explicitly given
    /// config file that cannot be read (the default one may be absent), TOML syntax
    /// errors, unknown keys (in the file or as `STICKY_DISPATCH_*` variables), values of
    /// the wrong type or out of range, and user names that do not resolve.
    pub fn load(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Self::load_with_default_path(overrides, env, Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Settings::load`] with the default file path as a parameter, so that tests do not
    /// depend on what is installed in `/etc`.
    fn load_with_default_path(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
        default_path: &Path,
    ) -> Result<Settings, ConfigError> {
        let (file, config_file) = match &overrides.config_path {
            Some(path) => (inputs::config_file(path, true)?, path.display().to_string()),
            None => match inputs::config_file(default_path, false)? {
                Some(layer) => (Some(layer), default_path.display().to_string()),
                None => (
                    None,
                    format!(
                        "{} (no {})",
                        inputs::DEFAULTS_SOURCE,
                        default_path.display()
                    ),
                ),
            },
        };

        let mut figment = Figment::from(inputs::defaults());
        if let Some(file) = file {
            figment = figment.merge(file);
        }
        for layer in inputs::environment(env) {
            figment = figment.merge(layer);
        }
        figment = figment.merge(inputs::command_line(overrides));

        let raw: keys::Raw = figment
            .extract()
            .map_err(|error| inputs::extraction_error(&figment, error))?;
        let error = |key: &str, message: String| ConfigError {
            key: Some(key.to_owned()),
            source_name: inputs::source_of(&figment, key),
            message,
        };
        let mut settings = raw.check(error, config_file)?;
        settings.given = KEYS
            .iter()
            .map(|key| key.name)
            .filter(|name| inputs::source_of(&figment, name) != inputs::DEFAULTS_SOURCE)
            .collect();
        if overrides.spawns_workers && !settings.is_given("socket_prefix") {
            // Two standalone dispatchers on one host must never share workers: each
            // names its own children's sockets after itself. (A reload loads again in
            // the same process, so it gets the same prefix.)
            settings.socket_prefix = own_socket_prefix(std::process::id());
        }
        settings
            .check_across()
            .map_err(|(key, message)| error(key, message))?;
        Ok(settings)
    }

    /// The rules that involve more than one key, and defaults that depend on who runs.
    fn check_across(&mut self) -> Result<(), (&'static str, String)> {
        let longest = self.link_socket_name(self.workers.get() - 1);
        if longest.len() > values::MAX_ABSTRACT_NAME {
            return Err((
                "socket_prefix",
                format!(
                    "too long: the socket name of the last worker would be {} bytes, \
                     an abstract socket name holds at most {}",
                    longest.len(),
                    values::MAX_ABSTRACT_NAME
                ),
            ));
        }
        let named = matches!(self.routing_key, KeySource::Cookie | KeySource::Query);
        if named && self.key_name.is_empty() {
            return Err((
                "key_name",
                format!(
                    "routing_key = \"{0}\" needs the name of the {0} in key_name",
                    self.routing_key
                ),
            ));
        }
        if self.dispatch == Dispatch::Kernel && self.routing_key != KeySource::PeerIp {
            return Err((
                "dispatch",
                format!(
                    "\"kernel\" routes by the client's address only, but routing_key = \"{}\" \
                     needs the request's bytes: use \"auto\" or \"userspace\"",
                    self.routing_key
                ),
            ));
        }
        if self.dispatch == Dispatch::Kernel
            && self.workers.get() > crate::routing::cbpf::MAX_WORKERS
        {
            return Err((
                "dispatch",
                format!(
                    "\"kernel\" serves at most {} workers, not {}: use \"auto\" or \"userspace\"",
                    crate::routing::cbpf::MAX_WORKERS,
                    self.workers
                ),
            ));
        }
        if self.lanes != 0 && u32::from(self.lanes) < self.workers.get() {
            return Err((
                "lanes",
                format!(
                    "must be at least workers ({}), or 0 for the default, got {}",
                    self.workers, self.lanes
                ),
            ));
        }
        if self.health_min_workers > self.workers.get() {
            return Err((
                "health_min_workers",
                format!(
                    "must be at most workers ({}), got {}: /health could never be healthy",
                    self.workers, self.health_min_workers
                ),
            ));
        }
        if self.worker_users.is_empty() {
            self.worker_users = crate::shared::default_peer_users();
        }
        Ok(())
    }

    /// Whether listeners take the kernel's path, where their lanes check out: `dispatch`,
    /// with `auto` resolved.
    pub fn kernel_routing(&self) -> bool {
        match self.dispatch {
            Dispatch::Kernel => true,
            Dispatch::Userspace => false,
            Dispatch::Auto => {
                self.routing_key == KeySource::PeerIp
                    && self.workers.get() <= crate::routing::cbpf::MAX_WORKERS
            }
        }
    }

    /// The lane count per address under systemd (`lanes`, with 0 resolved).
    pub fn lane_count(&self) -> u32 {
        match self.lanes {
            0 => self.workers.get().max(DEFAULT_MIN_LANES),
            lanes => u32::from(lanes),
        }
    }

    /// Whether a layer above the built-in defaults sets `key` ([`Settings::given`]).
    pub fn is_given(&self, key: &str) -> bool {
        self.given.contains(&key)
    }

    /// Name of the socket for worker `index`: `{socket_prefix}{index}` (abstract
    /// namespace; no leading '@' in the returned string).
    pub fn link_socket_name(&self, index: u32) -> String {
        crate::shared::link_socket_name(&self.socket_prefix, index)
    }

    /// What a reload to `new` applies: the live keys from `new`, the restart-only keys as
    /// they run now.
    ///
    /// # Errors
    ///
    /// The message, when `new`'s live keys do not fit the running restart-only ones (e.g.
    /// an empty `key_name` while `routing_key = "cookie"` still runs).
    pub fn reloaded(&self, new: Settings) -> Result<Reloaded, String> {
        let (mut settings, kept) = self.merge_reload(new.clone());
        settings.check_across().map_err(|(key, message)| {
            format!("key `{key}`: {message} (with the running values of the restart-only keys)")
        })?;
        let applied = KEYS
            .iter()
            .filter(|key| key.reload == Reload::Live)
            .map(|key| key.name)
            .filter(|name| self.value_text(name) != new.value_text(name))
            .collect();
        settings.restart_needed = self
            .restart_needed
            .iter()
            .chain(&kept)
            .copied()
            .filter(|name| settings.value_text(name) != new.value_text(name))
            .fold(Vec::new(), |mut names, name| {
                if !names.contains(&name) {
                    names.push(name);
                }
                names
            });
        Ok(Reloaded {
            settings,
            applied,
            kept,
        })
    }

    /// `key`'s value for a log line: a string without its quotes (`30s`), anything else
    /// as TOML (`[0, 1000]`); empty for an unknown key.
    pub fn value_of(&self, key: &str) -> String {
        match self.raw_table().get(key) {
            Some(toml::Value::String(text)) => text.clone(),
            Some(value) => value.to_string(),
            None => String::new(),
        }
    }

    /// `key`'s value as written (TOML), e.g. `"30s"`; empty for an unknown key.
    fn value_text(&self, key: &str) -> String {
        self.raw_table()
            .get(key)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    fn raw_table(&self) -> toml::Table {
        toml::Table::try_from(&self.raw).expect("the raw settings serialise as a TOML table")
    }
}

/// Renders the effective configuration as a valid config file, each key with its reload
/// class, for `check-config`: what is printed can be saved and loaded back to the same
/// settings.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# Effective sticky-dispatch configuration.")?;
        // escape_debug keeps an odd path on the comment line.
        writeln!(f, "# Config file: {}", self.config_file.escape_debug())?;
        writeln!(
            f,
            "# After each key: whether `systemctl reload` applies it (live) or it needs a restart."
        )?;
        if self.kernel_routing() {
            writeln!(
                f,
                "# Path: the kernel's (each worker accepts on its own lane; {} lanes per address \
                 under systemd) for every listener whose lanes check out at start, else the \
                 dispatcher's (the log says why).",
                self.lane_count()
            )?;
        } else {
            writeln!(
                f,
                "# Path: the dispatcher's (it accepts every connection and passes it over the link)."
            )?;
        }
        let table = self.raw_table();
        for key in KEYS {
            let value = table.get(key.name).expect("every key has a value");
            writeln!(f, "{} = {value}  # {}", key.name, key.reload.as_str())?;
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::values::{default_workers, MAX_ABSTRACT_NAME};
    use super::*;
    use nix::unistd::{getuid, Uid};
    use std::net::SocketAddr;
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/config.toml");

    /// A config file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> TempFile {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "sticky-dispatch-config-test-{}-{}.toml",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn name(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A default path that does not exist, so tests ignore /etc.
    fn missing_default() -> PathBuf {
        std::env::temp_dir().join(format!(
            "sticky-dispatch-config-test-{}-absent.toml",
            std::process::id()
        ))
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(overrides: &Overrides, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_with_default_path(overrides, env(vars), &missing_default())
    }

    fn load_file(
        contents: &str,
        vars: &[(&str, &str)],
    ) -> (TempFile, Result<Settings, ConfigError>) {
        let file = TempFile::new(contents);
        let overrides = Overrides {
            config_path: Some(file.path().to_owned()),
            ..Overrides::default()
        };
        let result = load(&overrides, vars);
        (file, result)
    }

    fn defaults() -> Settings {
        load(&Overrides::default(), &[]).unwrap()
    }

    /// Compares settings regardless of where they were loaded from.
    fn same(mut a: Settings, b: &Settings) {
        a.config_file.clone_from(&b.config_file);
        assert_eq!(&a, b);
    }

    #[test]
    fn defaults_when_no_file() {
        let s = defaults();
        let own_and_root = if getuid().is_root() {
            vec![Uid::from_raw(0)]
        } else {
            vec![getuid(), Uid::from_raw(0)]
        };
        let expected = Settings {
            workers: NonZeroU32::new(default_workers()).unwrap(),
            worker_unit: "app@.service".into(),
            socket_prefix: "sticky-dispatch/".into(),
            listen: vec![],
            log_level: "info".into(),
            shutdown_timeout: Duration::from_secs(60),
            pending_timeout: Duration::from_secs(30),
            max_pending: NonZeroUsize::new(1024).unwrap(),
            max_in_flight: NonZeroUsize::new(256).unwrap(),
            max_connections: NonZeroUsize::new(16384).unwrap(),
            on_worker_down: OnWorkerDown::Wait,
            routing_key: KeySource::PeerIp,
            dispatch: Dispatch::Auto,
            lanes: 0,
            key_name: String::new(),
            trusted_hops: 1,
            key_timeout: Duration::from_secs(5),
            key_max_bytes: 8192,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            hash_seed: 0,
            worker_users: own_and_root,
            dispatcher_users: vec![],
            metrics_listen: vec![],
            health_min_workers: 1,
            config_file: format!("built-in defaults (no {})", missing_default().display()),
            restart_needed: vec![],
            given: vec![],
            raw: s.raw.clone(),
        };
        assert_eq!(s, expected);
        assert_eq!(s.link_socket_name(3), "sticky-dispatch/3");
    }

    #[test]
    fn default_path_is_used_when_present() {
        let file = TempFile::new("workers = 3\n");
        let s =
            Settings::load_with_default_path(&Overrides::default(), env(&[]), file.path()).unwrap();
        assert_eq!(s.workers.get(), 3);
        assert_eq!(s.config_file, file.name());
    }

    #[test]
    fn shipped_file_equals_defaults() {
        let overrides = Overrides {
            config_path: Some(SHIPPED.into()),
            ..Overrides::default()
        };
        let s = load(&overrides, &[]).unwrap();
        assert_eq!(s.config_file, SHIPPED);
        same(s, &defaults());
    }

    #[test]
    fn shipped_file_lists_exactly_the_documented_keys() {
        let text = std::fs::read_to_string(SHIPPED).unwrap();
        // Keys are at the start of a line, possibly commented out.
        let shipped: Vec<&str> = text
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
            .filter(|key| {
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        for key in KEYS {
            assert!(
                shipped.contains(&key.name),
                "{} missing from {SHIPPED}",
                key.name
            );
        }
        for key in &shipped {
            assert!(
                KEYS.iter().any(|k| k.name == *key),
                "{key} in {SHIPPED} is not in KEYS"
            );
        }
        // Only workers and listen are commented out.
        let mut commented: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# ")?.split_once(" = "))
            .map(|(key, _)| key)
            .filter(|key| KEYS.iter().any(|k| k.name == *key))
            .collect();
        commented.sort_unstable();
        assert_eq!(commented, ["listen", "workers"]);
    }

    #[test]
    fn key_doc_defaults_are_the_built_in_defaults() {
        let toml: String = KEYS
            .iter()
            .filter(|k| k.name != "workers")
            .map(|k| format!("{} = {}\n", k.name, k.default_text()))
            .collect();
        let (_file, s) = load_file(&toml, &[]);
        same(s.unwrap(), &defaults());
        // Every raw field is documented: serde knows each key, and suggests it for a typo.
        for key in KEYS {
            let err = load_file(&format!("{}x = 1\n", key.name), &[])
                .1
                .unwrap_err();
            let suggestion = format!("did you mean `{}`?", key.name);
            assert!(err.message.contains(&suggestion), "{err}");
        }
    }

    #[test]
    fn layering_file_then_env_then_overrides() {
        let file = TempFile::new(
            "workers = 2\nlog_level = \"debug\"\nmax_pending = 5\nhash_seed = 7\n\
             listen = [\"127.0.0.1:1\"]\n",
        );
        let mut overrides = Overrides {
            config_path: Some(file.path().to_owned()),
            ..Overrides::default()
        };
        let vars = [
            ("STICKY_DISPATCH_WORKERS", "3"),
            ("STICKY_DISPATCH_LOG_LEVEL", "warn"),
            ("STICKY_DISPATCH_HASH_SEED", "8"),
        ];

        let s = load(&overrides, &[]).unwrap();
        assert_eq!(
            (
                s.workers.get(),
                s.log_level.as_str(),
                s.max_pending.get(),
                s.hash_seed
            ),
            (2, "debug", 5, 7)
        );

        let s = load(&overrides, &vars).unwrap();
        assert_eq!(
            (
                s.workers.get(),
                s.log_level.as_str(),
                s.max_pending.get(),
                s.hash_seed
            ),
            (3, "warn", 5, 8)
        );

        overrides.workers = Some(4);
        overrides.log_level = Some("error".into());
        overrides.listen = vec!["[::1]:2".parse().unwrap()];
        let s = load(&overrides, &vars).unwrap();
        assert_eq!(
            (
                s.workers.get(),
                s.log_level.as_str(),
                s.max_pending.get(),
                s.hash_seed
            ),
            (4, "error", 5, 8)
        );
        assert_eq!(s.listen, vec!["[::1]:2".parse::<SocketAddr>().unwrap()]);
        assert_eq!(s.config_file, file.name());
    }

    #[test]
    fn env_values_are_typed() {
        let s = load(
            &Overrides::default(),
            &[
                ("STICKY_DISPATCH_WORKERS", "8"),
                ("STICKY_DISPATCH_LISTEN", "[\"127.0.0.1:1\", \"[::1]:2\"]"),
                ("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "2m 30s"),
                ("STICKY_DISPATCH_PENDING_TIMEOUT", "500ms"),
                ("STICKY_DISPATCH_HASH_SEED", "18446744073709551615"),
                ("STICKY_DISPATCH_LOG_LEVEL", "info,sticky_dispatch=debug"),
                ("STICKY_DISPATCH_SOCKET_PREFIX", "123"),
                ("STICKY_DISPATCH_ON_WORKER_DOWN", "failover"),
                ("STICKY_DISPATCH_IPV6_PREFIX", "56"),
                ("STICKY_DISPATCH_WORKER_USERS", "[root, 4242]"),
                ("STICKY_DISPATCH_DISPATCHER_USERS", "root"),
            ],
        )
        .unwrap();
        assert_eq!(s.workers.get(), 8);
        assert_eq!(
            s.listen,
            vec![
                "127.0.0.1:1".parse::<SocketAddr>().unwrap(),
                "[::1]:2".parse().unwrap()
            ]
        );
        assert_eq!(s.shutdown_timeout, Duration::from_secs(150));
        assert_eq!(s.pending_timeout, Duration::from_millis(500));
        assert_eq!(s.hash_seed, u64::MAX);
        assert_eq!(s.log_level, "info,sticky_dispatch=debug");
        assert_eq!(s.socket_prefix, "123");
        assert_eq!(s.on_worker_down, OnWorkerDown::Failover);
        assert_eq!(s.ipv6_prefix, 56);
        assert_eq!(s.worker_users, vec![Uid::from_raw(0), Uid::from_raw(4242)]);
        assert_eq!(s.dispatcher_users, vec![Uid::from_raw(0)]);

        // A single address is a list of one, even an IPv6 one in brackets.
        let s = load(
            &Overrides::default(),
            &[("STICKY_DISPATCH_LISTEN", "[::1]:8080")],
        )
        .unwrap();
        assert_eq!(s.listen, vec!["[::1]:8080".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn non_key_env_vars_are_ignored() {
        let s = load(
            &Overrides::default(),
            &[
                ("STICKY_DISPATCH_INDEX", "3"),
                ("STICKY_DISPATCH_CONFIG", "/nonexistent"),
                ("STICKY_DISPATCH_", "x"),
                ("OTHER_WORKERS", "x"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(s, defaults());
    }

    #[test]
    fn unknown_key_in_file_names_key_and_file() {
        let (file, result) = load_file("wrokers = 4\n", &[]);
        let err = result.unwrap_err();
        assert_eq!(err.key, None);
        assert_eq!(err.source_name, file.name());
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: unknown key `wrokers`: did you mean `workers`?",
                file.name()
            )),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_far_from_every_key_points_to_check_config() {
        let (_file, result) = load_file("colour = \"blue\"\n", &[]);
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("unknown key `colour` (`sticky-dispatch check-config` prints every key"),
            "{text}"
        );
        assert!(!text.contains("`workers`"), "no list of keys: {text}");
        let (_file, result) = load_file("worker = 4\n", &[]);
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("unknown key `worker`: did you mean `workers`?"));
    }

    #[test]
    fn unknown_env_var_names_variable() {
        let err = load(&Overrides::default(), &[("STICKY_DISPATCH_WROKERS", "4")]).unwrap_err();
        assert_eq!(err.source_name, "STICKY_DISPATCH_WROKERS");
        assert!(err.message.contains("`wrokers`"), "{err}");
    }

    #[test]
    fn bad_values_in_file_name_key_and_file() {
        let cases = [
            (
                "workers = \"many\"",
                "workers",
                "invalid type: found string \"many\", expected u32",
            ),
            ("workers = 0", "workers", "must be between 1 and 4096"),
            ("workers = 4097", "workers", "must be between 1 and 4096"),
            ("workers = -1", "workers", "-1"),
            (
                "ipv4_prefix = 33",
                "ipv4_prefix",
                "must be between 0 and 32",
            ),
            (
                "ipv6_prefix = 129",
                "ipv6_prefix",
                "must be between 0 and 128",
            ),
            (
                "shutdown_timeout = \"soon\"",
                "shutdown_timeout",
                "invalid duration `soon`",
            ),
            (
                "shutdown_timeout = 60",
                "shutdown_timeout",
                "expected a string",
            ),
            (
                "pending_timeout = \"0s\"",
                "pending_timeout",
                "greater than zero",
            ),
            (
                "on_worker_down = \"panic\"",
                "on_worker_down",
                "unknown value `panic`, expected `wait` or `failover`",
            ),
            (
                "routing_key = \"header\"",
                "routing_key",
                "unknown value `header`",
            ),
            ("max_pending = 0", "max_pending", "at least 1"),
            ("max_in_flight = 0", "max_in_flight", "at least 1"),
            ("max_connections = 0", "max_connections", "at least 1"),
            (
                "listen = [\"localhost\"]",
                "listen",
                "`localhost` has no port",
            ),
            (
                "listen = [\"localhost:http\"]",
                "listen",
                "`localhost:http` is not a socket address",
            ),
            (
                "listen = [\"no-such-host.invalid:80\"]",
                "listen",
                "could not resolve `no-such-host.invalid`",
            ),
            ("listen = 80", "listen", "expected a string"),
            ("log_level = \"info,[\"", "log_level", "invalid log filter"),
            (
                "worker_unit = \"app.service\"",
                "worker_unit",
                "must end in \"@.service\"",
            ),
            (
                "worker_unit = \"@.service\"",
                "worker_unit",
                "no name before '@'",
            ),
            ("worker_unit = \"a b@.service\"", "worker_unit", "' '"),
            ("socket_prefix = \"\"", "socket_prefix", "must not be empty"),
            ("socket_prefix = \"a\\u0000b\"", "socket_prefix", "NUL"),
            ("hash_seed = -1", "hash_seed", "-1"),
            ("hash_seed = \"x\"", "hash_seed", "\"x\""),
            (
                "worker_users = [true]",
                "worker_users",
                "a user name or a numeric uid",
            ),
            ("dispatcher_users = [-1]", "dispatcher_users", "-1"),
            (
                "metrics_listen = [\"nowhere\"]",
                "metrics_listen",
                "`nowhere` has no port",
            ),
            (
                "workers = 2\nhealth_min_workers = 3",
                "health_min_workers",
                "must be at most workers (2), got 3",
            ),
        ];
        for (contents, key, message) in cases {
            let (file, result) = load_file(contents, &[]);
            let err = result.expect_err(contents);
            assert_eq!(err.key.as_deref(), Some(key), "{contents}: {err}");
            assert_eq!(err.source_name, file.name(), "{contents}: {err}");
            assert!(err.message.contains(message), "{contents}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("{}: key `{key}`: ", file.name())),
                "{err}"
            );
        }
    }

    #[test]
    fn socket_prefix_must_fit_abstract_name() {
        let fits = "p".repeat(MAX_ABSTRACT_NAME - 1);
        let vars = [
            ("STICKY_DISPATCH_SOCKET_PREFIX", fits.as_str()),
            ("STICKY_DISPATCH_WORKERS", "10"),
        ];
        let s = load(&Overrides::default(), &vars[..1]).unwrap();
        assert_eq!(s.link_socket_name(0).len(), MAX_ABSTRACT_NAME);
        // Index 9 fits, but with 11 workers index 10 would not.
        let overrides = Overrides {
            workers: Some(11),
            ..Overrides::default()
        };
        load(&Overrides::default(), &vars).unwrap();
        let err = load(&overrides, &vars).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("socket_prefix"));
        assert_eq!(err.source_name, "STICKY_DISPATCH_SOCKET_PREFIX");
    }

    #[test]
    fn syntax_error_names_file() {
        let (file, result) = load_file("workers = [\n", &[]);
        let err = result.unwrap_err();
        assert_eq!(err.key, None);
        assert_eq!(err.source_name, file.name());
    }

    #[test]
    fn bad_env_value_names_variable() {
        let cases = [
            ("STICKY_DISPATCH_WORKERS", "many", "workers"),
            ("STICKY_DISPATCH_WORKERS", "0", "workers"),
            ("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "60", "shutdown_timeout"),
            ("STICKY_DISPATCH_ON_WORKER_DOWN", "panic", "on_worker_down"),
            ("STICKY_DISPATCH_LISTEN", "nowhere", "listen"),
        ];
        for (name, value, key) in cases {
            // The file sets the same key validly: the env layer is to blame.
            let (_file, result) =
                load_file(&format!("{key} = {}\n", default_of(key)), &[(name, value)]);
            let err = result.expect_err(name);
            assert_eq!(err.key.as_deref(), Some(key), "{err}");
            assert_eq!(err.source_name, name, "{err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("{name}: key `{key}`: ")),
                "{err}"
            );
        }
    }

    fn default_of(key: &str) -> &'static str {
        match key {
            "workers" => "2",
            _ => KEYS.iter().find(|k| k.name == key).unwrap().default_text(),
        }
    }

    #[test]
    fn bad_override_names_command_line() {
        let overrides = Overrides {
            workers: Some(0),
            ..Overrides::default()
        };
        let err = load(&overrides, &[("STICKY_DISPATCH_WORKERS", "2")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: key `workers`: must be between 1 and 4096, got 0"
        );
    }

    #[test]
    fn unknown_user_names_key() {
        let (file, result) = load_file("worker_users = [\"no-such-user-sticky-dispatch\"]\n", &[]);
        let err = result.unwrap_err();
        assert_eq!(err.key.as_deref(), Some("worker_users"));
        assert_eq!(err.source_name, file.name());
        assert!(
            err.message
                .contains("unknown user `no-such-user-sticky-dispatch`"),
            "{err}"
        );
    }

    #[test]
    fn users_resolve_names_and_uids() {
        let (_file, result) = load_file(
            "worker_users = [\"root\", 1000, \"1001\", 1000]\ndispatcher_users = [0]\n",
            &[],
        );
        let s = result.unwrap();
        let uids = |raw: &[u32]| raw.iter().copied().map(Uid::from_raw).collect::<Vec<_>>();
        // Duplicates are dropped, order is kept.
        assert_eq!(s.worker_users, uids(&[0, 1000, 1001]));
        assert_eq!(s.dispatcher_users, uids(&[0]));
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let path = std::env::temp_dir().join(format!(
            "sticky-dispatch-config-test-{}-missing.toml",
            std::process::id()
        ));
        let overrides = Overrides {
            config_path: Some(path.clone()),
            ..Overrides::default()
        };
        let err = load(&overrides, &[]).unwrap_err();
        assert_eq!(err.key, None);
        assert_eq!(err.source_name, path.display().to_string());
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot read", path.display())),
            "{err}"
        );
    }

    #[test]
    fn display_round_trips() {
        let overrides = Overrides {
            listen: vec!["127.0.0.1:8080".into(), "[::1]:8080".into()],
            workers: Some(7),
            log_level: Some("info,sticky_dispatch=debug".into()),
            ..Overrides::default()
        };
        let vars = [
            ("STICKY_DISPATCH_HASH_SEED", "18446744073709551615"),
            ("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "1m 30s 250ms"),
            ("STICKY_DISPATCH_SOCKET_PREFIX", "odd \"prefix\"\\\t/"),
            ("STICKY_DISPATCH_ON_WORKER_DOWN", "failover"),
            ("STICKY_DISPATCH_DISPATCHER_USERS", "[0, 1000]"),
        ];
        for settings in [defaults(), load(&overrides, &vars).unwrap()] {
            let text = settings.to_string();
            // Every key is rendered.
            for key in KEYS {
                assert!(text.contains(&format!("\n{} = ", key.name)), "{text}");
            }
            let (_file, reloaded) = load_file(&text, &[]);
            same(reloaded.unwrap(), &settings);
        }
    }

    #[test]
    fn every_key_shows_its_reload_class_in_check_config() {
        let text = defaults().to_string();
        for key in KEYS {
            let line = text
                .lines()
                .find(|line| line.starts_with(&format!("{} = ", key.name)))
                .unwrap_or_else(|| panic!("{} missing from:\n{text}", key.name));
            assert!(
                line.ends_with(&format!("  # {}", key.reload.as_str())),
                "{line}"
            );
        }
    }

    #[test]
    fn the_key_reading_settings_apply_on_reload() {
        // These four once drifted out of the reload lists: now the table says they are live.
        for name in ["key_name", "trusted_hops", "key_timeout", "key_max_bytes"] {
            let key = KEYS.iter().find(|k| k.name == name).unwrap();
            assert_eq!(key.reload, Reload::Live, "{name}");
        }
    }

    #[test]
    fn reload_applies_live_keys_and_keeps_restart_only_ones() {
        let running = load(&Overrides::default(), &[("STICKY_DISPATCH_WORKERS", "4")]).unwrap();
        let new = load(
            &Overrides::default(),
            &[
                ("STICKY_DISPATCH_WORKERS", "5"),
                ("STICKY_DISPATCH_HASH_SEED", "9"),
                ("STICKY_DISPATCH_KEY_TIMEOUT", "2s"),
                ("STICKY_DISPATCH_TRUSTED_HOPS", "3"),
                ("STICKY_DISPATCH_PENDING_TIMEOUT", "1s"),
            ],
        )
        .unwrap();
        let reloaded = running.reloaded(new).unwrap();
        let s = &reloaded.settings;
        assert_eq!(
            (s.workers.get(), s.hash_seed),
            (4, 0),
            "restart-only keys kept"
        );
        assert_eq!(s.key_timeout, Duration::from_secs(2));
        assert_eq!(s.trusted_hops, 3);
        assert_eq!(s.pending_timeout, Duration::from_secs(1));
        assert_eq!(reloaded.kept, ["workers", "hash_seed"]);
        assert_eq!(
            reloaded.applied,
            ["pending_timeout", "trusted_hops", "key_timeout"]
        );
        assert_eq!(s.restart_needed, ["workers", "hash_seed"]);
        // check-config of the running settings shows what runs, not what is configured.
        assert!(s.to_string().contains("\nworkers = 4  # restart\n"), "{s}");

        // Configured back to the running value: nothing waits for a restart any more.
        let back = load(&Overrides::default(), &[("STICKY_DISPATCH_WORKERS", "4")]).unwrap();
        let again = s.reloaded(back).unwrap();
        assert_eq!(again.settings.restart_needed, Vec::<&str>::new());
        assert_eq!(again.kept, Vec::<&str>::new());
        assert_eq!(again.settings, running);
    }

    #[test]
    fn reload_that_does_not_fit_the_running_keys_is_refused() {
        let running = load(
            &Overrides::default(),
            &[
                ("STICKY_DISPATCH_ROUTING_KEY", "cookie"),
                ("STICKY_DISPATCH_KEY_NAME", "session"),
            ],
        )
        .unwrap();
        // routing_key is restart-only: the running "cookie" would be left without a name.
        let err = running.reloaded(defaults()).unwrap_err();
        assert!(err.starts_with("key `key_name`: "), "{err}");
    }

    #[test]
    fn given_keys_are_those_a_layer_sets_even_to_the_default() {
        assert!(defaults().given.is_empty());
        let (_file, s) = load_file(
            "socket_prefix = \"sticky-dispatch/\"\n",
            &[("STICKY_DISPATCH_WORKERS", "3")],
        );
        let s = s.unwrap();
        assert_eq!(s.given, ["workers", "socket_prefix"]);
        assert!(s.is_given("socket_prefix") && !s.is_given("listen"));
        let flags = Overrides {
            listen: vec!["127.0.0.1:1".into()],
            ..Overrides::default()
        };
        assert_eq!(load(&flags, &[]).unwrap().given, ["listen"]);
    }

    #[test]
    fn a_dispatcher_that_spawns_its_workers_names_their_sockets_after_itself() {
        let standalone = Overrides {
            spawns_workers: true,
            ..Overrides::default()
        };
        let own = own_socket_prefix(std::process::id());
        assert_eq!(own, format!("sticky-dispatch/{}/", std::process::id()));
        let s = load(&standalone, &[]).unwrap();
        assert_eq!(s.socket_prefix, own);
        // A reload loads again: the same prefix, so nothing waits for a restart.
        assert!(s
            .reloaded(load(&standalone, &[]).unwrap())
            .unwrap()
            .kept
            .is_empty());
        // A configured prefix is kept, even the default one.
        let given = load(
            &standalone,
            &[("STICKY_DISPATCH_SOCKET_PREFIX", "sticky-dispatch/")],
        )
        .unwrap();
        assert_eq!(given.socket_prefix, "sticky-dispatch/");
        // Workers started by someone else keep the well-known default.
        assert_eq!(defaults().socket_prefix, "sticky-dispatch/");
    }

    #[test]
    fn a_host_name_listens_on_every_address_it_resolves_to_once() {
        let flags = Overrides {
            listen: vec!["localhost:8090".into(), "127.0.0.1:8090".into()],
            ..Overrides::default()
        };
        let listen = load(&flags, &[]).unwrap().listen;
        let loopback: SocketAddr = "127.0.0.1:8090".parse().unwrap();
        assert!(listen.contains(&loopback), "{listen:?}");
        assert_eq!(listen.iter().filter(|a| **a == loopback).count(), 1);
        assert!(listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8090));
    }

    #[test]
    fn default_socket_prefix_is_the_one_workers_use() {
        assert_eq!(
            defaults().socket_prefix,
            crate::shared::DEFAULT_SOCKET_PREFIX
        );
    }

    #[test]
    fn env_kind_comes_from_the_raw_type() {
        let kind = |name: &str| KEYS.iter().find(|k| k.name == name).unwrap().env;
        assert_eq!(kind("log_level"), EnvKind::Text);
        assert_eq!(kind("shutdown_timeout"), EnvKind::Text);
        assert_eq!(kind("listen"), EnvKind::List);
        assert_eq!(kind("worker_users"), EnvKind::List);
        assert_eq!(kind("workers"), EnvKind::Parsed);
        assert_eq!(kind("hash_seed"), EnvKind::Parsed);
    }
}
