//! The shim's seccomp filter, installed on all its threads once its VM is
//! running: from then on the shim forwards SSH and published ports, reads
//! the agent's frames and writes state, and never again needs what this
//! list refuses. Each call on it fails with EPERM (a refusal, not a kill:
//! a grant must not die for a call the shim was never meant to make).
//!
//! A deny list rather than kiln-vmm's allow lists: the shim's own calls
//! (threads, sockets, files, signals, waits) are many and ordinary, and
//! not worth pinning one by one; what matters is that a shim taken over
//! through something the guest sent cannot start programs, change mounts
//! or namespaces, load kernel code or reach into other processes. The
//! filter cannot go on before the VMM starts: filters survive execve, and
//! kiln-vmm needs mounts, namespaces and setresuid for its jail.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum ShimFilterError {
    #[error("cannot build the shim's seccomp filter")]
    Build(#[source] seccompiler::Error),
    #[error("cannot install the shim's seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// What the shim never does once its VM runs.
const DENIED: &[i64] = &[
    // Starting programs.
    libc::SYS_execve,
    libc::SYS_execveat,
    // Mounts, roots and namespaces.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // Kernel code, keys and tracing.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    // Files by handle (past any mount's view).
    libc::SYS_open_by_handle_at,
    // The host's clock, name, swap and power.
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];

fn program() -> Result<BpfProgram, ShimFilterError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|&call| (call, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| ShimFilterError::Build(e.into()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| ShimFilterError::Build(e.into()))
}

/// Installs the filter on every thread of this process (and so on any
/// it starts later).
pub fn install() -> Result<(), ShimFilterError> {
    let program = program()?;
    seccompiler::apply_filter_all_threads(&program).map_err(ShimFilterError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child with the filter on: each call that must be
    /// refused fails with EPERM, and ordinary calls still work. The exit
    /// code says which check failed.
    #[test]
    fn refused_calls_fail_with_eperm_and_others_work() {
        // Built before the fork: the child only installs and calls.
        let program = program().unwrap();
        // SAFETY: the child makes raw system calls only and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                if seccompiler::apply_filter_all_threads(&program).is_err() {
                    return 10;
                }
                let refused = |r: libc::c_long| {
                    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                };
                // SAFETY: each call is refused by the filter before it acts;
                // the pointers are valid NUL-terminated strings or null.
                unsafe {
                    if !refused(libc::syscall(libc::SYS_unshare, 0)) {
                        return 11;
                    }
                    let path = c"/bin/true".as_ptr();
                    let argv = [path, std::ptr::null()];
                    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                    if !refused(libc::syscall(
                        libc::SYS_execve,
                        path,
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )) {
                        return 12;
                    }
                    if !refused(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0)) {
                        return 13;
                    }
                    if libc::getpid() <= 0 || libc::syscall(libc::SYS_getppid) <= 0 {
                        return 14;
                    }
                }
                0
            })();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check failed in the child");
    }
}
