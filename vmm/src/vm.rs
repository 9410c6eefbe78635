//! One micro-VM assembled from a [`VmConfig`] and run to its end.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kiln_protocol::vmm::{KvmProblem, KVM_DEVICE};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootProtocol, KernelEntry};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::i8042::I8042;
use crate::devices::pvpanic::{self, PvPanic};
use crate::devices::serial::{ConsoleSink, ConsoleTail, IrqTrigger, Markers, SerialDevice};
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{MuxerError, Vsock};
use crate::devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use crate::devices::{bus::lock, Bus};
use crate::exit::{ExitReason, RunState};
use crate::host::HostProfile;
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::metrics::{self, DriveMetrics, Metrics};
use crate::seccomp::{self, ThreadKind};
use crate::timeline::Timeline;
use crate::vcpu::{self, VcpuContext, VcpuError};

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

/// An event-loop participant.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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
    config: VmConfig,
    profile: HostProfile,
    mem: GuestMemoryMmap,
    _vm_fd: VmFd,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    state: Arc<RunState>,
    events: EventManager<Subscriber>,
    serial: Arc<Mutex<SerialDevice>>,
    /// virtio-blk devices, in guest order (for metrics).
    drives: Vec<Arc<Mutex<Block>>>,
    /// Files this VM created and must remove.
    owned_paths: Vec<PathBuf>,
}

impl Vm {
    /// Builds a VM; `started` is when the VMM started (for boot metrics).
    pub fn build(config: VmConfig, payload: Payload, started: Instant) -> Result<Vm, VmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(|e| VmError::KvmUnavailable(describe_kvm_open_error(&e)))?;
        if config.tdx {
            let types = kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_VM_TYPES));
            return Err(
                if types > 0 && types & (1 << kvm_bindings::KVM_X86_TDX_VM) != 0 {
                    VmError::TdxNotImplemented
                } else {
                    VmError::TdxUnavailable
                },
            );
        }
        let profile = HostProfile::detect();
        tracing::info!(
            "host profile: {} (cx16 masked: {}, PV hypercalls masked: {}, extra cmdline: {:?})",
            profile.name(),
            profile.mask_cx16,
            profile.mask_pv_hypercalls,
            profile.cmdline_extra
        );
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        // Memory first: see `memory::register` for why.
        let mem_bytes = config.mem_mib << 20;
        let mem = memory::create(mem_bytes, config.hugepages)?;
        memory::register(&vm_fd, &mem)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the interrupt controller"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("create the PIT"))?;

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

        let timeline = Arc::new(Timeline::new(started));
        let state = Arc::new(
            RunState::new(timeline.clone()).map_err(|source| VmError::Setup {
                what: "the exit event",
                source,
            })?,
        );
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| VmError::Setup {
                what: "the event loop",
                source: std::io::Error::other(format!("{e:?}")),
            })?;
        let mut owned_paths = Vec::new();

        // Port devices: COM1 and the reset half of the i8042.
        let mut pio = Bus::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Setup {
            what: "the serial IRQ",
            source,
        })?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("route the serial IRQ"))?;
        // A log file this build creates goes away again if the build fails.
        let mut created_log = RemoveOnDrop(None);
        let console_out: Option<Box<dyn std::io::Write + Send>> = match &config.serial {
            SerialOutput::None => None,
            SerialOutput::Stdio => Some(Box::new(std::io::stdout())),
            SerialOutput::File(path) => Some(Box::new({
                if !path.exists() {
                    created_log.0 = Some(path.clone());
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::Setup {
                        what: "the serial log file",
                        source,
                    })?
            })),
        };
        let console_tail = Arc::new(ConsoleTail::default());
        let serial = Arc::new(Mutex::new(SerialDevice {
            uart: Serial::new(
                IrqTrigger(serial_irq),
                ConsoleSink::new(
                    console_out,
                    console_tail.clone(),
                    &Markers {
                        ready: config.ready_marker.clone(),
                        init_failed: config.init_failed_marker.clone(),
                    },
                    timeline.clone(),
                ),
            ),
        }));
        pio.insert(serial.clone(), 0x3f8, 8)?;
        let reset_state = state.clone();
        pio.insert(
            Arc::new(Mutex::new(I8042::new(Box::new(move || {
                reset_state.request_exit(ExitReason::GuestReset)
            })))),
            0x60,
            5,
        )?;
        // The panic report comes first: the guest resets right after it.
        let panic_state = state.clone();
        pio.insert(
            Arc::new(Mutex::new(PvPanic::new(Box::new(move || {
                panic_state.request_exit(ExitReason::GuestPanic {
                    line: console_tail.panic_line(),
                })
            })))),
            pvpanic::PORT,
            1,
        )?;

        // virtio-mmio devices, one page and one IRQ each.
        let mut mmio = Bus::default();
        let mut virtio: Vec<(Arc<Mutex<dyn VirtioDevice>>, Subscriber)> = Vec::new();
        if let Some(vsock_cfg) = &config.vsock {
            let dev = Arc::new(Mutex::new(Vsock::new(
                vsock_cfg.guest_cid,
                &vsock_cfg.uds_path,
            )?));
            owned_paths.push(vsock_cfg.uds_path.clone());
            let activity = timeline.clone();
            lock(&dev).set_activity_hook(Box::new(move || activity.mark_activity()));
            virtio.push((dev.clone(), dev));
        }
        if config.rng {
            let dev = Arc::new(Mutex::new(Rng::new().map_err(|source| VmError::Setup {
                what: "virtio-rng",
                source,
            })?));
            virtio.push((dev.clone(), dev));
        }
        // Drives last and in order: the guest names them vda, vdb, ... as it
        // probes the command line's devices.
        let mut drives = Vec::new();
        for (i, drive) in config.drives.iter().enumerate() {
            let disk = Disk::open(&drive.path, drive.read_only).map_err(ConfigError::from)?;
            let dev = Arc::new(Mutex::new(
                Block::new(disk, &drive.id_or_default(i)).map_err(|source| VmError::Setup {
                    what: "virtio-blk",
                    source,
                })?,
            ));
            let activity = timeline.clone();
            lock(&dev).set_activity_hook(Box::new(move || activity.mark_activity()));
            drives.push(dev.clone());
            virtio.push((dev.clone(), dev));
        }
        let mut cmdline_devices = Vec::new();
        for (i, (device, subscriber)) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Setup {
                what: "a virtio IRQ",
                source,
            })?;
            vm_fd
                .register_irqfd(&irqfd, irq)
                .map_err(kvm_err("route a virtio IRQ"))?;
            for (q, evt) in lock(&device).queue_events().iter().enumerate() {
                // Queue notifications go straight to the event loop, no vCPU exit.
                vm_fd
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        q as u32,
                    )
                    .map_err(kvm_err("register a queue notification"))?;
            }
            let transport =
                MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)));
            mmio.insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)?;
            events.add_subscriber(subscriber);
            cmdline_devices.push((base, irq));
        }

        if linux {
            // On every host: without it a guest panic reads as a clean reset.
            let mut extra = profile.cmdline_extra.clone();
            extra.push(pvpanic::CMDLINE_PARAM.to_string());
            let cmdline = boot::build_cmdline(&config.cmdline, &extra, &cmdline_devices)?;
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
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::configure(&fd, index, config.vcpus, &supported, &profile, &kernel)?;
            vcpus.push(fd);
        }

        created_log.0 = None;
        Ok(Vm {
            config,
            profile,
            mem,
            _vm_fd: vm_fd,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            state,
            events,
            serial,
            drives,
            owned_paths,
        })
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
                .add_subscriber(Arc::new(Mutex::new(ConsoleInput {
                    serial: self.serial.clone(),
                })));
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

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // No vCPU starts without its filter.
        let vcpus = match self.state.exit_reason() {
            None => std::mem::take(&mut self.vcpus),
            Some(_) => Vec::new(),
        };
        for (index, fd) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                index: index as u8,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                mem: self.mem.clone(),
                state: self.state.clone(),
                stop: stop.clone(),
                seccomp: vcpu_filter.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("kiln-vcpu-{index}"))
                .spawn(move || vcpu::run(fd, ctx))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.state.request_exit(ExitReason::VmmError {
                        message: format!("cannot start vCPU thread {index}: {e}"),
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
        let reason = loop {
            if let Err(e) = self.events.run_with_timeout(200) {
                self.state.request_exit(ExitReason::VmmError {
                    message: format!("event loop failed: {e:?}"),
                });
            }
            if let Some(reason) = self.state.exit_reason() {
                break self.with_init_failure(reason);
            }
            if !watchdog.is_zero() && self.state.timeline.since_last_activity() > watchdog {
                self.state.request_exit(ExitReason::Watchdog {
                    idle_secs: self.config.watchdog_secs,
                });
            }
        };

        // Stop the vCPUs: flag, then kick each out of KVM_RUN until it leaves.
        stop.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the thread is alive (not finished) and its pthread_t valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            }
        }

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
        }
    }
}

/// Removes a path when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
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

/// Feeds the VMM's standard input to the guest console.
struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Fails for files and /dev/null, which then simply give no input.
        let _ = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN));
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let _ = ops.remove(events);
            return;
        }
        let _ = lock(&self.serial)
            .uart
            .enqueue_raw_bytes(&buf[..n as usize]);
    }
}

/// SIGTERM, SIGINT and SIGHUP, taken through a signalfd while the VM runs.
struct SignalWatch {
    subscriber: Subscriber,
    old_mask: libc::sigset_t,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it
/// starts later), so that one arriving while the VM is built waits for the
/// VM's signalfd instead of killing the process uncleanly.
pub fn block_stop_signals() {
    // SAFETY: plain sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

impl SignalWatch {
    fn new(state: Arc<RunState>) -> std::io::Result<Self> {
        // SAFETY: plain sigset manipulation on local values.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            // Blocked here, inherited by the vCPU threads: only the signalfd sees them.
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(e);
            }
            Ok(SignalWatch {
                subscriber: Arc::new(Mutex::new(SignalSubscriber {
                    file: File::from_raw_fd(fd),
                    state,
                })),
                old_mask: old,
            })
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in new().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

struct SignalSubscriber {
    file: File,
    state: Arc<RunState>,
}

impl MutEventSubscriber for SignalSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.file, EventSet::IN));
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        if self.file.read_exact(&mut info).is_ok() {
            let signal = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
            self.state.request_exit(ExitReason::Signal { signal });
        }
    }
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The vCPU kick signal only interrupts KVM_RUN; its handler does nothing.
fn install_kick_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}
