//! Starting a session's program as the logged-in user with a login-like
//! environment, on pipes or on a pty.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};

use crate::image_config::{self, ImageConfig};
use crate::reaper;
use crate::ssh::pty::{self, WindowSize};
use crate::user::Identity;

/// PATH for sessions when the image does not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("this image has no shell at {0}, so SSH sessions cannot run commands")]
    NoShell(String),
    #[error("cannot open a pty")]
    Pty(#[source] std::io::Error),
    #[error("cannot start {0}")]
    Start(String, #[source] std::io::Error),
}

/// Who the session runs as.
#[derive(Clone, Debug)]
pub struct Login {
    pub identity: Identity,
    pub shell: String,
}

impl Login {
    /// `identity` with the login shell from the image's /etc/passwd.
    pub fn new(identity: Identity, root: &Path) -> Self {
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
        let shell = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 7 && f[0] == identity.name)
            .map(|f| f[6].to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".to_string());
        Login { identity, shell }
    }
}

/// What the client asked for on one channel.
pub struct Request<'a> {
    /// `None` for an interactive shell.
    pub command: Option<&'a str>,
    /// Terminal type and size when a pty was requested.
    pub pty: Option<(&'a str, WindowSize)>,
    /// Variables the client sent and we accepted.
    pub client_env: &'a [(String, String)],
}

/// How the session talks to its program.
pub enum Io {
    Pty(File),
    Pipes {
        stdin: ChildStdin,
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
}

pub struct Process {
    pub pid: i32,
    pub io: Io,
}

fn is_executable(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The image's environment, then the login variables, then the client's.
fn environment(login: &Login, req: &Request) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ImageConfig::load(Path::new(image_config::CONFIG_PATH))
        .ok()
        .and_then(|c| c.env)
        .unwrap_or_default()
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    };
    let id = &login.identity;
    set("HOME", &id.home);
    set("USER", &id.name);
    set("LOGNAME", &id.name);
    set("SHELL", &login.shell);
    if let Some((term, _)) = req.pty {
        set("TERM", term);
    }
    for (k, v) in req.client_env {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    env
}

/// Starts the login shell (with `-c COMMAND` for exec) in a new session.
pub fn spawn(login: &Login, req: &Request) -> Result<Process, SpawnError> {
    if !is_executable(&login.shell) {
        return Err(SpawnError::NoShell(login.shell.clone()));
    }
    let id = &login.identity;
    let mut cmd = Command::new(&login.shell);
    match req.command {
        Some(c) => {
            cmd.arg("-c").arg(c);
        }
        // A leading dash makes the shell a login shell (reads /etc/profile).
        None => {
            let name = Path::new(&login.shell)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".to_string());
            cmd.arg0(format!("-{name}"));
        }
    }
    let home = if Path::new(&id.home).is_dir() {
        id.home.as_str()
    } else {
        "/"
    };
    let env = environment(login, req);
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(home)
        .uid(id.uid)
        .gid(id.gid);
    crate::workload::inherit_glibc_tunables(&mut cmd, env.iter().map(|(k, _)| k.as_str()));

    let with_pty = req.pty.is_some();
    let leader = match req.pty {
        Some((_, size)) => {
            let p = reaper::exclusive(|| pty::open(size)).map_err(SpawnError::Pty)?;
            let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
            cmd.stdin(Stdio::from(dup(&p.follower)?))
                .stdout(Stdio::from(dup(&p.follower)?))
                .stderr(Stdio::from(p.follower));
            Some(p.leader)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    // SAFETY: setsid and ioctl are async-signal-safe and touch no parent state.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Stdin is the pty follower: make it the controlling terminal.
            if with_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        reaper::spawn(&mut cmd).map_err(|e| SpawnError::Start(login.shell.clone(), e))?;
    let pid = child.id() as i32;
    let io = match leader {
        Some(l) => Io::Pty(l),
        None => match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(stdin), Some(stdout), Some(stderr)) => Io::Pipes {
                stdin,
                stdout,
                stderr,
            },
            _ => {
                let e = std::io::Error::other("session pipes missing");
                return Err(SpawnError::Start(login.shell.clone(), e));
            }
        },
    };
    Ok(Process { pid, io })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn me() -> Login {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Login {
            identity: Identity {
                uid,
                gid,
                home: "/tmp".into(),
                name: "me".into(),
            },
            shell: "/bin/sh".into(),
        }
    }

    fn wait(pid: i32) -> kiln_protocol::ExitStatus {
        for _ in 0..500 {
            if let Some(s) = reaper::try_wait(pid) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("session process did not exit");
    }

    #[test]
    fn exec_gets_a_login_environment_and_its_exit_code() {
        let env = vec![("LANG".to_string(), "C.UTF-8".to_string())];
        let p = spawn(
            &me(),
            &Request {
                command: Some("echo $HOME $USER $SHELL $LANG; pwd; exit 7"),
                pty: None,
                client_env: &env,
            },
        )
        .unwrap();
        let Io::Pipes { mut stdout, .. } = p.io else {
            panic!("expected pipes");
        };
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "/tmp me /bin/sh C.UTF-8\n/tmp\n");
        assert_eq!(wait(p.pid), kiln_protocol::ExitStatus::Code(7));
    }

    #[test]
    fn a_pty_session_has_a_controlling_terminal() {
        let p = spawn(
            &me(),
            &Request {
                command: Some("tty; echo $TERM; stty size"),
                pty: Some((
                    "xterm",
                    WindowSize {
                        cols: 90,
                        rows: 33,
                        ..Default::default()
                    },
                )),
                client_env: &[],
            },
        )
        .unwrap();
        let Io::Pty(mut leader) = p.io else {
            panic!("expected a pty");
        };
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        // EIO once the last follower closes.
        while let Ok(n @ 1..) = leader.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("/dev/pts/"), "{out}");
        assert!(out.contains("xterm\r\n33 90\r\n"), "{out}");
        assert_eq!(wait(p.pid), kiln_protocol::ExitStatus::Code(0));
    }

    #[test]
    fn a_missing_shell_is_a_clear_error() {
        let mut login = me();
        login.shell = "/no/such/sh".into();
        let e = spawn(
            &login,
            &Request {
                command: None,
                pty: None,
                client_env: &[],
            },
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "this image has no shell at /no/such/sh, so SSH sessions cannot run commands"
        );
    }
}
