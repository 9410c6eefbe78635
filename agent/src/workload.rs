//! Starting the workload, and reaping every process PID 1 inherits.

use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};

use kiln_protocol::ExitStatus;

use crate::image_config::Resolved;
use crate::user::Identity;

/// A started workload's pid and pipes.
pub struct Started {
    pub pid: i32,
    pub stdin: Option<ChildStdin>,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
}

/// Starts `r` as `id` in its own session (so signals reach its whole group).
pub fn spawn(r: &Resolved, id: &Identity, interactive: bool) -> std::io::Result<Started> {
    let mut cmd = Command::new(&r.argv[0]);
    cmd.args(&r.argv[1..])
        .env_clear()
        .envs(r.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&r.working_dir)
        .uid(id.uid)
        .gid(id.gid)
        .stdin(if interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    inherit_glibc_tunables(&mut cmd, r.env.iter().map(|(k, _)| k.as_str()));
    if !r.env.iter().any(|(k, _)| k == "HOME") {
        cmd.env("HOME", &id.home);
    }
    // SAFETY: setsid is async-signal-safe and touches no parent state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("workload pipes missing"));
    };
    Ok(Started {
        pid: child.id() as i32,
        stdin: child.stdin.take(),
        stdout,
        stderr,
    })
    // `child` is dropped without waiting: the reaper collects it.
}

/// Passes the agent's own `GLIBC_TUNABLES` (from the PVM host's guest command
/// line or PID 1's re-exec: it keeps glibc off AVX, whose register state the
/// guest kernel cannot preserve there) to a child whose environment does not
/// set it.
pub fn inherit_glibc_tunables<'a>(cmd: &mut Command, mut child_env: impl Iterator<Item = &'a str>) {
    if let Some(t) = std::env::var_os("GLIBC_TUNABLES") {
        if !child_env.any(|k| k == "GLIBC_TUNABLES") {
            cmd.env("GLIBC_TUNABLES", t);
        }
    }
}

/// Reaps every exited child; returns the status of `watched` if it was among them.
pub fn reap(watched: i32) -> Option<ExitStatus> {
    crate::reaper::reap_all(watched)
}

/// Sends `signal` to the workload's process group (its session).
pub fn signal_group(pid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid addresses the process group.
    unsafe { libc::kill(-pid, signal) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Identity {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Identity {
            uid,
            gid,
            home: "/".into(),
            name: "me".into(),
        }
    }

    fn resolved(script: &str) -> Resolved {
        Resolved {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("FOO".into(), "bar".into()),
            ],
            working_dir: "/tmp".into(),
            user: None,
        }
    }

    fn wait(pid: i32) -> ExitStatus {
        for _ in 0..500 {
            if let Some(s) = reap(pid) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("child {pid} did not exit");
    }

    #[test]
    fn runs_with_env_and_cwd_and_reports_code_and_signal() {
        use std::io::Read;
        let mut s = spawn(
            &resolved("echo $FOO $HOME; pwd; echo e >&2; exit 3"),
            &me(),
            false,
        )
        .unwrap();
        let mut out = String::new();
        s.stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        s.stderr.read_to_string(&mut err).unwrap();
        assert_eq!(out, "bar /\n/tmp\n");
        assert_eq!(err, "e\n");
        assert_eq!(wait(s.pid), ExitStatus::Code(3));

        let s = spawn(&resolved("sleep 30"), &me(), false).unwrap();
        signal_group(s.pid, libc::SIGTERM);
        assert_eq!(wait(s.pid), ExitStatus::Signal(libc::SIGTERM));
    }

    #[test]
    fn missing_program_is_an_error() {
        let mut r = resolved("");
        r.argv = vec!["/no/such/program".into()];
        assert!(spawn(&r, &me(), false).is_err());
    }
}
