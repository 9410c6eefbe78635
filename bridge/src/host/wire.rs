//! What `kiln host …` prints: one JSON document per call, read back by a
//! bridge over SSH. Success is `{"ok": …}`; failure `{"error": {"kind",
//! "message"}}`, with a kind the bridge acts on (another host, retry
//! later, give up) rather than text it would have to match.

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, ProvisionedInstance, UsageMetrics};
use crate::capacity::{CapacitySnapshot, Resources};

/// The version a host must run to serve this bridge: kiln's own.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One call's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(Failure),
}

/// A failed call, sorted by what the caller should do next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// One line for a person.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The host has no room for the grant now.
    NoCapacity,
    /// The host cannot take this grant (TDX, too many vCPUs).
    CannotSatisfy,
    /// Passing; the same call may work later.
    Transient,
    /// Retrying will not help.
    Fatal,
    /// No grant of that id on the host.
    NotFound,
    /// The call itself was malformed (bad grant JSON, bad arguments).
    Usage,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// The failure of a backend call, keeping its kind.
    pub fn of_backend(e: &BackendError) -> Failure {
        let kind = match e {
            BackendError::NoCapacity(_) => FailureKind::NoCapacity,
            BackendError::CannotSatisfy(_) => FailureKind::CannotSatisfy,
            BackendError::Transient(_) => FailureKind::Transient,
            BackendError::Fatal(_) => FailureKind::Fatal,
        };
        // The outer words ("Backend failure") say nothing the kind does not.
        let message =
            std::error::Error::source(e).map_or_else(|| e.to_string(), crate::error_chain);
        Failure::new(kind, message)
    }
}

/// `kiln host info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// kiln's version on the host; a bridge refuses a host whose version
    /// differs from its own.
    pub version: String,
    /// Which KVM the host has (`intel`, `amd`, `pvm`), or None without
    /// a usable /dev/kvm.
    pub kvm: Option<String>,
    pub tdx: bool,
    /// The host's CPUs and memory as configured for grants (before the
    /// reserve).
    pub total: Resources,
    pub reserve: Resources,
    /// What grants may use and what running ones hold.
    pub capacity: CapacitySnapshot,
    /// Where requesters reach its VMs.
    pub address: String,
}

/// `kiln host status ID` and one row of `kiln host list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub phase: HostPhase,
    /// Once provisioned.
    #[serde(default)]
    pub instance: Option<ProvisionedInstance>,
    /// How it ended, once it has.
    #[serde(default)]
    pub usage: Option<UsageMetrics>,
    /// The host stopped it at its `valid_to`.
    #[serde(default)]
    pub deadline_reached: bool,
}

/// Where a grant is on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    /// A provision holds room for it; no instance yet (or one whose
    /// provision was cut short: `kiln host abandon` removes it).
    Provisioning,
    Running,
    Ended,
}

/// Reads a reply, as the bridge does.
pub fn parse_reply<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<Reply<T>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_their_kind_across_the_wire() {
        let e = BackendError::NoCapacity(crate::capacity::CapacityError::Insufficient {
            wanted: Resources::new(2, 512),
            free: Resources::new(1, 256),
        });
        let text = serde_json::to_string(&Reply::<()>::Error(Failure::of_backend(&e))).unwrap();
        assert!(
            text.starts_with(r#"{"error":{"kind":"no_capacity","#),
            "{text}"
        );
        match parse_reply::<()>(text.as_bytes()).unwrap() {
            Reply::Error(f) => {
                assert_eq!(f.kind, FailureKind::NoCapacity);
                assert!(!f.message.contains("Backend"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
        let ok: Reply<u32> = parse_reply(br#"{"ok":7}"#).unwrap();
        assert_eq!(ok, Reply::Ok(7));
    }
}
