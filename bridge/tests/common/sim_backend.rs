//! A simulated backend: instances are records in a shared `World` (the
//! stand-in for a hypervisor, which outlives any one kilnd), with a real
//! `CapacityLedger`, configurable regions and TDX, a switch for transient
//! failures, and instances that run until terminated or for a set time.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kiln_bridge::backend::{
    Backend, BackendCapabilities, BackendError, HostUsage, ProvisionedInstance, PublishedPort,
    UsageMetrics,
};
use kiln_bridge::capacity::{CapacityLedger, Resources};
use kiln_bridge::grant::{Grant, TdxPolicy};
use kiln_protocol::{ExitStatus, Usage};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

#[derive(Clone, Debug)]
struct SimInstance {
    resources: Resources,
    started_at: DateTime<Utc>,
    /// When it ends on its own.
    ends_at: Option<DateTime<Utc>>,
    ended: Option<(DateTime<Utc>, Option<ExitStatus>)>,
}

/// What outlives kilnd: instances and the host's capacity.
pub struct World {
    pub ledger: CapacityLedger,
    instances: Mutex<HashMap<String, SimInstance>>,
    next: AtomicUsize,
}

impl World {
    pub fn new(vcpus: u32, ram_mib: u64) -> Arc<World> {
        Arc::new(World {
            ledger: CapacityLedger::new(Resources::new(vcpus, ram_mib), Resources::default(), None)
                .expect("ledger"),
            instances: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(1),
        })
    }

    /// Instances that have not ended.
    pub fn live(&self) -> usize {
        self.instances
            .lock()
            .expect("lock")
            .values()
            .filter(|i| i.ended.is_none() && i.ends_at.is_none_or(|t| t > Utc::now()))
            .count()
    }

    pub fn total(&self) -> usize {
        self.instances.lock().expect("lock").len()
    }
}

pub struct SimBackend {
    name: String,
    regions: BTreeSet<String>,
    tdx: bool,
    pub world: Arc<World>,
    /// Provisions fail with a transient error while set.
    pub fail_transiently: AtomicBool,
    /// Provisions fail for good while set.
    pub fail_fatally: AtomicBool,
    /// How long new instances run on their own; None: until terminated.
    pub run_for: Mutex<Option<Duration>>,
    pub provision_calls: AtomicUsize,
    /// Simulated boot time.
    pub provision_delay: Mutex<Duration>,
    pub exit_code: i32,
    /// Grant ids `abandon` was called for.
    pub abandoned: Mutex<Vec<String>>,
}

impl SimBackend {
    pub fn new(name: &str, regions: &[&str], tdx: bool, world: Arc<World>) -> SimBackend {
        SimBackend {
            name: name.into(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            tdx,
            world,
            fail_transiently: AtomicBool::new(false),
            fail_fatally: AtomicBool::new(false),
            run_for: Mutex::new(None),
            provision_calls: AtomicUsize::new(0),
            provision_delay: Mutex::new(Duration::from_millis(30)),
            exit_code: 0,
            abandoned: Mutex::new(Vec::new()),
        }
    }

    pub fn calls(&self) -> usize {
        self.provision_calls.load(Ordering::SeqCst)
    }

    fn usage_of(
        inst: &SimInstance,
        ended_at: DateTime<Utc>,
        status: Option<ExitStatus>,
    ) -> UsageMetrics {
        let uptime_ms = u64::try_from((ended_at - inst.started_at).num_milliseconds()).unwrap_or(0);
        UsageMetrics {
            guest: Usage {
                uptime_ms,
                cpu_user_ms: uptime_ms / 2,
                mem_used_kib: inst.resources.ram_mib * 512,
                workload: "exited".into(),
                ..Default::default()
            },
            exit_status: status,
            host: HostUsage {
                vcpu_cpu_ms: uptime_ms / 2 + 1,
                vmm_rss_kib: inst.resources.ram_mib * 1024 + 4096,
            },
            ended_at,
        }
    }
}

#[async_trait]
impl Backend for SimBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> BackendCapabilities {
        BackendCapabilities {
            regions: self.regions.clone(),
            tdx: self.tdx,
            capacity: self.world.ledger.snapshot(),
            hosts: Vec::new(),
            cloud: None,
        }
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        self.regions.contains(&grant.region)
            && (grant.tdx != TdxPolicy::Required || self.tdx)
            && self
                .world
                .ledger
                .fits(Resources::new(grant.vcpus, grant.ram_mib))
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        self.provision_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_transiently.load(Ordering::SeqCst) {
            return Err(BackendError::Transient(Box::new(SimError(
                "injected transient failure".into(),
            ))));
        }
        if self.fail_fatally.load(Ordering::SeqCst) {
            return Err(BackendError::Fatal(Box::new(SimError(
                "injected fatal failure".into(),
            ))));
        }
        let n = self.world.next.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", self.name);
        let resources = Resources::new(grant.vcpus, grant.ram_mib);
        self.world.ledger.reserve(&id, resources)?;
        // A provision dropped during its boot (its grant was terminated)
        // leaves no reservation behind.
        let reservation = Reservation {
            ledger: &self.world.ledger,
            id: &id,
            keep: false,
        };
        // Boot time, so concurrent provisions overlap.
        let delay = *self.provision_delay.lock().expect("lock");
        tokio::time::sleep(delay).await;
        reservation.keep();
        let started_at = Utc::now();
        let run_for = *self.run_for.lock().expect("lock");
        let ends_at =
            run_for.map(|d| started_at + chrono::Duration::from_std(d).expect("duration"));
        self.world.instances.lock().expect("lock").insert(
            id.clone(),
            SimInstance {
                resources,
                started_at,
                ends_at,
                ended: None,
            },
        );
        Ok(ProvisionedInstance {
            backend: self.name.clone(),
            instance_id: id.clone(),
            host: "127.0.0.1".into(),
            ssh_port: 2200,
            user: "root".into(),
            host_key_fingerprint: "SHA256:simulated".into(),
            host_key: String::new(),
            // Where a real backend would listen: a port per guest port.
            published: grant
                .publish
                .iter()
                .zip(2300..)
                .map(|(&guest_port, port)| PublishedPort {
                    guest_port,
                    host: "127.0.0.1".into(),
                    port,
                })
                .collect(),
            started_at,
            location: None,
            private: serde_json::json!({ "sim_id": id, "vcpus": grant.vcpus, "ram_mib": grant.ram_mib }),
        })
    }

    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError> {
        loop {
            {
                let mut all = self.world.instances.lock().expect("lock");
                let Some(inst) = all.get_mut(&instance.instance_id) else {
                    return Err(BackendError::Fatal(Box::new(SimError(format!(
                        "no instance {}",
                        instance.instance_id
                    )))));
                };
                if inst.ended.is_none() {
                    if let Some(t) = inst.ends_at.filter(|t| *t <= Utc::now()) {
                        inst.ended = Some((t, Some(ExitStatus::Code(self.exit_code))));
                    }
                }
                if let Some((at, status)) = inst.ended {
                    return Ok(Self::usage_of(inst, at, status));
                }
                // Re-adoption: account for what runs (a no-op if known).
                self.world
                    .ledger
                    .adopt(&instance.instance_id, inst.resources);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        if let Some(inst) = self
            .world
            .instances
            .lock()
            .expect("lock")
            .get_mut(&instance.instance_id)
        {
            if inst.ended.is_none() {
                inst.ended = Some((Utc::now(), Some(ExitStatus::Signal(9))));
            }
        }
        self.world.ledger.release(&instance.instance_id);
        Ok(())
    }

    async fn current_usage(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        let all = self.world.instances.lock().expect("lock");
        Ok(all
            .get(&instance.instance_id)
            .filter(|inst| inst.ended.is_none())
            .map(|inst| Self::usage_of(inst, Utc::now(), None)))
    }

    async fn abandon(&self, grant_id: &str) -> Result<(), BackendError> {
        self.abandoned
            .lock()
            .expect("lock")
            .push(grant_id.to_string());
        Ok(())
    }
}

/// Releases a reservation when dropped, unless kept.
struct Reservation<'a> {
    ledger: &'a CapacityLedger,
    id: &'a str,
    keep: bool,
}

impl Reservation<'_> {
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.ledger.release(self.id);
        }
    }
}
