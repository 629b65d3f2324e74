//! Configuration of the dispatcher daemon.
//!
//! Settings come from four layers, each overriding the one before:
//! built-in defaults, the config file ([`DEFAULT_CONFIG_PATH`] or the one
//! given with `--config`), `STICKY_DISPATCH_<KEY>` environment variables and
//! command-line [`Overrides`].
//!
//! As in zincati, loading happens in two stages: figment merges the layers
//! into a raw serde struct that mirrors the file format (every key optional,
//! unknown keys rejected), which is then validated into typed [`Settings`].
//! Keeping the two apart lets the raw stage report *where* a bad value came
//! from (figment tracks the provider of every value), while the typed stage
//! guarantees the rest of the daemon never sees an out-of-range value.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::error::{Kind, OneOf};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use nix::unistd::{getuid, Uid, User};
use serde::de::{self, Deserializer, IntoDeserializer, Unexpected};
use serde::Deserialize;

/// Where the config file is read from when no `--config` is given. It may be
/// absent: then the built-in defaults apply.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sticky-dispatch/config.toml";

/// Prefix of the environment variables that set config keys.
const ENV_PREFIX: &str = "STICKY_DISPATCH_";
/// Variables under [`ENV_PREFIX`] that are not config keys: the worker index
/// systemd hands to a worker, and the config file path (read by the
/// command-line parser). They must not trip the unknown-key check.
const ENV_NOT_KEYS: &[&str] = &["INDEX", "CONFIG"];

/// Source name used for values nobody set.
const DEFAULTS_SOURCE: &str = "built-in defaults";
/// Source name of the command-line layer.
const COMMAND_LINE_SOURCE: &str = "command line";

/// Upper bound on `workers`: far beyond any sane deployment, and it keeps the
/// socket name length check and per-worker tables small.
const MAX_WORKERS: u32 = 4096;
/// An abstract socket name lives in `sun_path` (108 bytes) after its leading
/// NUL byte.
const MAX_ABSTRACT_NAME: usize = 107;
/// Upper bound on timeouts, so that adding one to `Instant::now()` elsewhere
/// can never overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

const DEFAULT_WORKER_UNIT: &str = "app@.service";
const DEFAULT_SOCKET_PREFIX: &str = "sticky-dispatch/";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_SHUTDOWN_TIMEOUT: &str = "60s";
const DEFAULT_PENDING_TIMEOUT: &str = "30s";
const DEFAULT_MAX_PENDING: usize = 1024;
const DEFAULT_MAX_IN_FLIGHT: usize = 256;
const DEFAULT_MAX_CONNECTIONS: usize = 16384;
const DEFAULT_IPV4_PREFIX: u8 = 32;
const DEFAULT_IPV6_PREFIX: u8 = 64;
const DEFAULT_HASH_SEED: u64 = 0;
const DEFAULT_TRUSTED_HOPS: u8 = 1;
const DEFAULT_KEY_TIMEOUT: &str = "5s";
const DEFAULT_KEY_MAX_BYTES: usize = 8192;

/// Values given on the command line; they override every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config PATH`: read this file instead of [`DEFAULT_CONFIG_PATH`]. Unlike
    /// the default path, it must exist.
    pub config_path: Option<PathBuf>,
    /// `--listen ADDR` (repeatable); empty means "not given".
    pub listen: Vec<SocketAddr>,
    /// `--workers N`.
    pub workers: Option<u32>,
    /// `--log-level FILTER`.
    pub log_level: Option<String>,
}

/// What happens to a connection whose worker is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnWorkerDown {
    /// Hold the connection until the worker is back (up to
    /// `pending_timeout`), so that the client keeps its worker.
    Wait,
    /// Hand the connection to another worker that is up, trading the
    /// client's session for not waiting.
    Failover,
}

impl OnWorkerDown {
    /// The name used in the config file.
    fn as_str(self) -> &'static str {
        match self {
            OnWorkerDown::Wait => "wait",
            OnWorkerDown::Failover => "failover",
        }
    }
}

impl fmt::Display for OnWorkerDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection is routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// The client's IP address as seen by the dispatcher (`getpeername`).
    PeerIp,
    /// The client address in a PROXY protocol v1/v2 header, which every connection
    /// must start with (behind HAProxy `send-proxy-v2`, nginx `proxy_protocol`).
    ProxyProtocol,
    /// The client address in the HTTP `X-Forwarded-For` header, `trusted_hops` from
    /// the right; the peer IP when the header is absent.
    XForwardedFor,
    /// The value of the HTTP cookie `key_name`; the peer IP when absent.
    Cookie,
    /// The value of the query parameter `key_name`; the peer IP when absent.
    Query,
}

impl KeySource {
    /// The name used in the config file.
    fn as_str(self) -> &'static str {
        match self {
            KeySource::PeerIp => "peer-ip",
            KeySource::ProxyProtocol => "proxy-protocol",
            KeySource::XForwardedFor => "x-forwarded-for",
            KeySource::Cookie => "cookie",
            KeySource::Query => "query",
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The validated, effective configuration of the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Number of workers; connections go to indices `0..workers`.
    pub workers: NonZeroU32,
    /// systemd template unit of a worker, e.g. `app@.service`; instance `N`
    /// is `app@N.service`.
    pub worker_unit: String,
    /// Prefix of the workers' abstract link socket names; see
    /// [`Settings::link_socket_name`].
    pub socket_prefix: String,
    /// Addresses to listen on in standalone mode (no socket activation).
    pub listen: Vec<SocketAddr>,
    /// Log filter in `EnvFilter` syntax; known to parse.
    pub log_level: String,
    /// How long shutdown waits for held connections before exiting anyway.
    pub shutdown_timeout: Duration,
    /// How long a connection waits for a worker that is down.
    pub pending_timeout: Duration,
    /// Per worker: connections that may wait while it is down.
    pub max_pending: NonZeroUsize,
    /// Per worker: connections handed over but not yet acknowledged.
    pub max_in_flight: NonZeroUsize,
    /// Total connections held (pending + unacknowledged) before the
    /// dispatcher pauses accepting.
    pub max_connections: NonZeroUsize,
    /// What to do with a connection whose worker is down.
    pub on_worker_down: OnWorkerDown,
    /// What connections are routed by.
    pub routing_key: KeySource,
    /// Cookie or query parameter name for `cookie`/`query` routing.
    pub key_name: String,
    /// Proxies in front that append to `X-Forwarded-For`.
    pub trusted_hops: u8,
    /// How long a client may take to send what its key is read from.
    pub key_timeout: Duration,
    /// How many bytes are peeked at for the key at most.
    pub key_max_bytes: usize,
    /// Leading bits of an IPv4 client address that are hashed (0..=32).
    pub ipv4_prefix: u8,
    /// Leading bits of an IPv6 client address that are hashed (0..=128).
    pub ipv6_prefix: u8,
    /// Seed of the client-to-worker hash.
    pub hash_seed: u64,
    /// Uids allowed to own a worker's link socket (checked with
    /// `SO_PEERCRED`). Never empty: when the key is unset or empty it holds
    /// the dispatcher's own uid and root.
    pub worker_users: Vec<Uid>,
    /// Uids a worker accepts as its dispatcher, passed on to the workers.
    /// Empty means each worker's own uid and root; the worker applies that
    /// default because only it knows which user it runs as.
    pub dispatcher_users: Vec<Uid>,
    /// Where the file layer came from, for logs: e.g.
    /// "/etc/sticky-dispatch/config.toml" or "built-in defaults (no
    /// /etc/sticky-dispatch/config.toml)".
    pub config_file: String,
}

impl Settings {
    /// Load with the layering described in the [module docs](self). `env` is
    /// injected for tests: an iterator of (name, value) pairs; the binary
    /// passes `std::env::vars()`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key and the layer at fault for: an
    /// explicitly given config file that cannot be read (the default one may
    /// be absent), TOML syntax errors, unknown keys (in the file or as
    /// `STICKY_DISPATCH_*` variables), values of the wrong type or out of
    /// range, and user names that do not resolve.
    pub fn load(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Self::load_with_default_path(overrides, env, Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Settings::load`] with the default file path as a parameter, so that
    /// tests do not depend on what is installed in `/etc`.
    fn load_with_default_path(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
        default_path: &Path,
    ) -> Result<Settings, ConfigError> {
        let (file, config_file) = match &overrides.config_path {
            Some(path) => (read_config_file(path, true)?, path.display().to_string()),
            None => match read_config_file(default_path, false)? {
                Some(layer) => (Some(layer), default_path.display().to_string()),
                None => (
                    None,
                    format!("{DEFAULTS_SOURCE} (no {})", default_path.display()),
                ),
            },
        };

        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(file);
        }
        for layer in env_layers(env) {
            figment = figment.merge(layer);
        }
        figment = figment.merge(override_layer(overrides));

        let raw: RawConfig = figment
            .extract()
            .map_err(|error| extraction_error(&figment, error))?;
        Validator { figment: &figment }.validate(raw, config_file)
    }

    /// Name of the socket for worker `index`: `{socket_prefix}{index}`
    /// (abstract namespace; no leading '@' in the returned string).
    pub fn link_socket_name(&self, index: u32) -> String {
        format!("{}{}", self.socket_prefix, index)
    }
}

/// Renders the effective configuration as a valid config file (users as
/// numeric uids), for `check-config`: what is printed can be saved and loaded
/// back to the same settings.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# Effective sticky-dispatch configuration.")?;
        // escape_debug keeps an odd path on the comment line.
        writeln!(f, "# Config file: {}", self.config_file.escape_debug())?;
        writeln!(f, "workers = {}", self.workers)?;
        writeln!(f, "worker_unit = {}", TomlStr(&self.worker_unit))?;
        writeln!(f, "socket_prefix = {}", TomlStr(&self.socket_prefix))?;
        write_list(
            f,
            "listen",
            self.listen
                .iter()
                .map(|a| TomlStr(&a.to_string()).to_string()),
        )?;
        writeln!(f, "log_level = {}", TomlStr(&self.log_level))?;
        writeln!(
            f,
            "shutdown_timeout = {}",
            TomlDuration(self.shutdown_timeout)
        )?;
        writeln!(
            f,
            "pending_timeout = {}",
            TomlDuration(self.pending_timeout)
        )?;
        writeln!(f, "max_pending = {}", self.max_pending)?;
        writeln!(f, "max_in_flight = {}", self.max_in_flight)?;
        writeln!(f, "max_connections = {}", self.max_connections)?;
        writeln!(
            f,
            "on_worker_down = {}",
            TomlStr(self.on_worker_down.as_str())
        )?;
        writeln!(f, "routing_key = {}", TomlStr(self.routing_key.as_str()))?;
        writeln!(f, "key_name = {}", TomlStr(&self.key_name))?;
        writeln!(f, "trusted_hops = {}", self.trusted_hops)?;
        writeln!(f, "key_timeout = {}", TomlDuration(self.key_timeout))?;
        writeln!(f, "key_max_bytes = {}", self.key_max_bytes)?;
        writeln!(f, "ipv4_prefix = {}", self.ipv4_prefix)?;
        writeln!(f, "ipv6_prefix = {}", self.ipv6_prefix)?;
        // TOML integers are i64; larger seeds are accepted as strings.
        if i64::try_from(self.hash_seed).is_ok() {
            writeln!(f, "hash_seed = {}", self.hash_seed)?;
        } else {
            writeln!(f, "hash_seed = \"{}\"", self.hash_seed)?;
        }
        write_list(
            f,
            "worker_users",
            self.worker_users.iter().map(|u| u.to_string()),
        )?;
        write_list(
            f,
            "dispatcher_users",
            self.dispatcher_users.iter().map(|u| u.to_string()),
        )
    }
}

/// Writes `key = [a, b, ...]` with already rendered items.
fn write_list(
    f: &mut fmt::Formatter<'_>,
    key: &str,
    items: impl Iterator<Item = String>,
) -> fmt::Result {
    let items: Vec<String> = items.collect();
    writeln!(f, "{key} = [{}]", items.join(", "))
}

/// A TOML basic string, quoted and escaped.
struct TomlStr<'a>(&'a str);

impl fmt::Display for TomlStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                // Control characters are all below U+00A0, so 4 digits do.
                c if c.is_control() => write!(f, "\\u{:04X}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// A duration as a quoted humantime string, e.g. `"1m 30s"`.
struct TomlDuration(Duration);

impl fmt::Display for TomlDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", humantime::format_duration(self.0))
    }
}

/// A configuration error: which key was wrong (if one was), in which layer,
/// and why. The daemon exits with status 78 (`EX_CONFIG`) on it.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {}{message}", key_part(.key))]
pub struct ConfigError {
    /// The config key at fault, if the error is about one key. `None` for
    /// errors about a whole source, such as an unreadable file, a TOML
    /// syntax error or an unknown key (whose name is in the message).
    pub key: Option<String>,
    /// The layer that set the bad value: the config file's path, the
    /// environment variable's name (e.g. `STICKY_DISPATCH_WORKERS`),
    /// "command line" or "built-in defaults".
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

/// One documented key, for generating docs (README table, man page) from the
/// definitions so they cannot drift.
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    /// The key, as written in the file; the environment variable is
    /// `STICKY_DISPATCH_` followed by it in upper case.
    pub name: &'static str,
    /// The default as a TOML value, or in words when it depends on the
    /// machine.
    pub default: &'static str,
    /// What the key does and why one would change it.
    pub doc: &'static str,
}

/// Every config key, in the order of the shipped config file.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc {
        name: "workers",
        default: "number of CPUs",
        doc: "Number of worker instances (1..=4096). Each client IP always goes to the same \
              index, so changing it remaps most clients to another worker.",
    },
    KeyDoc {
        name: "worker_unit",
        default: "\"app@.service\"",
        doc: "systemd template unit that runs one worker; instance N is `<name>@N.service`. \
              Must end in `@.service`.",
    },
    KeyDoc {
        name: "socket_prefix",
        default: "\"sticky-dispatch/\"",
        doc: "Prefix of the abstract Unix socket of worker N (`@<socket_prefix>N`). Change it \
              to run several dispatchers on one host; workers must use the same prefix.",
    },
    KeyDoc {
        name: "listen",
        default: "[]",
        doc: "Socket addresses to listen on in standalone mode, e.g. \
              `[\"127.0.0.1:8080\", \"[::1]:8080\"]`. Leave empty under socket activation.",
    },
    KeyDoc {
        name: "log_level",
        default: "\"info\"",
        doc: "Log filter in RUST_LOG syntax, e.g. `\"info,sticky_dispatch=debug\"`.",
    },
    KeyDoc {
        name: "shutdown_timeout",
        default: "\"60s\"",
        doc: "How long shutdown waits for held connections to be handed over before exiting \
              anyway. Keep it below the unit's TimeoutStopSec.",
    },
    KeyDoc {
        name: "pending_timeout",
        default: "\"30s\"",
        doc: "How long a connection waits for a worker that is down before `on_worker_down` \
              applies; once a worker has been down this long, its new connections get \
              `on_worker_down` at once.",
    },
    KeyDoc {
        name: "max_pending",
        default: "1024",
        doc: "Per worker: connections that may wait while it is down; further ones get \
              `on_worker_down` at once.",
    },
    KeyDoc {
        name: "max_in_flight",
        default: "256",
        doc: "Per worker: connections handed over but not yet acknowledged.",
    },
    KeyDoc {
        name: "max_connections",
        default: "16384",
        doc: "Total connections held (waiting plus unacknowledged) before the dispatcher \
              pauses accepting. Keep it well below the file-descriptor limit.",
    },
    KeyDoc {
        name: "on_worker_down",
        default: "\"wait\"",
        doc: "After `pending_timeout`, `\"wait\"` closes the connection (clients only ever \
              reach their own worker); `\"failover\"` sends it to a deterministic other \
              live worker (served, but without its session).",
    },
    KeyDoc {
        name: "routing_key",
        default: "\"peer-ip\"",
        doc: "What connections are routed by: `\"peer-ip\"` (the client's address), \
              `\"proxy-protocol\"` (the client in a PROXY v1/v2 header every connection starts \
              with), `\"x-forwarded-for\"`, `\"cookie\"` or `\"query\"` (read from the HTTP \
              request head without consuming it; the peer IP when absent).",
    },
    KeyDoc {
        name: "key_name",
        default: "\"\"",
        doc: "For `routing_key = \"cookie\"` or `\"query\"`: the cookie or query parameter \
              whose value is the key. The value must be there from a client's first request \
              (socket.io's `sid` is not: it is assigned by the worker).",
    },
    KeyDoc {
        name: "trusted_hops",
        default: "1",
        doc: "For `routing_key = \"x-forwarded-for\"`: how many proxies in front append to \
              the header; the client is that many entries from the right (1..=32).",
    },
    KeyDoc {
        name: "key_timeout",
        default: "\"5s\"",
        doc: "How long a client may take to send what its key is read from (PROXY header, \
              HTTP request head); then it is closed. Never holds up other clients.",
    },
    KeyDoc {
        name: "key_max_bytes",
        default: "8192",
        doc: "The most bytes peeked at for the key (64..=65536); a request head longer than \
              this is routed by the peer IP.",
    },
    KeyDoc {
        name: "ipv4_prefix",
        default: "32",
        doc: "Leading bits of an IPv4 client address that are hashed (0..=32); lower it to \
              keep clients of one network together.",
    },
    KeyDoc {
        name: "ipv6_prefix",
        default: "64",
        doc: "Leading bits of an IPv6 client address that are hashed (0..=128); 64 keeps a \
              host whose temporary addresses change on the same worker.",
    },
    KeyDoc {
        name: "hash_seed",
        default: "0",
        doc: "Seed of the client-to-worker hash; a secret one keeps clients from predicting \
              their worker. Changing it remaps all clients. Write values above i64::MAX as a \
              string.",
    },
    KeyDoc {
        name: "worker_users",
        default: "[]",
        doc: "Users (names or uids) allowed to own a worker's socket, checked with \
              SO_PEERCRED. Empty: the dispatcher's own uid and root.",
    },
    KeyDoc {
        name: "dispatcher_users",
        default: "[]",
        doc: "Users (names or uids) a worker accepts as its dispatcher, passed to the workers. \
              Empty: the worker's own uid and root.",
    },
];

/// The config as written in a file: every key optional (the defaults are
/// applied during validation, so figment only holds what a layer actually
/// set and can name it), unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workers: Option<u32>,
    worker_unit: Option<String>,
    socket_prefix: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    listen: Option<Vec<String>>,
    log_level: Option<String>,
    shutdown_timeout: Option<String>,
    pending_timeout: Option<String>,
    max_pending: Option<usize>,
    max_in_flight: Option<usize>,
    max_connections: Option<usize>,
    on_worker_down: Option<OnWorkerDown>,
    routing_key: Option<KeySource>,
    key_name: Option<String>,
    trusted_hops: Option<u8>,
    key_timeout: Option<String>,
    key_max_bytes: Option<usize>,
    ipv4_prefix: Option<u8>,
    ipv6_prefix: Option<u8>,
    #[serde(default, deserialize_with = "hash_seed")]
    hash_seed: Option<u64>,
    #[serde(default, deserialize_with = "one_or_many")]
    worker_users: Option<Vec<UserSpec>>,
    #[serde(default, deserialize_with = "one_or_many")]
    dispatcher_users: Option<Vec<UserSpec>>,
}

/// A user as written in the config: a name, or a numeric uid (a number, or a
/// string of digits, as systemd accepts).
#[derive(Debug, Clone, PartialEq)]
enum UserSpec {
    Uid(u32),
    Name(String),
}

impl<'de> Deserialize<'de> for UserSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = UserSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user name or a numeric uid")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UserSpec, E> {
                u32::try_from(v)
                    .map(UserSpec::Uid)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UserSpec, E> {
                u32::try_from(v)
                    .map(UserSpec::Uid)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UserSpec, E> {
                Ok(match v.parse::<u32>() {
                    Ok(uid) => UserSpec::Uid(uid),
                    Err(_) => UserSpec::Name(v.to_owned()),
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Accepts a list, or a single value as a list of one: convenient in
/// environment variables (`STICKY_DISPATCH_WORKER_USERS=app`).
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }
    }
    deserializer.deserialize_any(Visitor(PhantomData)).map(Some)
}

/// Accepts the seed as an integer or, since TOML integers stop at
/// `i64::MAX`, as a string of digits.
fn hash_seed<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an unsigned 64-bit integer (or a string of one)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
        }
    }
    deserializer.deserialize_any(Visitor).map(Some)
}

/// One layer of settings with its own metadata. Every environment variable
/// is a layer of its own so that an error can name the exact variable.
struct Layer {
    metadata: Metadata,
    data: Map<Profile, Dict>,
}

impl Layer {
    fn new(name: &str, source: Source, dict: Dict) -> Layer {
        Layer {
            metadata: Metadata::from(name.to_owned(), source),
            data: Profile::Default.collect(dict),
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

/// Reads and parses the config file. `Ok(None)` if it is the default path and
/// absent; a path given explicitly must exist.
fn read_config_file(path: &Path, explicit: bool) -> Result<Option<Layer>, ConfigError> {
    let file_error = |message: String| ConfigError {
        key: None,
        source_name: path.display().to_string(),
        message,
    };
    let contents = match std::fs::read_to_string(path) {
        Ok(contents) => contents,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => return Ok(None),
        Err(e) => return Err(file_error(format!("cannot read config file: {e}"))),
    };
    // Parsed here rather than by figment so that a syntax error is reported
    // against the file instead of as a "TOML source string".
    let mut data = Toml::string(&contents)
        .data()
        .map_err(|e| file_error(e.kind.to_string().trim_end().to_owned()))?;
    let dict = data.remove(&Profile::Default).unwrap_or_default();
    Ok(Some(Layer::new(
        "config file",
        Source::File(path.to_owned()),
        dict,
    )))
}

/// How an environment variable's value is read for a key.
enum EnvKind {
    /// Taken literally: a log filter like `info,x=debug` must not be parsed
    /// as a list, nor `123` as a number.
    Text,
    /// A `[...]` list in figment's syntax, or else one literal item: so that
    /// `[::1]:80` is an address, not a list.
    List,
    /// Parsed by figment: numbers become numbers.
    Parsed,
}

fn env_kind(key: &str) -> EnvKind {
    match key {
        "worker_unit" | "socket_prefix" | "log_level" | "shutdown_timeout" | "pending_timeout"
        | "on_worker_down" | "routing_key" | "key_name" | "key_timeout" => EnvKind::Text,
        "listen" | "worker_users" | "dispatcher_users" => EnvKind::List,
        _ => EnvKind::Parsed,
    }
}

/// One layer per `STICKY_DISPATCH_<KEY>` variable, in name order.
fn env_layers(env: impl IntoIterator<Item = (String, String)>) -> Vec<Layer> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix(ENV_PREFIX).is_some_and(|key| {
                !key.is_empty()
                    && !ENV_NOT_KEYS
                        .iter()
                        .any(|not_key| key.eq_ignore_ascii_case(not_key))
            })
        })
        .collect();
    vars.sort();
    vars.into_iter()
        .map(|(name, raw)| {
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            let parse = |raw: &str| match raw.parse::<Value>() {
                Ok(value) => value,
                Err(never) => match never {},
            };
            let value = match env_kind(&key) {
                EnvKind::Text => Value::from(raw),
                EnvKind::List => {
                    let trimmed = raw.trim();
                    if trimmed.starts_with('[') && trimmed.ends_with(']') {
                        parse(trimmed)
                    } else {
                        Value::from(raw)
                    }
                }
                EnvKind::Parsed => parse(&raw),
            };
            let mut dict = Dict::new();
            dict.insert(key, value);
            Layer::new("environment variable", Source::Custom(name), dict)
        })
        .collect()
}

/// The command-line layer: only what was given.
fn override_layer(overrides: &Overrides) -> Layer {
    let mut dict = Dict::new();
    if let Some(workers) = overrides.workers {
        dict.insert("workers".into(), Value::from(workers));
    }
    if !overrides.listen.is_empty() {
        let listen: Vec<Value> = overrides
            .listen
            .iter()
            .map(|addr| Value::from(addr.to_string()))
            .collect();
        dict.insert("listen".into(), Value::from(listen));
    }
    if let Some(log_level) = &overrides.log_level {
        dict.insert("log_level".into(), Value::from(log_level.clone()));
    }
    Layer::new(
        COMMAND_LINE_SOURCE,
        Source::Custom(COMMAND_LINE_SOURCE.into()),
        dict,
    )
}

/// The name of a layer as shown in errors: a file path, a variable name,
/// "command line".
fn source_name(metadata: &Metadata) -> String {
    match &metadata.source {
        Some(Source::File(path)) => path.display().to_string(),
        Some(Source::Custom(name)) => name.clone(),
        _ => metadata.name.to_string(),
    }
}

/// Converts a figment extraction error into a [`ConfigError`] naming the key
/// and the layer that set it.
fn extraction_error(figment: &Figment, error: figment::Error) -> ConfigError {
    // serde stops at the first error, so the chain holds only one.
    let error = error.into_iter().next().expect("an error has one entry");
    let key = error.path.first().cloned();
    let (key, lookup, message) = match &error.kind {
        Kind::UnknownField(field, expected) => (
            None,
            Some(field.clone()),
            format!("unknown key `{field}`, expected {}", OneOf(expected)),
        ),
        Kind::UnknownVariant(value, expected) => (
            key.clone(),
            key,
            format!("unknown value `{value}`, expected {}", OneOf(expected)),
        ),
        kind => (key.clone(), key, kind.to_string()),
    };
    // The merged top-level dict has no provider, so look up the key itself.
    let source_name = lookup
        .as_deref()
        .and_then(|key| figment.find_metadata(key))
        .or(error.metadata.as_ref())
        .map(source_name)
        .unwrap_or_else(|| DEFAULTS_SOURCE.to_owned());
    ConfigError {
        key,
        source_name,
        message,
    }
}

/// Turns a [`RawConfig`] into [`Settings`], naming the layer of a bad value.
struct Validator<'a> {
    figment: &'a Figment,
}

impl Validator<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let source_name = self
            .figment
            .find_metadata(key)
            .map(source_name)
            .unwrap_or_else(|| DEFAULTS_SOURCE.to_owned());
        ConfigError {
            key: Some(key.to_owned()),
            source_name,
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig, config_file: String) -> Result<Settings, ConfigError> {
        let workers = raw.workers.unwrap_or_else(default_workers);
        let workers = NonZeroU32::new(workers)
            .filter(|w| w.get() <= MAX_WORKERS)
            .ok_or_else(|| {
                self.error(
                    "workers",
                    format!("must be between 1 and {MAX_WORKERS}, got {workers}"),
                )
            })?;

        let worker_unit = raw
            .worker_unit
            .unwrap_or_else(|| DEFAULT_WORKER_UNIT.to_owned());
        check_worker_unit(&worker_unit).map_err(|m| self.error("worker_unit", m))?;

        let socket_prefix = raw
            .socket_prefix
            .unwrap_or_else(|| DEFAULT_SOCKET_PREFIX.to_owned());
        check_socket_prefix(&socket_prefix, workers).map_err(|m| self.error("socket_prefix", m))?;

        let listen = raw
            .listen
            .unwrap_or_default()
            .iter()
            .map(|addr| {
                addr.trim().parse::<SocketAddr>().map_err(|_| {
                    self.error(
                        "listen",
                        format!(
                            "`{addr}` is not a socket address \
                             (expected e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let log_level = raw
            .log_level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| {
            self.error(
                "log_level",
                format!("invalid log filter `{log_level}`: {e}"),
            )
        })?;

        let shutdown_timeout = self.timeout(
            "shutdown_timeout",
            raw.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        )?;
        let pending_timeout = self.timeout(
            "pending_timeout",
            raw.pending_timeout,
            DEFAULT_PENDING_TIMEOUT,
        )?;

        let max_pending = self.at_least_one("max_pending", raw.max_pending, DEFAULT_MAX_PENDING)?;
        let max_in_flight =
            self.at_least_one("max_in_flight", raw.max_in_flight, DEFAULT_MAX_IN_FLIGHT)?;
        let max_connections = self.at_least_one(
            "max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        )?;

        let routing_key = raw.routing_key.unwrap_or(KeySource::PeerIp);
        let key_name = raw.key_name.unwrap_or_default();
        let named = matches!(routing_key, KeySource::Cookie | KeySource::Query);
        if named && key_name.is_empty() {
            return Err(self.error(
                "key_name",
                format!("routing_key = \"{routing_key}\" needs the name of the {routing_key} in key_name"),
            ));
        }
        if !key_name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"=;&,".contains(&b))
        {
            return Err(self.error(
                "key_name",
                format!("`{key_name}` is not a valid cookie or parameter name"),
            ));
        }
        let trusted_hops = raw.trusted_hops.unwrap_or(DEFAULT_TRUSTED_HOPS);
        if !(1..=32).contains(&trusted_hops) {
            return Err(self.error(
                "trusted_hops",
                format!("must be between 1 and 32, got {trusted_hops}"),
            ));
        }
        let key_timeout = self.timeout("key_timeout", raw.key_timeout, DEFAULT_KEY_TIMEOUT)?;
        let key_max_bytes = raw.key_max_bytes.unwrap_or(DEFAULT_KEY_MAX_BYTES);
        if !(64..=65536).contains(&key_max_bytes) {
            return Err(self.error(
                "key_max_bytes",
                format!("must be between 64 and 65536, got {key_max_bytes}"),
            ));
        }

        let ipv4_prefix =
            self.prefix_len("ipv4_prefix", raw.ipv4_prefix, DEFAULT_IPV4_PREFIX, 32)?;
        let ipv6_prefix =
            self.prefix_len("ipv6_prefix", raw.ipv6_prefix, DEFAULT_IPV6_PREFIX, 128)?;

        let mut worker_users = self.users("worker_users", raw.worker_users)?;
        if worker_users.is_empty() {
            worker_users = vec![getuid(), Uid::from_raw(0)];
            worker_users.dedup();
        }
        let dispatcher_users = self.users("dispatcher_users", raw.dispatcher_users)?;

        Ok(Settings {
            workers,
            worker_unit,
            socket_prefix,
            listen,
            log_level,
            shutdown_timeout,
            pending_timeout,
            max_pending,
            max_in_flight,
            max_connections,
            on_worker_down: raw.on_worker_down.unwrap_or(OnWorkerDown::Wait),
            routing_key,
            key_name,
            trusted_hops,
            key_timeout,
            key_max_bytes,
            ipv4_prefix,
            ipv6_prefix,
            hash_seed: raw.hash_seed.unwrap_or(DEFAULT_HASH_SEED),
            worker_users,
            dispatcher_users,
            config_file,
        })
    }

    fn timeout(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        let duration = humantime::parse_duration(value.trim()).map_err(|e| {
            self.error(
                key,
                format!("invalid duration `{value}`: {e} (expected e.g. \"30s\" or \"2m 30s\")"),
            )
        })?;
        if duration.is_zero() {
            return Err(self.error(key, "must be greater than zero"));
        }
        if duration > MAX_TIMEOUT {
            return Err(self.error(
                key,
                format!(
                    "must be at most {}",
                    humantime::format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        Ok(duration)
    }

    fn at_least_one(
        &self,
        key: &str,
        value: Option<usize>,
        default: usize,
    ) -> Result<NonZeroUsize, ConfigError> {
        NonZeroUsize::new(value.unwrap_or(default))
            .ok_or_else(|| self.error(key, "must be at least 1, got 0"))
    }

    fn prefix_len(
        &self,
        key: &str,
        value: Option<u8>,
        default: u8,
        max: u8,
    ) -> Result<u8, ConfigError> {
        let value = value.unwrap_or(default);
        if value > max {
            return Err(self.error(key, format!("must be between 0 and {max}, got {value}")));
        }
        Ok(value)
    }

    fn users(&self, key: &str, specs: Option<Vec<UserSpec>>) -> Result<Vec<Uid>, ConfigError> {
        let mut uids = Vec::new();
        for spec in specs.unwrap_or_default() {
            let uid = match spec {
                UserSpec::Uid(uid) => Uid::from_raw(uid),
                UserSpec::Name(name) if name.is_empty() => {
                    return Err(self.error(key, "empty user name"))
                }
                UserSpec::Name(name) => match User::from_name(&name) {
                    Ok(Some(user)) => user.uid,
                    Ok(None) => return Err(self.error(key, format!("unknown user `{name}`"))),
                    Err(e) => {
                        return Err(self.error(key, format!("cannot look up user `{name}`: {e}")))
                    }
                },
            };
            if !uids.contains(&uid) {
                uids.push(uid);
            }
        }
        Ok(uids)
    }
}

/// The default for `workers`: one per CPU, as the dispatcher itself is
/// cheap and a worker per CPU uses the machine without oversubscribing it.
fn default_workers() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cpus).unwrap_or(MAX_WORKERS).min(MAX_WORKERS)
}

/// A template unit name: `<name>@.service` with a non-empty `<name>` made of
/// the characters systemd allows in unit names.
fn check_worker_unit(unit: &str) -> Result<(), String> {
    let Some(name) = unit.strip_suffix("@.service") else {
        return Err(format!(
            "`{unit}` is not a template unit: it must end in \"@.service\", e.g. \"app@.service\""
        ));
    };
    if name.is_empty() {
        return Err(format!("`{unit}` has no name before '@'"));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || ":-_.\\".contains(c)))
    {
        return Err(format!(
            "`{unit}` contains {c:?}, which systemd does not allow in unit names"
        ));
    }
    // systemd's limit on unit names (UNIT_NAME_MAX - 1), with the longest
    // instance number filled in.
    let longest = unit.len() + (MAX_WORKERS - 1).to_string().len();
    if longest > 255 {
        return Err(format!("`{unit}` is too long for a unit name"));
    }
    Ok(())
}

/// The prefix must be usable as the start of an abstract socket name for
/// every worker index.
fn check_socket_prefix(prefix: &str, workers: NonZeroU32) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if prefix.contains('\0') {
        return Err("must not contain a NUL byte".to_owned());
    }
    let longest = format!("{prefix}{}", workers.get() - 1);
    if longest.len() > MAX_ABSTRACT_NAME {
        return Err(format!(
            "too long: the socket name of the last worker would be {} bytes, \
             an abstract socket name holds at most {MAX_ABSTRACT_NAME}",
            longest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
            key_name: String::new(),
            trusted_hops: 1,
            key_timeout: Duration::from_secs(5),
            key_max_bytes: 8192,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            hash_seed: 0,
            worker_users: own_and_root,
            dispatcher_users: vec![],
            config_file: format!("built-in defaults (no {})", missing_default().display()),
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
            .map(|k| format!("{} = {}\n", k.name, k.default))
            .collect();
        let (_file, s) = load_file(&toml, &[]);
        same(s.unwrap(), &defaults());
        // Every raw field is documented.
        let err = load_file("nope = 1\n", &[]).1.unwrap_err();
        for key in KEYS {
            assert!(err.message.contains(&format!("`{}`", key.name)), "{}", err);
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
                "{}: unknown key `wrokers`, expected one of `workers`",
                file.name()
            )),
            "{text}"
        );
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
                "listen = [\"localhost:80\"]",
                "listen",
                "`localhost:80` is not a socket address",
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
            _ => KEYS.iter().find(|k| k.name == key).unwrap().default,
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
            listen: vec![
                "127.0.0.1:8080".parse().unwrap(),
                "[::1]:8080".parse().unwrap(),
            ],
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
}
