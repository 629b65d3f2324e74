//! The layers figment merges, lowest first: built-in defaults, the config file,
//! `STICKY_DISPATCH_<KEY>` environment variables (a layer each, so an error can name the
//! variable), and the command line. Each keeps its own metadata, so that a bad value is
//! reported against the layer that set it.

use std::io;
use std::path::Path;

use figment::error::{Kind, OneOf};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use super::keys::KEYS;
use super::values::EnvKind;
use super::{ConfigError, Overrides};

/// Prefix of the environment variables that set config keys.
const ENV_PREFIX: &str = "STICKY_DISPATCH_";
/// Variables under [`ENV_PREFIX`] that are not config keys: the worker index standalone
/// mode hands to a worker, and the config file path (read by the command-line parser).
/// They must not trip the unknown-key check.
const ENV_NOT_KEYS: &[&str] = &["INDEX", "CONFIG"];

/// Source name of the lowest layer.
pub(super) const DEFAULTS_SOURCE: &str = "built-in defaults";
/// Source name of the command-line layer.
const COMMAND_LINE_SOURCE: &str = "command line";

/// One layer of settings with its own metadata.
pub(super) struct Layer {
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

/// Every key's default, from the key table.
pub(super) fn defaults() -> Layer {
    let text: String = KEYS
        .iter()
        .map(|key| format!("{} = {}\n", key.name, key.default_toml()))
        .collect();
    let mut data = Toml::string(&text)
        .data()
        .expect("the key table's defaults are valid TOML");
    let dict = data.remove(&Profile::Default).unwrap_or_default();
    Layer::new(
        DEFAULTS_SOURCE,
        Source::Custom(DEFAULTS_SOURCE.into()),
        dict,
    )
}

/// Reads and parses the config file. `Ok(None)` if it is the default path and absent; a
/// path given explicitly must exist.
pub(super) fn config_file(path: &Path, explicit: bool) -> Result<Option<Layer>, ConfigError> {
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
    // Parsed here rather than by figment so that a syntax error is reported against the
    // file instead of as a "TOML source string".
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

/// One layer per `STICKY_DISPATCH_<KEY>` variable, in name order. A variable that names
/// no key still becomes a layer, so that the unknown-key check reports it.
pub(super) fn environment(env: impl IntoIterator<Item = (String, String)>) -> Vec<Layer> {
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
            let kind = KEYS
                .iter()
                .find(|k| k.name == key)
                .map_or(EnvKind::Parsed, |k| k.env);
            let value = match kind {
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
pub(super) fn command_line(overrides: &Overrides) -> Layer {
    let mut dict = Dict::new();
    if let Some(workers) = overrides.workers {
        dict.insert("workers".into(), Value::from(workers));
    }
    if !overrides.listen.is_empty() {
        let listen: Vec<Value> = overrides
            .listen
            .iter()
            .map(|addr| Value::from(addr.as_str()))
            .collect();
        dict.insert("listen".into(), Value::from(listen));
    }
    if !overrides.metrics_listen.is_empty() {
        let listen: Vec<Value> = overrides
            .metrics_listen
            .iter()
            .map(|addr| Value::from(addr.as_str()))
            .collect();
        dict.insert("metrics_listen".into(), Value::from(listen));
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

/// The name of a layer as shown in errors: a file path, a variable name, "command line".
fn source_name(metadata: &Metadata) -> String {
    match &metadata.source {
        Some(Source::File(path)) => path.display().to_string(),
        Some(Source::Custom(name)) => name.clone(),
        _ => metadata.name.to_string(),
    }
}

/// The layer that set `key` last.
pub(super) fn source_of(figment: &Figment, key: &str) -> String {
    figment
        .find_metadata(key)
        .map(source_name)
        .unwrap_or_else(|| DEFAULTS_SOURCE.to_owned())
}

/// "unknown key `wrokers`: did you mean `workers`?" rather than all the keys, which
/// `check-config` lists with their values anyway.
fn unknown_key_message(field: &str, expected: &[&str]) -> String {
    // A key that differs in at most a third of its letters (at least one) is a typo.
    let closest = expected
        .iter()
        .map(|key| (strsim::damerau_levenshtein(field, key), *key))
        .filter(|(distance, key)| *distance <= (key.len() / 3).max(1))
        .min();
    match closest {
        Some((_, key)) => format!("unknown key `{field}`: did you mean `{key}`?"),
        None => format!(
            "unknown key `{field}` (`sticky-dispatch check-config` prints every key with its \
             value; sticky-dispatch.toml(5) explains them)"
        ),
    }
}

/// Converts a figment extraction error into a [`ConfigError`] naming the key and the
/// layer that set it.
pub(super) fn extraction_error(figment: &Figment, error: figment::Error) -> ConfigError {
    // serde stops at the first error, so the chain holds only one.
    let error = error.into_iter().next().expect("an error has one entry");
    let key = error.path.first().cloned();
    let (key, lookup, message) = match &error.kind {
        Kind::UnknownField(field, expected) => (
            None,
            Some(field.clone()),
            unknown_key_message(field, expected),
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
