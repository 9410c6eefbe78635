//! Network namespaces a test makes for itself (`ip netns add`), joined by
//! veth pairs, and removed by name on drop whatever happened. Traffic in
//! them never leaves them: the addresses exist only inside.

use std::os::fd::AsRawFd;
use std::process::Command;

/// Runs `ip ARGS`, failing the test with ip's message.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace with its loopback up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `kiln-<tag>-<pid>`: two test processes never share one.
    pub fn new(tag: &str) -> NetNs {
        let ns = NetNs {
            name: format!("kiln-{tag}-{}", std::process::id()),
        };
        // One left by a killed run of this pid would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth pair from this namespace (`mine`, address `my_cidr`) to
    /// `other` (`theirs`, `their_cidr`), both up.
    pub fn link(&self, mine: &str, my_cidr: &str, other: &NetNs, theirs: &str, their_cidr: &str) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "add",
            mine,
            "type",
            "veth",
            "peer",
            "name",
            theirs,
            "netns",
            &other.name,
        ]);
        ip(&["-n", &self.name, "addr", "add", my_cidr, "dev", mine]);
        ip(&["-n", &other.name, "addr", "add", their_cidr, "dev", theirs]);
        ip(&["-n", &self.name, "link", "set", mine, "up"]);
        ip(&["-n", &other.name, "link", "set", theirs, "up"]);
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Moves the calling thread into the namespace: what it connects to,
    /// binds and spawns from then on is inside.
    pub fn enter(&self) {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        // SAFETY: setns changes only this thread's network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns changes only this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// As [`NetNs::spawn`], waiting for `f`'s result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in the namespace")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
