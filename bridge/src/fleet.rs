//! The fleet: backends in their configured order, one routing decision per
//! grant, and the provider card that sums them up.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{
    Backend, BackendCapabilities, BackendError, HostState, ProvisionedInstance, UsageMetrics,
};
use crate::capacity::{CapacitySnapshot, Resources};
use crate::grant::{FieldProblem, Grant, GrantError, TdxPolicy};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("Two backends are named {0}")]
    DuplicateName(String),
    #[error("No backend can take the grant now")]
    NoBackendCanSatisfy,
    #[error("Every backend that could take the grant failed; the last, {backend}, said")]
    AllFailed {
        backend: String,
        #[source]
        last: BackendError,
    },
    #[error("Backend {backend} failed for good")]
    Fatal {
        backend: String,
        #[source]
        error: BackendError,
    },
    #[error("No backend named {0} in this fleet")]
    UnknownBackend(String),
    #[error("Backend {backend} failed")]
    Backend {
        backend: String,
        #[source]
        error: BackendError,
    },
}

impl FleetError {
    /// Whether the grant failed for want of room rather than a fault.
    pub fn is_capacity(&self) -> bool {
        match self {
            FleetError::NoBackendCanSatisfy => true,
            FleetError::AllFailed { last, .. } => last.is_capacity(),
            _ => false,
        }
    }
}

/// One backend's line on the provider card.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendCard {
    pub name: String,
    #[serde(flatten)]
    pub capabilities: BackendCapabilities,
}

/// What the whole fleet offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderCard {
    pub regions: BTreeSet<String>,
    pub tdx: bool,
    pub capacity: CapacitySnapshot,
    pub backends: Vec<BackendCard>,
}

/// Backends in order of preference.
pub struct Fleet {
    backends: Vec<Arc<dyn Backend>>,
}

impl Fleet {
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Result<Self, FleetError> {
        let mut seen = BTreeSet::new();
        for b in &backends {
            if !seen.insert(b.name().to_string()) {
                return Err(FleetError::DuplicateName(b.name().to_string()));
            }
        }
        Ok(Fleet { backends })
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name().to_string()).collect()
    }

    /// The union of every backend's regions.
    pub fn regions(&self) -> BTreeSet<String> {
        self.backends
            .iter()
            .flat_map(|b| b.capabilities().regions)
            .collect()
    }

    pub fn capabilities(&self) -> ProviderCard {
        let backends: Vec<BackendCard> = self
            .backends
            .iter()
            .map(|b| BackendCard {
                name: b.name().to_string(),
                capabilities: b.capabilities(),
            })
            .collect();
        let sum = |pick: fn(&CapacitySnapshot) -> Resources| {
            backends.iter().fold(Resources::default(), |acc, c| {
                let r = pick(&c.capabilities.capacity);
                Resources {
                    vcpus: acc.vcpus.saturating_add(r.vcpus),
                    ram_mib: acc.ram_mib.saturating_add(r.ram_mib),
                }
            })
        };
        ProviderCard {
            regions: backends
                .iter()
                .flat_map(|c| c.capabilities.regions.iter().cloned())
                .collect(),
            tdx: backends.iter().any(|c| c.capabilities.tdx),
            capacity: CapacitySnapshot {
                usable: sum(|c| c.usable),
                used: sum(|c| c.used),
            },
            backends,
        }
    }

    /// Refuses, at submission, a grant no backend could ever take whatever
    /// the load: TDX required but not offered in its region, or larger than
    /// every backend there.
    pub fn check_admissible(&self, grant: &Grant) -> Result<(), GrantError> {
        let in_region: Vec<BackendCapabilities> = self
            .backends
            .iter()
            .map(|b| b.capabilities())
            .filter(|c| c.regions.contains(&grant.region))
            .collect();
        if grant.tdx == TdxPolicy::Required && !in_region.iter().any(|c| c.tdx) {
            return Err(GrantError::field_problem("tdx", FieldProblem::NotOffered));
        }
        let eligible = in_region
            .iter()
            .filter(|c| grant.tdx != TdxPolicy::Required || c.tdx);
        let mut fits_cpu = false;
        for c in eligible {
            // A grant runs on one machine: a backend of several fits it
            // when one of its hosts does (or one not heard from yet might).
            let machines: Vec<(Resources, bool)> = if c.hosts.is_empty() {
                vec![(c.capacity.usable, false)]
            } else {
                c.hosts
                    .iter()
                    .map(|h| (h.capacity.usable, h.state == HostState::Unknown))
                    .collect()
            };
            for (usable, unknown) in machines {
                fits_cpu |= unknown || grant.vcpus <= usable.vcpus;
                if unknown || (grant.vcpus <= usable.vcpus && grant.ram_mib <= usable.ram_mib) {
                    return Ok(());
                }
            }
        }
        // Name the dimension no backend has enough of; if each fits somewhere
        // but never together, memory is the one to shrink.
        let field = match (fits_cpu, grant.cpu_millicores.is_some()) {
            (false, true) => "cpu_millicores",
            (false, false) => "vcpus",
            (true, _) => "ram_mib",
        };
        Err(GrantError::field_problem(field, FieldProblem::TooLarge))
    }

    /// Backends to try for a grant, in order: those without TDX are left out
    /// when it is required, and come after those with it when preferred.
    fn candidates(&self, grant: &Grant) -> Vec<&Arc<dyn Backend>> {
        let (with_tdx, without): (Vec<_>, Vec<_>) =
            self.backends.iter().partition(|b| b.capabilities().tdx);
        match grant.tdx {
            TdxPolicy::Required => with_tdx,
            TdxPolicy::Preferred => with_tdx.into_iter().chain(without).collect(),
            TdxPolicy::No => self.backends.iter().collect(),
        }
    }

    /// Provisions on the first backend that can take the grant; on a failure
    /// that another backend might not have, tries the next (skipping the one
    /// that failed). A fatal failure stops the search.
    ///
    /// Before each backend is called, `attempting` is told its name, so the
    /// caller can record where the provision is going (kilnd stores it, so
    /// that after a crash it asks that backend alone to `abandon` it). A
    /// backend that failed has left nothing behind (see `Backend`), so only
    /// the latest name matters. An error from `attempting` stops the search
    /// before that backend is called and is the outer error; the inner
    /// result is the provision's.
    pub async fn provision<E>(
        &self,
        grant: &Grant,
        mut attempting: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<Result<ProvisionedInstance, FleetError>, E> {
        let mut last_failure: Option<(String, BackendError)> = None;
        for backend in self.candidates(grant) {
            if !backend.can_satisfy(grant) {
                continue;
            }
            let name = backend.name().to_string();
            attempting(&name)?;
            match backend.provision(grant).await {
                Ok(instance) => {
                    tracing::info!(grant = %grant.id, backend = %name, instance = %instance.instance_id, "provisioned");
                    return Ok(Ok(instance));
                }
                Err(error) if error.retry_elsewhere() => {
                    tracing::warn!(grant = %grant.id, backend = %name, error = %crate::error_chain(&error), "provision failed; trying the next backend");
                    last_failure = Some((name, error));
                }
                Err(error) => {
                    return Ok(Err(FleetError::Fatal {
                        backend: name,
                        error,
                    }))
                }
            }
        }
        Ok(Err(match last_failure {
            Some((backend, last)) => FleetError::AllFailed { backend, last },
            None => FleetError::NoBackendCanSatisfy,
        }))
    }

    pub async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, FleetError> {
        let backend = self.owner(instance)?;
        backend
            .watch_until_exit(instance)
            .await
            .map_err(|error| failed(instance, error))
    }

    pub async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), FleetError> {
        let backend = self.owner(instance)?;
        backend
            .terminate(instance)
            .await
            .map_err(|error| failed(instance, error))
    }

    /// Usage so far, from the instance's backend (None if it cannot tell).
    pub async fn current_usage(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, FleetError> {
        let backend = self.owner(instance)?;
        backend
            .current_usage(instance)
            .await
            .map_err(|error| failed(instance, error))
    }

    /// Asks the backend an interrupted provision of `grant_id` was calling
    /// (`backend`, as recorded from `provision`'s `attempting`) to remove
    /// what it left. With none recorded (grants stored before kilnd recorded
    /// it), or a name this fleet does not have (the configuration changed
    /// since), every backend is asked. Failures are logged; the rest still
    /// run.
    pub async fn abandon(&self, grant_id: &str, backend: Option<&str>) {
        let asked: Vec<&Arc<dyn Backend>> = match backend {
            Some(name) => match self.backends.iter().find(|b| b.name() == name) {
                Some(b) => vec![b],
                None => {
                    tracing::warn!(grant = %grant_id, backend = %name, "the backend recorded for an interrupted provision is not in this fleet; asking every backend");
                    self.backends.iter().collect()
                }
            },
            None => self.backends.iter().collect(),
        };
        for backend in asked {
            if let Err(e) = backend.abandon(grant_id).await {
                tracing::warn!(grant = %grant_id, backend = %backend.name(), error = %crate::error_chain(&e), "could not clean up an interrupted provision");
            }
        }
    }

    fn owner(&self, instance: &ProvisionedInstance) -> Result<&Arc<dyn Backend>, FleetError> {
        self.backends
            .iter()
            .find(|b| b.name() == instance.backend)
            .ok_or_else(|| FleetError::UnknownBackend(instance.backend.clone()))
    }
}

/// A failure of the backend that owns `instance`.
fn failed(instance: &ProvisionedInstance, error: BackendError) -> FleetError {
    FleetError::Backend {
        backend: instance.backend.clone(),
        error,
    }
}
