//! seccomp filters, one per kind of kiln-vmm thread, each allowing only the
//! system calls that thread makes once the guest runs (ioctls by number).
//! Anything else kills the process (or, with `--seccomp log`, is logged by
//! the kernel and allowed, to find a missing rule).
//!
//! A thread installs its filter itself, before it handles anything the
//! guest controls: a vCPU thread before its first KVM_RUN, the main thread
//! (the event loop that runs the devices) once it has started the vCPUs.
//! A new kind of thread gets a [`ThreadKind`] and a rule list here.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// What a filter does with a system call it has no rule for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// Kill the VMM (SIGSYS).
    #[default]
    Kill,
    /// Allow it and have the kernel log it (audit / kernel log).
    Log,
    /// No filters at all.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Self, SeccompError> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(SeccompError::Mode(s.to_string())),
        }
    }
}

/// The kinds of thread kiln-vmm runs once the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, device emulation, vsock connections,
    /// signals, metrics and shutdown.
    Main,
    /// A vCPU: KVM_RUN and the port and MMIO accesses it hands to devices.
    Vcpu,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("invalid --seccomp {0:?} (kill, log or off)")]
    Mode(String),
    #[error("cannot build the seccomp filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[from] seccompiler::Error),
}

/// The compiled filter for `kind`, or None with [`SeccompMode::Off`].
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = match kind {
        ThreadKind::Main => main_rules()?,
        ThreadKind::Vcpu => vcpu_rules()?,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(Some(filter.try_into()?))
}

/// Installs `program` on the calling thread (and threads it starts later).
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program)?;
    Ok(())
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every thread needs to live and die: memory, locks, signals, time,
/// its own exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Closing descriptors (std checks one is open with F_GETFD first).
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_write,
    libc::SYS_writev,
];

fn vcpu_rules() -> Result<Rules, SeccompError> {
    let mut rules = allow(COMMON);
    // Eventfd reads for a device's interrupt acknowledgement.
    rules.insert(libc::SYS_read, Vec::new());
    let mut requests = vec![kvm_ioctl(_IOC_NONE, 0x80, 0), KVM_GET_REGS, KVM_TRANSLATE];
    requests.extend_from_slice(&VCPU_SNAPSHOT);
    rules.insert(libc::SYS_ioctl, ioctls(&requests)?);
    Ok(rules)
}

/// What a paused vCPU thread reads for a snapshot (`snapshot::vcpu_state`).
const VCPU_SNAPSHOT: [u64; 12] = [
    kvm_ioctl(
        _IOC_READ | _IOC_WRITE,
        0x91,
        size_of::<kvm_bindings::kvm_cpuid2>(),
    ),
    kvm_ioctl(_IOC_READ, 0x98, size_of::<kvm_bindings::kvm_mp_state>()),
    kvm_ioctl(_IOC_READ, 0x83, size_of::<kvm_bindings::kvm_sregs>()),
    kvm_ioctl(_IOC_READ, 0x8c, size_of::<kvm_bindings::kvm_fpu>()),
    kvm_ioctl(_IOC_READ, 0xa4, size_of::<kvm_bindings::kvm_xsave>()),
    kvm_ioctl(_IOC_READ, 0xcf, size_of::<kvm_bindings::kvm_xsave>()),
    kvm_ioctl(_IOC_READ, 0xa6, size_of::<kvm_bindings::kvm_xcrs>()),
    kvm_ioctl(_IOC_READ, 0xa1, size_of::<kvm_bindings::kvm_debugregs>()),
    kvm_ioctl(_IOC_READ, 0x8e, size_of::<kvm_bindings::kvm_lapic_state>()),
    kvm_ioctl(
        _IOC_READ | _IOC_WRITE,
        0x88,
        size_of::<kvm_bindings::kvm_msrs>(),
    ),
    kvm_ioctl(_IOC_READ, 0x9f, size_of::<kvm_bindings::kvm_vcpu_events>()),
    kvm_ioctl(_IOC_NONE, 0xa3, 0),
];

/// What the main thread asks KVM for a snapshot (`Vm::snapshot`).
const VM_SNAPSHOT: [u64; 5] = [
    kvm_ioctl(
        _IOC_READ | _IOC_WRITE,
        0x02,
        size_of::<kvm_bindings::kvm_msr_list>(),
    ),
    kvm_ioctl(_IOC_NONE, 0x03, 0),
    kvm_ioctl(_IOC_READ, 0x9f, size_of::<kvm_bindings::kvm_pit_state2>()),
    kvm_ioctl(
        _IOC_READ | _IOC_WRITE,
        0x62,
        size_of::<kvm_bindings::kvm_irqchip>(),
    ),
    kvm_ioctl(_IOC_READ, 0x7c, size_of::<kvm_bindings::kvm_clock_data>()),
];

fn main_rules() -> Result<Rules, SeccompError> {
    let mut rules = allow(COMMON);
    rules.extend(allow(&[
        // The event loop and the signalfd.
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        // virtio-net's rate limiters arm their timers.
        libc::SYS_timerfd_settime,
        libc::SYS_read,
        libc::SYS_readv,
        // virtio-blk: the drives' data and flushes.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_lseek,
        // vsock: the host's connections over Unix sockets.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        // Stopping the vCPUs: a signal kicks each out of KVM_RUN.
        libc::SYS_tgkill,
        // Metrics at the end, and the files the VM made.
        libc::SYS_getrusage,
        libc::SYS_openat,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // The control socket (--api-sock) and the snapshots it writes.
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
    ]));
    // Only Unix sockets: connecting to the host's listeners.
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    // virtio-net: the offloads the guest's driver accepted, for its TAP
    // (frames are read and written with read and write).
    let mut requests = vec![libc::FIONBIO, libc::TUNSETOFFLOAD];
    requests.extend_from_slice(&VM_SNAPSHOT);
    rules.insert(libc::SYS_ioctl, ioctls(&requests)?);
    Ok(rules)
}

/// KVMIO, the KVM ioctls' type.
const KVMIO: u32 = 0xAE;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`: a vCPU's registers, read once
/// when KVM cannot emulate an instruction.
const KVM_GET_REGS: u64 = kvm_ioctl(
    _IOC_READ,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>(),
);
/// `_IOWR(KVMIO, 0x85, struct kvm_translation)`: to read that instruction.
const KVM_TRANSLATE: u64 = kvm_ioctl(
    _IOC_READ | _IOC_WRITE,
    0x85,
    std::mem::size_of::<kvm_bindings::kvm_translation>(),
);

const fn kvm_ioctl(dir: u32, nr: u32, size: usize) -> u64 {
    ioctl_expr(dir, KVMIO, nr, size as u32) as u64
}

fn allow(calls: &[i64]) -> Rules {
    calls.iter().map(|c| (*c, Vec::new())).collect()
}

/// One rule per allowed request number (ioctl's second argument).
fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|r| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *r)?;
            Ok(SeccompRule::new(vec![cond])?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with `kind`'s filter installed; returns
    /// the signal that ended the child, or None if it exited.
    fn in_filtered_child(kind: ThreadKind, f: fn()) -> Option<i32> {
        let Ok(Some(prog)) = program(kind, SeccompMode::Kill) else {
            panic!("no filter");
        };
        // SAFETY: the child only installs the filter, calls `f` and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: prctl with constants; the filter needs no_new_privs
            // when the test does not run as root.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if install(&prog).is_err() {
                unsafe { libc::_exit(3) };
            }
            f();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFSIGNALED(status) {
            Some(libc::WTERMSIG(status))
        } else {
            assert_eq!(libc::WEXITSTATUS(status), 0, "child failed to run");
            None
        }
    }

    fn allowed_calls() {
        // SAFETY: harmless calls, checked to pass the filters.
        unsafe {
            libc::getpid();
            libc::sched_yield();
        }
    }

    fn open_a_file() {
        // SAFETY: a plain open(2) of a constant path; the filter refuses it.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/hostname".as_ptr(),
                0,
            )
        };
    }

    fn start_a_process() {
        // SAFETY: the filter ends the process at the call.
        unsafe { libc::syscall(libc::SYS_fork) };
    }

    fn open_a_tcp_socket() {
        // SAFETY: as above.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn create_a_vm() {
        // KVM_CREATE_VM on stdin: refused by number before the kernel looks.
        // SAFETY: the filter ends the process at the call.
        unsafe { libc::ioctl(0, kvm_ioctl(_IOC_NONE, 0x01, 0) as libc::c_ulong, 0) };
    }

    #[test]
    fn allowed_calls_pass_each_filter() {
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, allowed_calls), None);
        assert_eq!(in_filtered_child(ThreadKind::Main, allowed_calls), None);
    }

    #[test]
    fn a_vcpu_thread_may_not_open_files_fork_or_create_vms() {
        for f in [open_a_file, start_a_process, create_a_vm] {
            assert_eq!(in_filtered_child(ThreadKind::Vcpu, f), Some(libc::SIGSYS));
        }
    }

    #[test]
    fn the_main_thread_may_not_fork_open_inet_sockets_or_create_vms() {
        for f in [start_a_process, open_a_tcp_socket, create_a_vm] {
            assert_eq!(in_filtered_child(ThreadKind::Main, f), Some(libc::SIGSYS));
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert!("loud".parse::<SeccompMode>().is_err());
        assert!(program(ThreadKind::Main, SeccompMode::Off)
            .unwrap()
            .is_none());
    }
}
