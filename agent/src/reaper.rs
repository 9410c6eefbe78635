//! One owner for `waitpid`. As PID 1 the agent reaps every process with
//! `waitpid(-1)`, which would steal the exit status of children that other
//! parts of the agent (SSH sessions) started and wait for. Children started
//! through [`spawn`] are tracked: whoever reaps them records the status here,
//! and [`try_wait`] hands it to the owner.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};

use kiln_protocol::ExitStatus;

/// Tracked pids, with their status once reaped.
static TRACKED: Mutex<Option<HashMap<i32, Option<ExitStatus>>>> = Mutex::new(None);

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
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return found;
        }
        let status = decode(status);
        if pid == watched {
            found = Some(status);
        } else if let Some(slot) = guard.as_mut().and_then(|t| t.get_mut(&pid)) {
            *slot = Some(status);
        }
    }
}

/// The status of tracked child `pid` once it has exited (then forgotten).
pub fn try_wait(pid: i32) -> Option<ExitStatus> {
    let mut guard = tracked();
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
