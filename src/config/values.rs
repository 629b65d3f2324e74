//! The types a key's value has in the file (raw, as figment extracts it) and the checks
//! that turn a raw value into the typed one the daemon uses.
//!
//! A raw type also says how an environment variable's text is read for its key
//! ([`RawValue::ENV`]), so that no key needs a separate list for it.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use nix::unistd::Uid;
use serde::de::{self, Deserializer, IntoDeserializer, Unexpected};
use serde::{Deserialize, Serialize, Serializer};

/// Upper bound on `workers`: far beyond any sane deployment, and it keeps the socket name
/// length check and per-worker tables small.
pub const MAX_WORKERS: u32 = 4096;
/// An abstract socket name lives in `sun_path` (108 bytes) after its leading NUL byte.
pub(super) const MAX_ABSTRACT_NAME: usize = 107;
/// Upper bound on timeouts, so that adding one to `Instant::now()` elsewhere can never
/// overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How an environment variable's value is read for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// Taken literally: a log filter like `info,x=debug` must not be parsed as a list,
    /// nor `123` as a number.
    Text,
    /// A `[...]` list in figment's syntax, or else one literal item: so that `[::1]:80`
    /// is an address, not a list.
    List,
    /// Parsed by figment: numbers become numbers.
    Parsed,
}

/// A type a key has in the file.
pub trait RawValue {
    /// How `STICKY_DISPATCH_<KEY>` is read for a key of this type.
    const ENV: EnvKind;
}

impl RawValue for String {
    const ENV: EnvKind = EnvKind::Text;
}
impl RawValue for u8 {
    const ENV: EnvKind = EnvKind::Parsed;
}
impl RawValue for u16 {
    const ENV: EnvKind = EnvKind::Parsed;
}
impl RawValue for u32 {
    const ENV: EnvKind = EnvKind::Parsed;
}
impl RawValue for usize {
    const ENV: EnvKind = EnvKind::Parsed;
}
impl<T> RawValue for OneOrMany<T> {
    const ENV: EnvKind = EnvKind::List;
}
impl RawValue for Seed {
    const ENV: EnvKind = EnvKind::Parsed;
}
impl RawValue for OnWorkerDown {
    const ENV: EnvKind = EnvKind::Text;
}
impl RawValue for KeySource {
    const ENV: EnvKind = EnvKind::Text;
}
impl RawValue for Dispatch {
    const ENV: EnvKind = EnvKind::Text;
}

/// What happens to a connection whose worker is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnWorkerDown {
    /// Hold the connection until the worker is back (up to `pending_timeout`), so that
    /// the client keeps its worker.
    Wait,
    /// Hand the connection to another worker that is up, trading the client's session
    /// for not waiting.
    Failover,
}

impl fmt::Display for OnWorkerDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.serialize(f)
    }
}

/// Which path connections take to their worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// The kernel for `routing_key = "peer-ip"` (wherever the lanes check out), the
    /// dispatcher otherwise.
    Auto,
    /// The kernel: each worker accepts on its own lane; only for `routing_key = "peer-ip"`.
    Kernel,
    /// The dispatcher accepts every connection and passes it over the link.
    Userspace,
}

impl fmt::Display for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.serialize(f)
    }
}

/// What a connection is routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// The client's IP address as seen by the dispatcher (`getpeername`).
    PeerIp,
    /// The client address in a PROXY protocol v1/v2 header, which every connection must
    /// start with (behind HAProxy `send-proxy-v2`, nginx `proxy_protocol`).
    ProxyProtocol,
    /// The client address in the HTTP `X-Forwarded-For` header, `trusted_hops` from the
    /// right; the peer IP when the header is absent.
    XForwardedFor,
    /// The value of the HTTP cookie `key_name`; the peer IP when absent.
    Cookie,
    /// The value of the query parameter `key_name`; the peer IP when absent.
    Query,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.serialize(f)
    }
}

/// A user as written in the config: a name, or a numeric uid (a number, or a string of
/// digits, as systemd accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    /// A numeric uid.
    Uid(u32),
    /// A user name, resolved when the configuration is loaded.
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

impl Serialize for UserSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            UserSpec::Uid(uid) => serializer.serialize_u32(*uid),
            UserSpec::Name(name) => serializer.serialize_str(name),
        }
    }
}

/// A list that may be written as a single value, a list of one: convenient in
/// environment variables (`STICKY_DISPATCH_WORKER_USERS=app`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
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
        deserializer
            .deserialize_any(Visitor(PhantomData))
            .map(OneOrMany)
    }
}

/// The hash seed: an integer or, since TOML integers stop at `i64::MAX`, a string of
/// digits; written back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
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
        deserializer.deserialize_any(Visitor).map(Seed)
    }
}

impl Serialize for Seed {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(self.0) {
            Ok(small) => serializer.serialize_i64(small),
            Err(_) => serializer.collect_str(&self.0),
        }
    }
}

// The checks, raw value -> typed value. An `Err` is the message; the caller names the key
// and the layer that set it.

/// `workers`: 1..=MAX_WORKERS.
pub(super) fn workers(raw: u32) -> Result<NonZeroU32, String> {
    NonZeroU32::new(raw)
        .filter(|w| w.get() <= MAX_WORKERS)
        .ok_or_else(|| format!("must be between 1 and {MAX_WORKERS}, got {raw}"))
}

/// The default for `workers`: one per CPU, as the dispatcher itself is cheap and a worker
/// per CPU uses the machine without oversubscribing it.
pub(super) fn default_workers() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cpus).unwrap_or(MAX_WORKERS).min(MAX_WORKERS)
}

/// Any value of the raw type is valid as it is.
pub(super) fn any<T>(raw: T) -> Result<T, String> {
    Ok(raw)
}

/// A template unit name: `<name>@.service` with a non-empty `<name>` made of the
/// characters systemd allows in unit names.
pub(super) fn worker_unit(unit: String) -> Result<String, String> {
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
    // systemd's limit on unit names (UNIT_NAME_MAX - 1), with the longest instance number
    // filled in.
    let longest = unit.len() + (MAX_WORKERS - 1).to_string().len();
    if longest > 255 {
        return Err(format!("`{unit}` is too long for a unit name"));
    }
    Ok(unit)
}

/// A socket name prefix without NUL bytes; its length is checked against `workers` once
/// both are known.
pub(super) fn socket_prefix(prefix: String) -> Result<String, String> {
    if prefix.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if prefix.contains('\0') {
        return Err("must not contain a NUL byte".to_owned());
    }
    Ok(prefix)
}

/// Socket addresses such as `127.0.0.1:8080` or `[::1]:8080`, or a host name and port
/// (`localhost:8080`) standing for every address the name resolves to, as nginx's
/// `listen` does. Duplicates are dropped: one socket per address.
pub(super) fn addresses(raw: OneOrMany<String>) -> Result<Vec<SocketAddr>, String> {
    let mut addresses = Vec::new();
    for text in &raw.0 {
        for addr in resolve(text.trim())? {
            if !addresses.contains(&addr) {
                addresses.push(addr);
            }
        }
    }
    Ok(addresses)
}

fn resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let expected = "expected e.g. \"127.0.0.1:8080\", \"[::1]:8080\" or \"localhost:8080\"";
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("`{text}` has no port ({expected})"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("`{text}` is not a socket address ({expected})"));
    }
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(resolved) => {
            let resolved: Vec<SocketAddr> = resolved.collect();
            if resolved.is_empty() {
                Err(format!("`{host}` resolves to no address"))
            } else {
                Ok(resolved)
            }
        }
        Err(err) => Err(format!("could not resolve `{host}`: {err} ({expected})")),
    }
}

/// A log filter in `EnvFilter` syntax.
pub(super) fn log_filter(filter: String) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("invalid log filter `{filter}`: {e}"))?;
    Ok(filter)
}

/// A humantime duration, greater than zero and at most a year.
pub(super) fn timeout(raw: String) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw.trim()).map_err(|e| {
        format!("invalid duration `{raw}`: {e} (expected e.g. \"30s\" or \"2m 30s\")")
    })?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    if duration > MAX_TIMEOUT {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_TIMEOUT)
        ));
    }
    Ok(duration)
}

/// A count of at least one.
pub(super) fn at_least_one(raw: usize) -> Result<NonZeroUsize, String> {
    NonZeroUsize::new(raw).ok_or_else(|| "must be at least 1, got 0".to_owned())
}

/// A number within `MIN..=MAX`.
pub(super) fn within<const MIN: usize, const MAX: usize, T>(raw: T) -> Result<T, String>
where
    T: Copy + Into<usize> + fmt::Display,
{
    if (MIN..=MAX).contains(&raw.into()) {
        Ok(raw)
    } else {
        Err(format!("must be between {MIN} and {MAX}, got {raw}"))
    }
}

/// A cookie or query parameter name (empty: none).
pub(super) fn key_name(name: String) -> Result<String, String> {
    if name
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"=;&,".contains(&b))
    {
        Ok(name)
    } else {
        Err(format!("`{name}` is not a valid cookie or parameter name"))
    }
}

/// The seed as a number.
pub(super) fn seed(raw: Seed) -> Result<u64, String> {
    Ok(raw.0)
}

/// Users resolved to uids, duplicates dropped, order kept.
pub(super) fn users(specs: OneOrMany<UserSpec>) -> Result<Vec<Uid>, String> {
    let mut uids = Vec::new();
    for spec in specs.0 {
        let uid = match spec {
            UserSpec::Uid(uid) => Uid::from_raw(uid),
            UserSpec::Name(name) => {
                crate::shared::resolve_user(&name).map_err(|e| e.to_string())?
            }
        };
        if !uids.contains(&uid) {
            uids.push(uid);
        }
    }
    Ok(uids)
}
