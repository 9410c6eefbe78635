//! One micro-VM, assembled from a [`VmConfig`] by the steps in
//! [`crate::builder`], and run to its end.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kiln_protocol::vmm::{KvmProblem, KVM_DEVICE};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::api::{ApiError, ApiServer, Pending, Reply, Request};
use crate::boot::{self, BootError, BootProtocol, KernelEntry};
use crate::builder::{self, kvm_err, Subscriber};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::console_input::ConsoleInput;
use crate::devices::pvpanic;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::MuxerError;
use crate::devices::virtio::MmioTransport;
use crate::devices::{bus::lock, Bus};
use crate::exit::{ExitReason, RunState};
use crate::host::{HostProfile, Virtualization};
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::metrics::{self, DriveMetrics, Metrics, NetMetrics};
use crate::seccomp::{self, ThreadKind};
use crate::signals::{install_kick_handler, SignalWatch};
use crate::snapshot::{self, DeviceKind, DeviceState, MachineState, SnapshotError, VmState};
use crate::vcpu::{self, VcpuContext, VcpuError, VcpuHandle};

/// Every way building a VM can fail.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    KvmUnavailable(String),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vsock(#[from] MuxerError),
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::TapError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("TDX requested, but this host's KVM offers no TDX VM type")]
    TdxUnavailable,
    #[error("TDX requested: this host offers TDX, but kiln-vmm does not launch TDX guests yet")]
    TdxNotImplemented,
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot register a device: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error(transparent)]
    Restore(Box<crate::snapshot::restore::RestoreError>),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<crate::snapshot::FileError> for VmError {
    fn from(e: crate::snapshot::FileError) -> Self {
        crate::snapshot::restore::RestoreError::File(e).into()
    }
}

/// A clear sentence for a failure to open /dev/kvm.
pub fn describe_kvm_open_error(e: &kvm_ioctls::Error) -> String {
    let io = std::io::Error::from_raw_os_error(e.errno());
    let problem = KvmProblem::from_io(io.kind());
    let what = match problem {
        KvmProblem::Missing => format!("{KVM_DEVICE} does not exist"),
        KvmProblem::PermissionDenied => format!("permission denied opening {KVM_DEVICE}"),
        KvmProblem::Other => format!("cannot open {KVM_DEVICE}: {e}"),
    };
    format!("{what}: {}", problem.advice())
}

/// What runs in the VM.
pub enum Payload {
    /// The configured kernel and initramfs.
    Kernel,
    /// Raw 32-bit protected-mode code at 1 MiB, for VMM self-tests.
    Code(Vec<u8>),
}

/// How a VM ended.
#[derive(Debug)]
pub struct VmOutcome {
    pub reason: ExitReason,
    pub metrics: Metrics,
}

pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) profile: HostProfile,
    pub(crate) kvm: Kvm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vm_fd: VmFd,
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) state: Arc<RunState>,
    pub(crate) events: EventManager<Subscriber>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// virtio-blk devices, in guest order (for metrics).
    pub(crate) drives: Vec<Arc<Mutex<Block>>>,
    /// The virtio-net card (for metrics).
    pub(crate) net: Option<Arc<Mutex<Net>>>,
    /// Every virtio transport, in guest order, and its device's kind.
    pub(crate) transports: Vec<(Arc<Mutex<MmioTransport>>, DeviceKind)>,
    /// Files this VM created and must remove.
    pub(crate) owned_paths: Vec<PathBuf>,
    /// The control socket, once [`Vm::serve_api`] set it up.
    api: Option<Arc<Mutex<Vec<Pending>>>>,
}

impl Vm {
    /// Builds a VM to boot `payload`; `started` is when the VMM started
    /// (for boot metrics).
    pub fn build(config: VmConfig, payload: Payload, started: Instant) -> Result<Vm, VmError> {
        config.validate()?;
        let kvm = builder::open_kvm(&config)?;
        let profile = builder::detect_profile();
        let mem_bytes = config.mem_mib << 20;
        let mem = memory::create(mem_bytes, config.hugepages)?;
        let vm_fd = builder::create_vm(&kvm, &mem)?;

        // The kernel and initramfs replace parts of the mapping KVM already
        // knows; its MMU notifier follows, and no vCPU has run yet.
        let linux = matches!(payload, Payload::Kernel);
        let (kernel, initrd) = match payload {
            Payload::Kernel => {
                let entry = boot::load_kernel(&mem, &config.kernel)?;
                let initrd = match &config.initrd {
                    Some(path) => Some(boot::load_initrd(&mem, path, entry.kernel_end)?),
                    None => None,
                };
                (entry, initrd)
            }
            Payload::Code(code) => {
                mem.write_slice(&code, GuestAddress(HIMEM_START))
                    .map_err(|_| BootError::GuestMemory("payload"))?;
                let entry = KernelEntry::raw(GuestAddress(HIMEM_START), BootProtocol::Pvh);
                for (i, e) in crate::boot::gdt::GDT_PVH.iter().enumerate() {
                    mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
                        .map_err(|_| BootError::GuestMemory("GDT"))?;
                }
                (entry, None)
            }
        };

        let mut core = builder::create_core(started)?;
        let mut legacy = builder::attach_legacy_devices(&vm_fd, &config, &core, None)?;
        let virtio = builder::attach_virtio_devices(&vm_fd, &config, &mem, &mut core)?;

        if linux {
            // On every host: without it a guest panic reads as a clean reset.
            let mut extra = profile.cmdline_extra.clone();
            extra.push(pvpanic::CMDLINE_PARAM.to_string());
            let cmdline = boot::build_cmdline(&config.cmdline, &extra, &virtio.cmdline_devices)?;
            tracing::info!(
                "kernel {} ({:?} entry at {:#x}), command line: {}",
                config.kernel.display(),
                kernel.protocol,
                kernel.entry.0,
                cmdline
                    .as_cstring()
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            boot::configure(&mem, &kernel, initrd, &cmdline, config.vcpus, mem_bytes)?;
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report supported CPUID"))?;
        let vcpus = builder::create_vcpus(&vm_fd, config.vcpus)?;
        for (index, fd) in vcpus.iter().enumerate() {
            vcpu::configure(fd, index as u8, config.vcpus, &supported, &profile, &kernel)?;
        }

        legacy.created_log.0 = None;
        Ok(Vm::assemble(
            config, profile, kvm, mem, vm_fd, vcpus, core, legacy, virtio,
        ))
    }

    /// The VM from the products of the builder's steps.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        config: VmConfig,
        profile: HostProfile,
        kvm: Kvm,
        mem: GuestMemoryMmap,
        vm_fd: VmFd,
        vcpus: Vec<VcpuFd>,
        core: builder::Core,
        legacy: builder::LegacyDevices,
        virtio: builder::VirtioDevices,
    ) -> Vm {
        Vm {
            config,
            profile,
            kvm,
            mem,
            vm_fd,
            vcpus,
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(virtio.mmio),
            state: core.state,
            events: core.events,
            serial: legacy.serial,
            drives: virtio.drives,
            net: virtio.net,
            transports: virtio.transports,
            owned_paths: virtio.owned_paths,
            api: None,
        }
    }

    /// Serves the control socket at `path` while the VM runs.
    pub fn serve_api(&mut self, path: &Path) -> Result<(), ApiError> {
        let server = ApiServer::bind(path)?;
        self.api = Some(server.queue());
        self.events.add_subscriber(Arc::new(Mutex::new(server)));
        Ok(())
    }

    /// Carries out the control socket's queued requests.
    fn serve_requests(&self, vcpus: &[VcpuHandle], paused: &mut bool) {
        let Some(queue) = &self.api else {
            return;
        };
        let pending = std::mem::take(&mut *lock(queue));
        for p in pending {
            let reply = match &p.request {
                Err(e) => Reply::error(e),
                Ok(Request::Pause) => match vcpus.iter().try_for_each(VcpuHandle::pause) {
                    Ok(()) => {
                        *paused = true;
                        Reply::ok()
                    }
                    Err(e) => Reply::error(e),
                },
                Ok(Request::Resume) => match vcpus.iter().try_for_each(VcpuHandle::resume) {
                    Ok(()) => {
                        *paused = false;
                        // The pause is not the guest's silence.
                        self.state.timeline.mark_activity();
                        Reply::ok()
                    }
                    Err(e) => Reply::error(e),
                },
                Ok(Request::Snapshot { state, mem }) => {
                    if !*paused {
                        Reply::error(SnapshotError::NotPaused)
                    } else {
                        match self.snapshot(vcpus, state, mem) {
                            Ok(()) => Reply::ok(),
                            Err(e) => Reply::error(error_chain(&e)),
                        }
                    }
                }
                Ok(Request::Stop) => {
                    self.state.request_exit(ExitReason::Signal {
                        signal: libc::SIGTERM,
                    });
                    Reply::ok()
                }
                Ok(Request::Metrics) => {
                    let (rss, _) = metrics::rss_kib();
                    Reply {
                        metrics: Some(serde_json::json!({
                            "paused": *paused,
                            "uptime_ms": self.state.timeline.start().elapsed().as_secs_f64() * 1000.0,
                            "vm_exits": self.state.exits.snapshot(),
                            "rss_kib": rss,
                            "guest_resident_kib": memory::resident(&self.mem).total_bytes() / 1024,
                        })),
                        ..Reply::ok()
                    }
                }
            };
            p.answer(&reply);
        }
    }

    /// Writes a snapshot of the paused VM: guest memory to `mem_path`, then
    /// the state file (whose presence marks the snapshot complete).
    fn snapshot(
        &self,
        vcpus: &[VcpuHandle],
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<(), SnapshotError> {
        if vcpus.len() != usize::from(self.config.vcpus) {
            return Err(SnapshotError::Stopped);
        }
        let msr_list = Arc::new(
            self.kvm
                .get_msr_index_list()
                .map_err(SnapshotError::MsrList)?
                .as_slice()
                .to_vec(),
        );
        let parts = snapshot::Parts {
            // A PVM guest runs with `noxsave`: the FPU area is the whole state.
            xsave: self.profile.virtualization != Virtualization::Pvm
                && self.kvm.check_extension(kvm_ioctls::Cap::Xsave),
        };
        let vcpu_states = vcpus
            .iter()
            .map(|h| h.save(msr_list.clone(), parts))
            .collect::<Result<Vec<_>, _>>()?;
        let state = VmState {
            config: self.config.clone(),
            host_profile: self.profile.name().to_string(),
            vcpus: vcpu_states,
            machine: MachineState::save(&self.vm_fd)?,
            serial: lock(&self.serial).uart.state().into(),
            devices: self
                .transports
                .iter()
                .map(|(t, kind)| DeviceState {
                    transport: lock(t).state(),
                    kind: kind.clone(),
                })
                .collect(),
        };
        let payload = serde_json::to_vec(&state).map_err(SnapshotError::Encode)?;
        memory::save(&self.mem, mem_path)?;
        snapshot::file::write(state_path, &payload)?;
        tracing::info!(
            "snapshot written: {} ({} bytes of state), {}",
            state_path.display(),
            payload.len(),
            mem_path.display()
        );
        Ok(())
    }

    /// Runs the VM until the guest stops, a signal arrives, or the watchdog fires.
    pub fn run(mut self) -> VmOutcome {
        let signals = match SignalWatch::new(self.state.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot watch signals: {e}");
                None
            }
        };
        if let Some(s) = &signals {
            self.events.add_subscriber(s.subscriber.clone());
        }
        self.events
            .add_subscriber(Arc::new(Mutex::new(ExitWatch(self.state.clone()))));
        if self.config.serial == SerialOutput::Stdio {
            self.events
                .add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(self.serial.clone()))));
        }
        install_kick_handler();
        let filters = (
            seccomp::program(ThreadKind::Vcpu, self.config.seccomp),
            seccomp::program(ThreadKind::Main, self.config.seccomp),
        );
        let (vcpu_filter, main_filter) = match filters {
            (Ok(v), Ok(m)) => (v.map(Arc::new), m),
            (Err(e), _) | (_, Err(e)) => {
                self.state.request_exit(ExitReason::VmmError {
                    message: e.to_string(),
                });
                (None, None)
            }
        };

        let mut vcpus = Vec::new();
        // No vCPU starts without its filter.
        let fds = match self.state.exit_reason() {
            None => std::mem::take(&mut self.vcpus),
            Some(_) => Vec::new(),
        };
        for (index, fd) in fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                index: index as u8,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                mem: self.mem.clone(),
                state: self.state.clone(),
                seccomp: vcpu_filter.clone(),
            };
            match VcpuHandle::spawn(fd, ctx) {
                Ok(h) => vcpus.push(h),
                Err(e) => {
                    self.state.request_exit(ExitReason::VmmError {
                        message: e.to_string(),
                    });
                    break;
                }
            }
        }

        // Before the loop serves the first device request the guest makes.
        if let Some(filter) = &main_filter {
            if let Err(e) = seccomp::install(filter) {
                self.state.request_exit(ExitReason::VmmError {
                    message: format!("main thread: {e}"),
                });
            }
        }
        let watchdog = Duration::from_secs(self.config.watchdog_secs);
        self.state.timeline.mark_activity();
        let mut paused = false;
        let reason = loop {
            if let Err(e) = self.events.run_with_timeout(200) {
                self.state.request_exit(ExitReason::VmmError {
                    message: format!("event loop failed: {e:?}"),
                });
            }
            self.serve_requests(&vcpus, &mut paused);
            if let Some(reason) = self.state.exit_reason() {
                break self.with_init_failure(reason);
            }
            if paused {
                // A paused guest is silent by our doing, not stuck.
                self.state.timeline.mark_activity();
            } else if !watchdog.is_zero() && self.state.timeline.since_last_activity() > watchdog {
                self.state.request_exit(ExitReason::Watchdog {
                    idle_secs: self.config.watchdog_secs,
                });
            }
        };

        VcpuHandle::stop_all(vcpus, Instant::now() + Duration::from_secs(1));

        let metrics = self.metrics(&reason);
        for path in &self.owned_paths {
            let _ = std::fs::remove_file(path);
        }
        drop(signals);
        VmOutcome { reason, metrics }
    }

    /// A guest stop after init's fatal-error marker is that failure.
    fn with_init_failure(&self, reason: ExitReason) -> ExitReason {
        let stopped = matches!(reason, ExitReason::GuestReset | ExitReason::GuestShutdown);
        if stopped && self.state.timeline.init_failed().is_some() {
            ExitReason::InitFailed
        } else {
            reason
        }
    }

    fn metrics(&self, reason: &ExitReason) -> Metrics {
        let timeline = &self.state.timeline;
        let (user, system) = metrics::cpu_times();
        let (rss, hwm) = metrics::rss_kib();
        let guest = memory::resident(&self.mem);
        Metrics {
            exit_reason: reason.to_string(),
            exit_code: reason.exit_code(),
            host_profile: self.profile.name().to_string(),
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            time_to_first_kvm_run_ms: metrics::ms(timeline.first_kvm_run()),
            first_serial_output_ms: metrics::ms(timeline.first_serial_output()),
            ready_marker_ms: metrics::ms(timeline.ready_marker()),
            total_ms: timeline.start().elapsed().as_secs_f64() * 1000.0,
            vm_exits: self.state.exits.snapshot(),
            vmm_user_cpu_ms: user.as_secs_f64() * 1000.0,
            vmm_system_cpu_ms: system.as_secs_f64() * 1000.0,
            peak_rss_kib: hwm,
            rss_kib: rss,
            guest_resident_kib: guest.total_bytes() / 1024,
            // Huge pages are not in the RSS, so only the rest comes off it.
            vmm_overhead_kib: rss.saturating_sub(guest.rss_bytes / 1024),
            drives: self
                .drives
                .iter()
                .map(|d| {
                    let d = lock(d);
                    DriveMetrics {
                        path: d.disk().path().to_path_buf(),
                        read_only: d.disk().read_only(),
                        counters: d.counters(),
                    }
                })
                .collect(),
            net: self.net.as_ref().map(|n| {
                let n = lock(n);
                NetMetrics {
                    tap: self
                        .config
                        .net
                        .as_ref()
                        .map(|c| c.tap.clone())
                        .unwrap_or_default(),
                    counters: n.counters(),
                }
            }),
        }
    }
}

/// Wakes the event loop when a vCPU or device asks the VM to stop.
struct ExitWatch(Arc<RunState>);

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.0.exit_event(), EventSet::IN));
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.exit_event().read();
    }
}

/// An error and its sources on one line, as the VMM prints errors.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}
