//! What the HTTP API returns, shared by the server and the client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{PublishedPort, UsageMetrics};
use crate::grant::Grant;
use crate::state::{FailureKind, GrantRecord, GrantState, StopCause};

/// How the requester reaches a running grant. The backend's private data
/// stays inside kilnd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub backend: String,
    pub instance_id: String,
    pub host: String,
    pub ssh_port: u16,
    pub user: String,
    pub host_key_fingerprint: String,
    /// `ssh-ed25519 AAAA...`, to pin in known_hosts (empty if unknown).
    #[serde(default)]
    pub host_key: String,
    pub started_at: DateTime<Utc>,
    /// The grant's published guest ports and where each is reachable.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Where the instance runs (a cloud's region, zone and machine type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// A grant as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantView {
    #[serde(flatten)]
    pub grant: Grant,
    pub state: GrantState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopCause>,
    /// Why it failed, as a kind to act on (`reason` says it in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// What the image's tag named at submit, and so what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionView>,
    pub updated_at: DateTime<Utc>,
}

impl From<GrantRecord> for GrantView {
    fn from(r: GrantRecord) -> Self {
        GrantView {
            connection: r.instance.map(|i| ConnectionView {
                backend: i.backend,
                instance_id: i.instance_id,
                host: i.host,
                ssh_port: i.ssh_port,
                user: i.user,
                host_key_fingerprint: i.host_key_fingerprint,
                host_key: i.host_key,
                started_at: i.started_at,
                published: i.published,
                location: i.location,
            }),
            grant: r.grant,
            state: r.state,
            reason: r.reason,
            stop: r.stop,
            failure: r.failure,
            image_digest: r.image_digest,
            updated_at: r.updated_at,
        }
    }
}

/// A grant's latest usage (`GET /v1/grants/{id}/usage`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageView {
    pub grant_id: String,
    pub state: GrantState,
    /// Whether `usage` is the final figure (the grant has ended).
    pub r#final: bool,
    /// None until a sample exists.
    pub usage: Option<UsageMetrics>,
    pub taken_at: Option<DateTime<Utc>>,
}
