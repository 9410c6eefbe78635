//! A grant: the right to run one image with given resources, reachable over
//! SSH by the requester's keys, until a deadline.

pub mod fuzz;
mod validate;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use validate::{FieldProblem, GrantError, ValidationContext, MAX_PUBLISHED_PORTS};

/// Whether the grant must, may or must not run in a TDX trust domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TdxPolicy {
    Required,
    Preferred,
    #[default]
    No,
}

/// A grant request as a client sends it (the body of `POST /v1/grants`).
/// Give either `vcpus` or `cpu_millicores`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Client-chosen id; resubmitting the same id never creates a second grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u32>,
    pub ram_mib: u64,
    pub region: String,
    #[serde(default)]
    pub tdx: TdxPolicy,
    pub ssh_keys: Vec<String>,
    /// RFC 3339.
    pub valid_to: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Guest TCP ports to publish on the host (at most
    /// [`MAX_PUBLISHED_PORTS`], each once); the connection says where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<u16>,
}

/// A validated grant. Only [`Grant::from_json`] makes one from outside input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub image: String,
    pub vcpus: u32,
    /// As requested, when the requester asked in millicores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u32>,
    pub ram_mib: u64,
    pub region: String,
    pub tdx: TdxPolicy,
    /// OpenSSH public keys, normalised.
    pub ssh_keys: Vec<String>,
    pub valid_to: DateTime<Utc>,
    /// Replaces the image's entrypoint and command when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Added to (or replacing in) the image's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Guest TCP ports the backend publishes on the host, in the order
    /// asked; the instance's connection lists where each is reachable.
    /// Absent in grants stored before ports could be published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<u16>,
    pub submitted_at: DateTime<Utc>,
}

impl Grant {
    /// Whether `other` asks for the same thing (a resubmission), ignoring
    /// when each was submitted.
    pub fn same_request_as(&self, other: &Grant) -> bool {
        let mut other = other.clone();
        other.submitted_at = self.submitted_at;
        *self == other
    }

    /// The workload override for the agent, as `KEY=VALUE` pairs.
    pub fn workload(&self) -> kiln_protocol::Workload {
        kiln_protocol::Workload {
            argv: self.command.clone().unwrap_or_default(),
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ..Default::default()
        }
    }
}
