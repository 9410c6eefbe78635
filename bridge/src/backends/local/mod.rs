//! `kind = "local"`: grants run as micro-VMs on this host. Each grant's VM
//! is looked after by its own `kiln-shim` process (see [`shim`]), so VMs
//! outlive kilnd and a restarted kilnd finds them through the grant's
//! directory, `$KILN_HOME/grants/<id>/`.

pub mod process;
pub mod shim;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::{BuildContext, BuildError, LocalSection};
use crate::backend::{
    Backend, BackendCapabilities, BackendError, ProvisionedInstance, UsageMetrics,
};
use crate::capacity::{CapacityLedger, Resources};
use crate::grant::{Grant, TdxPolicy};
use crate::host_key::HostKey;
use crate::machine::{binary_beside_me, meminfo_kib};
use process::Process;
use shim::{Launch, Phase, State};

/// How long a VM may take to boot (slow on hosts that emulate guest kernels).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a workload gets between SIGTERM and SIGKILL on terminate.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the shim's state is read.
const POLL: Duration = Duration::from_millis(250);
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
    Image(String, #[source] kiln_image::build::BuildError),
    #[error("cannot open the image cache")]
    Cache(#[source] kiln_image::cache::CacheError),
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
    #[error("the image build task failed")]
    Task(#[source] tokio::task::JoinError),
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
        let ledger = ctx.ledger_for(&name, total)?;
        let vmm = binary_beside_me("KILN_VMM", "kiln-vmm");
        let tdx = probe_tdx(&vmm);
        Ok(LocalBackend {
            name,
            region: ctx.region.clone(),
            home,
            ledger,
            tdx,
            vmm,
            shim: binary_beside_me("KILN_SHIM", "kiln-shim"),
        })
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

    /// Builds the image, starts the shim, waits for the VM to run.
    async fn boot(&self, grant: &Grant) -> Result<ProvisionedInstance, LocalError> {
        let initrd = self.build_image(&grant.image).await?;
        let dir = self.grant_dir(&grant.id);
        // A directory left by an earlier, failed attempt holds nothing live.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| LocalError::Dir(dir.clone(), e))?;
        let host_key = HostKey::generate()?;
        let launch = Launch {
            vmm: self.vmm.clone(),
            kernel: self.home.join("kernel/vmlinux"),
            initrd,
            vcpus: grant.vcpus as u8,
            mem_mib: grant.ram_mib,
            runtime_dir: self.home.join("vms"),
            workload: grant.workload(),
            authorized_keys: grant.ssh_keys.clone(),
            ssh_host_key: host_key.private_openssh()?,
            boot_timeout_ms: BOOT_TIMEOUT.as_millis() as u64,
            stop_grace_ms: STOP_GRACE.as_millis() as u64,
        };
        let launch_path = dir.join(shim::LAUNCH_FILE);
        let json = serde_json::to_vec_pretty(&launch)
            .map_err(|e| LocalError::Shim(shim::ShimError::Parse(launch_path.clone(), e)))?;
        std::fs::write(&launch_path, json).map_err(|e| LocalError::Dir(dir.clone(), e))?;
        let shim = self.spawn_shim(&dir)?;
        let state = match wait_until_running(&dir, &shim).await {
            Ok(s) => s,
            Err(e) => {
                shim.kill();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let private = Private {
            dir,
            shim,
            vcpus: grant.vcpus,
            ram_mib: grant.ram_mib,
        };
        Ok(ProvisionedInstance {
            backend: self.name.clone(),
            instance_id: grant.id.clone(),
            host: "127.0.0.1".to_string(),
            ssh_port: state.ssh_port.unwrap_or_default(),
            user: "root".to_string(),
            host_key_fingerprint: host_key.fingerprint(),
            host_key: host_key.public_openssh()?,
            started_at: Utc::now(),
            private: serde_json::to_value(&private).unwrap_or_default(),
        })
    }

    async fn build_image(&self, image: &str) -> Result<PathBuf, LocalError> {
        let home = self.home.clone();
        let image = image.to_string();
        tokio::task::spawn_blocking(move || {
            let cache =
                kiln_image::cache::Cache::open(&home.join("images")).map_err(LocalError::Cache)?;
            let opts = kiln_image::build::Options {
                input: kiln_image::build::Input::Registry(image.clone()),
                agent: home.join("bin/kiln-agent"),
                compression: kiln_image::compress::Compression::None,
                max_expanded: kiln_image::assemble::DEFAULT_MAX_EXPANDED,
                insecure: Vec::new(),
                docker_config: None,
                refresh: false,
                output: None,
            };
            kiln_image::build::build(&cache, &opts, &mut |_| {})
                .map(|b| b.path)
                .map_err(|e| LocalError::Image(image, e))
        })
        .await
        .map_err(LocalError::Task)?
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

    fn private(&self, instance: &ProvisionedInstance) -> Result<Private, BackendError> {
        serde_json::from_value(instance.private.clone()).map_err(|_| {
            BackendError::Fatal(Box::new(LocalError::Foreign(instance.instance_id.clone())))
        })
    }
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
        tokio::time::sleep(POLL).await;
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
        }
    }

    fn can_satisfy(&self, grant: &Grant) -> bool {
        self.check(grant).is_ok_and(|r| self.ledger.fits(r))
    }

    async fn provision(&self, grant: &Grant) -> Result<ProvisionedInstance, BackendError> {
        let want = self
            .check(grant)
            .map_err(|e| BackendError::CannotSatisfy(Box::new(e)))?;
        self.ledger.reserve(&grant.id, want)?;
        match self.boot(grant).await {
            Ok(instance) => Ok(instance),
            Err(e) => {
                self.ledger.release(&grant.id);
                Err(match e {
                    // Another backend pulls the same image the same way.
                    LocalError::Image(..) => BackendError::Fatal(Box::new(e)),
                    _ => BackendError::Transient(Box::new(e)),
                })
            }
        }
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
            let state =
                shim::read_state(&p.dir).map_err(|e| BackendError::Transient(Box::new(e)))?;
            let ended = state.as_ref().is_some_and(|s| s.phase == Phase::Ended);
            if ended || !p.shim.alive() {
                // A shim that died without a final word leaves what it last knew.
                let s = state;
                return Ok(UsageMetrics {
                    guest: s.as_ref().and_then(|s| s.usage.clone()).unwrap_or_default(),
                    exit_status: s.as_ref().and_then(|s| s.exit_status),
                    host: s.map(|s| s.host).unwrap_or_default(),
                    ended_at: Utc::now(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn terminate(&self, instance: &ProvisionedInstance) -> Result<(), BackendError> {
        let p = self.private(instance)?;
        if p.shim.alive() {
            p.shim.signal(libc::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_secs(40);
            while p.shim.alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
            if p.shim.alive() {
                // Its VMM follows it (parent-death signal).
                p.shim.kill();
            }
        }
        self.ledger.release(&instance.instance_id);
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

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn host_ram_mib() -> u64 {
    meminfo_kib("MemTotal").map_or(0, |kib| kib / 1024)
}
