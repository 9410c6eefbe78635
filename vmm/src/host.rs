//! Which kind of KVM host this is, and what the guest needs because of it.
//!
//! Chosen by detection, never by a flag: on a PVM host (the `kvm_pvm`
//! module, which runs guest kernel code through KVM's instruction emulator)
//! kiln masks CPU features the emulator cannot handle and adds guest
//! command-line workarounds. On a VMX/SVM host nothing is changed.

use std::path::Path;

use serde::Serialize;

/// How this host provides KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Virtualization {
    /// Pagetable-based virtualization (`kvm_pvm`): guest kernel code is emulated.
    Pvm,
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// KVM works but the flavour is not recognised.
    Unknown,
}

/// Host-specific adjustments applied to every guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostProfile {
    pub virtualization: Virtualization,
    /// Clear CPUID.1:ECX.CX16 (the emulator lacks CMPXCHG16B).
    pub mask_cx16: bool,
    /// Clear the KVM PV features that issue hypercalls (they never return on PVM).
    pub mask_pv_hypercalls: bool,
    /// Appended to the guest command line.
    pub cmdline_extra: Vec<String>,
}

impl HostProfile {
    /// Detects the profile of this host.
    pub fn detect() -> Self {
        Self::for_virtualization(detect_virtualization(Path::new("/")))
    }

    pub fn for_virtualization(virtualization: Virtualization) -> Self {
        match virtualization {
            Virtualization::Pvm => HostProfile {
                virtualization,
                mask_cx16: true,
                mask_pv_hypercalls: true,
                cmdline_extra: [
                    // XSAVE, POPCNT and SMAP pass through CPUID whatever the VMM
                    // sets, so the guest must be told not to use them.
                    "noxsave",
                    "clearcpuid=popcnt,smap",
                    // Enables kiln's guest patch (INT3 self-test, FWAIT, SYSCALL).
                    "kiln_pvm_quirks",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            },
            _ => HostProfile {
                virtualization,
                mask_cx16: false,
                mask_pv_hypercalls: false,
                cmdline_extra: Vec::new(),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self.virtualization {
            Virtualization::Pvm => "pvm",
            Virtualization::Vmx => "vmx",
            Virtualization::Svm => "svm",
            Virtualization::Unknown => "unknown",
        }
    }
}

/// Reads `/sys/module` and `/proc/cpuinfo` under `root` (a test can point it elsewhere).
pub fn detect_virtualization(root: &Path) -> Virtualization {
    let module = |name: &str| root.join("sys/module").join(name).exists();
    if module("kvm_pvm") {
        return Virtualization::Pvm;
    }
    if module("kvm_intel") {
        return Virtualization::Vmx;
    }
    if module("kvm_amd") {
        return Virtualization::Svm;
    }
    let flags = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let has_flag = |f: &str| {
        flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == f))
    };
    if has_flag("vmx") {
        Virtualization::Vmx
    } else if has_flag("svm") {
        Virtualization::Svm
    } else {
        Virtualization::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_selects_the_pvm_profile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_pvm")).unwrap();
        assert_eq!(detect_virtualization(dir.path()), Virtualization::Pvm);
        let p = HostProfile::for_virtualization(Virtualization::Pvm);
        assert!(p.mask_cx16 && p.mask_pv_hypercalls);
        assert!(p.cmdline_extra.iter().any(|a| a == "kiln_pvm_quirks"));
    }

    #[test]
    fn hardware_hosts_get_no_workarounds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_intel")).unwrap();
        assert_eq!(detect_virtualization(dir.path()), Virtualization::Vmx);
        let p = HostProfile::for_virtualization(Virtualization::Vmx);
        assert!(!p.mask_cx16 && !p.mask_pv_hypercalls && p.cmdline_extra.is_empty());
    }

    #[test]
    fn cpuinfo_flags_are_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(dir.path().join("proc/cpuinfo"), "flags\t\t: fpu svm sse\n").unwrap();
        assert_eq!(detect_virtualization(dir.path()), Virtualization::Svm);
    }
}
