//! GCP Compute Engine as a [`CloudApi`]: each call one Compute v1 request
//! through Google's Rust client, plus, for inserts and deletes, the wait
//! for the zone operation to be DONE. The client's own retries are off:
//! retries and failover are the cloud backend's, by [`CloudErrorKind`].
//!
//! Idempotency: an instance's name is deterministic per grant and its
//! insert carries a `requestId` derived from the create's token, so a
//! repeated create either gets GCE's answer to the first (same requestId)
//! or a 409 for the name, after which the existing instance is returned.

mod errors;
mod lazy;
mod translate;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use google_cloud_auth::credentials::{self, Credentials};
use google_cloud_compute_v1::client::{Instances, MachineTypes, ZoneOperations, Zones};
use google_cloud_compute_v1::model::{
    self, access_config, AccessConfig, AdvancedMachineFeatures, AttachedDisk,
    AttachedDiskInitializeParams, Metadata, NetworkInterface, Operation,
};
use google_cloud_gax::retry_policy::NeverRetry;

use crate::backends::cloud::api::{
    CloudApi, CloudError, CloudErrorKind, CloudFeatures, CloudInstance, MachineType, Placement,
    GRANT_TAG,
};

/// Why a [`GcpApi`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    #[error("GCP project must not be empty")]
    NoProject,
    #[error("Cannot read the service-account key {}", .0.display())]
    ReadKey(PathBuf, #[source] std::io::Error),
    #[error("The service-account key {} is not JSON", .0.display())]
    ParseKey(PathBuf, #[source] serde_json::Error),
    #[error("Cannot build GCP credentials")]
    Credentials(#[source] google_cloud_auth::build_errors::Error),
    #[error("Cannot build the Compute {0} client")]
    Client(
        &'static str,
        #[source] google_cloud_gax::client_builder::Error,
    ),
}

/// How long operations are waited for, and how often polled.
#[derive(Clone, Copy, Debug)]
pub struct Polling {
    /// Between two `zoneOperations.get`s.
    pub interval: Duration,
    /// Most time an insert or delete is waited for; past it the call
    /// fails as transient, and a retry with the same token finds the same
    /// operation.
    pub limit: Duration,
    /// Tries to see a just-inserted instance (Compute reads can lag the
    /// operation).
    pub visible_tries: u32,
}

impl Default for Polling {
    fn default() -> Polling {
        Polling {
            interval: Duration::from_secs(1),
            limit: Duration::from_secs(300),
            visible_tries: 5,
        }
    }
}

/// Most time one request may take before it fails as transient.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The startup-script metadata key GCE's guest agent runs at boot.
const STARTUP_SCRIPT: &str = "startup-script";

/// Compute Engine in one project.
pub struct GcpApi {
    project: String,
    instances: Instances,
    operations: ZoneOperations,
    machine_types: MachineTypes,
    zones: Zones,
    polling: Polling,
}

impl GcpApi {
    /// A client for `project`. Credentials: the service-account key in
    /// `credentials_file` when given; none (anonymous) when only
    /// `endpoint_url` is (a test server); else Application Default
    /// Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's, or the
    /// metadata server). `endpoint_url` replaces
    /// `https://compute.googleapis.com`.
    pub async fn new(
        project: String,
        endpoint_url: Option<String>,
        credentials_file: Option<PathBuf>,
    ) -> Result<GcpApi, GcpError> {
        if project.is_empty() {
            return Err(GcpError::NoProject);
        }
        // Google's crates leave the TLS crypto to the application; kilnd
        // already builds ring (deprecated by rustls only for lacking
        // post-quantum key exchange). A provider installed first is kept.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let creds = credentials_for(endpoint_url.is_some(), credentials_file)?;
        macro_rules! client {
            ($ty:ty, $what:literal) => {{
                let mut b = <$ty>::builder()
                    .with_credentials(creds.clone())
                    .with_retry_policy(NeverRetry)
                    .with_attempt_timeout(ATTEMPT_TIMEOUT);
                if let Some(e) = &endpoint_url {
                    b = b.with_endpoint(e.clone());
                }
                b.build().await.map_err(|e| GcpError::Client($what, e))?
            }};
        }
        Ok(GcpApi {
            instances: client!(Instances, "instances"),
            operations: client!(ZoneOperations, "zone operations"),
            machine_types: client!(MachineTypes, "machine types"),
            zones: client!(Zones, "zones"),
            project,
            polling: Polling::default(),
        })
    }

    /// The same client with other operation timings (tests poll fast).
    pub fn with_polling(mut self, polling: Polling) -> GcpApi {
        self.polling = polling;
        self
    }

    /// Waits until `op` is DONE; its error, if any, sorted.
    async fn wait(
        &self,
        call: &'static str,
        zone: &str,
        mut op: Operation,
    ) -> Result<(), CloudError> {
        let start = Instant::now();
        loop {
            if op.status == Some(model::operation::Status::Done) {
                return match errors::operation(call, &op) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            if start.elapsed() >= self.polling.limit {
                return Err(errors::own(
                    CloudErrorKind::Transient,
                    call,
                    "OPERATION_TIMEOUT",
                    format!(
                        "operation {} not DONE after {:?}",
                        op.name.as_deref().unwrap_or("?"),
                        self.polling.limit
                    ),
                ));
            }
            tokio::time::sleep(self.polling.interval).await;
            let name = op.name.clone().unwrap_or_default();
            op = self
                .operations
                .get()
                .set_project(&self.project)
                .set_zone(zone)
                .set_operation(name)
                .send()
                .await
                .map_err(|e| errors::call(call, &e))?;
        }
    }

    /// One instance; `None` on a 404.
    async fn get(&self, zone: &str, name: &str) -> Result<Option<CloudInstance>, CloudError> {
        match self
            .instances
            .get()
            .set_project(&self.project)
            .set_zone(zone)
            .set_instance(name)
            .send()
            .await
        {
            Ok(i) => Ok(translate::instance(&i)),
            Err(e) => {
                let e = errors::call("get", &e);
                if e.kind == CloudErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The instance just created (or found by its name), tolerating
    /// Compute's brief lag after the operation.
    async fn created(&self, spec_zone: &str, name: &str) -> Result<CloudInstance, CloudError> {
        for _ in 0..self.polling.visible_tries.max(1) {
            if let Some(i) = self.get(spec_zone, name).await? {
                return Ok(i);
            }
            tokio::time::sleep(self.polling.interval).await;
        }
        Err(errors::own(
            CloudErrorKind::NotFound,
            "insert",
            "NOT_VISIBLE",
            format!(
                "instance {name} in {spec_zone} not visible after its insert ({} reads)",
                self.polling.visible_tries
            ),
        ))
    }
}

fn credentials_for(
    endpoint_set: bool,
    credentials_file: Option<PathBuf>,
) -> Result<Credentials, GcpError> {
    match credentials_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| GcpError::ReadKey(path.clone(), e))?;
            let key: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| GcpError::ParseKey(path, e))?;
            credentials::service_account::Builder::new(key)
                .build()
                .map_err(GcpError::Credentials)
        }
        None if endpoint_set => Ok(credentials::anonymous::Builder::new().build()),
        None => credentials::Builder::default()
            .build()
            .map_err(GcpError::Credentials),
    }
}

/// The insert body for `spec` (its labels already checked).
fn instance_body(
    spec: &crate::backends::cloud::api::CreateSpec,
    labels: std::collections::HashMap<String, String>,
) -> model::Instance {
    let p = &spec.placement;
    let mut body = model::Instance::new()
        .set_name(&spec.name)
        .set_machine_type(format!("zones/{}/machineTypes/{}", p.zone, p.machine_type))
        .set_labels(labels)
        .set_metadata(
            Metadata::new().set_items([model::metadata::Items::new()
                .set_key(STARTUP_SCRIPT)
                .set_value(&spec.user_data)]),
        )
        .set_disks([AttachedDisk::new()
            .set_boot(true)
            .set_auto_delete(true)
            .set_initialize_params(
                AttachedDiskInitializeParams::new().set_source_image(&spec.image),
            )])
        // The default network, with an external address: the bridge
        // reaches the instance over the internet.
        .set_network_interfaces([NetworkInterface::new()
            .set_access_configs([AccessConfig::new()
                .set_type(access_config::Type::OneToOneNat)
                .set_name("External NAT")])]);
    if spec.nested_virtualization {
        body = body.set_advanced_machine_features(
            AdvancedMachineFeatures::new().set_enable_nested_virtualization(true),
        );
    }
    body
}

pub use lazy::LazyGcpApi;

/// What Compute Engine offers kiln.
const FEATURES: CloudFeatures = CloudFeatures {
    stop_start: true,
    idempotent_create: true,
    user_data: true,
    tags: true,
};

#[async_trait]
impl CloudApi for GcpApi {
    fn cloud(&self) -> &'static str {
        "gcp"
    }

    fn features(&self) -> CloudFeatures {
        FEATURES
    }

    async fn zones(&self, region: &str) -> Result<Vec<String>, CloudError> {
        // Zone.region is a URL: filtered here rather than by a server-side
        // filter whose URL matching would be one more thing to get right.
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .zones
                .list()
                .set_project(&self.project)
                .set_or_clear_page_token(token.take())
                .send()
                .await
                .map_err(|e| errors::call("zones", &e))?;
            for z in page.items {
                let in_region = z.region.as_deref().map(translate::last_segment) == Some(region);
                let up = z.status == Some(model::zone::Status::Up);
                if let (true, true, Some(name)) = (in_region, up, z.name) {
                    out.push(name);
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn machine_types(
        &self,
        _region: &str,
        zone: &str,
    ) -> Result<Vec<MachineType>, CloudError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .machine_types
                .list()
                .set_project(&self.project)
                .set_zone(zone)
                .set_or_clear_page_token(token.take())
                .send()
                .await
                .map_err(|e| errors::call("machine_types", &e))?;
            out.extend(page.items.iter().filter_map(translate::machine_type));
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(out)
    }

    async fn create(
        &self,
        spec: &crate::backends::cloud::api::CreateSpec,
    ) -> Result<CloudInstance, CloudError> {
        let invalid = |m: String| errors::own(CloudErrorKind::Invalid, "insert", "kiln", m);
        if !translate::valid_instance_name(&spec.name) {
            return Err(invalid(format!(
                "{:?} is not a GCE instance name (lowercase letter first, then lowercase \
                 letters, digits or -, at most 63)",
                spec.name
            )));
        }
        let labels = translate::labels(&spec.tags).map_err(invalid)?;
        let zone = &spec.placement.zone;
        let sent = self
            .instances
            .insert()
            .set_project(&self.project)
            .set_zone(zone)
            .set_request_id(translate::request_id(&spec.token))
            .set_body(instance_body(spec, labels))
            .send()
            .await;
        let waited = match sent {
            Ok(op) => self.wait("insert", zone, op).await,
            Err(e) => Err(errors::call("insert", &e)),
        };
        match waited {
            Ok(()) => self.created(zone, &spec.name).await,
            // The name exists: this grant's instance from an earlier try,
            // unless another grant's labels say otherwise.
            Err(e) if e.kind == CloudErrorKind::Conflict => {
                let existing = self.get(zone, &spec.name).await?.ok_or(e)?;
                let ours = existing.tags.get(GRANT_TAG) == spec.tags.get(GRANT_TAG);
                if ours {
                    Ok(existing)
                } else {
                    Err(errors::own(
                        CloudErrorKind::Conflict,
                        "insert",
                        "NAME_TAKEN",
                        format!(
                            "instance {} in {zone} exists for grant {:?}",
                            spec.name,
                            existing.grant()
                        ),
                    ))
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn describe(
        &self,
        placement: &Placement,
        id: &str,
    ) -> Result<Option<CloudInstance>, CloudError> {
        self.get(&placement.zone, id).await
    }

    async fn list(
        &self,
        region: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudInstance>, CloudError> {
        translate::labels(tags)
            .map_err(|m| errors::own(CloudErrorKind::Invalid, "list", "kiln", m))?;
        let filter = translate::label_filter(tags);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .instances
                .aggregated_list()
                .set_project(&self.project)
                .set_or_clear_page_token(token.take());
            if !filter.is_empty() {
                req = req.set_filter(&filter);
            }
            let page = req.send().await.map_err(|e| errors::call("list", &e))?;
            for scoped in page.items.values() {
                for i in scoped.instances.iter().filter_map(translate::instance) {
                    // The filter is the server's; the region and the tags
                    // are checked here too, so a looser match cannot leak
                    // another bridge's instances to the reaper.
                    let tagged = tags.iter().all(|(k, v)| i.tags.get(k) == Some(v));
                    if i.placement.region == region && tagged {
                        out.push(i);
                    }
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| (&a.placement.zone, &a.id).cmp(&(&b.placement.zone, &b.id)));
        Ok(out)
    }

    async fn terminate(&self, instance: &CloudInstance) -> Result<(), CloudError> {
        let zone = &instance.placement.zone;
        let sent = self
            .instances
            .delete()
            .set_project(&self.project)
            .set_zone(zone)
            .set_instance(&instance.id)
            .send()
            .await;
        let waited = match sent {
            Ok(op) => self.wait("delete", zone, op).await,
            Err(e) => Err(errors::call("delete", &e)),
        };
        match waited {
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_must_exist_and_be_json() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        assert!(matches!(
            credentials_for(false, Some(missing)),
            Err(GcpError::ReadKey(..))
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "not json").unwrap();
        assert!(matches!(
            credentials_for(false, Some(bad)),
            Err(GcpError::ParseKey(..))
        ));
        // Not a service-account key.
        let other = dir.path().join("other.json");
        std::fs::write(&other, r#"{"type": "authorized_user"}"#).unwrap();
        assert!(matches!(
            credentials_for(false, Some(other)),
            Err(GcpError::Credentials(_))
        ));
        assert!(credentials_for(true, None).is_ok());
    }

    #[tokio::test]
    async fn an_empty_project_is_refused() {
        let e = GcpApi::new(String::new(), Some("http://127.0.0.1:1".into()), None).await;
        assert!(matches!(e, Err(GcpError::NoProject)));
    }
}
