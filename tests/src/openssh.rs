//! Driving the stock OpenSSH client (`ssh`, `scp`, `sftp`, `ssh-keygen`)
//! in tests, each command bounded by a timeout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Longest any one client command may take (guest exec is slow here).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (openssh-client): run scripts/setup.sh");
    assert!(out.status.success(), "{out:?}");
    key
}

/// Runs `cmd` with `stdin`, killing it after [`CLIENT_TIMEOUT`].
pub fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let pid = child.id() as i32;
    if let Some(mut s) = child.stdin.take() {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&data);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLIENT_TIMEOUT) {
        Ok(out) => out.expect("client output"),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} still running after {CLIENT_TIMEOUT:?}");
        }
    }
}

/// The stock OpenSSH client tools against `host`:`port` (127.0.0.1 unless
/// set) as `user`.
pub struct Client {
    key: PathBuf,
    host: String,
    port: u16,
    user: String,
    /// Pin the server's host key to this known_hosts file.
    known_hosts: Option<PathBuf>,
}

impl Client {
    pub fn new(key: &Path, port: u16, user: &str) -> Self {
        Client {
            key: key.to_path_buf(),
            host: "127.0.0.1".to_string(),
            port,
            user: user.to_string(),
            known_hosts: None,
        }
    }

    /// Connect to `host` instead of 127.0.0.1.
    pub fn at(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }

    /// Only accept the host keys in `known_hosts` (else any key).
    pub fn pinned(mut self, known_hosts: &Path) -> Self {
        self.known_hosts = Some(known_hosts.to_path_buf());
        self
    }

    /// `user@host:path` for scp.
    pub fn remote(&self, path: &str) -> String {
        format!("{}@{}:{path}", self.user, self.host)
    }

    fn options(&self, cmd: &mut Command, port_flag: &str) {
        let (strict, known) = match &self.known_hosts {
            Some(k) => ("yes", k.display().to_string()),
            None => ("no", "/dev/null".to_string()),
        };
        cmd.arg("-i")
            .arg(&self.key)
            .args([port_flag, &self.port.to_string()])
            .args([
                "-o",
                &format!("StrictHostKeyChecking={strict}"),
                "-o",
                &format!("UserKnownHostsFile={known}"),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=60",
            ]);
    }

    pub fn ssh(&self, extra: &[&str], remote: &str, stdin: &[u8]) -> Output {
        let mut cmd = Command::new("ssh");
        self.options(&mut cmd, "-p");
        cmd.args(extra)
            .arg(format!("{}@{}", self.user, self.host))
            .arg(remote);
        run(cmd, stdin)
    }

    pub fn scp(&self, from: &str, to: &str) -> Output {
        self.scp_with(&[], from, to)
    }

    /// scp with extra flags (e.g. `-v` to diagnose a failure).
    pub fn scp_with(&self, extra: &[&str], from: &str, to: &str) -> Output {
        let mut cmd = Command::new("scp");
        self.options(&mut cmd, "-P");
        cmd.args(extra).args([from, to]);
        run(cmd, b"")
    }

    pub fn sftp(&self, batch: &str) -> Output {
        let mut cmd = Command::new("sftp");
        self.options(&mut cmd, "-P");
        cmd.args(["-b", "-"])
            .arg(format!("{}@{}", self.user, self.host));
        run(cmd, batch.as_bytes())
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
