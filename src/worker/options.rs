//! Starting a worker: its index, link socket prefix and allowed dispatchers from the
//! environment (or the unit's instance name), and why a start fails.

use std::io;

use nix::unistd::Uid;

use super::{DISPATCHER_USERS_ENV, INDEX_ENV, LINK_FD_ENV, SOCKET_PREFIX_ENV};
use crate::shared::{self, UserError, DEFAULT_SOCKET_PREFIX};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Neither `STICKY_DISPATCH_INDEX` nor a unit instance name gave an index.
    #[error("no worker index: set {INDEX_ENV}, or run as an instance of a template unit such as app@3.service")]
    NoIndex,
    /// The index was given but is not a number.
    #[error("worker index {0:?} is not a non-negative integer")]
    BadIndex(String),
    /// A user in the allowed-dispatcher list does not exist.
    #[error("{DISPATCHER_USERS_ENV}: unknown user {0:?}")]
    UnknownUser(String),
    /// Another process holds this worker's link socket name.
    #[error(
        "the link socket @{name} is in use: worker {index} of socket_prefix \"{prefix}\" is \
         already running, maybe another app's. Stop that worker, or give each app its own \
         socket_prefix: the dispatcher's config key `socket_prefix` and, for its workers, \
         {SOCKET_PREFIX_ENV}"
    )]
    InUse {
        /// The abstract socket name.
        name: String,
        /// The prefix it was made from.
        prefix: String,
        /// The worker index.
        index: u32,
    },
    /// The link socket a worker launcher passed ([`LINK_FD_ENV`]) cannot be used.
    #[error("the link socket passed in {LINK_FD_ENV} cannot serve as @{name}: {why}")]
    Inherited {
        /// The abstract socket name expected.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// Any other failure to bind the link socket.
    #[error("could not bind the link socket @{name}")]
    Bind {
        /// The abstract socket name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How a worker finds its link socket and whom it trusts.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// This worker's index.
    pub index: u32,
    /// Link socket prefix; the socket is `@<prefix><index>`.
    pub socket_prefix: String,
    /// Uids accepted as the dispatcher.
    pub dispatcher_users: Vec<Uid>,
    /// Drain when SIGTERM arrives (the default). Turn off to drain only through
    /// [`WorkerListener::drain_trigger`](super::WorkerListener::drain_trigger).
    pub drain_on_sigterm: bool,
}

impl WorkerOptions {
    /// Options from the environment: the index from `STICKY_DISPATCH_INDEX`, else the
    /// systemd unit's instance name; prefix and users from their variables or defaults.
    /// Also reads (and unsets) [`LINK_FD_ENV`], for [`LinkServer::bind`](super::link::LinkServer::bind).
    pub fn from_env() -> Result<WorkerOptions, WorkerError> {
        // Taken now, with the rest of the environment: the variable goes before the app
        // can start children.
        super::link::read_inherited_fd();
        let index = match std::env::var(INDEX_ENV) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| WorkerError::BadIndex(text))?,
            Err(_) => {
                let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                match instance_from_cgroup(&cgroup) {
                    Some(instance) => instance
                        .parse()
                        .map_err(|_| WorkerError::BadIndex(instance.to_owned()))?,
                    None => return Err(WorkerError::NoIndex),
                }
            }
        };
        let socket_prefix =
            std::env::var(SOCKET_PREFIX_ENV).unwrap_or_else(|_| DEFAULT_SOCKET_PREFIX.to_owned());
        let dispatcher_users = match std::env::var(DISPATCHER_USERS_ENV) {
            Ok(list) if !list.trim().is_empty() => {
                shared::parse_user_list(&list).map_err(|err| match err {
                    UserError::Unknown(name) | UserError::Lookup { name, .. } => {
                        WorkerError::UnknownUser(name)
                    }
                    UserError::Empty => WorkerError::UnknownUser(String::new()),
                })?
            }
            _ => shared::default_peer_users(),
        };
        Ok(WorkerOptions {
            index,
            socket_prefix,
            dispatcher_users,
            drain_on_sigterm: true,
        })
    }
}

/// The instance name of the `.service` unit whose cgroup this process is in:
/// `0::/system.slice/system-app.slice/app@3.service` → `3`.
fn instance_from_cgroup(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(|unit| {
            let (_, instance) = unit.strip_suffix(".service")?.split_once('@')?;
            (!instance.is_empty()).then_some(instance)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_comes_from_the_unit_in_the_cgroup() {
        let v2 = "0::/system.slice/system-app.slice/app@3.service\n";
        assert_eq!(instance_from_cgroup(v2), Some("3"));
        let hybrid = "12:pids:/system.slice/system-app.slice/app@11.service\n1:name=systemd:/system.slice/system-app.slice/app@11.service\n0::/system.slice/system-app.slice/app@11.service\n";
        assert_eq!(instance_from_cgroup(hybrid), Some("11"));
        assert_eq!(
            instance_from_cgroup("0::/user.slice/session-1.scope\n"),
            None
        );
        assert_eq!(instance_from_cgroup("0::/system.slice/app.service\n"), None);
        assert_eq!(instance_from_cgroup(""), None);
    }
}
