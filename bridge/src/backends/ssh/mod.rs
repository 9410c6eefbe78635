//! `kind = "ssh"`: grants run on other machines the operator owns, each
//! driven over one SSH session (russh) by `kiln host …` calls. The hosts
//! run the VMs exactly as the local backend does (it is what `kiln host`
//! runs there); this side only picks a host, relays the calls, and keeps
//! what it heard for the provider card.
//!
//! Hosts are tried in configured order: grants fill the first host before
//! the next gets any. Packing keeps whole hosts free for large grants and
//! makes where a grant lands predictable to the operator; a host that is
//! full, refuses, or cannot be reached is skipped for that grant.

pub mod install;
pub mod remote;
pub mod session;

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{BuildContext, BuildError};
use crate::backend::{
    Backend, BackendCapabilities, BackendError, ProvisionedInstance, UsageMetrics,
};
use crate::capacity::{CapacityError, CapacitySnapshot, Resources};
use crate::config::SshSection;
use crate::grant::{Grant, TdxPolicy};
use crate::host::wire::{FailureKind, HostPhase, InstanceStatus};
use remote::{RemoteError, RemoteHost};
use session::HostTarget;

/// How long a quick call (info, status, usage) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `info` may take: it answers at once, so silence soon means
/// the host is cut off.
const INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a provision may take there: an image build and a boot.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a terminate may take (the workload's grace, then the stop).
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the hosts are asked for their capacity.
const REFRESH: Duration = Duration::from_secs(5);
/// How often a running grant's host is asked whether it has ended.
const WATCH_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("no host of backend {0} has room for the grant")]
    Full(String),
    #[error("host {0} of this backend is not in its configuration")]
    UnknownHost(String),
    #[error("instance {0} does not carry the ssh backend's details")]
    Foreign(String),
    #[error("grant {id} is no longer on host {host}")]
    Gone { id: String, host: String },
    #[error("host {0} said it ended but sent no usage")]
    NoUsage(String),
}

/// What the backend keeps in `ProvisionedInstance::private`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Private {
    /// The configured address of the host that runs it.
    host: String,
}

pub struct SshBackend {
    name: String,
    region: String,
    hosts: Vec<Arc<RemoteHost>>,
}

impl SshBackend {
    pub fn new(section: &SshSection, ctx: &BuildContext) -> Result<SshBackend, BuildError> {
        for h in &section.hosts {
            check_identity(&h.identity_file).map_err(|problem| BuildError::Identity {
                backend: section.name.clone(),
                host: h.address.clone(),
                path: h.identity_file.clone(),
                problem,
            })?;
        }
        let hosts: Vec<Arc<RemoteHost>> = section
            .hosts
            .iter()
            .map(|h| {
                Arc::new(RemoteHost::new(
                    HostTarget {
                        address: h.address.clone(),
                        user: h.user.clone().unwrap_or_else(|| "root".into()),
                        identity_file: h.identity_file.clone(),
                        host_key: h.host_key.clone(),
                    },
                    h.kiln.as_deref().unwrap_or("kiln"),
                    h.kiln_home.as_deref(),
                ))
            })
            .collect();
        let backend = SshBackend {
            name: section.name.clone(),
            region: section.region.clone().unwrap_or_else(|| ctx.region.clone()),
            hosts,
        };
        backend.keep_refreshing();
        Ok(backend)
    }

    /// Asks every host for its capacity now and then, for the provider
    /// card and routing hints, for as long as the backend lives.
    fn keep_refreshing(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hosts: Vec<Weak<RemoteHost>> = self.hosts.iter().map(Arc::downgrade).collect();
        runtime.spawn(async move {
            loop {
                let live: Vec<Arc<RemoteHost>> = hosts.iter().filter_map(Weak::upgrade).collect();
                if live.is_empty() {
                    return;
                }
                let mut asks = tokio::task::JoinSet::new();
                for host in live {
                    asks.spawn(async move {
                        if host.refresh(INFO_TIMEOUT).await.is_ok() {
                            host.abandon_pending(TERMINATE_TIMEOUT).await;
                        }
                    });
                }
                while asks.join_next().await.is_some() {}
                tokio::time::sleep(REFRESH).await;
            }
        });
    }

    fn host(&self, instance: &ProvisionedInstance) -> Result<&Arc<RemoteHost>, BackendError> {
        let p: Private = serde_json::from_value(instance.private.clone()).map_err(|_| {
            BackendError::Fatal(Box::new(SshError::Foreign(instance.instance_id.clone())))
        })?;
        self.hosts
            .iter()
            .find(|h| h.address == p.host)
            .ok_or_else(|| BackendError::Fatal(Box::new(SshError::UnknownHost(p.host))))
    }

    /// Provisions on `host`: the grant goes as JSON on standard input.
    async fn provision_on(
        &self,
        host: &RemoteHost,
        grant: &Grant,
    ) -> Result<ProvisionedInstance, RemoteError> {
        // A host heard from lately is taken at its word; one that is not
        // (new, cut off, refused) is asked first, so a refusal says why.
        if !host.ready() {
            host.refresh(INFO_TIMEOUT).await?;
        }
        let json = serde_json::to_vec(grant).unwrap_or_default();
        let remote: ProvisionedInstance = host.call("provision", &json, PROVISION_TIMEOUT).await?;
        Ok(ProvisionedInstance {
            backend: self.name.clone(),
            location: Some(format!("host {}", host.address)),
            private: serde_json::to_value(Private {
                host: host.address.clone(),
            })
            .unwrap_or_default(),
            ..remote
        })
    }

    async fn status(&self, host: &RemoteHost, id: &str) -> Result<InstanceStatus, RemoteError> {
        host.call(
            &format!("status {}", remote::shell_quote(id)),
            b"",
            CALL_TIMEOUT,
        )
        .await
    }
}

#[async_trait]
impl Backend for SshBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> BackendCapabilities {
        let hosts: Vec<_> = self.hosts.iter().map(|h| h.card()).collect();
        let capacity = self.hosts.iter().filter_map(|h| h.capacity()).fold(
            CapacitySnapshot::default(),
            |acc, c| CapacitySnapshot {
                usable: add(acc.usable, c.usable),
                used: add(acc.used, c.used),
            },
        );
        BackendCapabilities {
            regions: [self.region.clone()].into_iter().collect(),
            tdx: self.hosts.iter().any(|h| h.tdx()),
            capacity,
            hosts,
            cloud: None,
        }
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        let want = Resources::new(grant.vcpus, grant.ram_mib);
        grant.region == self.region
            && (grant.tdx != TdxPolicy::Required || self.hosts.iter().any(|h| h.tdx()))
            && self.hosts.iter().any(|h| h.may_fit(want))
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        let want = Resources::new(grant.vcpus, grant.ram_mib);
        let mut last: Option<RemoteError> = None;
        let mut full = true;
        for host in &self.hosts {
            if grant.tdx == TdxPolicy::Required && !host.tdx() {
                continue;
            }
            match self.provision_on(host, grant).await {
                Ok(instance) => {
                    tracing::info!(grant = %grant.id, host = %host.address, "provisioned on an owned host");
                    host.keep(&grant.id);
                    return Ok(instance);
                }
                Err(e) => {
                    // Cut off mid-call, the host may have booted the VM all
                    // the same: it is removed once the host answers again.
                    if matches!(e, RemoteError::Session(..)) {
                        host.abandon_later(&grant.id);
                    }
                    tracing::warn!(grant = %grant.id, host = %host.address, error = %crate::error_chain(&e), "host did not take the grant; trying the next");
                    // The same image fails the same way on every host.
                    if e.kind() == Some(FailureKind::Fatal) {
                        return Err(e.into_backend());
                    }
                    full &= e.kind() == Some(FailureKind::NoCapacity);
                    last = Some(e);
                }
            }
        }
        match last {
            Some(_) if full => {
                let free = self
                    .hosts
                    .iter()
                    .filter_map(|h| h.capacity())
                    .map(|c| c.free())
                    .max_by_key(|f| (f.vcpus, f.ram_mib))
                    .unwrap_or_default();
                Err(BackendError::NoCapacity(CapacityError::Insufficient {
                    wanted: want,
                    free,
                }))
            }
            Some(e) => Err(e.into_backend()),
            None => Err(BackendError::CannotSatisfy(Box::new(SshError::Full(
                self.name.clone(),
            )))),
        }
    }

    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError> {
        let host = self.host(instance)?;
        let id = &instance.instance_id;
        loop {
            match self.status(host, id).await {
                Ok(s) if s.phase == HostPhase::Ended => {
                    return s.usage.ok_or_else(|| {
                        BackendError::Fatal(Box::new(SshError::NoUsage(host.address.clone())))
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == Some(FailureKind::NotFound) => {
                    return Err(BackendError::Fatal(Box::new(SshError::Gone {
                        id: id.clone(),
                        host: host.address.clone(),
                    })))
                }
                // A host cut off keeps its grants running, and stops them
                // at their deadline by itself: keep asking until it answers.
                Err(e) => {
                    tracing::debug!(grant = %id, host = %host.address, error = %crate::error_chain(&e), "no status");
                }
            }
            tokio::time::sleep(WATCH_POLL).await;
        }
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        let host = self.host(instance)?;
        let args = format!("terminate {}", remote::shell_quote(&instance.instance_id));
        match host
            .call::<InstanceStatus>(&args, b"", TERMINATE_TIMEOUT)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == Some(FailureKind::NotFound) => Ok(()),
            // Unreachable: the grant manager retries until the host answers.
            Err(e) if e.is_transient() => Err(BackendError::Transient(Box::new(e))),
            Err(e) => Err(BackendError::Fatal(Box::new(e))),
        }
    }

    async fn current_usage(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        let host = self.host(instance)?;
        let args = format!("usage {}", remote::shell_quote(&instance.instance_id));
        host.call(&args, b"", CALL_TIMEOUT)
            .await
            .map_err(|e| BackendError::Transient(Box::new(e)))
    }

    async fn abandon(&self, grant_id: &str) -> Result<(), BackendError> {
        // Which host a cut-short provision reached is not known here; the
        // call is idempotent and cheap, so every host is asked.
        let args = format!("abandon {}", remote::shell_quote(grant_id));
        let mut failed = None;
        for host in &self.hosts {
            if let Err(e) = host.call::<()>(&args, b"", TERMINATE_TIMEOUT).await {
                tracing::warn!(grant = %grant_id, host = %host.address, error = %crate::error_chain(&e), "abandon failed; retried when the host answers");
                host.abandon_later(grant_id);
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => Err(BackendError::Transient(Box::new(e))),
            None => Ok(()),
        }
    }
}

/// An unencrypted OpenSSH private key, readable now: a bad one is the
/// operator's to fix, so it stops kilnd at start rather than every grant.
fn check_identity(path: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let key = ssh_key::PrivateKey::from_openssh(&text)
        .map_err(|e| format!("not an OpenSSH private key ({e})"))?;
    if key.is_encrypted() {
        return Err("encrypted; kiln needs a key without a passphrase".into());
    }
    Ok(())
}

fn add(a: Resources, b: Resources) -> Resources {
    Resources {
        vcpus: a.vcpus.saturating_add(b.vcpus),
        ram_mib: a.ram_mib.saturating_add(b.ram_mib),
    }
}
