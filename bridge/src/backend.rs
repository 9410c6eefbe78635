//! The `Backend` trait: one place grants can run (this host, another owned
//! host, a cloud), and the plain data that crosses it.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::capacity::{CapacityError, CapacitySnapshot};
use crate::grant::Grant;

/// What a backend offers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendCapabilities {
    pub regions: BTreeSet<String>,
    pub tdx: bool,
    pub capacity: CapacitySnapshot,
    /// The machines behind a backend of several (owned hosts over SSH),
    /// each with its state; empty for a backend of one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostCard>,
    /// A cloud backend's state, capability flags and machine types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<crate::backends::cloud::CloudCard>,
}

/// One machine of a backend, as the provider card lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostCard {
    /// As configured (`host` or `host:port`).
    pub address: String,
    pub state: HostState,
    /// Since when it has been in that state (unreachable or refused).
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Why it is refused or unreachable.
    #[serde(default)]
    pub message: Option<String>,
    /// Its own ledger, as it last reported it (zero until it has).
    pub capacity: CapacitySnapshot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Not heard from yet.
    Unknown,
    /// Answering, and takes grants.
    Ready,
    /// Cannot be reached now; retried with backoff.
    Unreachable,
    /// Answers, but cannot take grants until the operator acts (its host
    /// key, its kiln version, no /dev/kvm).
    Refused,
}

/// A running instance, as plain data. It is stored as is, so that after a
/// kilnd restart `watch_until_exit` and `terminate` can be called again on
/// it (re-adoption) by a backend that never saw it in this process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProvisionedInstance {
    /// Name of the backend that owns it; routes later calls.
    pub backend: String,
    pub instance_id: String,
    /// Where the requester connects with SSH.
    pub host: String,
    pub ssh_port: u16,
    pub user: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub host_key_fingerprint: String,
    /// The host key itself (`ssh-ed25519 AAAA...`) for a known_hosts line;
    /// empty when the backend cannot know it.
    #[serde(default)]
    pub host_key: String,
    pub started_at: DateTime<Utc>,
    /// Where each of the grant's published guest ports is reachable, in
    /// the grant's order. Absent in instances stored before ports could be
    /// published.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Where it runs, in the backend's words (a cloud's region, zone and
    /// machine type); none for a backend of one place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Whatever else the backend needs to find the instance again.
    #[serde(default)]
    pub private: serde_json::Value,
}

/// A guest TCP port published on the host, as the requester reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port inside the VM (one of the grant's `publish`).
    pub guest_port: u16,
    /// The host address to connect to (as the SSH connection's `host`).
    pub host: String,
    /// The host TCP port that forwards to `guest_port`.
    pub port: u16,
}

/// Host-side figures, measured outside the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostUsage {
    /// CPU time of the vCPU threads.
    pub vcpu_cpu_ms: u64,
    /// Resident memory of the VMM process.
    pub vmm_rss_kib: u64,
}

/// What an instance used, and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageMetrics {
    /// As the agent measured it inside the guest.
    pub guest: kiln_protocol::Usage,
    /// None when the workload never reported an exit (killed, lost).
    pub exit_status: Option<kiln_protocol::ExitStatus>,
    pub host: HostUsage,
    /// When the figures were taken: the instance's end for final usage,
    /// the moment of the sample for usage so far.
    pub ended_at: DateTime<Utc>,
}

/// Why a backend call failed, sorted by what the caller should do next.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// This backend has no room for the grant now; another may.
    #[error("Backend has no room for the grant")]
    NoCapacity(#[source] CapacityError),
    /// This backend cannot take the grant (no such region, no TDX);
    /// another backend may.
    #[error("Backend cannot satisfy the grant")]
    CannotSatisfy(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A passing failure; retrying, here later or on another backend, may work.
    #[error("Transient backend failure")]
    Transient(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Retrying will not help.
    #[error("Backend failure")]
    Fatal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl BackendError {
    /// Whether another backend is worth trying.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(
            self,
            BackendError::NoCapacity(_)
                | BackendError::CannotSatisfy(_)
                | BackendError::Transient(_)
        )
    }

    /// Whether the failure means "no room" rather than "broken".
    pub fn is_capacity(&self) -> bool {
        matches!(self, BackendError::NoCapacity(_))
    }
}

impl From<CapacityError> for BackendError {
    fn from(e: CapacityError) -> Self {
        BackendError::NoCapacity(e)
    }
}

/// One place grants can run.
///
/// Contract:
/// - `provision` returns a usable instance or leaves nothing behind
///   (no reservation, no half-booted VM). It may also be dropped before
///   it returns (its grant was terminated meanwhile); `abandon` is then
///   called to remove whatever it had started.
/// - `watch_until_exit` and `terminate` may be called on an instance this
///   process did not provision (after a restart); a backend re-accounts its
///   resources then (see `CapacityLedger::adopt`).
/// - `watch_until_exit` returns once the instance has ended, including when
///   it had already ended before the call.
/// - `terminate` is idempotent, and the grant manager calls it once every
///   grant ends, however it ended: release resources there.
///
/// Beyond those six, two calls have defaults for a backend that cannot do
/// better: `current_usage` (usage so far) and `abandon` (clean up after a
/// provision that kilnd's death interrupted).
#[async_trait]
pub trait Backend: Send + Sync {
    /// Unique within a fleet; stored in every instance it provisions.
    fn name(&self) -> &str;
    fn capabilities(&self) -> BackendCapabilities;
    /// Whether this backend would take the grant now. A hint for routing:
    /// `provision` still decides.
    fn can_satisfy(&self, grant: &Grant) -> bool;
    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError>;
    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError>;
    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError>;

    /// What a running instance has used so far (`exit_status` None), or
    /// None when the backend only knows at the end.
    async fn current_usage(
        &self,
        _instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        Ok(None)
    }

    /// Removes whatever a `provision` of grant `grant_id` that never
    /// returned (kilnd died during it, or it was dropped) may have left:
    /// a running VM, a reservation. Idempotent; a no-op when nothing is left.
    async fn abandon(&self, _grant_id: &str) -> Result<(), BackendError> {
        Ok(())
    }
}
