//! What a cloud backend needs from a cloud: a handful of instance calls,
//! as one trait. Placement, failover, idempotency, readiness and the
//! orphan reaper are written once (`cloud`); each cloud (`aws`, `gcp`)
//! only translates these calls and sorts its errors into
//! [`CloudErrorKind`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The tag (AWS) or label (GCP) naming the bridge that created an
/// instance; the reaper only ever looks at its own bridge's instances.
pub const BRIDGE_TAG: &str = "kiln-bridge";
/// The tag or label naming the grant an instance serves.
pub const GRANT_TAG: &str = "kiln-grant";

/// Where an instance runs, and of what type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Placement {
    pub region: String,
    pub zone: String,
    /// AWS instance type, GCE machine type.
    pub machine_type: String,
}

/// One instance to create.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    /// The instance's name: deterministic per grant, so that a retry or a
    /// restarted bridge finds what already exists before creating.
    pub name: String,
    /// The cloud's idempotency token (AWS `ClientToken`, GCP
    /// `requestId`), the same for every retry of the same create.
    pub token: String,
    pub placement: Placement,
    /// AMI id, or GCE image URL.
    pub image: String,
    /// The bootstrap: cloud-init `#cloud-config` on AWS, the
    /// `startup-script` on GCE.
    pub user_data: String,
    /// [`BRIDGE_TAG`], [`GRANT_TAG`], and anything else to find it by.
    pub tags: BTreeMap<String, String>,
    /// Ask for nested virtualization (GCE `enableNestedVirtualization`);
    /// AWS needs a `.metal` type instead and ignores it.
    pub nested_virtualization: bool,
}

/// An instance as the cloud last described it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudInstance {
    /// AWS `i-…`; the GCE instance name.
    pub id: String,
    pub placement: Placement,
    pub state: CloudState,
    pub public_ip: Option<IpAddr>,
    pub private_ip: Option<IpAddr>,
    pub tags: BTreeMap<String, String>,
    pub launched_at: Option<DateTime<Utc>>,
    /// Why the cloud stopped or ended it, when it says.
    pub state_reason: Option<String>,
}

impl CloudInstance {
    /// The grant it serves, by its tag.
    pub fn grant(&self) -> Option<&str> {
        self.tags.get(GRANT_TAG).map(String::as_str)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudState {
    /// Created, not running yet (AWS pending; GCE PROVISIONING, STAGING).
    Pending,
    Running,
    /// Being stopped or suspended; it may come back.
    Stopping,
    Stopped,
    /// On its way out, or gone.
    Terminated,
}

impl CloudState {
    /// Whether the instance can no longer serve its grant.
    pub fn is_over(self) -> bool {
        matches!(
            self,
            CloudState::Stopping | CloudState::Stopped | CloudState::Terminated
        )
    }
}

/// A machine type a zone offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineType {
    pub name: String,
    pub vcpus: u32,
    pub ram_mib: u64,
    /// Whether KVM works inside it (AWS bare metal; GCE types that allow
    /// nested virtualization).
    pub kvm: bool,
    /// Whether it can run as an Intel TDX confidential VM.
    pub tdx: bool,
}

/// What the caller does next, by the kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudErrorKind {
    /// No capacity of that type in that zone now: try the next zone.
    Capacity,
    /// An account quota in that region: skip the region for a while.
    Quota,
    /// Credentials or permissions: the backend is unhealthy until the
    /// operator acts.
    Auth,
    /// Too many requests: back off and retry.
    Throttled,
    /// No such instance (or not yet visible).
    NotFound,
    /// The name or token is taken by another request.
    Conflict,
    /// The request itself is wrong (bad image, bad type): not retried.
    Invalid,
    /// Anything else that may pass (a 5xx, a dropped connection).
    Transient,
}

/// A failed cloud call, with the cloud's own code kept for the log.
#[derive(Debug, thiserror::Error)]
#[error("{cloud} {call}: {code}: {message}")]
pub struct CloudError {
    pub kind: CloudErrorKind,
    pub cloud: &'static str,
    pub call: &'static str,
    /// The cloud's error code (`InsufficientInstanceCapacity`,
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`), or the HTTP status.
    pub code: String,
    pub message: String,
}

/// What a cloud backend can do, as the provider card shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudFeatures {
    pub stop_start: bool,
    pub idempotent_create: bool,
    pub user_data: bool,
    pub tags: bool,
}

/// The calls a cloud answers. Every call is one request (and, for GCE, the
/// wait for its operation); retries and failover are the caller's.
#[async_trait]
pub trait CloudApi: Send + Sync {
    /// `aws` or `gcp`, for messages.
    fn cloud(&self) -> &'static str;
    fn features(&self) -> CloudFeatures;
    /// The zones of a region that are up.
    async fn zones(&self, region: &str) -> Result<Vec<String>, CloudError>;
    /// The machine types a zone offers.
    async fn machine_types(&self, region: &str, zone: &str)
        -> Result<Vec<MachineType>, CloudError>;
    /// Creates one instance. A create the cloud already saw (same token,
    /// or same name) returns that instance, not a second one.
    async fn create(&self, spec: &CreateSpec) -> Result<CloudInstance, CloudError>;
    /// One instance by id; `None` when the cloud does not know it (any
    /// more, or not yet).
    async fn describe(
        &self,
        placement: &Placement,
        id: &str,
    ) -> Result<Option<CloudInstance>, CloudError>;
    /// The instances of a region that carry every tag in `tags`,
    /// terminated ones included while the cloud still lists them.
    async fn list(
        &self,
        region: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudInstance>, CloudError>;
    /// Terminates (deletes) one instance; fine if it is already gone.
    async fn terminate(&self, instance: &CloudInstance) -> Result<(), CloudError>;
}
