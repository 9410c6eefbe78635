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
    /// Appended to the guest command line: [`pvm_cmdline`] on a PVM host.
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
                cmdline_extra: pvm_cmdline(PvmCmdline::Tuned),
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

/// How much of kiln's PVM command line to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvmCmdline {
    /// Only what a guest needs to boot at all on a PVM host (what another
    /// VMM, such as the benchmark's QEMU peer, needs too).
    BootOnly,
    /// Plus the settings that make emulated guest-kernel code faster:
    /// what kiln-vmm uses.
    Tuned,
}

/// Keeps glibc in the guest off AVX (the same setting as the agent's own
/// fallback in `agent/src/main.rs`).
const GLIBC_WITHOUT_AVX: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load";

/// The guest command-line arguments a PVM host needs, where the guest
/// kernel's code runs through KVM's instruction emulator.
pub fn pvm_cmdline(level: PvmCmdline) -> Vec<String> {
    // XSAVE, POPCNT and SMAP pass through CPUID whatever the VMM sets, so
    // the guest must be told not to use them.
    let mut clear = vec!["popcnt", "smap"];
    let mut args = vec![
        "noxsave",
        // Enables kiln's guest patch (INT3 self-test, FWAIT, SYSCALL).
        "kiln_pvm_quirks",
        // Emulated kernel code runs for tens of seconds without a quiescent
        // state, so RCU stalls are routine here. A stall that another CPU
        // reports makes it ask the stalled CPU for a backtrace by NMI, and
        // the NMI entry code (LSL) ends the VM in an emulation failure.
        "rcupdate.rcu_cpu_stall_suppress=1",
    ];
    if level == PvmCmdline::Tuned {
        // Each iteration of a REP string instruction is emulated on its own,
        // so byte-wise REP MOVSB/STOSB (ERMS, FSRM) is the slowest way to
        // copy or clear memory here. Without them the kernel clears pages
        // and copies user data eight bytes per iteration (REP STOSQ/MOVSQ):
        // unpacking the initramfs took a quarter less time, copying a file
        // in the guest half as long.
        clear.extend(["erms", "fsrm"]);
        // kiln's guest patch 0002: built-in modules' sysfs parameters are
        // added in one pass per module instead of rebuilding the group for
        // each one (quadratic): ~6 s of a ~40 s boot here.
        args.push("kiln_batch_sysfs");
        // Patch 0003: no /sys/kernel/slab, whose ~200 cache directories one
        // late initcall builds (~5 s of a ~36 s boot here); nothing in
        // kiln's guest reads it.
        args.push("kiln_no_slab_sysfs");
        // Patch 0004: no sealing of ~5,300 ENDBRs on a CPU without CET-IBT,
        // where it changes nothing (~4 % of a boot's emulated instructions).
        args.push("kiln_no_endbr_seal");
        // Patch 0005: the NOP padding of ~1,600 alternatives is merged
        // without running the instruction decoder where it cannot find a
        // NOP (~8 % of a boot's emulated instructions); same patched text.
        args.push("kiln_fast_nops");
        // Patch 0006: boot-time struct pages are written from one template
        // in the state the page allocator takes them in, instead of being
        // written and then walked twice more (~40 emulated instructions per
        // 4 KiB of guest RAM, ~21 % of a 256 MiB boot); same struct pages.
        args.push("kiln_fast_memmap");
        // Patch 0007: building the direct map, the e820 table is no longer
        // scanned three times for each unused page-table entry past the end
        // of RAM (~5 % of a boot); same page tables.
        args.push("kiln_fast_e820");
        // Patch 0008: uevents sent before init runs, when nothing can
        // receive them, keep their bookkeeping but build no environment
        // (~2 % of a boot).
        args.push("kiln_no_boot_uevents");
        // Patch 0009: the 2 MiB atom of the first per-CPU chunk is not
        // zeroed as a whole; one vCPU uses ~170 KiB of it (~3 % of a boot).
        args.push("kiln_percpu_raw");
        // Patch 0010: the eight initcall levels parse only the arguments
        // that name a kernel parameter, not the whole command line (~1 %).
        args.push("kiln_initcall_args");
        // Patch 0011: no /sys/kernel/irq, which nothing in the guest reads
        // (~2 % of a boot).
        args.push("kiln_no_irq_sysfs");
        // Patch 0012: sysctl registration compares names with strcmp()
        // instead of measuring each one it passes (~2 %); same tree.
        args.push("kiln_fast_sysctl");
        // Patch 0013: each initramfs symlink is created, chowned and given
        // its mtime through one path walk instead of four (~13 K emulated
        // instructions per symlink; a busybox image has hundreds), and the
        // whole pages of a large file's data, page-aligned by kiln's image
        // builder, go into the file as they are instead of being copied and
        // then freed (~5 K per 4 KiB); same tree, same contents.
        args.push("kiln_fast_cpio");
        // A guest with one CPU rewrites every LOCK prefix in kernel text
        // (~6,000 sites, each through a temporary mapping and TLB flush),
        // about a sixth of a boot's emulated instructions here; LOCK on one
        // CPU is merely redundant, so the kernel keeps it.
        args.push("noreplace-smp");
        // An unknown `NAME=value` argument becomes an environment variable
        // of init. With `noxsave` the guest kernel does not preserve YMM
        // registers, so glibc in the guest must not pick its AVX routines;
        // kiln's agent re-execs itself with this set when it is missing,
        // which costs ~1.5 s of emulated exec here.
        args.push(GLIBC_WITHOUT_AVX);
    }
    let clearcpuid = format!("clearcpuid={}", clear.join(","));
    // The kernel reads only the last clearcpuid=, so there is exactly one.
    std::iter::once(clearcpuid)
        .chain(args.into_iter().map(str::to_string))
        .collect()
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
        assert_eq!(p.cmdline_extra, pvm_cmdline(PvmCmdline::Tuned));
    }

    #[test]
    fn the_tuned_pvm_cmdline_extends_the_boot_only_one() {
        let boot = pvm_cmdline(PvmCmdline::BootOnly);
        let tuned = pvm_cmdline(PvmCmdline::Tuned);
        let clearcpuid = |v: &[String]| {
            let c: Vec<&String> = v.iter().filter(|a| a.starts_with("clearcpuid=")).collect();
            assert_eq!(c.len(), 1, "one clearcpuid= in {v:?}");
            c[0].clone()
        };
        assert_eq!(clearcpuid(&boot), "clearcpuid=popcnt,smap");
        assert_eq!(clearcpuid(&tuned), "clearcpuid=popcnt,smap,erms,fsrm");
        for arg in boot.iter().filter(|a| !a.starts_with("clearcpuid=")) {
            assert!(tuned.contains(arg), "{arg} missing from {tuned:?}");
        }
        for tuning_arg in [
            "kiln_batch_sysfs",
            "kiln_no_slab_sysfs",
            "kiln_no_endbr_seal",
            "kiln_fast_nops",
            "kiln_fast_memmap",
            "kiln_fast_e820",
            "kiln_no_boot_uevents",
            "kiln_percpu_raw",
            "kiln_initcall_args",
            "kiln_no_irq_sysfs",
            "kiln_fast_sysctl",
            "kiln_fast_cpio",
            "noreplace-smp",
        ] {
            assert!(tuned.iter().any(|a| a == tuning_arg));
            assert!(!boot.iter().any(|a| a == tuning_arg));
        }
        let tunables = tuned.iter().find_map(|a| a.strip_prefix("GLIBC_TUNABLES="));
        assert_eq!(
            tunables.map(|v| v.split(',').any(|f| f == "glibc.cpu.hwcaps=-AVX")),
            Some(true),
            "{tuned:?}"
        );
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
