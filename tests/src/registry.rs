//! Real tools shared by tests: shell scripts that must succeed, and a
//! throwaway docker-registry on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a shell script, failing the test with its output if it fails.
pub fn sh(script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "script failed:\n{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Registry {
    child: Child,
    pub addr: String,
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("bind");
    l.local_addr().expect("addr").port()
}

/// GET `path` on `addr`; returns the status line and body.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_on("127.0.0.1")
    }

    /// A registry listening on `ip` (an address of the calling thread's
    /// network namespace).
    pub fn start_on(ip: &str) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port(ip);
        let addr = format!("{ip}:{port}");
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry not installed: run scripts/setup.sh");
        let reg = Registry {
            child,
            addr,
            storage,
            _dir: dir,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if http_get(&reg.addr, "/v2/")
                .is_some_and(|r| r.starts_with("HTTP/1.") && r.contains(" 200 "))
            {
                return reg;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("registry did not come up on {}", reg.addr);
    }

    /// Pushes `oci:LAYOUT:TAG` as `NAME:TAG` with extra skopeo flags.
    pub fn push(&self, layout: &Path, tag: &str, name: &str, flags: &str) {
        sh(&format!(
            "skopeo copy -q --dest-tls-verify=false {flags} oci:{}:{tag} docker://{}/{name}:{tag}",
            layout.display(),
            self.addr
        ));
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
