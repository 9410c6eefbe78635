//! vCPU setup (CPUID, MSRs, registers, LAPIC), the thread that runs it,
//! and the handle that pauses, resumes, saves and stops that thread.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::gdt::{segment_from_gdt, GDT_LONG_MODE, GDT_PVH};
use crate::boot::{BootProtocol, KernelEntry};
use crate::cpuid;
use crate::devices::Bus;
use crate::exit::{ExitReason, RunState};
use crate::host::HostProfile;
use crate::layout::*;
use crate::snapshot::{Parts, SnapshotError, VcpuState, VcpuStateError};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot set {what} of vCPU {index}")]
    Set {
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs on vCPU {index}")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {0} has stopped")]
    Stopped(u8),
    #[error("vCPU {0} did not answer in time (stuck in KVM_RUN?)")]
    NoAnswer(u8),
    #[error("cannot start the thread of vCPU {index}")]
    Thread { index: u8, source: std::io::Error },
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Puts vCPU `index` of `count` into the state the boot protocol expects.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    supported_cpuid: &CpuId,
    profile: &HostProfile,
    kernel: &KernelEntry,
) -> Result<(), VcpuError> {
    let set = |what: &'static str| {
        move |source| VcpuError::Set {
            what,
            index,
            source,
        }
    };

    let mut cpuid = supported_cpuid.clone();
    cpuid::normalize(cpuid.as_mut_slice(), index, count, profile);
    vcpu.set_cpuid2(&cpuid).map_err(set("CPUID"))?;

    let boot_msrs = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let entries: Vec<kvm_msr_entry> = boot_msrs
        .iter()
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        index,
        set: 0,
        wanted: entries.len(),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
    if n != entries.len() {
        return Err(VcpuError::Msrs {
            index,
            set: n,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(set("FPU"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: kernel.entry.0,
        ..Default::default()
    };
    let mut sregs = vcpu.get_sregs().map_err(set("special registers"))?;
    let gdt: &[u64] = match kernel.protocol {
        BootProtocol::Pvh => {
            regs.rbx = PVH_INFO_START;
            &GDT_PVH
        }
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
            &GDT_LONG_MODE
        }
    };
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match kernel.protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(set("special registers"))?;
    vcpu.set_regs(&regs).map_err(set("registers"))?;

    // LINT0 delivers the legacy PIC (ExtINT), LINT1 NMIs, as the MP table says.
    let mut lapic = vcpu.get_lapic().map_err(set("LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(set("LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let v = u32::from_le_bytes(raw);
    let v = (v & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub index: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub state: Arc<RunState>,
    /// The vCPU threads' seccomp filter, installed before the first KVM_RUN.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

enum Step {
    Continue,
    Exit(ExitReason),
    InternalError,
}

/// What the handle asks of a vCPU thread.
enum Command {
    Pause,
    Resume,
    /// Read the state (only while paused): the MSRs to read, the parts.
    Save(Arc<Vec<u32>>, Parts),
    Stop,
}

/// What a vCPU thread answers.
enum Answer {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, VcpuStateError>>),
    NotPaused,
}

thread_local! {
    /// This thread's `kvm_run` area, for the kick signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Called by the kick signal's handler: makes this thread's next (or
/// current) KVM_RUN return at once, so a kick sent just before the thread
/// enters KVM_RUN is not lost.
pub(crate) fn on_kick() {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping, set by
        // `run_thread` and cleared before the VcpuFd is dropped; the handler
        // runs on this same thread.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// How long a vCPU thread may take to answer; a guest stuck inside a
/// hypercall on some hosts never leaves KVM_RUN.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A running vCPU thread, controlled from the VMM's main thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    commands: Sender<Command>,
    answers: Receiver<Answer>,
}

impl VcpuHandle {
    /// Starts the thread that runs `vcpu`.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let index = ctx.index;
        let (commands, command_rx) = mpsc::channel();
        let (answer_tx, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vcpu-{index}"))
            .spawn(move || run_thread(vcpu, ctx, command_rx, answer_tx))
            .map_err(|source| VcpuError::Thread { index, source })?;
        Ok(VcpuHandle {
            index,
            thread,
            commands,
            answers,
        })
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if !self.thread.is_finished() {
            // SAFETY: the thread is alive (not finished) and its pthread_t valid.
            unsafe {
                libc::pthread_kill(self.thread.as_pthread_t(), crate::signals::kick_signal())
            };
        }
    }

    fn ask(&self, command: Command) -> Result<Answer, VcpuError> {
        self.commands
            .send(command)
            .map_err(|_| VcpuError::Stopped(self.index))?;
        self.kick();
        match self.answers.recv_timeout(ANSWER_TIMEOUT) {
            Ok(answer) => Ok(answer),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::NoAnswer(self.index)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Stopped(self.index)),
        }
    }

    /// Takes the vCPU out of KVM_RUN and parks it; returns once it is parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        match self.ask(Command::Pause)? {
            Answer::Paused => Ok(()),
            _ => Err(VcpuError::NoAnswer(self.index)),
        }
    }

    /// Lets a parked vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        match self.ask(Command::Resume)? {
            Answer::Resumed => Ok(()),
            _ => Err(VcpuError::NoAnswer(self.index)),
        }
    }

    /// Reads the state of a paused vCPU.
    pub fn save(&self, msr_list: Arc<Vec<u32>>, parts: Parts) -> Result<VcpuState, SnapshotError> {
        match self.ask(Command::Save(msr_list, parts))? {
            Answer::Saved(result) => Ok((*result)?),
            Answer::NotPaused => Err(SnapshotError::NotPaused),
            _ => Err(VcpuError::NoAnswer(self.index).into()),
        }
    }

    /// Asks the thread to end, running or parked, without waiting.
    pub fn request_stop(&self) {
        let _ = self.commands.send(Command::Stop);
        self.kick();
    }

    /// Stops every thread in `handles`, kicking them out of KVM_RUN until
    /// `deadline`; a thread still inside KVM_RUN then is left behind.
    pub fn stop_all(handles: Vec<VcpuHandle>, deadline: Instant) {
        for h in &handles {
            h.request_stop();
        }
        while Instant::now() < deadline && handles.iter().any(|h| !h.thread.is_finished()) {
            for h in &handles {
                h.kick();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in handles {
            if h.thread.is_finished() {
                let _ = h.thread.join();
            }
        }
    }
}

/// The vCPU thread: runs the vCPU and obeys the handle between runs.
fn run_thread(
    mut vcpu: VcpuFd,
    ctx: VcpuContext,
    commands: Receiver<Command>,
    answers: Sender<Answer>,
) {
    KVM_RUN.with(|r| r.set(vcpu.get_kvm_run()));
    run(&mut vcpu, &ctx, &commands, &answers);
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

/// Parks a vCPU until it is resumed (true) or stopped (false).
fn park(
    vcpu: &mut VcpuFd,
    index: u8,
    commands: &Receiver<Command>,
    answers: &Sender<Answer>,
) -> bool {
    // One KVM_RUN that returns at once: KVM finishes the I/O the last
    // exit left pending (a port read's value into RAX, RIP past the
    // instruction), so the state a snapshot reads is whole.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    let _ = answers.send(Answer::Paused);
    loop {
        match commands.recv() {
            Ok(Command::Pause) => {
                let _ = answers.send(Answer::Paused);
            }
            Ok(Command::Resume) => {
                let _ = answers.send(Answer::Resumed);
                return true;
            }
            Ok(Command::Save(msrs, parts)) => {
                let state = VcpuState::save(vcpu, index, &msrs, parts);
                let _ = answers.send(Answer::Saved(Box::new(state)));
            }
            Ok(Command::Stop) | Err(_) => return false,
        }
    }
}

/// Runs the vCPU until the VM stops; reports why through `ctx.state`.
fn run(
    vcpu: &mut VcpuFd,
    ctx: &VcpuContext,
    commands: &Receiver<Command>,
    answers: &Sender<Answer>,
) {
    if let Some(filter) = &ctx.seccomp {
        if let Err(e) = crate::seccomp::install(filter) {
            ctx.state.request_exit(ExitReason::VmmError {
                message: format!("vCPU {}: {e}", ctx.index),
            });
            return;
        }
    }
    let counters = &ctx.state.exits;
    let timeline = &ctx.state.timeline;
    if ctx.index == 0 {
        timeline.mark_first_kvm_run();
    }
    loop {
        // Cleared before the commands are read: a kick after this point
        // either finds its command below or makes KVM_RUN return at once.
        vcpu.set_kvm_immediate_exit(0);
        match commands.try_recv() {
            Ok(Command::Pause) => {
                if !park(vcpu, ctx.index, commands, answers) {
                    break;
                }
            }
            Ok(Command::Resume) => {
                let _ = answers.send(Answer::Resumed);
            }
            Ok(Command::Save(..)) => {
                let _ = answers.send(Answer::NotPaused);
            }
            Ok(Command::Stop) | Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let step = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    counters.io_in.fetch_add(1, Ordering::Relaxed);
                    if !ctx.pio.read(u64::from(port), data) {
                        // Nothing there: a floating ISA bus reads all ones.
                        data.fill(0xff);
                    }
                    timeline.mark_activity();
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    counters.io_out.fetch_add(1, Ordering::Relaxed);
                    ctx.pio.write(u64::from(port), data);
                    timeline.mark_activity();
                    Step::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    counters.mmio_read.fetch_add(1, Ordering::Relaxed);
                    if !ctx.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    timeline.mark_activity();
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    counters.mmio_write.fetch_add(1, Ordering::Relaxed);
                    ctx.mmio.write(addr, data);
                    timeline.mark_activity();
                    Step::Continue
                }
                VcpuExit::Hlt => Step::Exit(ExitReason::GuestShutdown),
                VcpuExit::Shutdown => Step::Exit(ExitReason::TripleFault { vcpu: ctx.index }),
                VcpuExit::SystemEvent(kind, _) => Step::Exit(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic { line: None },
                    _ => ExitReason::GuestShutdown,
                }),
                VcpuExit::InternalError => Step::InternalError,
                VcpuExit::FailEntry(reason, cpu) => Step::Exit(ExitReason::VmmError {
                    message: format!(
                        "KVM could not enter vCPU {} (hardware reason {reason:#x}, host CPU {cpu})",
                        ctx.index
                    ),
                }),
                VcpuExit::Intr => Step::Continue,
                other => {
                    counters.other.fetch_add(1, Ordering::Relaxed);
                    Step::Exit(ExitReason::VmmError {
                        message: format!("unhandled exit on vCPU {}: {other:?}", ctx.index),
                    })
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(e) => Step::Exit(ExitReason::VmmError {
                message: format!("KVM_RUN failed on vCPU {}: {e}", ctx.index),
            }),
        };
        match step {
            Step::Continue => {}
            Step::Exit(reason) => {
                ctx.state.request_exit(reason);
                break;
            }
            Step::InternalError => {
                ctx.state.request_exit(emulation_failure(vcpu, ctx));
                break;
            }
        }
    }
}

/// Reads what KVM knows about an internal error: suberror, RIP and the
/// bytes of the instruction there.
fn emulation_failure(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> ExitReason {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
    // active member of the kvm_run union.
    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    let bytes = vcpu
        .translate_gva(rip)
        .ok()
        .filter(|t| t.valid != 0)
        .and_then(|t| {
            let mut buf = vec![0u8; 15];
            ctx.mem
                .read_slice(&mut buf, GuestAddress(t.physical_address))
                .ok()
                .map(|_| buf)
        })
        .unwrap_or_default();
    ExitReason::EmulationFailure {
        vcpu: ctx.index,
        rip,
        suberror,
        bytes,
    }
}
