//! A [`GcpApi`] made on first use: Google's clients are built in async
//! code, and backends are built before kilnd serves. The key file is read
//! at build time all the same, so a bad one stops kilnd at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{GcpApi, GcpError};
use crate::backends::cloud::api::{
    CloudApi, CloudError, CloudErrorKind, CloudFeatures, CloudInstance, CreateSpec, MachineType,
    Placement,
};

pub struct LazyGcpApi {
    project: String,
    endpoint_url: Option<String>,
    credentials_file: Option<PathBuf>,
    api: OnceCell<GcpApi>,
}

impl LazyGcpApi {
    /// Checks what can be checked without the runtime: the project, and
    /// that the key file reads as JSON.
    pub fn new(
        project: String,
        endpoint_url: Option<String>,
        credentials_file: Option<PathBuf>,
    ) -> Result<LazyGcpApi, GcpError> {
        if project.is_empty() {
            return Err(GcpError::NoProject);
        }
        if let Some(path) = &credentials_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| GcpError::ReadKey(path.clone(), e))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| GcpError::ParseKey(path.clone(), e))?;
        }
        Ok(LazyGcpApi {
            project,
            endpoint_url,
            credentials_file,
            api: OnceCell::new(),
        })
    }

    async fn api(&self, call: &'static str) -> Result<&GcpApi, CloudError> {
        self.api
            .get_or_try_init(|| {
                GcpApi::new(
                    self.project.clone(),
                    self.endpoint_url.clone(),
                    self.credentials_file.clone(),
                )
            })
            .await
            .map_err(|e| CloudError {
                // Credentials the client cannot use: the operator acts.
                kind: CloudErrorKind::Auth,
                cloud: "gcp",
                call,
                code: "CLIENT".into(),
                message: crate::error_chain(&e),
            })
    }
}

#[async_trait]
impl CloudApi for LazyGcpApi {
    fn cloud(&self) -> &'static str {
        "gcp"
    }

    fn features(&self) -> CloudFeatures {
        super::FEATURES
    }

    async fn zones(&self, region: &str) -> Result<Vec<String>, CloudError> {
        self.api("zones.list").await?.zones(region).await
    }

    async fn machine_types(
        &self,
        region: &str,
        zone: &str,
    ) -> Result<Vec<MachineType>, CloudError> {
        self.api("machineTypes.list")
            .await?
            .machine_types(region, zone)
            .await
    }

    async fn create(&self, spec: &CreateSpec) -> Result<CloudInstance, CloudError> {
        self.api("instances.insert").await?.create(spec).await
    }

    async fn describe(
        &self,
        placement: &Placement,
        id: &str,
    ) -> Result<Option<CloudInstance>, CloudError> {
        self.api("instances.get")
            .await?
            .describe(placement, id)
            .await
    }

    async fn list(
        &self,
        region: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudInstance>, CloudError> {
        self.api("instances.aggregatedList")
            .await?
            .list(region, tags)
            .await
    }

    async fn terminate(&self, instance: &CloudInstance) -> Result<(), CloudError> {
        self.api("instances.delete")
            .await?
            .terminate(instance)
            .await
    }
}
