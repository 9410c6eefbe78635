//! Where a grant is in its life, as stored and as the API shows it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::ProvisionedInstance;
use crate::grant::Grant;

/// A grant's state. `exited`, `terminated` and `failed` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Stored, not yet handed to a backend.
    Pending,
    /// A backend is provisioning it.
    Provisioning,
    Running,
    /// Being stopped (by request or at `valid_to`).
    Terminating,
    /// The workload ended on its own.
    Exited,
    /// Stopped by request or at `valid_to`.
    Terminated,
    /// Never ran, or was lost.
    Failed,
}

impl GrantState {
    pub const ALL: [GrantState; 7] = [
        GrantState::Pending,
        GrantState::Provisioning,
        GrantState::Running,
        GrantState::Terminating,
        GrantState::Exited,
        GrantState::Terminated,
        GrantState::Failed,
    ];

    pub fn is_final(self) -> bool {
        matches!(
            self,
            GrantState::Exited | GrantState::Terminated | GrantState::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Pending => "pending",
            GrantState::Provisioning => "provisioning",
            GrantState::Running => "running",
            GrantState::Terminating => "terminating",
            GrantState::Exited => "exited",
            GrantState::Terminated => "terminated",
            GrantState::Failed => "failed",
        }
    }
}

impl fmt::Display for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Unknown grant state {0}")]
pub struct UnknownState(String);

impl FromStr for GrantState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GrantState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// Why a grant is being or was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    Requested,
    Deadline,
}

impl StopCause {
    pub fn as_str(self) -> &'static str {
        match self {
            StopCause::Requested => "requested",
            StopCause::Deadline => "deadline",
        }
    }

    pub fn parse(s: &str) -> Option<StopCause> {
        match s {
            "requested" => Some(StopCause::Requested),
            "deadline" => Some(StopCause::Deadline),
            _ => None,
        }
    }

    /// The reason recorded on the grant.
    pub fn reason(self) -> &'static str {
        match self {
            StopCause::Requested => "terminated on request",
            StopCause::Deadline => "valid_to reached",
        }
    }
}

/// Why a grant failed, for a caller that acts on it (retry later when
/// there was no room; report a fault otherwise). The reason beside it is
/// for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No backend had room for it.
    NoCapacity,
    /// Provisioning failed otherwise.
    Provision,
    /// kilnd stopped while it was provisioning.
    Interrupted,
    /// Its instance was lost, or could not be stopped.
    Lost,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::NoCapacity => "no_capacity",
            FailureKind::Provision => "provision",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<FailureKind> {
        [
            FailureKind::NoCapacity,
            FailureKind::Provision,
            FailureKind::Interrupted,
            FailureKind::Lost,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A grant with everything known about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub grant: Grant,
    pub state: GrantState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopCause>,
    /// Set when the grant failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// The manifest digest the image's tag named at submit, which is what
    /// runs; None when the image was given by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The backend its provision called last (or is calling): the one to
    /// ask to abandon a provision kilnd's death cut short. None before the
    /// first call, and for grants stored before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<ProvisionedInstance>,
    pub updated_at: DateTime<Utc>,
}

impl GrantRecord {
    /// The grant as a backend must run it: its image pinned to the digest
    /// resolved at submit, so a tag pushed again later changes nothing.
    pub fn pinned_grant(&self) -> Grant {
        let mut grant = self.grant.clone();
        if let Some(d) = &self.image_digest {
            grant.image = crate::tags::pinned(&grant.image, d);
        }
        grant
    }
}
