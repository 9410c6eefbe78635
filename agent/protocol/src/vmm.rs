//! The contract between `kiln-vmm` and whoever launches it (`kiln run`,
//! `kiln-shim`): its exit statuses and the advice it gives when KVM cannot
//! be used. Kept here, free of KVM, so that launchers need not link the VMM.

/// Exit statuses of `kiln-vmm` (documented in `kiln-vmm --help`).
pub mod exit {
    /// The guest powered off or reset the VM.
    pub const GUEST_STOPPED: i32 = 0;
    /// The VMM itself failed (configuration, KVM).
    pub const VMM_ERROR: i32 = 1;
    pub const TRIPLE_FAULT: i32 = 2;
    pub const EMULATION_FAILURE: i32 = 3;
    pub const WATCHDOG: i32 = 4;
    /// The guest kernel reported a panic.
    pub const GUEST_PANIC: i32 = 5;
    /// The guest's init (the agent) reported a fatal error, then stopped the VM.
    pub const INIT_FAILED: i32 = 6;
    /// Plus the signal number, like a shell.
    pub const SIGNAL_BASE: i32 = 128;
    /// Stopped by SIGTERM: how a launcher's own stop ends the VMM.
    pub const STOPPED_BY_SIGTERM: i32 = SIGNAL_BASE + 15;
}

/// Where KVM's device node lives.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Why `/dev/kvm` could not be opened, as far as advice goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmProblem {
    /// The node does not exist: no KVM on this host.
    Missing,
    /// The node exists but this user may not open it read-write.
    PermissionDenied,
    /// Anything else.
    Other,
}

impl KvmProblem {
    /// From the error of a failed open of `/dev/kvm`.
    pub fn from_io(kind: std::io::ErrorKind) -> Self {
        match kind {
            std::io::ErrorKind::NotFound => KvmProblem::Missing,
            std::io::ErrorKind::PermissionDenied => KvmProblem::PermissionDenied,
            _ => KvmProblem::Other,
        }
    }

    /// What to do about it, in one clause.
    pub fn advice(self) -> &'static str {
        match self {
            KvmProblem::Missing => {
                "this host offers no KVM; enable hardware virtualization and load kvm_intel or kvm_amd"
            }
            KvmProblem::PermissionDenied => {
                "run as root, or add your user to the kvm group (the group that owns /dev/kvm) and log in again"
            }
            KvmProblem::Other => "check that the KVM modules are loaded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_to_advice() {
        let kind = |errno| std::io::Error::from_raw_os_error(errno).kind();
        // ENOENT, EACCES, EPERM.
        assert_eq!(KvmProblem::from_io(kind(2)), KvmProblem::Missing);
        assert_eq!(KvmProblem::from_io(kind(13)), KvmProblem::PermissionDenied);
        assert_eq!(KvmProblem::from_io(kind(1)), KvmProblem::PermissionDenied);
        assert!(KvmProblem::Missing.advice().contains("kvm_intel"));
        assert!(KvmProblem::PermissionDenied.advice().contains("kvm group"));
        assert_eq!(exit::STOPPED_BY_SIGTERM, 143);
    }
}
