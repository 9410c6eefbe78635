//! One owner for `waitpid`. As PID 1 the agent reaps every process with
//! `waitpid(-1)`, which would steal the exit status of children that other
//! parts of the agent (SSH sessions) started and wait for. Children started
//! through [`spawn`] are tracked: whoever reaps them records the status here,
//! and [`try_wait`] / [`wait`] hand it to the owner.
//!
//! Nothing here polls on a timer when it can block instead: on hosts that
//! emulate the guest kernel every wake-up is expensive, and a few threads
//! waking every 10-20 ms slowed everything else in the guest down.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kiln_protocol::ExitStatus;

/// Tracked pids, with their status once reaped.
static TRACKED: Mutex<Option<HashMap<i32, Option<ExitStatus>>>> = Mutex::new(None);
/// Signalled whenever `reap_all` records a tracked child's status.
static REAPED: Condvar = Condvar::new();
/// How often a waiter looks for itself when no one signals: a process that
/// is not PID 1 may have no thread running `reap_all`.
const SELF_CHECK: Duration = Duration::from_millis(50);

fn tracked() -> MutexGuard<'static, Option<HashMap<i32, Option<ExitStatus>>>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

fn decode(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

/// Spawns `cmd` as a tracked child. The lock is held across the spawn so no
/// `waitpid(-1)` runs meanwhile: std reaps a child whose exec failed itself
/// and must find it still there, and the pid must be tracked before anyone
/// can reap it.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut guard = tracked();
    let child = cmd.spawn()?;
    guard
        .get_or_insert_with(HashMap::new)
        .insert(child.id() as i32, None);
    Ok(child)
}

/// Runs `f` while no child can be spawned or reaped (e.g. to create file
/// descriptors that must not leak into a concurrently forked child).
pub fn exclusive<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tracked();
    f()
}

/// Reaps every exited child; returns the status of `watched` if it was
/// among them and records those of tracked children.
pub fn reap_all(watched: i32) -> Option<ExitStatus> {
    let mut guard = tracked();
    let mut found = None;
    let mut recorded = false;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            if recorded {
                REAPED.notify_all();
            }
            return found;
        }
        let status = decode(status);
        if pid == watched {
            found = Some(status);
        } else if let Some(slot) = guard.as_mut().and_then(|t| t.get_mut(&pid)) {
            *slot = Some(status);
            recorded = true;
        }
    }
}

/// Blocks until `watched` has exited and returns its status, reaping every
/// other child that exits meanwhile (PID 1's duty). It sleeps in
/// `waitid(WNOWAIT)` until some child can be reaped, without reaping it,
/// so `spawn`'s guarantee holds: reaping happens under the lock.
pub fn reap_until(watched: i32) -> ExitStatus {
    loop {
        if let Some(status) = reap_all(watched) {
            return status;
        }
        // SAFETY: waitid with a zeroed out-struct; WNOWAIT leaves the child
        // to `reap_all`.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if rc != 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // No children at all: someone else reaped `watched`. Report
                // it gone rather than wait forever, as `try_wait` does.
                Some(libc::ECHILD) => return reap_all(watched).unwrap_or(ExitStatus::Code(255)),
                _ => std::thread::sleep(SELF_CHECK),
            }
        }
    }
}

/// The status of tracked child `pid` once it has exited (then forgotten).
pub fn try_wait(pid: i32) -> Option<ExitStatus> {
    let mut guard = tracked();
    take_status(&mut guard, pid)
}

/// Blocks until tracked child `pid` has exited and returns its status.
/// Woken by `reap_all` when another thread reaps it; checks for itself
/// every `SELF_CHECK` in case none does.
pub fn wait(pid: i32) -> ExitStatus {
    let mut guard = tracked();
    loop {
        if let Some(status) = take_status(&mut guard, pid) {
            return status;
        }
        guard = REAPED
            .wait_timeout(guard, SELF_CHECK)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

fn take_status(
    guard: &mut MutexGuard<'static, Option<HashMap<i32, Option<ExitStatus>>>>,
    pid: i32,
) -> Option<ExitStatus> {
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(Some(status)) = map.get(&pid) {
        let status = *status;
        map.remove(&pid);
        return Some(status);
    }
    let mut status = 0;
    // SAFETY: waitpid on one pid with a valid out-pointer.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if reaped == pid {
        map.remove(&pid);
        return Some(decode(status));
    }
    if reaped < 0 && !map.contains_key(&pid) {
        // Not ours and not a child: report it gone rather than wait forever.
        return Some(ExitStatus::Code(255));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wait(pid: i32) -> ExitStatus {
        for _ in 0..500 {
            if let Some(s) = try_wait(pid) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("child {pid} did not exit");
    }

    #[test]
    fn tracked_status_survives_a_global_reap() {
        let pid = spawn(Command::new("/bin/sh").args(["-c", "exit 5"]))
            .unwrap()
            .id() as i32;
        // Let it exit, then reap everything as PID 1's loop does.
        std::thread::sleep(Duration::from_millis(200));
        let _ = reap_all(0);
        assert_eq!(wait(pid), ExitStatus::Code(5));

        let pid = spawn(Command::new("/bin/sh").args(["-c", "kill -9 $$"]))
            .unwrap()
            .id() as i32;
        assert_eq!(wait(pid), ExitStatus::Signal(9));
    }

    #[test]
    fn a_failed_exec_is_an_error_not_a_panic() {
        let e = spawn(&mut Command::new("/no/such/shell")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
