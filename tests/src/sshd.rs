//! A private OpenSSH server (Debian's `/usr/sbin/sshd`) on a loopback
//! port: its own host key, one authorized client key, no PAM, no
//! passwords. Killed on drop, with every process it started, so that its
//! open connections end too. A command whose connection has already ended
//! but which still runs (a `sleep` the client gave up on) is no longer
//! below sshd and is missed: a test that leaves one keeps its connection
//! open until the server is dropped.
//!
//! Root only (as kiln's tests run): sshd's privilege separation needs it,
//! and the client logs in as root.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::openssh::keygen;
use crate::wait_for;

const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd and the keys that go with it.
pub struct Sshd {
    dir: PathBuf,
    ip: String,
    port: u16,
    child: Option<Child>,
}

impl Sshd {
    /// Starts sshd on a free port, keeping its files in `dir` (which must
    /// outlive it). Keys already in `dir` are kept, so a restart in the
    /// same `dir` is the same host.
    pub fn start(dir: &Path) -> Sshd {
        Sshd::start_on(dir, free_port())
    }

    /// [`Sshd::start`] on a given port.
    pub fn start_on(dir: &Path, port: u16) -> Sshd {
        Sshd::start_at(dir, "127.0.0.1", port)
    }

    /// [`Sshd::start`] on `ip`:`port`, `ip` an address of the calling
    /// thread's network namespace (where sshd then runs).
    pub fn start_at(dir: &Path, ip: &str, port: u16) -> Sshd {
        if !dir.join("host_key").exists() {
            keygen(dir, "host_key");
        }
        if !dir.join("client").exists() {
            keygen(dir, "client");
        }
        let authorized = std::fs::read(dir.join("client.pub")).expect("read client.pub");
        std::fs::write(dir.join("authorized_keys"), authorized).expect("write authorized_keys");
        let d = dir.display();
        let config = format!(
            "ListenAddress {ip}\n\
             Port {port}\n\
             HostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\n\
             StrictModes no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             Subsystem sftp internal-sftp\n"
        );
        std::fs::write(dir.join("sshd_config"), config).expect("write sshd_config");
        // sshd's privilege-separation directory; the package's unit makes
        // it, and nothing here runs the unit.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let log = std::fs::File::create(dir.join("sshd.log")).expect("create sshd.log");
        // sshd refuses to start without an absolute path (it re-executes
        // itself for every connection).
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn /usr/sbin/sshd (openssh-server): run scripts/setup.sh");
        let mut sshd = Sshd {
            dir: dir.to_path_buf(),
            ip: ip.to_string(),
            port,
            child: Some(child),
        };
        let listening = wait_for(Duration::from_secs(10), || {
            if sshd.exited() {
                return Some(false);
            }
            TcpStream::connect((ip, port)).ok().map(|_| true)
        });
        assert_eq!(
            listening,
            Some(true),
            "sshd did not listen on port {port}:\n{}",
            sshd.log()
        );
        sshd
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `IP:PORT`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The host's public key line (`ssh-ed25519 AAAA… host_key`).
    pub fn host_key(&self) -> String {
        let line = std::fs::read_to_string(self.dir.join("host_key.pub")).expect("host_key.pub");
        line.trim().to_string()
    }

    /// The authorized client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client")
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Kills the listener and everything it started (the per-connection
    /// processes and their commands), so established connections drop as
    /// if the host went away. Killing the listener alone would leave them
    /// up: each connection is served by its own process.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // Everything is stopped before anything is killed, so that no
        // process forks a child after the listing that would find it
        // (a connection starting its command, say), and none is reparented
        // away from the tree before it is listed.
        let mut stopped = vec![pid];
        loop {
            for p in &stopped {
                // SAFETY: kill(2) on our own child (not yet reaped) or on
                // a process it started; at worst that one has exited.
                unsafe { libc::kill(*p, libc::SIGSTOP) };
            }
            let all = descendants(pid);
            if all.iter().all(|p| stopped.contains(p)) {
                break;
            }
            stopped.extend(
                all.into_iter()
                    .filter(|p| !stopped.contains(p))
                    .collect::<Vec<_>>(),
            );
        }
        for p in stopped.iter().skip(1) {
            // SAFETY: as above.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Every live process below `pid`, found by parent links in /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}
