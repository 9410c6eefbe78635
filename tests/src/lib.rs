//! Helpers shared by kiln's end-to-end tests: where the built binaries and
//! the guest kernel are, how to build the static test guest program and an
//! initramfs around it, and a VMM process that is always cleaned up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_image::cpio::{Meta, Writer};

pub mod bench;
pub mod ec2;
pub mod fleet;
pub mod gce;
pub mod images;
pub mod jail;
pub mod kilnd;
pub mod netns;
pub mod openssh;
pub mod peer;
pub mod registry;
pub mod sshd;
pub mod stand_in;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The profile directory (target/debug or target/release) of the running
/// executable: tests live in PROFILE/deps, binaries in PROFILE.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A workspace binary built for the host (cargo builds them before tests).
pub fn bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// `$KILN_HOME` as the kernel recipe installed it.
pub fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// The guest kernel built by scripts/build-kernel.sh.
pub fn kernel() -> PathBuf {
    let p = kiln_home().join("kernel/vmlinux");
    assert!(
        p.exists(),
        "guest kernel missing at {}: run scripts/setup.sh",
        p.display()
    );
    p
}

/// Builds `bin` of `package` as a static x86_64 executable (guest programs
/// must not depend on the initramfs having a libc) and returns its path.
/// Uses its own target directory so it never waits on the outer cargo.
pub fn static_guest_binary(package: &str, bin: &str) -> PathBuf {
    let target_dir = profile_dir()
        .parent()
        .map(|t| t.join("guest"))
        .expect("target directory");
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args([
            "build",
            // The profile scripts/setup.sh builds the agent with.
            "--profile",
            "guest",
            "--quiet",
            "--target",
            triple,
            "-p",
            package,
            "--bin",
            bin,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace_root())
        .status()
        .expect("run cargo");
    assert!(status.success(), "building static {bin} failed");
    target_dir.join(triple).join("guest").join(bin)
}

/// The static test guest program (`kiln-test-init`), built once per test run.
pub fn guest_init() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| static_guest_binary("kiln-tests", "kiln-test-init"))
        .clone()
}

/// Writes an initramfs whose `/init` is `init` into `dir`.
pub fn initramfs_with_init(dir: &Path, init: &Path) -> PathBuf {
    let data = std::fs::read(init).expect("read init binary");
    let mut w = Writer::new(Vec::new());
    for d in ["dev", "proc", "sys", "tmp"] {
        w.dir(d, Meta::root(0o755)).expect("cpio dir");
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    w.char_device("dev/console", Meta::root(0o600), 5, 1)
        .expect("cpio console");
    w.file("init", Meta::root(0o755), &data).expect("cpio init");
    let bytes = w.finish().expect("cpio finish");
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, bytes).expect("write initramfs");
    path
}

/// A minimal guest root filesystem: static busybox with its applets, an
/// /etc/passwd with root and `app` (1000:1000), and `init` as /init.
pub struct GuestRoot {
    writer: Writer<Vec<u8>>,
}

/// busybox applets linked into /bin.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "pwd", "ls", "sleep", "uname", "true", "false", "env", "printf",
    "head", "wc", "sync", "kill", "ps", "mount", "dd", "yes", "tty", "stty",
];

impl GuestRoot {
    pub fn new(init: &Path) -> Self {
        let mut w = Writer::new(Vec::new());
        for d in [
            "bin", "dev", "etc", "home", "home/app", "kiln", "proc", "root", "run", "sys", "tmp",
        ] {
            w.dir(d, Meta::root(0o755)).expect("cpio dir");
        }
        w.char_device("dev/console", Meta::root(0o600), 5, 1)
            .expect("cpio console");
        let busybox = std::fs::read("/bin/busybox")
            .expect("/bin/busybox (busybox-static): run scripts/setup.sh");
        w.file("bin/busybox", Meta::root(0o755), &busybox)
            .expect("cpio busybox");
        for a in APPLETS {
            w.symlink(&format!("bin/{a}"), "busybox", Meta::root(0o777))
                .expect("cpio applet");
        }
        w.file(
            "etc/passwd",
            Meta::root(0o644),
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .expect("cpio passwd");
        w.file("etc/group", Meta::root(0o644), b"root:x:0:\napp:x:1000:\n")
            .expect("cpio group");
        let init = std::fs::read(init).expect("read init binary");
        w.file("init", Meta::root(0o755), &init).expect("cpio init");
        GuestRoot { writer: w }
    }

    /// Adds a file (e.g. `kiln/config.json`).
    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        self.writer
            .file(path, Meta::root(0o644), data)
            .expect("cpio file");
        self
    }

    pub fn write(self, dir: &Path) -> PathBuf {
        let bytes = self.writer.finish().expect("cpio finish");
        let path = dir.join("rootfs.cpio");
        std::fs::write(&path, bytes).expect("write initramfs");
        path
    }
}

/// The static agent binary, built once per test run.
pub fn agent() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| static_guest_binary("kiln-agent", "kiln-agent"))
        .clone()
}

/// A micro-VM whose agent (PID 1) has connected its control channel.
pub struct AgentVm {
    vmm: VmmProcess,
    uds: PathBuf,
    serial: PathBuf,
    conn: std::os::unix::net::UnixStream,
}

impl AgentVm {
    /// Boots `initrd` (2 vCPUs, vsock at `dir/vm.sock`) and waits for the
    /// agent to connect to the host control port.
    pub fn boot(dir: &Path, initrd: &Path) -> Self {
        Self::boot_with(dir, initrd, &[])
    }

    /// [`AgentVm::boot`] with more kiln-vmm arguments (e.g. `--api-sock`).
    pub fn boot_with(dir: &Path, initrd: &Path, extra: &[&str]) -> Self {
        let (kernel, initrd) = (kernel(), initrd.to_path_buf());
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--vcpus",
            "2",
        ];
        args.extend_from_slice(extra);
        Self::launch(dir, "vm.sock", "serial.log", &args)
    }

    /// Restores a snapshot as a VM named `name` (vsock at
    /// `dir/<name>/<name>.sock`, console at `dir/<name>/<name>.log`) and
    /// waits for its agent to connect again.
    pub fn restore(dir: &Path, name: &str, state: &Path, mem: &Path) -> Self {
        let args = [
            "--restore",
            state.to_str().unwrap_or_default(),
            "--mem-file",
            mem.to_str().unwrap_or_default(),
        ];
        // Each jailed VMM owns its sockets directory: one per clone.
        let own = dir.join(name);
        std::fs::create_dir_all(&own).expect("a clone's directory");
        let (uds, serial) = (format!("{name}.sock"), format!("{name}.log"));
        Self::launch(&own, &uds, &serial, &args)
    }

    fn launch(dir: &Path, uds: &str, serial: &str, args: &[&str]) -> Self {
        let (uds, serial) = (dir.join(uds), dir.join(serial));
        let port = kiln_protocol::CONTROL_PORT;
        let control = std::os::unix::net::UnixListener::bind(format!("{}_{port}", uds.display()))
            .expect("bind control socket");
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--vsock-uds",
            uds.to_str().unwrap_or_default(),
            "--serial-log",
            serial.to_str().unwrap_or_default(),
        ]);
        let mut vmm = VmmProcess::spawn(&all);
        control.set_nonblocking(true).expect("nonblocking listener");
        let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
        // Generous: boots are slow on emulating hosts, slower on a busy machine.
        let (conn, _) = vmm
            .poll(Duration::from_secs(600), || control.accept().ok())
            .unwrap_or_else(|e| panic!("agent never connected: {e}\nserial:\n{}", serial_text()));
        conn.set_nonblocking(false).expect("blocking stream");
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("read timeout");
        AgentVm {
            vmm,
            uds,
            serial,
            conn,
        }
    }

    /// The VMM process (for its control socket, signals, exit).
    pub fn vmm_mut(&mut self) -> &mut VmmProcess {
        &mut self.vmm
    }

    /// The VM's vsock socket (for forwarders).
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The guest console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The next frame from the agent; panics (with the console) on anything else.
    pub fn next_frame(&mut self) -> kiln_protocol::Frame {
        match kiln_protocol::read_frame(&mut self.conn) {
            Ok(Some(Ok(f))) => f,
            other => panic!("bad frame {other:?}; serial:\n{}", self.serial()),
        }
    }

    pub fn send(&mut self, frame: &kiln_protocol::Frame) {
        use std::io::Write;
        self.conn
            .write_all(&frame.encode())
            .expect("write to the agent");
    }

    /// Waits for the VMM to exit; returns its status, stderr and the console.
    pub fn wait(self, timeout: Duration) -> (ExitStatus, String, String) {
        let (status, stderr) = self.vmm.wait(timeout);
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        (status, stderr, serial)
    }
}

/// A running `kiln-vmm`, killed on drop if still running.
pub struct VmmProcess {
    child: Child,
}

impl VmmProcess {
    pub fn spawn(args: &[&str]) -> Self {
        let child = Command::new(bin("kiln-vmm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln-vmm");
        VmmProcess { child }
    }

    /// Like [`VmmProcess::spawn`], inside the named network namespace
    /// (`/run/netns/NAME`, as `ip netns add` makes it). Only the network
    /// namespace changes: `ip netns exec` would also remount /sys, hiding
    /// the host's cgroup v1 hierarchies from the jail.
    pub fn spawn_in_netns(netns: &str, args: &[&str]) -> Self {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("open the netns");
        let ns_fd = ns.as_raw_fd();
        let mut cmd = Command::new(bin("kiln-vmm"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setns is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn kiln-vmm in a network namespace");
        drop(ns);
        VmmProcess { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The status and stderr once the VMM has exited; None while it runs.
    pub fn exited(&mut self) -> Option<(ExitStatus, String)> {
        let status = self.child.try_wait().expect("wait kiln-vmm")?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        Some((status, err))
    }

    /// Waits up to `timeout`; returns the status and stderr.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        wait_for(timeout, || self.exited())
            .unwrap_or_else(|| panic!("kiln-vmm still running after {timeout:?}"))
    }

    /// Polls `f` like [`wait_for`], but gives up as soon as the VMM exits:
    /// a guest that will never answer should not cost the whole timeout.
    /// The error says which happened (with the VMM's status and stderr).
    pub fn poll<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        wait_for(timeout, || match f() {
            Some(v) => Some(Ok(v)),
            None => self.exited().map(|(status, stderr)| {
                Err(format!("kiln-vmm exited ({status}); stderr:\n{stderr}"))
            }),
        })
        .unwrap_or_else(|| Err(format!("still waiting after {timeout:?}")))
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `kiln-vmm` to completion with `args`; returns (code, stderr).
pub fn run_vmm(args: &[&str]) -> (Option<i32>, String) {
    let (status, stderr) = VmmProcess::spawn(args).wait(Duration::from_secs(30));
    (status.code(), stderr)
}

/// `pid: cmdline` of live processes whose command line contains `needle`
/// (to prove a test left no VMM or helper process behind).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if line.contains(needle) {
            found.push(format!("{}: {line}", e.file_name().to_string_lossy()));
        }
    }
    found
}
