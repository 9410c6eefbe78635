//! Cloud overflow: grants run on cloud instances (AWS EC2, GCP Compute)
//! when owned capacity runs out. [`CloudBackend`] holds the rules every
//! cloud shares; [`api::CloudApi`] is what each cloud translates.
//!
//! The rules, in the order a provision meets them:
//! - The fleet records that the grant is provisioning here before the
//!   backend is called, and every instance carries the bridge's and the
//!   grant's tags: whatever a crash leaves, `abandon` (or the reaper)
//!   finds by tag and terminates. No instance is left behind.
//! - A create is retried only after looking for what it may have made
//!   (the response can be lost after the cloud acted), with the same
//!   idempotency token.
//! - Any failure after a create terminates what was created before the
//!   backend returns.
//! - A capacity error moves to the next machine type in the zone, and
//!   once none is left, to the next zone (never the same zone again for
//!   that grant); a quota error puts the whole region aside for a while;
//!   an auth error marks the backend unhealthy; throttling backs off.

pub mod api;
pub mod bootstrap;
mod pacing;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use russh::keys::ssh_key::PublicKey;
use serde::{Deserialize, Serialize};

use super::{BuildContext, LiveGrants};
use crate::backend::{
    Backend, BackendCapabilities, BackendError, HostState, HostUsage, ProvisionedInstance,
    UsageMetrics,
};
use crate::capacity::{CapacityError, CapacitySnapshot, Resources};
use crate::config::{Cloud, CloudSection, ConnectVia};
use crate::grant::{Grant, TdxPolicy};
use crate::host_key::{HostKey, HostKeyError};
use api::{
    CloudApi, CloudError, CloudErrorKind, CloudFeatures, CloudInstance, CreateSpec, MachineType,
    Placement, BRIDGE_TAG, GRANT_TAG,
};
use pacing::{throttle_pause, CreateLimit};

/// Requesters' SSH port on an instance when the section sets none.
const DEFAULT_SSH_PORT: u16 = 2222;
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_SYNC: Duration = Duration::from_secs(30);
const DEFAULT_CREATES_PER_MINUTE: u32 = 30;
/// How long a region that hit a quota is left out.
const QUOTA_COOL_DOWN: Duration = Duration::from_secs(600);
/// How often the instance types are asked for again.
const INVENTORY_REFRESH: Duration = Duration::from_secs(3600);
/// How often a provision asks the cloud whether its instance runs.
const READY_POLL: Duration = Duration::from_secs(1);
/// How often a running instance's VM is probed: a probe costs the cloud
/// nothing, and the grant is ready the moment it answers.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How long one host-key probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Throttled calls retried this often before the placement is given up.
const THROTTLE_RETRIES: u32 = 4;
/// What kiln itself needs of an instance beside the grant's VM.
const INSTANCE_OVERHEAD_MIB: u64 = 512;

/// A user-data renderer: the grant, its per-grant host key, the port
/// requesters use. Each cloud has its own form (cloud-config, a GCE
/// startup script), both from `bootstrap`.
pub type RenderUserData =
    Box<dyn Fn(&Grant, &HostKey, u16) -> Result<String, String> + Send + Sync>;

/// The user data of a section's instances: a `#cloud-config` for EC2's
/// cloud-init, the startup script itself for GCE.
pub fn user_data_renderer(
    section: &CloudSection,
    cloud: Cloud,
    insecure_registries: &[String],
) -> RenderUserData {
    let (url, sha) = (section.bundle_url.clone(), section.bundle_sha256.clone());
    let registries = insecure_registries.to_vec();
    Box::new(move |grant, host_key, ssh_port| {
        let b = bootstrap::Bootstrap {
            bundle_url: &url,
            bundle_sha256: &sha,
            grant,
            host_key,
            ssh_port,
            kiln_home: bootstrap::DEFAULT_KILN_HOME,
            prefix: bootstrap::DEFAULT_PREFIX,
            insecure_registries: &registries,
            power_off: true,
        };
        match cloud {
            Cloud::Aws => bootstrap::cloud_config(&b),
            Cloud::Gcp => bootstrap::script(&b),
        }
        .map_err(|e| crate::error_chain(&e))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CloudBackendError {
    #[error("no configured machine type fits {vcpus} vCPUs and {ram_mib} MiB")]
    NoTypeFits { vcpus: u32, ram_mib: u64 },
    #[error("grant asks for TDX, which no configured machine type offers")]
    NoTdx,
    #[error("cloud instances cannot publish guest ports yet")]
    Publish,
    #[error("every zone refused: {0}")]
    Exhausted(#[source] CloudError),
    #[error("the backend is unhealthy: {0}")]
    Unhealthy(String),
    #[error("no region left to try (quota cool-down)")]
    AllRegionsCooling,
    #[error("instance {id} {state} before its VM answered")]
    EndedEarly { id: String, state: String },
    #[error("instance {0} has no {1} address")]
    NoAddress(String, &'static str),
    #[error("instance {0}'s VM did not answer SSH within {1:?}")]
    NotReady(
        String,
        Duration,
        #[source] Option<crate::backends::ssh::session::SessionError>,
    ),
    #[error("instance {id} was {state} by the cloud{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Lost {
        id: String,
        state: String,
        reason: Option<String>,
    },
    #[error("instance {0} does not carry the cloud backend's details")]
    Foreign(String),
    #[error("cannot render the user data: {0}")]
    UserData(String),
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// What the backend keeps in `ProvisionedInstance::private`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Private {
    placement: Placement,
    grant: String,
    /// What the grant holds of `max_instances` and the card's capacity.
    #[serde(default)]
    resources: Resources,
}

/// The section's keys, with defaults applied.
struct Settings {
    regions: Vec<String>,
    zones: Vec<String>,
    machine_types: Vec<String>,
    max_instances: u32,
    /// Boot image per region (every region has one: the config checks).
    images: BTreeMap<String, String>,
    ssh_port: u16,
    connect: ConnectVia,
    ready_timeout: Duration,
    sync: Duration,
    bridge_id: String,
}

/// What the backend has learnt, for routing and the provider card.
#[derive(Default)]
struct Known {
    /// The configured types the cloud offers, by name.
    types: BTreeMap<String, MachineType>,
    /// Zones per region, as the cloud lists them (configured ones only
    /// when `zones` is set).
    zones: BTreeMap<String, Vec<String>>,
    inventory_at: Option<Instant>,
    /// Instances counted against `max_instances`, by grant: those being
    /// provisioned (from the moment a slot is taken) and those running.
    slots: BTreeMap<String, Resources>,
    /// Regions left out until then, after a quota error.
    cooling: BTreeMap<String, (Instant, DateTime<Utc>)>,
    /// Set by an auth error, cleared by the next call that works.
    unhealthy: Option<(DateTime<Utc>, String)>,
    /// Instances this backend terminated, so their end is no loss.
    terminated: BTreeSet<String>,
}

pub struct CloudBackend {
    name: String,
    label: String,
    settings: Settings,
    api: Arc<dyn CloudApi>,
    render: RenderUserData,
    creates: CreateLimit,
    known: Arc<Mutex<Known>>,
}

impl CloudBackend {
    pub fn new(
        section: &CloudSection,
        ctx: &BuildContext,
        api: Arc<dyn CloudApi>,
        render: RenderUserData,
    ) -> Arc<CloudBackend> {
        let settings = Settings {
            regions: section.regions.clone(),
            zones: section.zones.clone(),
            machine_types: section.machine_types.clone(),
            max_instances: section.max_instances,
            images: section
                .regions
                .iter()
                .filter_map(|r| Some((r.clone(), section.image_for(r)?.to_string())))
                .collect(),
            ssh_port: section.ssh_port.unwrap_or(DEFAULT_SSH_PORT),
            connect: section.connect_via(),
            ready_timeout: section
                .ready_timeout_secs
                .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs),
            sync: section.sync_secs.map_or(DEFAULT_SYNC, Duration::from_secs),
            bridge_id: ctx.bridge_id.clone(),
        };
        let backend = Arc::new(CloudBackend {
            name: section.name.clone(),
            label: section.region.clone().unwrap_or_else(|| ctx.region.clone()),
            settings,
            api,
            render,
            creates: CreateLimit::new(
                section
                    .creates_per_minute
                    .unwrap_or(DEFAULT_CREATES_PER_MINUTE),
            ),
            known: Arc::new(Mutex::new(Known::default())),
        });
        CloudBackend::keep_syncing(&backend, ctx.live_grants.clone());
        backend
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        // Plain maps, consistent between statements.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refreshes the inventory, and lists this bridge's instances every
    /// `sync` to reap those no grant owns, for as long as the backend lives.
    fn keep_syncing(backend: &Arc<CloudBackend>, live: Option<Arc<dyn LiveGrants>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<CloudBackend> = Arc::downgrade(backend);
        let every = backend.settings.sync;
        runtime.spawn(async move {
            loop {
                let Some(backend) = weak.upgrade() else {
                    return;
                };
                if backend.inventory_is_stale() {
                    backend.refresh_inventory().await;
                }
                if let Some(live) = &live {
                    backend.reap(live.as_ref()).await;
                }
                drop(backend);
                tokio::time::sleep(every).await;
            }
        });
    }

    fn inventory_is_stale(&self) -> bool {
        self.known()
            .inventory_at
            .is_none_or(|at| at.elapsed() >= INVENTORY_REFRESH)
    }

    /// Asks the cloud for each region's zones and the configured types.
    pub async fn refresh_inventory(&self) {
        let mut zones = BTreeMap::new();
        let mut types = BTreeMap::new();
        for region in &self.settings.regions {
            let listed = match self.api.zones(region).await {
                Ok(z) => z,
                Err(e) => {
                    self.note_failure(&e);
                    tracing::warn!(backend = %self.name, %region, error = %e, "cannot list zones");
                    continue;
                }
            };
            let chosen: Vec<String> = if self.settings.zones.is_empty() {
                listed
            } else {
                // Configured order, those the cloud has.
                self.settings
                    .zones
                    .iter()
                    .filter(|z| listed.contains(z))
                    .cloned()
                    .collect()
            };
            if let Some(zone) = chosen.first() {
                match self.api.machine_types(region, zone).await {
                    Ok(offered) => {
                        for t in offered {
                            if self.settings.machine_types.contains(&t.name) {
                                types.entry(t.name.clone()).or_insert(t);
                            }
                        }
                    }
                    Err(e) => {
                        self.note_failure(&e);
                        tracing::warn!(backend = %self.name, %region, error = %e, "cannot list machine types");
                    }
                }
            }
            zones.insert(region.clone(), chosen);
        }
        let mut known = self.known();
        if !zones.is_empty() {
            known.zones = zones;
        }
        if !types.is_empty() {
            known.types = types;
            known.inventory_at = Some(Instant::now());
            known.unhealthy = None;
        }
    }

    /// The configured types that fit the grant, in configured order. Types
    /// not in the inventory yet are left out: their size is unknown.
    fn types_for(&self, grant: &Grant) -> Result<Vec<MachineType>, CloudBackendError> {
        let known = self.known();
        let need = grant.ram_mib.saturating_add(INSTANCE_OVERHEAD_MIB);
        let fitting: Vec<MachineType> = self
            .settings
            .machine_types
            .iter()
            .filter_map(|name| known.types.get(name))
            .filter(|t| t.kvm && t.vcpus >= grant.vcpus && t.ram_mib >= need)
            .cloned()
            .collect();
        if fitting.is_empty() {
            return Err(CloudBackendError::NoTypeFits {
                vcpus: grant.vcpus,
                ram_mib: grant.ram_mib,
            });
        }
        match grant.tdx {
            TdxPolicy::Required => {
                let tdx: Vec<MachineType> = fitting.into_iter().filter(|t| t.tdx).collect();
                if tdx.is_empty() {
                    return Err(CloudBackendError::NoTdx);
                }
                Ok(tdx)
            }
            TdxPolicy::Preferred => {
                let (mut with, without): (Vec<_>, Vec<_>) =
                    fitting.into_iter().partition(|t| t.tdx);
                with.extend(without);
                Ok(with)
            }
            TdxPolicy::No => Ok(fitting),
        }
    }

    /// Counts the grant against `max_instances` until `release`.
    fn take_slot(&self, grant: &Grant) -> Result<(), CapacityError> {
        let mut known = self.known();
        if known.slots.contains_key(&grant.id) {
            return Ok(());
        }
        if known.slots.len() >= self.settings.max_instances as usize {
            return Err(CapacityError::AllInstancesInUse(
                self.settings.max_instances,
            ));
        }
        known
            .slots
            .insert(grant.id.clone(), Resources::new(grant.vcpus, grant.ram_mib));
        Ok(())
    }

    fn release(&self, grant_id: &str) {
        self.known().slots.remove(grant_id);
    }

    /// Records what a failed call says about the backend as a whole.
    fn note_failure(&self, e: &CloudError) {
        if e.kind == CloudErrorKind::Auth {
            let mut known = self.known();
            if known.unhealthy.is_none() {
                tracing::error!(backend = %self.name, error = %e, "cloud refused the credentials: backend unhealthy");
                known.unhealthy = Some((Utc::now(), e.to_string()));
            }
        }
    }

    fn note_success(&self) {
        self.known().unhealthy = None;
    }

    fn tags(&self, grant_id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (BRIDGE_TAG.to_string(), self.settings.bridge_id.clone()),
            (GRANT_TAG.to_string(), grant_id.to_string()),
        ])
    }

    fn own_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(BRIDGE_TAG.to_string(), self.settings.bridge_id.clone())])
    }

    /// Tries each region, zone and type in order until one serves the
    /// grant.
    async fn place(&self, grant: &Grant) -> Result<ProvisionedInstance, CloudBackendError> {
        if let Some((_, why)) = &self.known().unhealthy {
            return Err(CloudBackendError::Unhealthy(why.clone()));
        }
        if self.known().types.is_empty() {
            self.refresh_inventory().await;
        }
        let types = self.types_for(grant)?;
        let host_key = HostKey::generate()?;
        let user_data = (self.render)(grant, &host_key, self.settings.ssh_port)
            .map_err(CloudBackendError::UserData)?;
        let mut last: Option<CloudError> = None;
        let mut attempt = 0u32;
        for region in &self.settings.regions {
            if self.is_cooling(region) {
                continue;
            }
            let zones = self.known().zones.get(region).cloned().unwrap_or_default();
            'zones: for zone in zones {
                for machine_type in &types {
                    attempt += 1;
                    let placement = Placement {
                        region: region.clone(),
                        zone: zone.clone(),
                        machine_type: machine_type.name.clone(),
                    };
                    let spec = CreateSpec {
                        name: instance_name(&grant.id, attempt),
                        token: instance_name(&grant.id, attempt),
                        placement: placement.clone(),
                        image: self
                            .settings
                            .images
                            .get(region)
                            .cloned()
                            .unwrap_or_default(),
                        user_data: user_data.clone(),
                        tags: self.tags(&grant.id),
                        nested_virtualization: true,
                    };
                    match self.try_placement(grant, &spec, &host_key).await {
                        Ok(instance) => return Ok(instance),
                        Err(PlaceError::Cloud(e)) => {
                            tracing::warn!(grant = %grant.id, backend = %self.name, zone = %zone, machine_type = %machine_type.name, error = %e, "placement failed");
                            self.note_failure(&e);
                            match e.kind {
                                // Capacity is per type and zone: the next
                                // type here, and once none is left, the
                                // zone is out for this grant.
                                CloudErrorKind::Capacity => {
                                    last = Some(e);
                                    continue;
                                }
                                CloudErrorKind::Quota => {
                                    self.cool(region);
                                    last = Some(e);
                                    break 'zones;
                                }
                                CloudErrorKind::Auth => {
                                    return Err(CloudBackendError::Unhealthy(e.to_string()))
                                }
                                CloudErrorKind::Invalid => return Err(e.into()),
                                CloudErrorKind::Throttled
                                | CloudErrorKind::NotFound
                                | CloudErrorKind::Conflict
                                | CloudErrorKind::Transient => {
                                    last = Some(e);
                                    continue 'zones;
                                }
                            }
                        }
                        // The instance was made but never served: it is
                        // gone again; the next zone may do better.
                        Err(PlaceError::NotServing(e)) => {
                            tracing::warn!(grant = %grant.id, backend = %self.name, zone = %zone, error = %crate::error_chain(&e), "instance did not serve; terminated");
                            continue 'zones;
                        }
                    }
                }
            }
        }
        match last {
            Some(e) => Err(CloudBackendError::Exhausted(e)),
            None if self.settings.regions.iter().all(|r| self.is_cooling(r)) => {
                Err(CloudBackendError::AllRegionsCooling)
            }
            None => Err(CloudBackendError::NoTypeFits {
                vcpus: grant.vcpus,
                ram_mib: grant.ram_mib,
            }),
        }
    }

    /// One placement: find or create the instance, wait until its VM
    /// answers. Whatever it created and could not use is terminated.
    async fn try_placement(
        &self,
        grant: &Grant,
        spec: &CreateSpec,
        host_key: &HostKey,
    ) -> Result<ProvisionedInstance, PlaceError> {
        let instance = self.create(spec).await?;
        match self.wait_ready(grant, &instance, host_key).await {
            Ok(ready) => Ok(ready),
            Err(e) => {
                self.terminate_quietly(&instance).await;
                Err(PlaceError::NotServing(e))
            }
        }
    }

    /// Creates, retrying throttling; after a failure that may have created
    /// it anyway (a lost response), looks for it by the grant's tag first.
    async fn create(&self, spec: &CreateSpec) -> Result<CloudInstance, PlaceError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.creates.take().await;
            let err = match self.api.create(spec).await {
                Ok(instance) => {
                    self.note_success();
                    return Ok(instance);
                }
                Err(e) => e,
            };
            match err.kind {
                CloudErrorKind::Throttled if attempt <= THROTTLE_RETRIES => {
                    tokio::time::sleep(throttle_pause(attempt)).await;
                }
                CloudErrorKind::Transient if attempt <= 2 => {
                    if let Some(found) = self.find_created(spec).await {
                        tracing::info!(instance = %found.id, "the create's answer was lost; found the instance it made");
                        return Ok(found);
                    }
                }
                _ => return Err(PlaceError::Cloud(err)),
            }
        }
    }

    /// The live instance an earlier try of `spec` made, if any.
    async fn find_created(&self, spec: &CreateSpec) -> Option<CloudInstance> {
        let listed = self
            .api
            .list(&spec.placement.region, &spec.tags)
            .await
            .ok()?;
        listed
            .into_iter()
            .find(|i| !i.state.is_over() && i.placement.zone == spec.placement.zone)
    }

    /// Polls until the instance runs with an address and its VM answers SSH
    /// with the grant's host key.
    async fn wait_ready(
        &self,
        grant: &Grant,
        created: &CloudInstance,
        host_key: &HostKey,
    ) -> Result<ProvisionedInstance, CloudBackendError> {
        let public = host_key.public_openssh()?;
        let pinned = PublicKey::from_openssh(&public)
            .map_err(|e| CloudBackendError::UserData(e.to_string()))?;
        let deadline = Instant::now() + self.settings.ready_timeout;
        let mut instance = created.clone();
        let mut last_probe = None;
        let mut last_described = Instant::now();
        let mut pending_pause = PROBE_EVERY;
        loop {
            if instance.state.is_over() {
                return Err(CloudBackendError::EndedEarly {
                    id: instance.id.clone(),
                    state: format!("{:?}", instance.state).to_lowercase(),
                });
            }
            if instance.state == api::CloudState::Running {
                let address = self.address_of(&instance)?;
                let probe_start = Instant::now();
                let probed = crate::backends::ssh::session::Session::host_key_answers(
                    address,
                    self.settings.ssh_port,
                    &pinned,
                    PROBE_TIMEOUT,
                )
                .await;
                tracing::debug!(instance = %instance.id, ms = probe_start.elapsed().as_millis() as u64, ok = probed.is_ok(), "host key probe");
                match probed {
                    Ok(()) => {
                        return Ok(ProvisionedInstance {
                            backend: self.name.clone(),
                            instance_id: instance.id.clone(),
                            host: address.to_string(),
                            ssh_port: self.settings.ssh_port,
                            user: "root".to_string(),
                            host_key_fingerprint: host_key.fingerprint(),
                            host_key: public,
                            started_at: Utc::now(),
                            published: Vec::new(),
                            location: Some(format!(
                                "region {}, zone {}, {}",
                                instance.placement.region,
                                instance.placement.zone,
                                instance.placement.machine_type
                            )),
                            private: serde_json::to_value(Private {
                                placement: instance.placement.clone(),
                                grant: grant.id.clone(),
                                resources: Resources::new(grant.vcpus, grant.ram_mib),
                            })
                            .unwrap_or_default(),
                        })
                    }
                    // A wrong key never heals: someone else answers there.
                    Err(
                        e @ crate::backends::ssh::session::SessionError::HostKeyMismatch { .. },
                    ) => {
                        return Err(CloudBackendError::NotReady(
                            instance.id.clone(),
                            self.settings.ready_timeout,
                            Some(e),
                        ))
                    }
                    Err(e) => last_probe = Some(e),
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(grant = %grant.id, instance = %instance.id, "not ready in time");
                return Err(CloudBackendError::NotReady(
                    instance.id.clone(),
                    self.settings.ready_timeout,
                    last_probe,
                ));
            }
            // Running: probe again soon, asking the cloud only now and then
            // (whether it stopped meanwhile); not yet: ask the cloud.
            if instance.state == api::CloudState::Running && last_described.elapsed() < READY_POLL {
                tokio::time::sleep(PROBE_EVERY).await;
                continue;
            }
            // Soon at first (an emulator, a warm pool, a fast cloud), then
            // doubling to READY_POLL.
            let pause = if instance.state == api::CloudState::Running {
                PROBE_EVERY
            } else {
                pending_pause = (pending_pause * 2).min(READY_POLL);
                pending_pause / 2
            };
            tokio::time::sleep(pause).await;
            last_described = Instant::now();
            match self.api.describe(&instance.placement, &instance.id).await {
                Ok(Some(now)) => instance = now,
                // Not visible yet (clouds are eventually consistent).
                Ok(None) => {}
                Err(e) if e.kind == CloudErrorKind::Auth => {
                    self.note_failure(&e);
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::debug!(instance = %instance.id, error = %e, "describe failed; polling on")
                }
            }
        }
    }

    fn address_of(&self, instance: &CloudInstance) -> Result<IpAddr, CloudBackendError> {
        let (address, which) = match self.settings.connect {
            ConnectVia::Public => (instance.public_ip, "public"),
            ConnectVia::Private => (instance.private_ip, "private"),
        };
        address.ok_or_else(|| CloudBackendError::NoAddress(instance.id.clone(), which))
    }

    async fn terminate_quietly(&self, instance: &CloudInstance) {
        self.known().terminated.insert(instance.id.clone());
        if let Err(e) = self.api.terminate(instance).await {
            // The reaper tries again: the instance carries the grant's tag.
            tracing::warn!(instance = %instance.id, error = %e, "terminate failed; the reaper will retry");
        }
    }

    fn is_cooling(&self, region: &str) -> bool {
        let mut known = self.known();
        match known.cooling.get(region) {
            Some((until, _)) if Instant::now() < *until => true,
            Some(_) => {
                known.cooling.remove(region);
                false
            }
            None => false,
        }
    }

    fn cool(&self, region: &str) {
        tracing::warn!(backend = %self.name, %region, "quota reached: region left out for a while");
        self.known().cooling.insert(
            region.to_string(),
            (Instant::now() + QUOTA_COOL_DOWN, Utc::now()),
        );
    }

    /// Every instance of this bridge not yet terminated, region by region; None when a
    /// region could not be listed (nothing is reaped on partial sight).
    async fn own_instances(&self) -> Option<Vec<CloudInstance>> {
        let mut all = Vec::new();
        for region in &self.settings.regions {
            match self.api.list(region, &self.own_tags()).await {
                // Stopped ones too: they still hold disks (and a GCE
                // TERMINATED instance is only stopped).
                Ok(listed) => all.extend(
                    listed
                        .into_iter()
                        .filter(|i| i.state != api::CloudState::Terminated),
                ),
                Err(e) => {
                    self.note_failure(&e);
                    tracing::warn!(backend = %self.name, %region, error = %e, "cannot list instances");
                    return None;
                }
            }
        }
        self.note_success();
        Some(all)
    }

    /// Terminates every instance of this bridge that no live grant owns.
    /// Instances are listed before grants are asked about, so a grant that
    /// starts provisioning meanwhile is already live when asked.
    pub async fn reap(&self, live: &dyn LiveGrants) -> Vec<String> {
        let Some(instances) = self.own_instances().await else {
            return Vec::new();
        };
        let mut reaped = Vec::new();
        for instance in instances {
            let owned = instance.grant().is_some_and(|g| live.is_live(g));
            if !owned {
                tracing::warn!(backend = %self.name, instance = %instance.id, grant = ?instance.grant(), "orphan instance: terminating");
                self.terminate_quietly(&instance).await;
                reaped.push(instance.id);
            }
        }
        reaped
    }

    fn private_of(&self, instance: &ProvisionedInstance) -> Result<Private, BackendError> {
        serde_json::from_value::<Private>(instance.private.clone())
            .map_err(|_| fatal(CloudBackendError::Foreign(instance.instance_id.clone())))
    }

    fn card(&self) -> CloudCard {
        let known = self.known();
        let (state, since, message) = match &known.unhealthy {
            Some((since, why)) => (HostState::Refused, Some(*since), Some(why.clone())),
            None if known.inventory_at.is_some() => (HostState::Ready, None, None),
            None => (HostState::Unknown, None, None),
        };
        CloudCard {
            cloud: self.api.cloud().to_string(),
            state,
            since,
            message,
            features: self.api.features(),
            max_instances: self.settings.max_instances,
            creates_per_minute: self.creates.per_minute(),
            instances: known.slots.len() as u32,
            machine_types: self
                .settings
                .machine_types
                .iter()
                .filter_map(|n| known.types.get(n).cloned())
                .collect(),
            cooling_regions: known
                .cooling
                .iter()
                .filter(|(_, (until, _))| Instant::now() < *until)
                .map(|(r, _)| r.clone())
                .collect(),
        }
    }
}

/// Why one placement failed.
enum PlaceError {
    /// The cloud refused a call.
    Cloud(CloudError),
    /// An instance was made but did not serve (now terminated).
    NotServing(CloudBackendError),
}

impl From<CloudError> for PlaceError {
    fn from(e: CloudError) -> Self {
        PlaceError::Cloud(e)
    }
}

/// A cloud backend's part of the provider card.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudCard {
    /// `aws` or `gcp`.
    pub cloud: String,
    /// `ready` once the cloud answered; `refused` while it refuses the
    /// credentials (until a call works again).
    pub state: HostState,
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub message: Option<String>,
    pub features: CloudFeatures,
    pub max_instances: u32,
    /// The most create calls a minute (the backend waits past it).
    pub creates_per_minute: u32,
    /// Instances running or being created now.
    pub instances: u32,
    /// The configured types, as the cloud describes them.
    pub machine_types: Vec<MachineType>,
    /// Regions left out after a quota error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cooling_regions: Vec<String>,
}

/// The instance name (and idempotency token) of placement `attempt` of a
/// grant: lowercase, at most 63 characters, as GCE names must be.
fn instance_name(grant_id: &str, attempt: u32) -> String {
    let id: String = grant_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    format!("kiln-{id}-{attempt}")
}

fn add(a: Resources, b: &Resources) -> Resources {
    Resources {
        vcpus: a.vcpus.saturating_add(b.vcpus),
        ram_mib: a.ram_mib.saturating_add(b.ram_mib),
    }
}

fn fatal(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Fatal(Box::new(e))
}

/// Sorts a provision failure by what the fleet does next.
fn provision_error(e: CloudBackendError) -> BackendError {
    match e {
        CloudBackendError::NoTypeFits { .. }
        | CloudBackendError::NoTdx
        | CloudBackendError::Publish
        | CloudBackendError::Unhealthy(_)
        | CloudBackendError::AllRegionsCooling => BackendError::CannotSatisfy(Box::new(e)),
        CloudBackendError::Exhausted(ref last) if last.kind == CloudErrorKind::Capacity => {
            BackendError::Transient(Box::new(e))
        }
        CloudBackendError::Cloud(ref c) if c.kind == CloudErrorKind::Invalid => {
            BackendError::CannotSatisfy(Box::new(e))
        }
        CloudBackendError::HostKey(_) | CloudBackendError::UserData(_) => fatal(e),
        _ => BackendError::Transient(Box::new(e)),
    }
}

#[async_trait]
impl Backend for CloudBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> BackendCapabilities {
        let card = self.card();
        let largest = card
            .machine_types
            .iter()
            .map(|t| Resources::new(t.vcpus, t.ram_mib.saturating_sub(INSTANCE_OVERHEAD_MIB)))
            .max_by_key(|r| (r.vcpus, r.ram_mib))
            .unwrap_or_default();
        let used = self.known().slots.values().fold(Resources::default(), add);
        BackendCapabilities {
            regions: BTreeSet::from([self.label.clone()]),
            tdx: card.machine_types.iter().any(|t| t.tdx),
            capacity: CapacitySnapshot {
                // What one instance can hold, as many times as instances
                // are allowed.
                usable: Resources::new(
                    largest.vcpus.saturating_mul(self.settings.max_instances),
                    largest
                        .ram_mib
                        .saturating_mul(u64::from(self.settings.max_instances)),
                ),
                used,
            },
            hosts: Vec::new(),
            cloud: Some(card),
        }
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        grant.region == self.label
            && grant.publish.is_empty()
            && self.known().unhealthy.is_none()
            && self.types_for(grant).is_ok()
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        if !grant.publish.is_empty() {
            return Err(provision_error(CloudBackendError::Publish));
        }
        self.take_slot(grant)?;
        match self.place(grant).await {
            Ok(instance) => Ok(instance),
            Err(e) => {
                self.release(&grant.id);
                Err(provision_error(e))
            }
        }
    }

    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError> {
        let Private {
            placement,
            grant,
            resources,
        } = self.private_of(instance)?;
        loop {
            let ended = match self.api.describe(&placement, &instance.instance_id).await {
                Ok(Some(now)) if !now.state.is_over() => {
                    // Counted again after a restart (see `Backend`); never
                    // for an instance that has ended, which holds no slot.
                    if !self.known().terminated.contains(&instance.instance_id) {
                        self.known().slots.entry(grant.clone()).or_insert(resources);
                    }
                    None
                }
                Ok(Some(now)) => {
                    Some((format!("{:?}", now.state).to_lowercase(), now.state_reason))
                }
                Ok(None) => Some(("deleted".to_string(), None)),
                Err(e) if e.kind == CloudErrorKind::Auth => {
                    self.note_failure(&e);
                    return Err(BackendError::Transient(Box::new(e)));
                }
                Err(e) => return Err(BackendError::Transient(Box::new(e))),
            };
            if let Some((state, reason)) = ended {
                self.release(&grant);
                if self.known().terminated.remove(&instance.instance_id) {
                    return Ok(ended_now());
                }
                return Err(fatal(CloudBackendError::Lost {
                    id: instance.instance_id.clone(),
                    state,
                    reason,
                }));
            }
            tokio::time::sleep(self.settings.sync.min(Duration::from_secs(5))).await;
        }
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        let Private {
            placement, grant, ..
        } = self.private_of(instance)?;
        self.known().terminated.insert(instance.instance_id.clone());
        let found = self
            .api
            .describe(&placement, &instance.instance_id)
            .await
            .map_err(|e| BackendError::Transient(Box::new(e)))?;
        if let Some(cloud) = found {
            if cloud.state != api::CloudState::Terminated {
                self.api
                    .terminate(&cloud)
                    .await
                    .map_err(|e| BackendError::Transient(Box::new(e)))?;
            }
        }
        self.release(&grant);
        Ok(())
    }

    async fn abandon(&self, grant_id: &str) -> Result<(), BackendError> {
        for region in &self.settings.regions {
            let listed = self
                .api
                .list(region, &self.tags(grant_id))
                .await
                .map_err(|e| BackendError::Transient(Box::new(e)))?;
            for instance in listed
                .iter()
                .filter(|i| i.state != api::CloudState::Terminated)
            {
                tracing::info!(grant = %grant_id, instance = %instance.id, "terminating what an interrupted provision left");
                self.known().terminated.insert(instance.id.clone());
                self.api
                    .terminate(instance)
                    .await
                    .map_err(|e| BackendError::Transient(Box::new(e)))?;
            }
        }
        self.release(grant_id);
        Ok(())
    }
}

fn ended_now() -> UsageMetrics {
    UsageMetrics {
        guest: kiln_protocol::Usage::default(),
        exit_status: None,
        host: HostUsage::default(),
        ended_at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_valid_gce_names() {
        assert_eq!(instance_name("g-0123abcd", 1), "kiln-g-0123abcd-1");
        assert_eq!(instance_name("My_Grant", 12), "kiln-my-grant-12");
        let long = instance_name(&"x".repeat(200), 999);
        assert!(long.len() <= 63, "{long}");
    }
}
