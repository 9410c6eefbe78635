//! The host side of an owned host: what `kiln host …` does, one process
//! per call, on the machine that runs the VMs (called over SSH by a
//! bridge elsewhere, or by hand). Each call answers one JSON document
//! ([`wire`]).
//!
//! The VMs themselves are the local backend's: each grant's shim runs on
//! after the call returns. What one call must tell the next is on disk
//! under `$KILN_HOME`: `grants/<id>/instance.json` for a provisioned
//! grant, and `claims/<id>.json` for the room a provision in progress
//! holds. Calls count both, under a short lock, before taking room, so
//! concurrent provisions never overcommit the host.

pub mod call;
mod claims;
pub mod in_process;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::{Backend, BackendError, ProvisionedInstance, UsageMetrics};
use crate::backends::local::{shim, LocalBackend};
use crate::backends::{BuildContext, BuildError};
use crate::capacity::Resources;
use crate::config::LocalSection;
use crate::dir_lock::{DirLock, LockError};
use crate::grant::Grant;
use crate::host_key::HostKey;
use claims::Claim;
use wire::{Failure, FailureKind, HostInfo, HostPhase, InstanceStatus};

/// The host's own settings, in `$KILN_HOME/host.toml` (optional).
pub const HOST_FILE: &str = "host.toml";
/// A provisioned grant's instance, in its directory.
pub const INSTANCE_FILE: &str = "instance.json";
/// Taken while a call counts what the host holds and claims room.
const LEDGER_LOCK: &str = "host.lock";
/// How long a call waits for another's count to finish.
const LEDGER_WAIT: Duration = Duration::from_secs(10);
/// The region label a host uses inside: regions are the bridge's to
/// assign, so the host runs whatever it is sent.
const HOST_REGION: &str = "host";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("invalid {0}: {1}")]
    Config(PathBuf, String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("invalid grant id {0:?}: 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("no grant {0} on this host")]
    NotFound(String),
    #[error("grant {0} is being provisioned by another call")]
    InProgress(String),
    #[error("the host's ledger stayed locked")]
    Busy(#[source] LockError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl HostError {
    /// The failure as a bridge reads it.
    pub fn failure(&self) -> Failure {
        let kind = match self {
            HostError::Backend(e) => return Failure::of_backend(e),
            HostError::NotFound(_) => FailureKind::NotFound,
            HostError::BadId(_) => FailureKind::Usage,
            HostError::InProgress(_) | HostError::Busy(_) | HostError::Write(..) => {
                FailureKind::Transient
            }
            HostError::Read(..) | HostError::Config(..) | HostError::Build(_) => FailureKind::Fatal,
        };
        Failure::new(kind, crate::error_chain(self))
    }
}

/// `host.toml`: what of this machine grants may use, and where requesters
/// reach its VMs. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    /// The address requesters connect to (default 127.0.0.1: only this
    /// machine; an owned host serving a fleet sets its own address).
    pub address: Option<String>,
    /// vCPUs and memory to offer; default the machine's.
    pub vcpus: Option<u32>,
    pub ram_mib: Option<u64>,
    /// Kept back from grants.
    #[serde(default)]
    pub reserve_vcpus: u32,
    #[serde(default)]
    pub reserve_ram_mib: u64,
    /// vCPUs per host CPU; at least 1.
    pub overcommit: Option<f64>,
    /// As the local backend's keys of the same names.
    pub rootfs: Option<String>,
    pub warm_start: Option<bool>,
    pub output_cap_kib: Option<u64>,
    pub keep_ended_days: Option<u32>,
    /// Registries its builds reach over plain HTTP (`host:port`).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// The host ports requesters connect to, `FIRST-LAST` (what the
    /// host's firewall opens); any free port by default.
    pub ports: Option<String>,
}

impl HostFile {
    fn load(home: &Path) -> Result<HostFile, HostError> {
        let path = home.join(HOST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HostFile::default()),
            Err(e) => return Err(HostError::Read(path, e)),
        };
        let file: HostFile =
            toml::from_str(&text).map_err(|e| HostError::Config(path.clone(), one_line(&e)))?;
        if file
            .address
            .as_deref()
            .is_some_and(|a| a.parse::<std::net::IpAddr>().is_err())
        {
            return Err(HostError::Config(
                path,
                "address must be an IP address of this host".into(),
            ));
        }
        if file
            .ports
            .as_deref()
            .is_some_and(|p| crate::config::port_range(p).is_none())
        {
            return Err(HostError::Config(
                path,
                "ports must be FIRST-LAST, two ports with FIRST <= LAST".into(),
            ));
        }
        Ok(file)
    }
}

fn one_line(e: &toml::de::Error) -> String {
    e.message().replace('\n', " ")
}

/// This machine, as `kiln host` sees it, and as kilnd's `local` backend
/// drives it in-process (see [`in_process`]): one code path for both.
pub struct Host {
    backend: LocalBackend,
    home: PathBuf,
}

impl Host {
    /// The host whose state lives in `home` (`$KILN_HOME`).
    pub fn open(home: &Path) -> Result<Host, HostError> {
        let file = HostFile::load(home)?;
        let total = Resources::new(
            file.vcpus.unwrap_or_else(crate::backends::local::host_cpus),
            file.ram_mib
                .unwrap_or_else(crate::backends::local::host_ram_mib),
        );
        let reserve = Resources::new(file.reserve_vcpus, file.reserve_ram_mib);
        let section = LocalSection {
            name: Some("host".into()),
            region: Some(HOST_REGION.into()),
            vcpus: Some(total.vcpus),
            ram_mib: Some(total.ram_mib),
            reserve_vcpus: Some(reserve.vcpus),
            reserve_ram_mib: Some(reserve.ram_mib),
            overcommit: file.overcommit,
            kiln_home: Some(home.to_path_buf()),
            keep_ended_days: file.keep_ended_days,
            rootfs: file.rootfs.clone(),
            output_cap_kib: file.output_cap_kib,
            warm_start: file.warm_start,
            address: file.address.clone(),
            ports: file.ports.clone(),
        };
        let ctx = BuildContext {
            region: HOST_REGION.into(),
            state_dir: home.to_path_buf(),
            insecure_registries: file.insecure_registries.clone(),
            // A host's local backend never lists instances of its own.
            bridge_id: String::new(),
            live_grants: None,
        };
        Ok(Host::of(LocalBackend::new(&section, &ctx)?))
    }

    /// The host a local backend runs on, in-process.
    pub fn of(backend: LocalBackend) -> Host {
        let home = backend.home().to_path_buf();
        Host { backend, home }
    }

    /// What the host is and has free now.
    pub fn info(&self) -> Result<HostInfo, HostError> {
        let _lock = self.lock_ledger()?;
        self.count_held(None)?;
        let caps = self.backend.capabilities();
        let (total, reserve) = self.backend.total_and_reserve();
        Ok(HostInfo {
            version: wire::VERSION.to_string(),
            kvm: kvm_flavour(),
            tdx: caps.tdx,
            total,
            reserve,
            capacity: caps.capacity,
            address: self.backend.address().to_string(),
        })
    }

    /// Boots the grant's VM and returns once it runs, serving `host_key`
    /// (the bridge's own for the grant) or a fresh one. Idempotent by
    /// grant id: a grant already running here is returned as it is.
    pub async fn provision(
        &self,
        grant: &Grant,
        host_key: Option<HostKey>,
    ) -> Result<ProvisionedInstance, HostError> {
        check_id(&grant.id)?;
        let mut grant = grant.clone();
        // Which region is the bridge's business: the host runs what it is
        // sent.
        grant.region = self.backend.region().to_string();
        let want = Resources::new(grant.vcpus, grant.ram_mib);
        {
            let _lock = self.lock_ledger()?;
            if let Some(running) = self.count_held(Some(&grant.id))? {
                return Ok(running);
            }
            self.backend
                .ledger()
                .reserve(&grant.id, want)
                .map_err(BackendError::from)?;
            Claim::new(want)
                .write(&self.home, &grant.id)
                .map_err(|e| HostError::Write(claims::path(&self.home, &grant.id), e))?;
        }
        let outcome = self.backend.provision_with_host_key(&grant, host_key).await;
        let result = match outcome {
            Ok(instance) => self.record(&instance).map(|()| instance),
            Err(e) => Err(HostError::Backend(e)),
        };
        if let Err(e) = &result {
            tracing::warn!(grant = %grant.id, error = %crate::error_chain(e), "provision failed");
        }
        claims::remove(&self.home, &grant.id);
        result
    }

    /// Where the grant is, and how it ended once it has.
    pub fn status(&self, id: &str) -> Result<InstanceStatus, HostError> {
        check_id(id)?;
        match self.instance(id)? {
            Some(instance) => {
                let usage = self.backend.ended(&instance)?;
                let deadline_reached = usage.is_some()
                    && shim::read_state(&self.grant_dir(id))
                        .ok()
                        .flatten()
                        .is_some_and(|s| s.deadline_reached);
                Ok(InstanceStatus {
                    id: id.to_string(),
                    phase: if usage.is_some() {
                        HostPhase::Ended
                    } else {
                        HostPhase::Running
                    },
                    instance: Some(instance),
                    usage,
                    deadline_reached,
                })
            }
            None if self.provisioning(id) => Ok(InstanceStatus {
                id: id.to_string(),
                phase: HostPhase::Provisioning,
                instance: None,
                usage: None,
                deadline_reached: false,
            }),
            None => Err(HostError::NotFound(id.to_string())),
        }
    }

    /// Every grant the host knows: provisioned ones (running or ended, until
    /// their directory is pruned) and provisions in progress.
    pub fn list(&self) -> Vec<InstanceStatus> {
        let mut ids: Vec<String> = dir_names(&self.home.join("grants"))
            .into_iter()
            .chain(claims::ids(&self.home))
            .collect();
        ids.sort();
        ids.dedup();
        ids.iter().filter_map(|id| self.status(id).ok()).collect()
    }

    /// Usage so far of a running grant (None once it has ended).
    pub async fn usage(&self, id: &str) -> Result<Option<UsageMetrics>, HostError> {
        check_id(id)?;
        let instance = self
            .instance(id)?
            .ok_or_else(|| HostError::NotFound(id.to_string()))?;
        Ok(self.backend.current_usage(&instance).await?)
    }

    /// Stops the grant's VM (the workload gets its grace period) and says
    /// how it ended. Idempotent; a provision in progress is abandoned.
    pub async fn terminate(&self, id: &str) -> Result<InstanceStatus, HostError> {
        check_id(id)?;
        match self.instance(id)? {
            Some(instance) => self.backend.terminate(&instance).await?,
            None if self.provisioning(id) => self.abandon(id).await?,
            None => return Err(HostError::NotFound(id.to_string())),
        }
        self.status(id).or_else(|e| match e {
            // An abandoned provision leaves nothing to report.
            HostError::NotFound(_) => Ok(InstanceStatus {
                id: id.to_string(),
                phase: HostPhase::Ended,
                instance: None,
                usage: None,
                deadline_reached: false,
            }),
            e => Err(e),
        })
    }

    /// Removes whatever a provision of `id` that never returned left: its
    /// VM and its claim. A provisioned grant is terminated. Idempotent.
    pub async fn abandon(&self, id: &str) -> Result<(), HostError> {
        check_id(id)?;
        // A provision still running (its caller gone: a dropped SSH
        // session does not stop it) would boot the VM after this returns.
        if let Some(by) = Claim::read(&self.home, id).and_then(|c| c.by) {
            if by.pid != std::process::id() && by.alive() {
                tracing::info!(grant = %id, pid = by.pid, "stopping the provision in progress");
                by.kill();
                for _ in 0..100 {
                    if !by.alive() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if let Some(instance) = self.instance(id)? {
            self.backend.terminate(&instance).await?;
            claims::remove(&self.home, id);
            return Ok(());
        }
        self.backend.abandon(id).await?;
        claims::remove(&self.home, id);
        Ok(())
    }

    fn grant_dir(&self, id: &str) -> PathBuf {
        self.home.join("grants").join(id)
    }

    fn instance(&self, id: &str) -> Result<Option<ProvisionedInstance>, HostError> {
        let path = self.grant_dir(id).join(INSTANCE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| HostError::Config(path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::Read(path, e)),
        }
    }

    /// Written before the claim goes: from then on the grant is counted
    /// by its instance.
    fn record(&self, instance: &ProvisionedInstance) -> Result<(), HostError> {
        let dir = self.grant_dir(&instance.instance_id);
        let path = dir.join(INSTANCE_FILE);
        let tmp = dir.join(format!(".{INSTANCE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(instance)
            .map_err(|e| HostError::Config(path.clone(), e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| HostError::Write(path, e))
    }

    /// Whether a provision of `id` holds room: a live claim.
    fn provisioning(&self, id: &str) -> bool {
        Claim::read(&self.home, id).is_some_and(|c| c.live(&self.grant_dir(id)))
    }

    /// Counts into the ledger every grant that holds room: running
    /// instances and live claims (a claim whose provision died and left no
    /// VM is removed). For `provision` of `id`: the instance if it already
    /// runs, or an error if another call is provisioning it.
    fn count_held(&self, id: Option<&str>) -> Result<Option<ProvisionedInstance>, HostError> {
        let ledger = self.backend.ledger();
        let mut running = None;
        for name in dir_names(&self.home.join("grants")) {
            let Ok(Some(instance)) = self.instance(&name) else {
                continue;
            };
            if let Some((held, true)) = self.backend.holding(&instance) {
                ledger.adopt(&name, held);
                if id == Some(name.as_str()) {
                    running = Some(instance);
                }
            }
        }
        if running.is_some() {
            return Ok(running);
        }
        for name in claims::ids(&self.home) {
            let Some(claim) = Claim::read(&self.home, &name) else {
                continue;
            };
            if !claim.live(&self.grant_dir(&name)) {
                claims::remove(&self.home, &name);
                continue;
            }
            if id == Some(name.as_str()) {
                return Err(HostError::InProgress(name));
            }
            ledger.adopt(&name, claim.resources);
        }
        Ok(None)
    }

    /// The ledger lock, waiting a little for another call's count.
    fn lock_ledger(&self) -> Result<DirLock, HostError> {
        std::fs::create_dir_all(&self.home).map_err(|e| HostError::Write(self.home.clone(), e))?;
        let deadline = std::time::Instant::now() + LEDGER_WAIT;
        loop {
            match DirLock::acquire(&self.home, LEDGER_LOCK) {
                Ok(lock) => return Ok(lock),
                Err(LockError::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(HostError::Busy(e)),
            }
        }
    }
}

/// Grant ids become directory names: nothing that could climb out.
fn check_id(id: &str) -> Result<(), HostError> {
    if id_is_plain(id) {
        Ok(())
    } else {
        Err(HostError::BadId(id.to_string()))
    }
}

/// 1 to 64 letters, digits, '-' or '_': a grant id a host takes.
pub(crate) fn id_is_plain(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Names of the subdirectories of `dir` that could be grant ids.
fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| check_id(n).is_ok())
        .collect()
}

/// Which KVM this machine has, if /dev/kvm opens.
pub fn kvm_flavour() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .ok()?;
    let flavour = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map_or("kvm", |m| m.trim_start_matches("kvm_"));
    Some(flavour.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_ids_cannot_name_other_directories() {
        for bad in ["", "..", "a/b", "../x", &"x".repeat(65), "a b"] {
            assert!(matches!(check_id(bad), Err(HostError::BadId(_))), "{bad}");
        }
        check_id("g-1_A").unwrap();
    }

    #[test]
    fn room_held_by_live_claims_counts_and_stale_claims_go() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join(HOST_FILE),
            "vcpus = 4\nram_mib = 4096\nreserve_vcpus = 1\n",
        )
        .unwrap();
        let host = Host::open(home.path()).unwrap();
        // A provision in progress (this process stands in for it) holds room.
        Claim::new(Resources::new(2, 1024))
            .write(home.path(), "live")
            .unwrap();
        // One whose provision died and left no VM holds none.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = crate::backends::local::process::Process::of(child.id());
        child.wait().unwrap();
        Claim {
            resources: Resources::new(1, 512),
            by: dead,
        }
        .write(home.path(), "stale")
        .unwrap();
        let info = host.info().unwrap();
        assert_eq!(info.total, Resources::new(4, 4096));
        assert_eq!(info.capacity.usable, Resources::new(3, 4096));
        assert_eq!(info.capacity.used, Resources::new(2, 1024));
        assert_eq!(claims::ids(home.path()), ["live"]);
        assert_eq!(host.status("live").unwrap().phase, HostPhase::Provisioning);
        assert!(matches!(host.status("stale"), Err(HostError::NotFound(_))));
        // The same grant cannot be provisioned twice at once.
        assert!(matches!(
            host.count_held(Some("live")),
            Err(HostError::InProgress(_))
        ));
    }

    #[test]
    fn a_bad_host_file_names_itself_and_the_key() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join(HOST_FILE), "vcpu = 3\n").unwrap();
        let e = HostFile::load(home.path()).unwrap_err().to_string();
        assert!(e.contains("host.toml") && e.contains("vcpu"), "{e}");
        std::fs::write(home.path().join(HOST_FILE), "address = \"here\"\n").unwrap();
        let e = HostFile::load(home.path()).unwrap_err().to_string();
        assert!(e.contains("address"), "{e}");
        std::fs::write(
            home.path().join(HOST_FILE),
            "address = \"10.0.0.2\"\nvcpus = 2\n",
        )
        .unwrap();
        let f = HostFile::load(home.path()).unwrap();
        assert_eq!((f.address.as_deref(), f.vcpus), (Some("10.0.0.2"), Some(2)));
    }
}
