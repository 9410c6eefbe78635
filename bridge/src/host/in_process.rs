//! kilnd's `local` backend: this host driven in-process through [`Host`],
//! the same code `kiln host` runs for a remote bridge. So a grant here is
//! counted as any host counts it (its claim while it provisions, its
//! instance once it runs), and a machine can be a bridge's local backend
//! and another bridge's owned host without being overcommitted.

use async_trait::async_trait;

use super::{Host, HostError};
use crate::backend::{
    Backend, BackendCapabilities, BackendError, ProvisionedInstance, UsageMetrics,
};
use crate::grant::Grant;

/// A host failure as the fleet reads it.
fn backend_error(e: HostError) -> BackendError {
    match e {
        HostError::Backend(e) => e,
        e @ (HostError::InProgress(_) | HostError::Busy(_) | HostError::Write(..)) => {
            BackendError::Transient(Box::new(e))
        }
        e => BackendError::Fatal(Box::new(e)),
    }
}

#[async_trait]
impl Backend for Host {
    fn name(&self) -> &str {
        self.backend.name()
    }

    fn capabilities(&self) -> BackendCapabilities {
        self.backend.capabilities()
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        self.backend.can_satisfy(grant)
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        Host::provision(self, grant, None)
            .await
            .map_err(backend_error)
    }

    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError> {
        self.backend.watch_until_exit(instance).await
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        self.backend.terminate(instance).await
    }

    async fn current_usage(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        self.backend.current_usage(instance).await
    }

    async fn abandon(&self, grant_id: &str) -> Result<(), BackendError> {
        Host::abandon(self, grant_id).await.map_err(backend_error)
    }
}
