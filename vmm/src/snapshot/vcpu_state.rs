//! One vCPU's architectural state, read from and written back to KVM.
//!
//! Written back in the order KVM requires: CPUID first (it decides which
//! MSRs and XSAVE features exist), MP state, registers, special registers
//! before the LAPIC (the APIC base MSR lives in sregs), FPU/XSAVE and XCRs,
//! debug registers, the LAPIC, MSRs after the LAPIC (TSC deadline), and the
//! pending events last (they may refer to all of the above).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot read {what} of vCPU {index}")]
    Get {
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore {what} of vCPU {index}")]
    Set {
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused MSR {msr:#x} of vCPU {index}")]
    Msr { index: u8, msr: u32 },
    #[error("vCPU {index}: the saved CPUID is not valid")]
    Cpuid { index: u8 },
}

/// Which optional parts of the state this host saves.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    /// XSAVE area and XCRs; off where the guest runs without XSAVE (as on
    /// a PVM host, `noxsave`): the legacy FPU area then holds everything.
    pub xsave: bool,
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID entries as (function, index, flags, eax, ebx, ecx, edx).
    pub cpuid: Vec<[u32; 7]>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    #[serde(with = "super::pod")]
    pub fpu: kvm_fpu,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR KVM would save.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency; `None` where KVM does not report it.
    pub tsc_khz: Option<u32>,
}

/// Reads MSRs in `list` that KVM can read; an index KVM refuses is left out
/// (KVM_GET_MSRS stops at the first one it cannot read).
fn read_msrs(vcpu: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    let mut skipped = Vec::new();
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msr {
            index,
            msr: chunk[0],
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Get {
                what: "MSRs",
                index,
                source,
            })?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            skipped.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    if !skipped.is_empty() {
        tracing::debug!("vCPU {index}: MSRs KVM listed but cannot read: {skipped:x?}");
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN; `msr_list` is what
    /// KVM_GET_MSR_INDEX_LIST reported.
    pub fn save(
        vcpu: &VcpuFd,
        index: u8,
        msr_list: &[u32],
        parts: Parts,
    ) -> Result<Self, VcpuStateError> {
        let get = |what| {
            move |source| VcpuStateError::Get {
                what,
                index,
                source,
            }
        };
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(get("CPUID"))?
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        let (xsave, xcrs) = if parts.xsave {
            (
                Some(vcpu.get_xsave().map_err(get("XSAVE area"))?),
                Some(vcpu.get_xcrs().map_err(get("XCRs"))?),
            )
        } else {
            (None, None)
        };
        Ok(VcpuState {
            cpuid,
            mp_state: vcpu.get_mp_state().map_err(get("MP state"))?,
            regs: vcpu.get_regs().map_err(get("registers"))?,
            sregs: vcpu.get_sregs().map_err(get("special registers"))?,
            fpu: vcpu.get_fpu().map_err(get("FPU"))?,
            xsave,
            xcrs,
            debug_regs: vcpu.get_debug_regs().map_err(get("debug registers"))?,
            lapic: vcpu.get_lapic().map_err(get("LAPIC"))?,
            msrs: read_msrs(vcpu, index, msr_list)?,
            events: vcpu.get_vcpu_events().map_err(get("vCPU events"))?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Writes the state back, in the order KVM requires (module doc).
    pub fn restore(&self, vcpu: &VcpuFd, index: u8) -> Result<(), VcpuStateError> {
        let set = |what| {
            move |source| VcpuStateError::Set {
                what,
                index,
                source,
            }
        };
        if let Some(khz) = self.tsc_khz {
            // Only a different frequency needs setting; most hosts (PVM
            // here) cannot scale the TSC at all.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(set("TSC frequency"))?;
            }
        }
        let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = self
            .cpuid
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e[0],
                index: e[1],
                flags: e[2],
                eax: e[3],
                ebx: e[4],
                ecx: e[5],
                edx: e[6],
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuStateError::Cpuid { index })?;
        vcpu.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        vcpu.set_mp_state(self.mp_state).map_err(set("MP state"))?;
        vcpu.set_regs(&self.regs).map_err(set("registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(set("special registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(set("FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: the area was read by KVM_GET_XSAVE on this VMM's
            // KVM; its size is the fixed legacy 4 KiB of kvm_xsave.
            unsafe { vcpu.set_xsave(xsave) }.map_err(set("XSAVE area"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(set("XCRs"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(set("debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(set("LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(i, data)| kvm_msr_entry {
                index: i,
                data,
                ..Default::default()
            })
            .collect();
        for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::Msr {
                index,
                msr: chunk[0].index,
            })?;
            let n = vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
            if n < chunk.len() {
                return Err(VcpuStateError::Msr {
                    index,
                    msr: chunk[n].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(set("vCPU events"))?;
        Ok(())
    }
}
