//! The fork into the jail: the child (PID 1 of a new PID namespace) drops
//! everything and becomes the VMM; the parent forwards stop signals to it
//! and ends with its status.

use std::path::PathBuf;

use super::cgroup::Cgroup;
use super::{held, mounts, Access, Exposed, JailError, UidLease, RLIMIT_NOFILE};

/// Which side of the fork this process is.
#[derive(Debug)]
pub enum Role {
    /// The jailed child: build and run the VM.
    Vmm,
    /// The host-side parent, after the child ended: exit with this status.
    Supervisor(i32),
}

/// What the child needs to jail itself.
pub(super) struct ChildPlan {
    pub root: PathBuf,
    pub exposed: Vec<Exposed>,
    pub uid: u32,
    pub rlimit_fsize: u64,
    pub cgroup: Cgroup,
    /// The virtio-net card's TAP, opened in the host's network namespace.
    pub tap: Option<String>,
}

/// Signals the supervisor passes on to the VMM.
const FORWARDED: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

pub(super) fn fork_jailed(plan: &ChildPlan, lease: UidLease) -> Result<Role, JailError> {
    // SIGCHLD joins the (already blocked) stop signals: the parent takes
    // them all with sigwaitinfo, so none is lost between checks.
    let mut set = sigset(&FORWARDED);
    // SAFETY: sigset manipulation on a local; sigprocmask of this thread.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // The parent moves the child into its cgroup while the child builds
    // its jail (a migration waits for an RCU grace period: milliseconds),
    // and says over this pipe when it is done.
    let mut joined = [0; 2];
    // SAFETY: pipe2 fills the two descriptors.
    if unsafe { libc::pipe2(joined.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("create a pipe"));
    }
    // The supervisor holds the write end for its whole life: the jailed
    // VMM ends when it hangs up (see `watch_supervisor`).
    let mut life = [0; 2];
    // SAFETY: pipe2 fills the two descriptors.
    if unsafe { libc::pipe2(life.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("create a pipe"));
    }
    // SAFETY: unshare has no memory effects; the new PID namespace applies
    // to the children of this process only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(JailError::last_os("create a PID namespace"));
    }
    // SAFETY: the process is single-threaded (see `enter`), so the child
    // may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::last_os("fork the jailed VMM"));
    }
    if pid == 0 {
        drop(lease); // the parent's copy of the lock holds the uid
        let mut only_chld = sigset(&[]);
        // SAFETY: as above.
        unsafe {
            libc::sigaddset(&mut only_chld, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &only_chld, std::ptr::null_mut());
        }
        // SAFETY: closing the parent's ends in the child.
        unsafe {
            libc::close(joined[1]);
            libc::close(life[1]);
        }
        if let Err(e) = jail_child(plan, joined[0], life[0]) {
            eprintln!("kiln-vmm: error: cannot enter the jail: {e}");
            if let Some(source) = std::error::Error::source(&e) {
                eprintln!("kiln-vmm: caused by: {source}");
            }
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(crate::exit::code::VMM_ERROR) };
        }
        return Ok(Role::Vmm);
    }
    // SAFETY: the child's ends are the child's.
    unsafe {
        libc::close(joined[0]);
        libc::close(life[0]);
    }
    let added = plan.cgroup.add(pid);
    // One byte: the child may go on; none (the pipe closes): it stops.
    if added.is_ok() {
        // SAFETY: a one-byte write from a local buffer.
        unsafe { libc::write(joined[1], [1u8].as_ptr().cast(), 1) };
    }
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(joined[1]) };
    let status = supervise(pid, &set);
    // SAFETY: our own descriptor, closed once, after the child has ended.
    unsafe { libc::close(life[1]) };
    drop(lease);
    added?;
    Ok(Role::Supervisor(status))
}

/// Forwards stop signals to `child` until it exits; its exit status, or
/// 128 + the signal that killed it.
fn supervise(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid output buffer.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `info` are valid for the call.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            return libc::WEXITSTATUS(status);
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let why = if sig == libc::SIGSYS {
                " (a seccomp filter refused a system call; --seccomp log names it)"
            } else {
                ""
            };
            eprintln!("kiln-vmm: the jailed VMM was killed by signal {sig}{why}");
            return 128 + sig;
        }
    }
}

/// In the child: namespaces, root, limits, then the unprivileged uid.
fn jail_child(plan: &ChildPlan, joined: libc::c_int, life: libc::c_int) -> Result<(), JailError> {
    // SAFETY: prctl with constant arguments. The child dies with its
    // supervisor while it builds the jail; the uid change below clears
    // this, and `watch_supervisor` takes over.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(JailError::last_os("watch the supervisor"));
    }
    // Not reachable by a bind mount from the new mount namespace: held.
    for e in plan.exposed.iter().filter(|e| e.held_from_host()) {
        let writable = e.access != Access::ReadOnly;
        held::hold(&e.path, &e.inside, writable).map_err(|source| JailError::Prepare {
            what: "a file reached through /proc",
            path: e.path.clone(),
            source,
        })?;
    }
    // The new network namespace is empty: the TAP is attached here.
    if let Some(name) = &plan.tap {
        held::hold_tap(name)?;
    }
    // SAFETY: unshare has no memory effects.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) } != 0 {
        return Err(JailError::last_os("create mount and network namespaces"));
    }
    mounts::enter_root(&plan.root, &plan.exposed, plan.uid)?;
    set_rlimit(libc::RLIMIT_NOFILE, RLIMIT_NOFILE)?;
    set_rlimit(libc::RLIMIT_FSIZE, plan.rlimit_fsize)?;
    let mut byte = [0u8; 1];
    // SAFETY: a one-byte read into a local buffer.
    if unsafe { libc::read(joined, byte.as_mut_ptr().cast(), 1) } != 1 {
        return Err(JailError::last_os("join the VM's cgroup"));
    }
    let mut keep = held::fds();
    keep.push(life);
    close_other_fds(&keep)?;
    // Opened as root, inside the new root, so the VMM's uid needs no read
    // right on the operator's files.
    let read_only = plan
        .exposed
        .iter()
        .filter(|e| e.access == Access::ReadOnly && !e.held_from_host());
    for e in read_only {
        held::hold(&e.inside, &e.inside, false).map_err(|source| JailError::Prepare {
            what: "a file the VM reads",
            path: e.inside.clone(),
            source,
        })?;
    }
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        std::env::remove_var(k);
    }
    let id = plan.uid;
    // SAFETY: plain credential calls; from root to an unprivileged uid,
    // which also clears every capability.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::last_os("drop supplementary groups"));
        }
        if libc::setresgid(id, id, id) != 0 {
            return Err(JailError::last_os("set the jail gid"));
        }
        if libc::setresuid(id, id, id) != 0 {
            return Err(JailError::last_os("set the jail uid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(JailError::last_os("set no_new_privs"));
        }
    }
    watch_supervisor(life)?;
    Ok(())
}

/// Ends the VMM as soon as its supervisor is gone: a VMM that outlived a
/// killed supervisor would run on as a uid (and in a cgroup) leased again
/// to the next VM. The parent-death signal set at the fork does not do
/// it: the uid change clears it (prctl(2)), and a killed supervisor left
/// its VMM running. A thread without filters (it starts before any are
/// installed) waits for the supervisor's end of `life` to close.
fn watch_supervisor(life: libc::c_int) -> Result<(), JailError> {
    let watch = move || {
        let mut poll = libc::pollfd {
            fd: life,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd on a descriptor this thread owns.
            let rc = unsafe { libc::poll(&mut poll, 1, -1) };
            if rc > 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                break;
            }
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        // SAFETY: ends every thread of the VMM at once, no destructors run.
        unsafe { libc::_exit(crate::exit::code::VMM_ERROR) };
    };
    std::thread::Builder::new()
        .name("kiln-supervised".into())
        .spawn(watch)
        .map(drop)
        .map_err(JailError::sys("watch the supervisor"))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(JailError::last_os("set a resource limit"));
    }
    Ok(())
}

/// Closes every descriptor above stderr but `keep` (the files the jail
/// holds for the VMM): the VMM opens what else it needs itself.
fn close_other_fds(keep: &[i32]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().filter(|&fd| fd >= 3) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd + 1;
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<(), JailError> {
    // SAFETY: close_range on descriptors this process no longer uses.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc != 0 {
        return Err(JailError::last_os("close inherited descriptors"));
    }
    Ok(())
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}
