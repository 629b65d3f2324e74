//! Every configuration key, defined once.
//!
//! One entry of the [`keys!`] table below gives a key's typed value and the check that
//! produces it from the raw value in the file, its default, whether a reload applies it
//! live or it needs a restart, and its documentation. From the table come: the
//! [`Settings`] fields, the raw serde struct figment extracts (with its unknown-key check),
//! the built-in defaults layer, how an environment variable is read for the key (from the
//! raw type, [`RawValue::ENV`]), the reload logic, `check-config`'s output, and the
//! documentation tables ([`KEYS`]: docs/configuration.md, manual page). Adding a key is adding an entry
//! (and a line to the shipped `config/config.toml`, which a test holds to the table).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use nix::unistd::Uid;
use serde::{Deserialize, Serialize};

use super::values::{
    self, Dispatch, EnvKind, KeySource, OnWorkerDown, OneOrMany, RawValue, Seed, UserSpec,
};
use super::ConfigError;

/// When a changed value takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// `systemctl reload sticky-dispatch` (SIGHUP) applies it to the running dispatcher.
    Live,
    /// Only a restart applies it; a reload that changes it keeps the running value and
    /// says so in the log and in `STATUS=`.
    Restart,
}

impl Reload {
    /// As shown in the docs and in `check-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reload::Live => "live",
            Reload::Restart => "restart",
        }
    }
}

/// A key's built-in default.
#[derive(Debug, Clone, Copy)]
pub enum Default {
    /// A TOML value.
    Toml(&'static str),
    /// Depends on the machine: described in words, computed (as TOML) at load time.
    Computed {
        /// What the docs show.
        shown: &'static str,
        /// The value on this machine, as TOML.
        toml: fn() -> String,
    },
}

/// One configuration key, for the defaults layer, environment variables and the docs.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key, as written in the file; the environment variable is `STICKY_DISPATCH_`
    /// followed by it in upper case.
    pub name: &'static str,
    /// The built-in default.
    pub default: Default,
    /// Whether a reload applies a change.
    pub reload: Reload,
    /// How the environment variable's text is read.
    pub env: EnvKind,
    /// What the key does and why one would change it.
    pub doc: &'static str,
}

impl Key {
    /// The default as the docs show it: a TOML value, or words.
    pub fn default_text(&self) -> &'static str {
        match self.default {
            Default::Toml(text) => text,
            Default::Computed { shown, .. } => shown,
        }
    }

    /// The default as a TOML value on this machine.
    pub(super) fn default_toml(&self) -> String {
        match self.default {
            Default::Toml(text) => text.to_owned(),
            Default::Computed { toml, .. } => toml(),
        }
    }
}

/// Generates, from one entry per key: [`Settings`] (typed fields, plus where the file
/// came from and what a reload could not apply), [`Raw`], [`KEYS`], the per-key checks
/// ([`Raw::check`]) and the reload merge ([`Settings::merge_reload`]).
macro_rules! keys {
    ($(
        $key:ident: $typed:ty = $check:path [$raw:ty],
            default $default:expr, reload $reload:ident,
            $doc:literal;
    )*) => {
        /// The validated, effective configuration of the dispatcher: one field per key
        /// (see [`KEYS`] for each key's documentation).
        #[derive(Debug, Clone)]
        pub struct Settings {
            $(
                #[doc = $doc]
                pub $key: $typed,
            )*
            /// Where the file layer came from, for logs: e.g.
            /// "/etc/sticky-dispatch/config.toml" or "built-in defaults (no
            /// /etc/sticky-dispatch/config.toml)".
            pub config_file: String,
            /// Restart-only keys whose value in the configuration differs from the running
            /// one since a reload: shown in `STATUS=` until the next restart.
            pub restart_needed: Vec<&'static str>,
            /// Keys that a layer above the built-in defaults sets (a file, a variable, a
            /// flag), even to the default value: defaults that depend on how the
            /// dispatcher runs (standalone's own `socket_prefix`) yield to them.
            pub given: Vec<&'static str>,
            /// The values as written, for `check-config`.
            pub(super) raw: Raw,
        }

        /// Settings compare by their effective values, not by how they were written
        /// (`"60s"` and `"1m"` are the same timeout).
        impl PartialEq for Settings {
            fn eq(&self, other: &Settings) -> bool {
                $(self.$key == other.$key &&)*
                    self.config_file == other.config_file
                    && self.restart_needed == other.restart_needed
            }
        }

        /// The configuration as written in a file; figment fills every key, the lowest
        /// layer being the built-in defaults. Unknown keys are rejected.
        #[derive(Debug, Clone, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct Raw {
            $(pub(super) $key: $raw,)*
        }

        /// Every config key, in the order of the shipped config file.
        pub const KEYS: &[Key] = &[
            $(Key {
                name: stringify!($key),
                default: $default,
                reload: Reload::$reload,
                env: <$raw as RawValue>::ENV,
                doc: $doc,
            },)*
        ];

        impl Raw {
            /// Checks every key on its own; `error` names the key and the layer that set
            /// it. Checks across keys follow in [`Settings::check_across`].
            pub(super) fn check(
                self,
                error: impl Fn(&'static str, String) -> ConfigError,
                config_file: String,
            ) -> Result<Settings, ConfigError> {
                Ok(Settings {
                    $($key: $check(self.$key.clone())
                        .map_err(|message| error(stringify!($key), message))?,)*
                    config_file,
                    restart_needed: Vec::new(),
                    given: Vec::new(),
                    raw: self,
                })
            }
        }

        impl Settings {
            /// `new` with the running values of the restart-only keys; returns it with the
            /// restart-only keys that differ.
            pub(super) fn merge_reload(&self, mut new: Settings) -> (Settings, Vec<&'static str>) {
                let mut kept = Vec::new();
                $(
                    if Reload::$reload == Reload::Restart {
                        if self.$key != new.$key {
                            kept.push(stringify!($key));
                        }
                        new.$key = self.$key.clone();
                        new.raw.$key = self.raw.$key.clone();
                    }
                )*
                (new, kept)
            }
        }
    };
}

keys! {
    workers: NonZeroU32 = values::workers [u32],
        default Default::Computed {
            shown: "number of CPUs",
            toml: || values::default_workers().to_string(),
        },
        reload Restart,
        "Number of worker instances (1..=4096). Each client IP always goes to the same \
         index, so changing it remaps most clients to another worker.";
    worker_unit: String = values::worker_unit [String],
        default Default::Toml("\"app@.service\""), reload Restart,
        "systemd template unit that runs one worker; instance N is `<name>@N.service`. \
         Must end in `@.service`. Read by the generator at boot and `systemctl daemon-reload`.";
    socket_prefix: String = values::socket_prefix [String],
        default Default::Toml("\"sticky-dispatch/\""), reload Restart,
        "Prefix of the abstract Unix socket of worker N (`@<socket_prefix>N`); workers \
         take it from STICKY_DISPATCH_SOCKET_PREFIX. Each dispatcher on a host needs its \
         own: a second one with the same prefix exits 78. A standalone dispatcher that \
         spawns its workers (`-- COMMAND`) uses `sticky-dispatch/<pid>/` unless this is set.";
    listen: Vec<SocketAddr> = values::addresses [OneOrMany<String>],
        default Default::Toml("[]"), reload Restart,
        "Socket addresses to listen on in standalone mode, e.g. \
         `[\"127.0.0.1:8080\", \"[::1]:8080\"]`. Leave empty under socket activation.";
    log_level: String = values::log_filter [String],
        default Default::Toml("\"info\""), reload Live,
        "Log filter in RUST_LOG syntax, e.g. `\"info,sticky_dispatch=debug\"`.";
    shutdown_timeout: Duration = values::timeout [String],
        default Default::Toml("\"60s\""), reload Live,
        "How long shutdown waits for held connections to be handed over before exiting \
         anyway. Keep it below the unit's TimeoutStopSec.";
    pending_timeout: Duration = values::timeout [String],
        default Default::Toml("\"30s\""), reload Live,
        "How long a connection waits for a worker that is down before `on_worker_down` \
         applies; once a worker has been down this long, its new connections get \
         `on_worker_down` at once.";
    max_pending: NonZeroUsize = values::at_least_one [usize],
        default Default::Toml("1024"), reload Live,
        "Per worker: connections that may wait while it is down; further ones get \
         `on_worker_down` at once.";
    max_in_flight: NonZeroUsize = values::at_least_one [usize],
        default Default::Toml("256"), reload Live,
        "Per worker: connections handed over but not yet acknowledged.";
    max_connections: NonZeroUsize = values::at_least_one [usize],
        default Default::Toml("16384"), reload Restart,
        "Total connections held (waiting plus unacknowledged) before the dispatcher \
         pauses accepting. Keep it well below the file-descriptor limit.";
    on_worker_down: OnWorkerDown = values::any [OnWorkerDown],
        default Default::Toml("\"wait\""), reload Live,
        "After `pending_timeout`, `\"wait\"` closes the connection (clients only ever \
         reach their own worker); `\"failover\"` sends it to a deterministic other \
         live worker (served, but without its session).";
    routing_key: KeySource = values::any [KeySource],
        default Default::Toml("\"peer-ip\""), reload Restart,
        "What connections are routed by: `\"peer-ip\"` (the client's address), \
         `\"proxy-protocol\"` (the client in a PROXY v1/v2 header every connection starts \
         with), `\"x-forwarded-for\"`, `\"cookie\"` or `\"query\"` (read from the HTTP \
         request head without consuming it; the peer IP when absent).";
    dispatch: Dispatch = values::any [Dispatch],
        default Default::Toml("\"auto\""), reload Restart,
        "Which path connections take: `\"kernel\"` (each listener has a listening socket \
         per worker, a *lane*, and the kernel hands each connection to its worker's lane by \
         the client's address: no process in between), `\"userspace\"` (the dispatcher \
         accepts every connection and passes it over the link), or `\"auto\"`: the kernel \
         for `routing_key = \"peer-ip\"`, the dispatcher otherwise. A listener whose lanes \
         do not check out takes the dispatcher's path, with a log line that says why.";
    lanes: u16 = values::within::<0, 256, u16> [u16],
        default Default::Toml("0"), reload Restart,
        "Under systemd: how many lanes (listening sockets on one address) the generator \
         writes into sticky-dispatch.socket for each `ListenStream=` address; at least \
         `workers`, so that `workers` can grow up to it without restarting the socket unit. \
         0 (the default): the larger of `workers` and 16. Standalone, the dispatcher makes \
         `workers` lanes itself.";
    key_name: String = values::key_name [String],
        default Default::Toml("\"\""), reload Live,
        "For `routing_key = \"cookie\"` or `\"query\"`: the cookie or query parameter \
         whose value is the key. The value must be there from a client's first request \
         (socket.io's `sid` is not: it is assigned by the worker).";
    trusted_hops: u8 = values::within::<1, 32, u8> [u8],
        default Default::Toml("1"), reload Live,
        "For `routing_key = \"x-forwarded-for\"`: how many proxies in front append to \
         the header; the client is that many entries from the right (1..=32).";
    key_timeout: Duration = values::timeout [String],
        default Default::Toml("\"5s\""), reload Live,
        "How long a client may take to send what its key is read from (PROXY header, \
         HTTP request head); then it is closed. Never holds up other clients.";
    key_max_bytes: usize = values::within::<64, 65536, usize> [usize],
        default Default::Toml("8192"), reload Live,
        "The most bytes peeked at for the key (64..=65536); a request head longer than \
         this is routed by the peer IP.";
    ipv4_prefix: u8 = values::within::<0, 32, u8> [u8],
        default Default::Toml("32"), reload Restart,
        "Leading bits of an IPv4 client address that are hashed (0..=32); lower it to \
         keep clients of one network together.";
    ipv6_prefix: u8 = values::within::<0, 128, u8> [u8],
        default Default::Toml("64"), reload Restart,
        "Leading bits of an IPv6 client address that are hashed (0..=128); 64 keeps a \
         host whose temporary addresses change on the same worker.";
    hash_seed: u64 = values::seed [Seed],
        default Default::Toml("0"), reload Restart,
        "Seed of the client-to-worker hash; a secret one keeps clients from predicting \
         their worker. Changing it remaps all clients. Write values above i64::MAX as a \
         string.";
    worker_users: Vec<Uid> = values::users [OneOrMany<UserSpec>],
        default Default::Toml("[]"), reload Live,
        "Users (names or uids) allowed to own a worker's socket, checked with \
         SO_PEERCRED. Empty: the dispatcher's own uid and root.";
    dispatcher_users: Vec<Uid> = values::users [OneOrMany<UserSpec>],
        default Default::Toml("[]"), reload Restart,
        "Users (names or uids) a worker accepts as its dispatcher, passed to the workers \
         when they start. Empty: the worker's own uid and root.";
    metrics_listen: Vec<SocketAddr> = values::addresses [OneOrMany<String>],
        default Default::Toml("[]"), reload Restart,
        "Addresses to serve `GET /metrics` (Prometheus) and `GET /health` on, e.g. \
         `[\"127.0.0.1:9191\"]`; empty: off. Under systemd, the socket named `metrics` \
         (sticky-dispatch-metrics.socket) serves them too.";
    health_min_workers: u32 = values::any [u32],
        default Default::Toml("1"), reload Live,
        "`GET /health` answers 200 while at least this many workers are up (0..=workers), \
         503 below it and while stopping: what a balancer in front takes a host out by.";
}
