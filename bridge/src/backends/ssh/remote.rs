//! One owned host behind an `ssh` backend: its SSH link, the `kiln host`
//! calls made over it, and what the bridge last heard from it.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use super::session::{ExecOutput, HostTarget, Link, SessionError};
use crate::backend::{BackendError, HostCard, HostState};
use crate::capacity::{CapacitySnapshot, Resources};
use crate::host::wire::{self, Failure, FailureKind, HostInfo, Reply};

/// How long a dial may take before the host counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("host {0}")]
    Session(String, #[source] SessionError),
    /// The host answered, and said no.
    #[error("host {address}: {}", .failure.message)]
    Refused { address: String, failure: Failure },
    /// What came back is not a `kiln host` reply (no kiln there, a shell
    /// error): the exit status and the first line of standard error.
    #[error("host {address}: `kiln host` answered nothing readable (exit {status}): {stderr}")]
    Garbled {
        address: String,
        status: String,
        stderr: String,
    },
    #[error("host {address} runs kiln {have}, this bridge {want}: run `kiln fleet add-host {address}` again")]
    Version {
        address: String,
        have: String,
        want: String,
    },
    #[error("host {0} has no usable /dev/kvm")]
    NoKvm(String),
}

impl RemoteError {
    /// Whether the host could do it later, or another host now.
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Session(_, e) => e.is_transient(),
            RemoteError::Refused { failure, .. } => failure.kind == FailureKind::Transient,
            _ => false,
        }
    }

    /// The host's own kind of failure, when it answered one.
    pub fn kind(&self) -> Option<FailureKind> {
        match self {
            RemoteError::Refused { failure, .. } => Some(failure.kind),
            _ => None,
        }
    }

    /// As a backend failure: what the fleet should do next.
    pub fn into_backend(self) -> BackendError {
        match self.kind() {
            Some(FailureKind::NoCapacity) | Some(FailureKind::CannotSatisfy) => {
                BackendError::CannotSatisfy(Box::new(self))
            }
            Some(FailureKind::Fatal) => BackendError::Fatal(Box::new(self)),
            _ if self.is_transient() => BackendError::Transient(Box::new(self)),
            _ => BackendError::CannotSatisfy(Box::new(self)),
        }
    }
}

/// What the bridge knows of a host between calls.
#[derive(Clone, Debug)]
struct View {
    info: Option<HostInfo>,
    state: HostState,
    since: Option<DateTime<Utc>>,
    message: Option<String>,
}

pub struct RemoteHost {
    pub address: String,
    link: Link,
    /// Grants whose provision here was cut off mid-call: whatever it
    /// left is removed once the host answers again.
    to_abandon: Mutex<BTreeSet<String>>,
    /// `kiln host` on that machine, as a shell command prefix.
    command: String,
    view: Mutex<View>,
}

impl RemoteHost {
    pub fn new(target: HostTarget, kiln: &str, home: Option<&str>) -> RemoteHost {
        let mut command = format!("{} host", shell_quote(kiln));
        if let Some(home) = home {
            command.push_str(&format!(" --home {}", shell_quote(home)));
        }
        RemoteHost {
            address: target.address.clone(),
            link: Link::new(target, CONNECT_TIMEOUT),
            to_abandon: Mutex::new(BTreeSet::new()),
            command,
            view: Mutex::new(View {
                info: None,
                state: HostState::Unknown,
                since: None,
                message: None,
            }),
        }
    }

    /// Runs `kiln host ARGS` there with `stdin`, and reads its reply.
    pub async fn call<T: DeserializeOwned>(
        &self,
        args: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<T, RemoteError> {
        let session = self.link.session().await.map_err(|e| self.lost(e))?;
        let out = session
            .exec(&format!("{} {args}", self.command), stdin, timeout)
            .await
            .map_err(|e| self.lost(e))?;
        match wire::parse_reply::<T>(&out.stdout) {
            Ok(Reply::Ok(v)) => Ok(v),
            Ok(Reply::Error(failure)) => Err(RemoteError::Refused {
                address: self.address.clone(),
                failure,
            }),
            Err(_) => Err(self.garbled(&out, &out.stderr)),
        }
    }

    /// Asks the host what it is and has free, and records the answer; a
    /// host of another kiln version or without KVM is refused.
    pub async fn refresh(&self, timeout: Duration) -> Result<HostInfo, RemoteError> {
        let outcome = self.call::<HostInfo>("info", b"", timeout).await;
        if let Err(RemoteError::Session(_, SessionError::Timeout(_))) = &outcome {
            // `info` answers in milliseconds: silence means the path to the
            // host is gone, and the next call should find out by dialing.
            self.link.forget();
        }
        let checked = outcome.and_then(|info| {
            if info.version != wire::VERSION {
                Err(RemoteError::Version {
                    address: self.address.clone(),
                    have: info.version.clone(),
                    want: wire::VERSION.to_string(),
                })
            } else if info.kvm.is_none() {
                Err(RemoteError::NoKvm(self.address.clone()))
            } else {
                Ok(info)
            }
        });
        let mut view = self.lock();
        match &checked {
            Ok(info) => {
                view.info = Some(info.clone());
                view.message = None;
                if view.state != HostState::Ready {
                    view.since = Some(Utc::now());
                }
                view.state = HostState::Ready;
            }
            Err(e) => {
                let state = if e.is_transient() {
                    HostState::Unreachable
                } else {
                    HostState::Refused
                };
                if view.state != state {
                    view.since = Some(Utc::now());
                    tracing::warn!(host = %self.address, error = %crate::error_chain(e), "host {}", word(state));
                }
                view.state = state;
                view.message = Some(crate::error_chain(e));
            }
        }
        checked
    }

    /// Whether the host, as last heard, has room for `want`. A host not
    /// heard from yet is worth a try.
    pub fn may_fit(&self, want: Resources) -> bool {
        let view = self.lock();
        match (&view.info, view.state) {
            (_, HostState::Refused) => false,
            (Some(info), HostState::Ready) => {
                let free = info.capacity.free();
                want.vcpus <= free.vcpus && want.ram_mib <= free.ram_mib
            }
            _ => true,
        }
    }

    pub fn card(&self) -> HostCard {
        let view = self.lock();
        HostCard {
            address: self.address.clone(),
            state: view.state,
            since: view.since,
            message: view.message.clone(),
            capacity: view.info.as_ref().map(|i| i.capacity).unwrap_or_default(),
        }
    }

    /// Its last reported capacity, while it is ready.
    pub fn capacity(&self) -> Option<CapacitySnapshot> {
        let view = self.lock();
        (view.state == HostState::Ready)
            .then(|| view.info.as_ref().map(|i| i.capacity))
            .flatten()
    }

    /// Remembers to remove what grant `id` may have left here.
    pub fn abandon_later(&self, id: &str) {
        lock(&self.to_abandon).insert(id.to_string());
    }

    /// `id` runs here after all: nothing of it is to be removed.
    pub fn keep(&self, id: &str) {
        lock(&self.to_abandon).remove(id);
    }

    /// Removes, now that the host answers, what cut-off provisions left.
    pub async fn abandon_pending(&self, timeout: Duration) {
        let pending: Vec<String> = lock(&self.to_abandon).iter().cloned().collect();
        for id in pending {
            let args = format!("abandon {}", shell_quote(&id));
            match self.call::<()>(&args, b"", timeout).await {
                Ok(()) => {
                    tracing::info!(grant = %id, host = %self.address, "removed what a cut-off provision left");
                    lock(&self.to_abandon).remove(&id);
                }
                Err(e) => {
                    tracing::warn!(grant = %id, host = %self.address, error = %crate::error_chain(&e), "abandon failed; retrying later");
                }
            }
        }
    }

    /// Whether it answered the last time it was asked.
    pub fn ready(&self) -> bool {
        self.lock().state == HostState::Ready
    }

    pub fn tdx(&self) -> bool {
        self.lock().info.as_ref().is_some_and(|i| i.tdx)
    }

    /// Since when the host has been unreachable, if it is.
    pub fn unreachable_since(&self) -> Option<DateTime<Utc>> {
        self.link.unreachable_since()
    }

    fn lost(&self, e: SessionError) -> RemoteError {
        let transient = e.is_transient();
        let mut view = self.lock();
        let state = if transient {
            HostState::Unreachable
        } else {
            HostState::Refused
        };
        if view.state != state {
            view.since = Some(Utc::now());
        }
        view.state = state;
        view.message = Some(crate::error_chain(&e));
        drop(view);
        RemoteError::Session(self.address.clone(), e)
    }

    fn garbled(&self, out: &ExecOutput, stderr: &[u8]) -> RemoteError {
        let text = String::from_utf8_lossy(stderr);
        let status = match (&out.status, &out.signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown".to_string(),
        };
        RemoteError::Garbled {
            address: self.address.clone(),
            status,
            stderr: text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update is one insert or remove; a poisoned set is whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn word(state: HostState) -> &'static str {
    match state {
        HostState::Unknown => "not heard from",
        HostState::Ready => "ready",
        HostState::Unreachable => "unreachable",
        HostState::Refused => "refused",
    }
}

/// `s` as one word of a POSIX shell command line.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(shell_quote("/usr/bin/kiln"), "/usr/bin/kiln");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }
}
