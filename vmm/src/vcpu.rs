//! vCPU setup (CPUID, MSRs, registers, LAPIC) and the thread that runs it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    pub stop: Arc<AtomicBool>,
    /// The vCPU threads' seccomp filter, installed before the first KVM_RUN.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

enum Step {
    Continue,
    Exit(ExitReason),
    InternalError,
}

/// Runs the vCPU until the VM stops; reports why through `ctx.state`.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
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
    while !ctx.stop.load(Ordering::Acquire) {
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
                ctx.state.request_exit(emulation_failure(&mut vcpu, &ctx));
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
