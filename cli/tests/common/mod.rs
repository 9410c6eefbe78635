//! What the `kiln run` end-to-end tests share: a private `$KILN_HOME` and
//! a child's output collected under a deadline.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{agent, bin, kernel, processes_mentioning, wait_for};

/// A private `$KILN_HOME` with the real kernel and the static agent.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("kernel")).unwrap();
        std::fs::create_dir_all(p.join("bin")).unwrap();
        std::os::unix::fs::symlink(kernel(), p.join("kernel/vmlinux")).unwrap();
        std::os::unix::fs::symlink(agent(), p.join("bin/kiln-agent")).unwrap();
        Home { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn kiln(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .env("KILN_HOME", self.path())
            .env("KILN_VMM", bin("kiln-vmm"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// No VM directory, socket or process of this home is left.
    pub fn assert_clean(&self) {
        let vms = self.path().join("vms");
        let left: Vec<_> = std::fs::read_dir(&vms)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            vms.display()
        );
        let needle = self.path().to_string_lossy().to_string();
        let gone = wait_for(Duration::from_secs(10), || {
            processes_mentioning(&needle).is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "processes still running: {:?}",
            processes_mentioning(&needle)
        );
    }
}

/// Collects a child's output while waiting for it with a deadline; kills
/// it (and fails) past the deadline.
pub fn finish(mut child: Child, limit: Duration) -> Output {
    fn collect(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    }
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kiln run still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
