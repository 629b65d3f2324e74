//! What the worker and the dispatcher both know about the link, so that the two ends
//! cannot disagree: where the link socket is, who may be at the other end, how a link
//! opens (the HELLO exchange), and how it fails. Feature-free: a worker-only build
//! compiles it.

use std::io;
use std::time::Duration;

use nix::unistd::{Uid, User};

use crate::link::LinkStream;
use crate::wire::{self, Message, Role};

/// The default link socket prefix (the `socket_prefix` key): worker N listens on
/// `@sticky-dispatch/N`.
pub const DEFAULT_SOCKET_PREFIX: &str = "sticky-dispatch/";

/// How long either end waits for the other's HELLO once it has sent its own.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an app that was told to drain (the Node package, the Python adapters) may
/// finish its open requests before it exits anyway: their default, and what the Node
/// bridge's `--stop-timeout` must leave room for.
pub const APP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// EX_CONFIG from sysexits.h: the exit status of a start refused for its configuration,
/// which systemd's `RestartPreventExitStatus=78` does not restart.
pub const EX_CONFIG: u8 = 78;

/// The abstract socket name of worker `index`'s link: `{prefix}{index}`, without the
/// leading '@' (that only marks the abstract namespace).
pub fn link_socket_name(prefix: &str, index: u32) -> String {
    format!("{prefix}{index}")
}

/// The abstract socket name a dispatcher holds while it uses `prefix` (without the '@'):
/// a second dispatcher with the same prefix fails to bind it, instead of connecting to
/// the first one's workers. Not a number, so no worker index can collide with it.
pub fn dispatcher_socket_name(prefix: &str) -> String {
    format!("{prefix}dispatcher")
}

/// A user spec that names no user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// An empty name.
    #[error("empty user name")]
    Empty,
    /// No such user in the user database.
    #[error("unknown user `{0}`")]
    Unknown(String),
    /// The user database could not be read.
    #[error("cannot look up user `{name}`: {errno}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// Why the lookup failed.
        errno: nix::errno::Errno,
    },
}

/// Resolves one user spec, a numeric uid or a user name, to a uid. Digits are a uid even
/// if a user of that name exists, as systemd reads `User=`.
pub fn resolve_user(spec: &str) -> Result<Uid, UserError> {
    if spec.is_empty() {
        return Err(UserError::Empty);
    }
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(spec) {
        Ok(Some(user)) => Ok(user.uid),
        Ok(None) => Err(UserError::Unknown(spec.to_owned())),
        Err(errno) => Err(UserError::Lookup {
            name: spec.to_owned(),
            errno,
        }),
    }
}

/// Parses a user list as an environment variable carries it: `"app, 0 www-data"`, or the
/// TOML-looking `[0, "app"]`. Order and repeats are kept.
pub fn parse_user_list(list: &str) -> Result<Vec<Uid>, UserError> {
    list.split(|c: char| c == ',' || c.is_whitespace() || "[]\"'".contains(c))
        .filter(|word| !word.is_empty())
        .map(resolve_user)
        .collect()
}

/// Who may be at the other end of a link unless configured otherwise: our own effective
/// uid and root (deduplicated when we are root).
pub fn default_peer_users() -> Vec<Uid> {
    let mut users = vec![Uid::effective(), Uid::from_raw(0)];
    users.dedup();
    users
}

/// Why a link failed, on either end.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer sent something that is not a message.
    #[error(transparent)]
    Decode(#[from] wire::DecodeError),
    /// The process at the other end runs as a user it may not.
    #[error("the socket is owned by uid {uid} (pid {pid}), which is not in {allowed}")]
    Impostor {
        /// The peer's uid (SO_PEERCRED).
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// The configuration key that lists the users allowed.
        allowed: &'static str,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// What the peer's HELLO said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHello {
    /// The peer's process id, for logs.
    pub pid: u32,
    /// The peer's role: a dispatcher's peer is a [`Role::Worker`] or a [`Role::NodeWorker`].
    pub role: Role,
    /// What a worker said it can do (`wire::FEATURE_LANES`); 0 from a dispatcher.
    pub features: u8,
}

/// The HELLO exchange, the same from both ends: sends ours (as `role`, for worker
/// `index`), then waits up to [`HELLO_TIMEOUT`] for the peer's, which must come from the
/// other side (a worker of either kind for a dispatcher, the dispatcher for a worker) and
/// name the same index. `features` is what a worker can do (0 for the dispatcher).
pub async fn exchange_hello(
    link: &LinkStream,
    role: Role,
    index: u32,
    features: u8,
) -> Result<PeerHello, LinkError> {
    let them = match role {
        Role::Dispatcher => "worker",
        Role::Worker | Role::NodeWorker => "dispatcher",
    };
    let mut out = Vec::with_capacity(wire::MAX_MESSAGE);
    Message::Hello {
        role,
        index,
        pid: std::process::id(),
        features,
    }
    .encode(&mut out);
    link.send(&out, None).await?;
    let no_hello = || LinkError::Protocol(format!("no HELLO from the {them}"));
    let mut buf = [0u8; wire::MAX_MESSAGE];
    let received = tokio::time::timeout(HELLO_TIMEOUT, link.recv(&mut buf))
        .await
        .map_err(|_| no_hello())??;
    if received.fd.is_some() || received.len == 0 {
        return Err(no_hello());
    }
    match Message::decode(&buf[..received.len])? {
        Message::Hello {
            role: their_role,
            index: their_index,
            pid,
            features,
        } if (their_role == Role::Dispatcher) != (role == Role::Dispatcher)
            && their_index == index =>
        {
            Ok(PeerHello {
                pid,
                role: their_role,
                features,
            })
        }
        other => Err(LinkError::Protocol(format!(
            "expected HELLO from the {them} for worker {index}, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/vectors/constants.json, which the Node and Python packages' tests read, holds
    /// exactly the values defined here.
    #[test]
    fn the_shared_constants_file_matches_the_definitions() {
        let file: serde_json::Value =
            serde_json::from_str(include_str!("../tests/vectors/constants.json")).unwrap();
        let ms = |d: Duration| serde_json::Value::from(d.as_millis() as u64);
        let expected = serde_json::json!({
            "about": file["about"],
            "env": {
                "index": crate::worker::INDEX_ENV,
                "socket_prefix": crate::worker::SOCKET_PREFIX_ENV,
                "dispatcher_users": crate::worker::DISPATCHER_USERS_ENV,
                "link_fd": crate::worker::LINK_FD_ENV,
            },
            "default_socket_prefix": DEFAULT_SOCKET_PREFIX,
            "hello_timeout_ms": ms(HELLO_TIMEOUT),
            "drain_answer_timeout_ms": ms(crate::worker::link::DRAIN_ANSWER_TIMEOUT),
            "accept_queue": crate::worker::ACCEPT_QUEUE,
            "first_read_timeout_ms": ms(crate::worker::FIRST_READ_TIMEOUT),
            "link_backlog": crate::link::LISTEN_BACKLOG,
            "no_dispatcher_notice_ms": ms(crate::worker::link::NO_DISPATCHER_HINT_AFTER),
            "app_drain_timeout_ms": ms(APP_DRAIN_TIMEOUT),
            "ex_config": EX_CONFIG,
        });
        for (key, value) in expected.as_object().unwrap() {
            assert_eq!(
                &file[key], value,
                "tests/vectors/constants.json `{key}` differs from its Rust definition"
            );
        }
        assert_eq!(
            file.as_object().unwrap().len(),
            expected.as_object().unwrap().len()
        );
    }

    #[test]
    fn users_resolve_from_names_and_uids() {
        assert_eq!(resolve_user("root"), Ok(Uid::from_raw(0)));
        assert_eq!(resolve_user("1000"), Ok(Uid::from_raw(1000)));
        assert_eq!(resolve_user(""), Err(UserError::Empty));
        assert_eq!(
            resolve_user("no-such-user-here"),
            Err(UserError::Unknown("no-such-user-here".into()))
        );
        assert_eq!(
            parse_user_list("root, 1000 2").unwrap(),
            [0, 1000, 2].map(Uid::from_raw)
        );
        assert_eq!(
            parse_user_list("[0, \"root\"]").unwrap(),
            [0, 0].map(Uid::from_raw)
        );
        assert!(parse_user_list("0, no-such-user-here").is_err());
        let defaults = default_peer_users();
        assert!(defaults.contains(&Uid::effective()) && defaults.contains(&Uid::from_raw(0)));
        let mut unique = defaults.clone();
        unique.dedup();
        assert_eq!(unique, defaults);
    }

    #[test]
    fn socket_names_join_prefix_and_index() {
        assert_eq!(
            link_socket_name(DEFAULT_SOCKET_PREFIX, 3),
            "sticky-dispatch/3"
        );
    }

    #[tokio::test]
    async fn hello_checks_role_and_index_both_ways() {
        let (dispatcher, worker) = LinkStream::pair().unwrap();
        let (d, w) = tokio::join!(
            exchange_hello(&dispatcher, Role::Dispatcher, 4, 0),
            exchange_hello(&worker, Role::Worker, 4, wire::FEATURE_LANES)
        );
        let pid = std::process::id();
        assert_eq!(
            (d.unwrap(), w.unwrap()),
            (
                PeerHello {
                    pid,
                    role: Role::Worker,
                    features: wire::FEATURE_LANES,
                },
                PeerHello {
                    pid,
                    role: Role::Dispatcher,
                    features: 0,
                }
            )
        );

        let (dispatcher, worker) = LinkStream::pair().unwrap();
        let (d, w) = tokio::join!(
            exchange_hello(&dispatcher, Role::Dispatcher, 4, 0),
            exchange_hello(&worker, Role::Worker, 5, 0)
        );
        assert!(matches!(d, Err(LinkError::Protocol(_))), "{d:?}");
        assert!(matches!(w, Err(LinkError::Protocol(_))), "{w:?}");

        let (one, other) = LinkStream::pair().unwrap();
        let (a, b) = tokio::join!(
            exchange_hello(&one, Role::Worker, 1, 0),
            exchange_hello(&other, Role::Worker, 1, 0)
        );
        assert!(a.is_err() && b.is_err(), "two workers must not agree");

        let (one, other) = LinkStream::pair().unwrap();
        let (a, b) = tokio::join!(
            exchange_hello(&one, Role::Worker, 1, 0),
            exchange_hello(&other, Role::NodeWorker, 1, 0)
        );
        assert!(a.is_err() && b.is_err(), "nor two kinds of worker");

        let (dispatcher, worker) = LinkStream::pair().unwrap();
        let (d, _) = tokio::join!(
            exchange_hello(&dispatcher, Role::Dispatcher, 2, 0),
            exchange_hello(&worker, Role::NodeWorker, 2, 0)
        );
        assert_eq!(d.unwrap().role, Role::NodeWorker);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (dispatcher, _silent) = LinkStream::pair().unwrap();
        let err = exchange_hello(&dispatcher, Role::Dispatcher, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol violation: no HELLO from the worker"
        );
    }
}
