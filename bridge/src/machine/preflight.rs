//! Checks made before a VM is launched, so that the common mistakes get a
//! one-line answer that says what to do instead of a VMM error.

use std::path::{Path, PathBuf};

use kiln_protocol::vmm::{KvmProblem, KVM_DEVICE as KVM};

use super::Spec;

/// Room the guest kernel needs besides the unpacked initramfs.
const KERNEL_HEADROOM_MIB: u64 = 48;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("kiln-vmm not found at {0}: run scripts/setup.sh")]
    VmmMissing(PathBuf),
    #[error("guest kernel missing at {0}: run scripts/setup.sh")]
    KernelMissing(PathBuf),
    #[error("initramfs missing at {0}")]
    InitrdMissing(PathBuf),
    #[error("disk image missing at {0}")]
    DriveMissing(PathBuf),
    #[error("{problem}: {advice}")]
    Kvm {
        problem: String,
        advice: &'static str,
    },
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("not enough memory: the VM needs {asked} MiB, the host has {available} MiB available; ask for less with --mem")]
    NotEnoughMemory { asked: u64, available: u64 },
    /// `field` is what the requester sets the memory with (`--mem`, a
    /// grant's `ram_mib`).
    #[error("{mem} MiB is too little for this image ({initrd} MiB initramfs): give the VM at least {needed} MiB with {field}")]
    TooSmall {
        mem: u64,
        initrd: u64,
        needed: u64,
        field: &'static str,
    },
}

/// Everything `spec` needs from the host, checked without side effects.
pub fn preflight(spec: &Spec) -> Result<(), PreflightError> {
    if !spec.vmm.is_file() {
        return Err(PreflightError::VmmMissing(spec.vmm.clone()));
    }
    if !spec.kernel.is_file() {
        return Err(PreflightError::KernelMissing(spec.kernel.clone()));
    }
    let initrd = std::fs::metadata(&spec.initrd)
        .map_err(|_| PreflightError::InitrdMissing(spec.initrd.clone()))?;
    if let Some(d) = spec.drives.iter().find(|d| !d.path.exists()) {
        return Err(PreflightError::DriveMissing(d.path.clone()));
    }
    check_kvm(Path::new(KVM))?;
    if spec.vcpus == 0 {
        return Err(PreflightError::NoVcpus);
    }
    check_memory(spec.mem_mib, initrd.len(), "--mem")?;
    if let Some(available) = available_mib() {
        if spec.mem_mib > available {
            return Err(PreflightError::NotEnoughMemory {
                asked: spec.mem_mib,
                available,
            });
        }
    }
    Ok(())
}

/// Whether `mem_mib` of guest memory holds an initramfs of `initrd_bytes`:
/// the kernel unpacks it into RAM next to its own copy (an uncompressed
/// archive is about its unpacked size), plus room for the kernel. Kept in
/// one place so `kiln run` and a grant refuse alike; `field` names the
/// setting to raise.
pub fn check_memory(
    mem_mib: u64,
    initrd_bytes: u64,
    field: &'static str,
) -> Result<(), PreflightError> {
    let initrd_mib = initrd_bytes.div_ceil(1 << 20);
    let needed = 2 * initrd_mib + KERNEL_HEADROOM_MIB;
    if mem_mib < needed {
        return Err(PreflightError::TooSmall {
            mem: mem_mib,
            initrd: initrd_mib,
            needed,
            field,
        });
    }
    Ok(())
}

fn check_kvm(path: &Path) -> Result<(), PreflightError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
    let Err(e) = opened else {
        return Ok(());
    };
    let problem = KvmProblem::from_io(e.kind());
    Err(PreflightError::Kvm {
        problem: match problem {
            KvmProblem::Missing => format!("{} does not exist", path.display()),
            KvmProblem::PermissionDenied => format!("no read-write access to {}", path.display()),
            KvmProblem::Other => format!("cannot open {}: {e}", path.display()),
        },
        advice: problem.advice(),
    })
}

/// MemAvailable from /proc/meminfo, in MiB.
fn available_mib() -> Option<u64> {
    meminfo_kib("MemAvailable").map(|kib| kib / 1024)
}

/// One field of /proc/meminfo (e.g. `MemTotal`), in KiB.
pub fn meminfo_kib(key: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// The number in a `Key:   1234 kB` line, as /proc/meminfo and
/// /proc/PID/status write them.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(dir: &Path) -> Spec {
        let touch = |name: &str, len: usize| {
            let p = dir.join(name);
            std::fs::write(&p, vec![0u8; len]).unwrap();
            p
        };
        Spec {
            vmm: touch("kiln-vmm", 1),
            kernel: touch("vmlinux", 1),
            initrd: touch("initrd", 10 << 20),
            vcpus: 1,
            mem_mib: 256,
            runtime_dir: dir.join("vms"),
            die_with_parent: true,
            boot_timeout: Duration::from_secs(1),
            metrics: None,
            drives: Vec::new(),
            kernel_args: Vec::new(),
            jail: true,
            cpu_millicores: None,
            restore: None,
            control_socket: false,
        }
    }

    #[test]
    fn names_what_is_missing_or_too_big() {
        let tmp = tempfile::tempdir().unwrap();
        let good = spec(tmp.path());
        let mut s = good.clone();
        s.kernel = tmp.path().join("nope");
        let e = preflight(&s).unwrap_err().to_string();
        assert!(
            e.contains("guest kernel missing") && e.contains("setup.sh"),
            "{e}"
        );
        let mut s = good.clone();
        s.vmm = tmp.path().join("nope");
        assert!(matches!(preflight(&s), Err(PreflightError::VmmMissing(_))));
        let mut s = good.clone();
        s.initrd = tmp.path().join("nope");
        assert!(matches!(
            preflight(&s),
            Err(PreflightError::InitrdMissing(_))
        ));
        if Path::new(KVM).exists() {
            let mut s = good.clone();
            s.mem_mib = 50;
            let e = preflight(&s).unwrap_err().to_string();
            assert!(e.contains("at least 68 MiB"), "{e}");
            let mut s = good.clone();
            s.mem_mib = 1 << 30;
            let e = preflight(&s).unwrap_err().to_string();
            assert!(e.starts_with("not enough memory"), "{e}");
            let mut s = good.clone();
            s.vcpus = 0;
            assert!(matches!(preflight(&s), Err(PreflightError::NoVcpus)));
            preflight(&good).unwrap();
        }
    }

    #[test]
    fn kvm_node_problems_say_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let e = check_kvm(&tmp.path().join("kvm")).unwrap_err().to_string();
        assert!(
            e.contains("does not exist") && e.contains("kvm_intel"),
            "{e}"
        );
    }

    #[test]
    fn reads_mem_available() {
        let info = "MemTotal: 100 kB\nMemAvailable:   20480 kB\n";
        assert_eq!(kib_field(info, "MemAvailable"), Some(20480));
        assert_eq!(kib_field(info, "MemTotal"), Some(100));
        assert_eq!(kib_field("MemTotal: 1 kB\n", "MemAvailable"), None);
    }
}
