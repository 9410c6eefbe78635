//! Owned hosts on this machine, for tests and benchmarks of the `ssh`
//! backend: each is a network namespace of its own, joined by a veth pair
//! to the caller's "bridge" namespace, with Debian's sshd on its own
//! address and host key and its own `$KILN_HOME`, as `kiln fleet
//! add-host` leaves one. Whatever VMs its grants left are stopped on drop.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::netns::NetNs;
use crate::sshd::Sshd;
use crate::{agent, bin, kernel, processes_mentioning};

/// The host ports every owned host's grants listen on.
pub const PORTS: &str = "23000-23099";

/// A host's `$KILN_HOME` as `kiln fleet add-host` leaves it: the guest
/// kernel and agent, and a `host.toml` with its address and size.
fn host_home(dir: &Path, address: &str, vcpus: u32, registry: &str) -> PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("kernel")).unwrap();
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::os::unix::fs::symlink(kernel(), home.join("kernel/vmlinux")).unwrap();
    std::os::unix::fs::symlink(agent(), home.join("bin/kiln-agent")).unwrap();
    std::fs::write(
        home.join("host.toml"),
        format!(
            "address = \"{address}\"\nvcpus = {vcpus}\nram_mib = {}\n\
             insecure_registries = [\"{registry}\"]\nports = \"{PORTS}\"\n",
            vcpus * 256
        ),
    )
    .unwrap();
    home
}

/// What the login shell reads before each command the host is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShellRc {
    /// This machine's, as it is.
    AsIs,
    /// root's `~/.bashrc` empty (bind-mounted over in sshd's own mount
    /// namespace): a host whose shell starts as quickly as Debian's
    /// default root shell, whatever this machine's rc does.
    Skipped,
}

/// root's rc file, which Debian's bash reads for every command run over
/// SSH, interactive or not.
const ROOT_BASHRC: &str = "/root/.bashrc";

/// One owned host: its namespace, sshd, and home.
pub struct OwnedHost {
    /// Declared first: its VMs stop before sshd and the namespace go.
    _vms: StopVms,
    pub ns: NetNs,
    /// Its address on the veth pair, where its sshd listens on port 22.
    pub address: String,
    pub sshd: Sshd,
    pub home: PathBuf,
}

impl OwnedHost {
    /// Host `tag` on `SUBNET.2`, linked to `bridge` (which gets
    /// `SUBNET.1`), with room for `vcpus` grants of 1 vCPU / 256 MiB and
    /// `registry` (an IP address) reachable over plain HTTP. Its files are
    /// under `work/host-TAG`.
    pub fn start(
        work: &Path,
        tag: &str,
        bridge: &NetNs,
        subnet: &str,
        vcpus: u32,
        registry: &str,
        rc: ShellRc,
    ) -> OwnedHost {
        let ns = NetNs::new(&format!("fleet-{tag}"));
        let address = format!("{subnet}.2");
        bridge.link(
            &format!("kf{tag}{}", std::process::id() % 10_000),
            &format!("{subnet}.1/24"),
            &ns,
            "eth0",
            &format!("{address}/24"),
        );
        // Back to the bridge's namespace, and through it to the other
        // subnets' bridge-side addresses (the registry's among them).
        ns.ip(&["route", "add", "default", "via", &format!("{subnet}.1")]);
        let dir = work.join(format!("host-{tag}"));
        std::fs::create_dir_all(dir.join("sshd")).unwrap();
        let home = host_home(&dir, &address, vcpus, registry);
        let (sshd_dir, ip) = (dir.join("sshd"), address.clone());
        let empty = dir.join("empty-rc");
        let sshd = ns.run(move || {
            if rc == ShellRc::Skipped {
                hide(&empty, Path::new(ROOT_BASHRC));
            }
            Sshd::start_at(&sshd_dir, &ip, 22)
        });
        OwnedHost {
            _vms: StopVms(home.clone()),
            ns,
            address,
            sshd,
            home,
        }
    }

    /// Its `[[backend.host]]` table, pinned to `host_key`.
    pub fn section(&self, host_key: &str) -> String {
        format!(
            "[[backend.host]]\naddress = \"{}\"\nidentity_file = \"{}\"\nhost_key = \"{host_key}\"\n\
             kiln = \"{}\"\nkiln_home = \"{}\"\n",
            self.address,
            self.sshd.client_key().display(),
            bin("kiln").display(),
            self.home.display()
        )
    }

    /// The directory of a grant on this host.
    pub fn grant_dir(&self, id: &str) -> PathBuf {
        self.home.join("grants").join(id)
    }

    /// The state a grant's shim last wrote on this host.
    pub fn shim_state(&self, id: &str) -> serde_json::Value {
        let path = self.grant_dir(id).join("state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or_default()
    }

    /// Cuts the host off from the bridge, or joins it back.
    pub fn link(&self, up: bool) {
        self.ns
            .ip(&["link", "set", "eth0", if up { "up" } else { "down" }]);
    }
}

/// Gives the calling thread a mount namespace of its own in which `path`
/// (if it exists) is an empty file, `empty`; what the thread starts
/// inherits it, nothing else sees it.
fn hide(empty: &Path, path: &Path) {
    if !path.exists() {
        return;
    }
    std::fs::write(empty, b"").unwrap();
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (empty, path, root) = (c(empty), c(path), c(Path::new("/")));
    // SAFETY: unshare and mount change only this thread's mount namespace
    // (made private first, so nothing propagates out) and read the
    // NUL-terminated strings above.
    unsafe {
        let fail = || std::io::Error::last_os_error();
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare: {}", fail());
        let (none, no_data) = (std::ptr::null(), std::ptr::null());
        let private = libc::MS_REC | libc::MS_PRIVATE;
        let rc = libc::mount(none, root.as_ptr(), none, private, no_data);
        assert_eq!(rc, 0, "make / private: {}", fail());
        let rc = libc::mount(empty.as_ptr(), path.as_ptr(), none, libc::MS_BIND, no_data);
        assert_eq!(rc, 0, "bind over {path:?}: {}", fail());
    }
}

/// Stops whatever VMs below a host's home still run, however its user
/// ended.
struct StopVms(PathBuf);

impl Drop for StopVms {
    fn drop(&mut self) {
        for p in processes_mentioning(&self.0.to_string_lossy()) {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process a host of ours started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
