//! The steps a VM is assembled from: open KVM, create the VM around its
//! memory, attach the legacy devices, attach the virtio devices, create the
//! vCPUs. [`crate::vm::Vm::build`] runs them as the boot recipe; a restore
//! runs the same steps with saved state put back in between.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::i8042::I8042;
use crate::devices::pvpanic::{self, PvPanic};
use crate::devices::serial::{
    ConsoleSink, ConsoleTail, IrqTrigger, Markers, SavedSerial, SerialDevice,
};
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use crate::devices::{bus::lock, Bus};
use crate::exit::{ExitReason, RunState};
use crate::host::HostProfile;
use crate::layout::*;
use crate::memory;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::snapshot::DeviceKind;
use crate::timeline::Timeline;
use crate::vm::{describe_kvm_open_error, VmError};

/// An event-loop participant.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm, refusing a TDX request this VMM cannot serve.
pub(crate) fn open_kvm(config: &VmConfig) -> Result<Kvm, VmError> {
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
    Ok(kvm)
}

/// This host's profile, logged once.
pub(crate) fn detect_profile() -> HostProfile {
    let profile = HostProfile::detect();
    tracing::info!(
        "host profile: {} (cx16 masked: {}, PV hypercalls masked: {}, extra cmdline: {:?})",
        profile.name(),
        profile.mask_cx16,
        profile.mask_pv_hypercalls,
        profile.cmdline_extra
    );
    profile
}

/// Creates the VM around `mem` with its in-kernel devices (IRQ chip, PIT).
pub(crate) fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    // Memory first: see `memory::register` for why.
    memory::register(&vm_fd, mem)?;
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
    Ok(vm_fd)
}

/// What the vCPU threads, devices and event loop share.
pub(crate) struct Core {
    pub timeline: Arc<Timeline>,
    pub state: Arc<RunState>,
    pub events: EventManager<Subscriber>,
}

pub(crate) fn create_core(started: Instant) -> Result<Core, VmError> {
    let timeline = Arc::new(Timeline::new(started));
    let state = Arc::new(
        RunState::new(timeline.clone()).map_err(|source| VmError::Setup {
            what: "the exit event",
            source,
        })?,
    );
    let events = EventManager::new().map_err(|e| VmError::Setup {
        what: "the event loop",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    Ok(Core {
        timeline,
        state,
        events,
    })
}

/// Removes a path when dropped, unless emptied first.
pub(crate) struct RemoveOnDrop(pub Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The port-I/O devices: COM1, the reset half of the i8042, pvpanic.
pub(crate) struct LegacyDevices {
    pub pio: Bus,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The serial log file, if this build created it: removed again if the
    /// build fails (empty it once the VM is built).
    pub created_log: RemoveOnDrop,
}

/// `serial`: the UART's saved state, on a restore.
pub(crate) fn attach_legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    core: &Core,
    serial: Option<&SavedSerial>,
) -> Result<LegacyDevices, VmError> {
    let mut pio = Bus::default();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Setup {
        what: "the serial IRQ",
        source,
    })?;
    vm_fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("route the serial IRQ"))?;
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
    let sink = ConsoleSink::new(
        console_out,
        console_tail.clone(),
        &Markers {
            ready: config.ready_marker.clone(),
            init_failed: config.init_failed_marker.clone(),
        },
        core.timeline.clone(),
    );
    let uart = match serial {
        None => Serial::new(IrqTrigger(serial_irq), sink),
        Some(saved) => Serial::from_state(&saved.into(), IrqTrigger(serial_irq), NoEvents, sink)
            .map_err(|_| VmError::Setup {
                what: "the serial console from its saved state",
                source: std::io::Error::other("receive FIFO overflow"),
            })?,
    };
    let serial = Arc::new(Mutex::new(SerialDevice { uart }));
    pio.insert(serial.clone(), 0x3f8, 8)?;
    let reset_state = core.state.clone();
    pio.insert(
        Arc::new(Mutex::new(I8042::new(Box::new(move || {
            reset_state.request_exit(ExitReason::GuestReset)
        })))),
        0x60,
        5,
    )?;
    // The panic report comes first: the guest resets right after it.
    let panic_state = core.state.clone();
    pio.insert(
        Arc::new(Mutex::new(PvPanic::new(Box::new(move || {
            panic_state.request_exit(ExitReason::GuestPanic {
                line: console_tail.panic_line(),
            })
        })))),
        pvpanic::PORT,
        1,
    )?;
    Ok(LegacyDevices {
        pio,
        serial,
        created_log,
    })
}

/// The virtio-mmio devices, one page and one IRQ each.
pub(crate) struct VirtioDevices {
    pub mmio: Bus,
    /// (MMIO base, IRQ) of each device, for the guest command line.
    pub cmdline_devices: Vec<(u64, u32)>,
    /// virtio-blk devices, in guest order (for metrics).
    pub drives: Vec<Arc<Mutex<Block>>>,
    /// The virtio-net card (for metrics).
    pub net: Option<Arc<Mutex<Net>>>,
    /// Files the devices created and the VM must remove.
    pub owned_paths: Vec<PathBuf>,
    /// Every transport, in guest order, with what its device is.
    pub transports: Vec<(Arc<Mutex<MmioTransport>>, DeviceKind)>,
    /// Every device, in guest order.
    pub devices: Vec<SharedDevice>,
    pub vsock: Option<Arc<Mutex<Vsock>>>,
}

/// Creates the configured devices (vsock, rng, net, then drives in order) and
/// attaches them.
pub(crate) fn attach_virtio_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    core: &mut Core,
) -> Result<VirtioDevices, VmError> {
    let mut owned_paths = Vec::new();
    let mut virtio: Vec<(SharedDevice, Subscriber, DeviceKind)> = Vec::new();
    let mut vsock = None;
    let mut net_dev = None;
    if let Some(vsock_cfg) = &config.vsock {
        let dev = Arc::new(Mutex::new(Vsock::new(
            vsock_cfg.guest_cid,
            &vsock_cfg.uds_path,
        )?));
        owned_paths.push(vsock_cfg.uds_path.clone());
        let activity = core.timeline.clone();
        lock(&dev).set_activity_hook(Box::new(move || activity.mark_activity()));
        vsock = Some(dev.clone());
        let kind = DeviceKind::Vsock {
            guest_cid: vsock_cfg.guest_cid,
        };
        virtio.push((dev.clone(), dev, kind));
    }
    if config.rng {
        let dev = Arc::new(Mutex::new(Rng::new().map_err(|source| VmError::Setup {
            what: "virtio-rng",
            source,
        })?));
        virtio.push((dev.clone(), dev, DeviceKind::Rng));
    }
    if let Some(net_cfg) = &config.net {
        // Jailed, the TAP was attached before the jail's empty network
        // namespace (see `jail::held`).
        let tap = match crate::jail::held::take_tap(&net_cfg.tap) {
            Some(tap) => tap,
            None => Tap::open(&net_cfg.tap)?,
        };
        let mut net = Net::new(tap, net_cfg.mac_bytes()?).map_err(|source| VmError::Setup {
            what: "virtio-net",
            source,
        })?;
        let limiter = |c: &Option<RateLimiterConfig>| {
            c.as_ref()
                .map(RateLimiter::new)
                .transpose()
                .map_err(ConfigError::from)
        };
        net.set_rate_limiters(
            limiter(&net_cfg.rx_rate_limiter)?,
            limiter(&net_cfg.tx_rate_limiter)?,
        );
        let dev = Arc::new(Mutex::new(net));
        let activity = core.timeline.clone();
        lock(&dev).set_activity_hook(Box::new(move || activity.mark_activity()));
        net_dev = Some(dev.clone());
        virtio.push((dev.clone(), dev, DeviceKind::Net));
    }
    // Drives last and in order: the guest names them vda, vdb, ... as it
    // probes the command line's devices.
    let mut drives = Vec::new();
    for (i, drive) in config.drives.iter().enumerate() {
        let disk = Disk::open(&drive.path, drive.read_only).map_err(ConfigError::from)?;
        let kind = DeviceKind::Block {
            path: drive.path.clone(),
            sectors: disk.sectors(),
            read_only: drive.read_only,
        };
        let dev = Arc::new(Mutex::new(
            Block::new(disk, &drive.id_or_default(i)).map_err(|source| VmError::Setup {
                what: "virtio-blk",
                source,
            })?,
        ));
        let activity = core.timeline.clone();
        lock(&dev).set_activity_hook(Box::new(move || activity.mark_activity()));
        drives.push(dev.clone());
        virtio.push((dev.clone(), dev, kind));
    }
    let mut mmio = Bus::default();
    let mut cmdline_devices = Vec::new();
    let mut transports = Vec::new();
    let mut devices = Vec::new();
    for (i, (device, subscriber, kind)) in virtio.into_iter().enumerate() {
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
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
        )));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        transports.push((transport, kind));
        devices.push(device);
        core.events.add_subscriber(subscriber);
        cmdline_devices.push((base, irq));
    }
    Ok(VirtioDevices {
        mmio,
        cmdline_devices,
        drives,
        net: net_dev,
        owned_paths,
        transports,
        devices,
        vsock,
    })
}

/// Creates `count` vCPUs, unconfigured.
pub(crate) fn create_vcpus(vm_fd: &VmFd, count: u8) -> Result<Vec<VcpuFd>, VmError> {
    (0..count)
        .map(|index| {
            vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("create a vCPU"))
        })
        .collect()
}
