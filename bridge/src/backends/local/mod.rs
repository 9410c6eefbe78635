//! `kind = "local"`: grants run as micro-VMs on this host. Each grant's VM
//! is looked after by its own `kiln-shim` process (see [`shim`]), so VMs
//! outlive kilnd and a restarted kilnd finds them through the grant's
//! directory, `$KILN_HOME/grants/<id>/`.

pub mod build;
pub mod output;
pub mod process;
mod prune;
pub mod shim;
mod shim_filter;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::{ledger_for, BuildContext, BuildError};
use crate::backend::{
    Backend, BackendCapabilities, BackendError, HostUsage, ProvisionedInstance, UsageMetrics,
};
use crate::capacity::{CapacityLedger, Resources};
use crate::config::LocalSection;
use crate::grant::{Grant, TdxPolicy};
use crate::host_key::HostKey;
use crate::machine::{
    binary_beside_me, check_memory, kib_field, meminfo_kib, BootFiles, PreflightError,
};
use process::Process;
use shim::{Launch, Phase, State};

/// How long a VM may take to boot (slow on hosts that emulate guest kernels).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a workload gets between SIGTERM and SIGKILL on terminate.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the shim's state is read while a VM runs.
const POLL: Duration = Duration::from_millis(250);
/// How often it is read while a grant waits for its VM: every poll's
/// wait lands in the grant's latency.
const BOOT_POLL: Duration = Duration::from_millis(10);
/// How long an ended grant's directory (state, output, logs) is kept.
const DEFAULT_KEEP_ENDED_DAYS: u32 = 7;
/// The shim's identity (pid and start time), written by the backend as soon
/// as it is spawned, so an interrupted provision can still find it.
const SHIM_FILE: &str = "shim.json";
/// The most vCPUs kiln-vmm gives one VM.
const MAX_VCPUS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("this host's region is {have}, not {want}")]
    Region { have: String, want: String },
    #[error("this host offers no TDX")]
    NoTdx,
    #[error("{0} vCPUs is more than one VM can have ({MAX_VCPUS})")]
    TooManyVcpus(u32),
    #[error("cannot build the image {0}")]
    Image(String, #[source] build::BuildChildError),
    /// The grant's memory cannot hold its image; nothing was booted.
    #[error(transparent)]
    Memory(PreflightError),
    #[error("cannot prepare {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot make the grant's SSH host key")]
    HostKey(#[from] crate::host_key::HostKeyError),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the VM did not boot: {0}")]
    Boot(String),
    #[error("the shim of grant {0} went away before the VM was up")]
    ShimGone(String),
    #[error(transparent)]
    Shim(#[from] shim::ShimError),
    #[error("instance {0} does not carry the local backend's details")]
    Foreign(String),
}

/// What the backend keeps in `ProvisionedInstance::private`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Private {
    dir: PathBuf,
    shim: Process,
    vcpus: u32,
    ram_mib: u64,
}

pub struct LocalBackend {
    name: String,
    region: String,
    home: PathBuf,
    ledger: CapacityLedger,
    tdx: bool,
    vmm: PathBuf,
    shim: PathBuf,
    keep_ended: chrono::Duration,
    rootfs: build::Rootfs,
    output_cap: u64,
    warm_start: bool,
    /// Where requesters connect: the address the shims listen on.
    address: String,
    /// Registries its builds reach over plain HTTP.
    insecure_registries: Vec<String>,
    /// The host ports its VMs' SSH and published ports listen on.
    ports: Option<(u16, u16)>,
    /// What of the host it was given, and what of that it keeps back.
    total: Resources,
    reserve: Resources,
}

impl LocalBackend {
    pub fn new(section: &LocalSection, ctx: &BuildContext) -> Result<LocalBackend, BuildError> {
        let name = section.name.clone().unwrap_or_else(|| "local".to_string());
        let home = section
            .kiln_home
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"));
        let total = Resources::new(
            section.vcpus.unwrap_or_else(host_cpus),
            section.ram_mib.unwrap_or_else(host_ram_mib),
        );
        let reserve = Resources::new(
            section.reserve_vcpus.unwrap_or(0),
            section.reserve_ram_mib.unwrap_or(0),
        );
        let ledger = ledger_for(&name, total, reserve, section.overcommit)?;
        let vmm = binary_beside_me("KILN_VMM", "kiln-vmm");
        let tdx = probe_tdx(&vmm);
        let keep_ended = chrono::Duration::days(i64::from(
            section.keep_ended_days.unwrap_or(DEFAULT_KEEP_ENDED_DAYS),
        ));
        let rootfs = match section.rootfs.as_deref() {
            None => build::Rootfs::Auto,
            Some(word) => build::Rootfs::parse(word)
                .ok_or_else(|| BuildError::Rootfs(name.clone(), word.to_string()))?,
        };
        let backend = LocalBackend {
            name,
            region: section.region.clone().unwrap_or_else(|| ctx.region.clone()),
            home,
            ledger,
            output_cap: section
                .output_cap_kib
                .map_or(output::DEFAULT_OUTPUT_CAP, |k| k << 10),
            tdx,
            vmm,
            shim: binary_beside_me("KILN_SHIM", "kiln-shim"),
            keep_ended,
            rootfs,
            warm_start: section.warm_start.unwrap_or(true),
            address: section
                .address
                .clone()
                .unwrap_or_else(|| shim::LISTEN_HOST.to_string()),
            insecure_registries: ctx.insecure_registries.clone(),
            ports: section.ports.as_deref().and_then(crate::config::port_range),
            total,
            reserve,
        };
        backend.prune();
        Ok(backend)
    }

    /// Removes the directories of grants that ended longer ago than the
    /// configured time.
    fn prune(&self) {
        let cutoff = Utc::now() - self.keep_ended;
        for dir in prune::expired(&self.home.join("grants"), cutoff) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed an ended grant's directory")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an ended grant's directory")
                }
            }
        }
    }

    fn check(&self, grant: &Grant) -> Result<Resources, LocalError> {
        if grant.region != self.region {
            return Err(LocalError::Region {
                have: self.region.clone(),
                want: grant.region.clone(),
            });
        }
        if grant.tdx == TdxPolicy::Required && !self.tdx {
            return Err(LocalError::NoTdx);
        }
        if grant.vcpus > MAX_VCPUS {
            return Err(LocalError::TooManyVcpus(grant.vcpus));
        }
        Ok(Resources::new(grant.vcpus, grant.ram_mib))
    }

    fn grant_dir(&self, id: &str) -> PathBuf {
        self.home.join("grants").join(id)
    }

    /// Builds the image, starts the shim, waits for the VM to run. The VM
    /// serves `host_key`, or a fresh one.
    async fn boot(
        &self,
        grant: &Grant,
        host_key: Option<HostKey>,
    ) -> Result<ProvisionedInstance, LocalError> {
        let begun = Instant::now();
        let boot = self.build_image(&grant.image).await?;
        let image_ms = begun.elapsed().as_millis() as u64;
        grant_memory_holds(grant.ram_mib, &boot)?;
        let dir = self.grant_dir(&grant.id);
        // A directory left by an earlier, failed attempt holds nothing live.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| LocalError::Dir(dir.clone(), e))?;
        let host_key = match host_key {
            Some(key) => key,
            None => HostKey::generate()?,
        };
        let launch = Launch {
            vmm: self.vmm.clone(),
            kernel: self.home.join("kernel/vmlinux"),
            boot,
            vcpus: grant.vcpus as u8,
            cpu_millicores: grant.cpu_millicores,
            mem_mib: grant.ram_mib,
            runtime_dir: self.home.join("vms"),
            workload: grant.workload(),
            authorized_keys: grant.ssh_keys.clone(),
            ssh_host_key: host_key.private_openssh()?,
            boot_timeout_ms: BOOT_TIMEOUT.as_millis() as u64,
            stop_grace_ms: STOP_GRACE.as_millis() as u64,
            output_cap: self.output_cap,
            snapshots: self
                .warm_start
                .then(|| self.home.join(crate::machine::warm::SNAPSHOTS_DIR)),
            publish: grant.publish.clone(),
            listen_host: Some(self.address.clone()),
            valid_to: Some(grant.valid_to),
            ports: self.ports,
        };
        let launch_path = dir.join(shim::LAUNCH_FILE);
        let json = serde_json::to_vec_pretty(&launch)
            .map_err(|e| LocalError::Shim(shim::ShimError::Parse(launch_path.clone(), e)))?;
        std::fs::write(&launch_path, json).map_err(|e| LocalError::Dir(dir.clone(), e))?;
        let shim = self.spawn_shim(&dir)?;
        if let Ok(json) = serde_json::to_vec(&shim) {
            // Without it, a provision cut short by kilnd's death can still
            // be cleaned up from state.json (see `abandon`).
            let _ = std::fs::write(dir.join(SHIM_FILE), json);
        }
        let shim_ms = begun.elapsed().as_millis() as u64;
        let state = match wait_until_running(&dir, &shim).await {
            Ok(s) => s,
            Err(e) => {
                shim.kill();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Where the provision's time went: the image, the launch up to the
        // shim's start, and the VM (VMM start to the agent starting the
        // command); the rest is the shim's and this backend's own.
        tracing::info!(
            grant = %grant.id,
            image_ms,
            shim_ms,
            vm_ms = state.started_ms,
            total_ms = begun.elapsed().as_millis() as u64,
            "local VM running"
        );
        let private = Private {
            dir,
            shim,
            vcpus: grant.vcpus,
            ram_mib: grant.ram_mib,
        };
        Ok(ProvisionedInstance {
            backend: self.name.clone(),
            instance_id: grant.id.clone(),
            host: self.address.clone(),
            ssh_port: state.ssh_port.unwrap_or_default(),
            user: "root".to_string(),
            host_key_fingerprint: host_key.fingerprint(),
            host_key: host_key.public_openssh()?,
            started_at: Utc::now(),
            published: state.published,
            location: None,
            private: serde_json::to_value(&private).unwrap_or_default(),
        })
    }

    /// Builds in a child process (see [`build`]), so kilnd keeps none of
    /// the builder's memory and a dropped provision stops its build.
    async fn build_image(&self, image: &str) -> Result<BootFiles, LocalError> {
        build::build(
            &self.shim,
            &self.home,
            image,
            self.rootfs,
            &self.insecure_registries,
        )
        .await
        .map_err(|e| LocalError::Image(image.to_string(), e))
    }

    /// Starts `kiln-shim DIR` in a session of its own, so that neither
    /// kilnd's death nor its terminal's signals reach it.
    fn spawn_shim(&self, dir: &Path) -> Result<Process, LocalError> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.join("shim.log"))
            .map_err(|e| LocalError::Dir(dir.to_path_buf(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LocalError::Dir(dir.to_path_buf(), e))?;
        let mut cmd = Command::new(&self.shim);
        cmd.arg(dir).stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| LocalError::Spawn(self.shim.clone(), e))?;
        let pid = child.id();
        // Nobody waits for the shim: it is reaped by whoever inherits it
        // (init) once kilnd is gone; while kilnd runs, a thread does it.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        Process::of(pid).ok_or_else(|| LocalError::ShimGone(dir.display().to_string()))
    }

    /// `$KILN_HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The resources this backend counts for its grants.
    pub fn ledger(&self) -> &CapacityLedger {
        &self.ledger
    }

    /// Where requesters reach its VMs.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The region label of its grants.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The host's CPUs and memory as configured, and the reserve.
    pub fn total_and_reserve(&self) -> (Resources, Resources) {
        (self.total, self.reserve)
    }

    /// The resources `instance` holds, and whether its VM's shim still runs.
    pub fn holding(&self, instance: &ProvisionedInstance) -> Option<(Resources, bool)> {
        let p = self.private(instance).ok()?;
        Some((Resources::new(p.vcpus, p.ram_mib), p.shim.alive()))
    }

    /// How the instance ended, or None while its VM runs: one look at what
    /// `watch_until_exit` waits for.
    pub fn ended(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        let p = self.private(instance)?;
        let state = shim::read_state(&p.dir).map_err(|e| BackendError::Transient(Box::new(e)))?;
        let ended = state.as_ref().is_some_and(|s| s.phase == Phase::Ended);
        if !ended && p.shim.alive() {
            return Ok(None);
        }
        // A shim that died without a final word leaves what it last knew.
        let s = state;
        Ok(Some(UsageMetrics {
            guest: s.as_ref().and_then(|s| s.usage.clone()).unwrap_or_default(),
            exit_status: s.as_ref().and_then(|s| s.exit_status),
            // The shim's last word is when the VM ended; a watcher that
            // comes back later (a restart, a host cut off) must not move
            // the end to when it looked.
            ended_at: s
                .as_ref()
                .filter(|_| ended)
                .map_or_else(Utc::now, |s| s.updated_at),
            host: s.map(|s| s.host).unwrap_or_default(),
        }))
    }

    /// [`Backend::provision`], the VM serving `host_key` when one is given
    /// (the bridge's, for a grant it placed on a cloud instance) instead of
    /// a fresh one.
    pub async fn provision_with_host_key(
        &self,
        grant: &Grant,
        host_key: Option<HostKey>,
    ) -> Result<ProvisionedInstance, BackendError> {
        let want = self
            .check(grant)
            .map_err(|e| BackendError::CannotSatisfy(Box::new(e)))?;
        self.ledger.reserve(&grant.id, want)?;
        match self.boot(grant, host_key).await {
            Ok(instance) => Ok(instance),
            Err(e) => {
                self.ledger.release(&grant.id);
                Err(match e {
                    // Another backend pulls the same image the same way.
                    LocalError::Image(..) => BackendError::Fatal(Box::new(e)),
                    // Any backend would unpack the same initramfs.
                    LocalError::Memory(..) => BackendError::Fatal(Box::new(e)),
                    _ => BackendError::Transient(Box::new(e)),
                })
            }
        }
    }

    fn private(&self, instance: &ProvisionedInstance) -> Result<Private, BackendError> {
        serde_json::from_value(instance.private.clone()).map_err(|_| {
            BackendError::Fatal(Box::new(LocalError::Foreign(instance.instance_id.clone())))
        })
    }
}

/// Refuses, before anything boots, a grant whose memory cannot hold the
/// initramfs it would unpack: the rule `kiln run` applies, naming the
/// grant's field instead of the flag.
fn grant_memory_holds(ram_mib: u64, boot: &BootFiles) -> Result<(), LocalError> {
    let size = std::fs::metadata(&boot.initrd)
        .map_err(|_| LocalError::Memory(PreflightError::InitrdMissing(boot.initrd.clone())))?
        .len();
    check_memory(ram_mib, size, "the grant's ram_mib").map_err(LocalError::Memory)
}

/// Polls the shim's state until the VM runs, ends, or the shim dies.
async fn wait_until_running(dir: &Path, shim: &Process) -> Result<State, LocalError> {
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT + Duration::from_secs(30);
    loop {
        match shim::read_state(dir)? {
            Some(s) if s.phase == Phase::Running => return Ok(s),
            // A command so short it ended before we looked: it did run, and
            // watching the instance reports how it ended.
            Some(s) if s.phase == Phase::Ended && s.exit_status.is_some() && s.error.is_none() => {
                return Ok(s)
            }
            Some(s) if s.phase == Phase::Ended => {
                return Err(LocalError::Boot(
                    s.error.unwrap_or_else(|| "it stopped at once".to_string()),
                ))
            }
            _ => {}
        }
        if !shim.alive() {
            return Err(LocalError::ShimGone(dir.display().to_string()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(LocalError::Boot(format!("not up after {BOOT_TIMEOUT:?}")));
        }
        tokio::time::sleep(BOOT_POLL).await;
    }
}

/// Asks the shim to stop its VM (the workload gets its grace period), and
/// kills it if it has not ended in time; its VMM follows it.
async fn stop_shim(shim: &Process) {
    if !shim.alive() {
        return;
    }
    shim.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_secs(40);
    while shim.alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    // Its VMM follows it (parent-death signal).
    shim.kill();
}

/// The shim of the grant in `dir`: from shim.json, or failing that from the
/// pid in state.json if that process is still a shim of this directory.
pub(crate) fn find_shim(dir: &Path) -> Option<Process> {
    if let Some(p) = std::fs::read(dir.join(SHIM_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Process>(&b).ok())
    {
        return Some(p);
    }
    let state = shim::read_state(dir).ok().flatten()?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", state.shim_pid)).ok()?;
    let dir_arg = dir.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == dir_arg)
        .then(|| Process::of(state.shim_pid))
        .flatten()
}

/// The VMM's CPU time and peak RSS so far, from /proc.
fn live_host_usage(vmm_pid: u32) -> HostUsage {
    let rest = process::stat_fields(vmm_pid).unwrap_or_default();
    // `rest` starts at field 3; utime and stime are fields 14 and 15.
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let status = std::fs::read_to_string(format!("/proc/{vmm_pid}/status")).unwrap_or_default();
    let peak_kib = kib_field(&status, "VmHWM").unwrap_or(0);
    HostUsage {
        vcpu_cpu_ms: ticks * 1000 / hz,
        vmm_rss_kib: peak_kib,
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> BackendCapabilities {
        BackendCapabilities {
            regions: [self.region.clone()].into_iter().collect(),
            tdx: self.tdx,
            capacity: self.ledger.snapshot(),
            hosts: Vec::new(),
            cloud: None,
        }
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        self.check(grant).is_ok_and(|r| self.ledger.fits(r))
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        self.provision_with_host_key(grant, None).await
    }

    async fn watch_until_exit(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<UsageMetrics, BackendError> {
        let p = self.private(instance)?;
        // After a restart this process has never counted a live VM. (One
        // that has ended must not be counted again: terminate released it.)
        if p.shim.alive() {
            self.ledger
                .adopt(&instance.instance_id, Resources::new(p.vcpus, p.ram_mib));
        }
        loop {
            if let Some(usage) = self.ended(instance)? {
                return Ok(usage);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        let p = self.private(instance)?;
        stop_shim(&p.shim).await;
        self.ledger.release(&instance.instance_id);
        self.prune();
        Ok(())
    }

    async fn current_usage(
        &self,
        instance: &ProvisionedInstance,
    ) -> Result<Option<UsageMetrics>, BackendError> {
        let p = self.private(instance)?;
        let state = shim::read_state(&p.dir).map_err(|e| BackendError::Transient(Box::new(e)))?;
        Ok(state
            .filter(|s| s.phase != Phase::Ended && p.shim.alive())
            .map(|s| UsageMetrics {
                guest: s.usage.unwrap_or_default(),
                exit_status: None,
                host: s.vmm_pid.map(live_host_usage).unwrap_or_default(),
                ended_at: Utc::now(),
            }))
    }

    async fn abandon(&self, grant_id: &str) -> Result<(), BackendError> {
        let dir = self.grant_dir(grant_id);
        if let Some(shim) = find_shim(&dir) {
            tracing::info!(grant = %grant_id, pid = shim.pid, "stopping the VM of an interrupted provision");
            stop_shim(&shim).await;
        }
        // A provision dropped before it returned kept its reservation.
        self.ledger.release(grant_id);
        Ok(())
    }
}

/// Whether kiln-vmm finds TDX on this host.
fn probe_tdx(vmm: &Path) -> bool {
    Command::new(vmm)
        .args(["--capabilities", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|v| v["tdx"] == true)
}

pub(crate) fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

pub(crate) fn host_ram_mib() -> u64 {
    meminfo_kib("MemTotal").map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_too_small_for_its_initramfs_is_refused_naming_the_figure_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 10 << 20]).unwrap();
        let boot = BootFiles {
            initrd: initrd.clone(),
            root_image: None,
            kernel_args: Vec::new(),
            measurement: None,
        };
        let e = grant_memory_holds(60, &boot).unwrap_err();
        assert!(matches!(
            e,
            LocalError::Memory(PreflightError::TooSmall { .. })
        ));
        let e = e.to_string();
        assert!(
            e.contains("at least 68 MiB") && e.contains("ram_mib"),
            "{e}"
        );
        grant_memory_holds(68, &boot).unwrap();
        let gone = BootFiles {
            initrd: dir.path().join("gone"),
            ..boot
        };
        assert!(grant_memory_holds(512, &gone)
            .unwrap_err()
            .to_string()
            .contains("gone"));
    }
}
