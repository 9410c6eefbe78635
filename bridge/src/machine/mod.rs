//! One micro-VM as a child `kiln-vmm` process: checked before launch,
//! ready when its agent says so, and stopped and cleaned up however it
//! ends. `kiln run` and the local backend both drive VMs through this.

mod boot;
mod cause;
mod preflight;
mod snapshot;
pub mod stop_signals;
mod tail;
pub mod warm;

pub use boot::BootFiles;
pub use preflight::{check_memory, kib_field, meminfo_kib, preflight, PreflightError};
pub use snapshot::{SnapshotError, SnapshotFiles};
pub use tail::Tail;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{read_frame, Frame, Message, CONTROL_PORT};

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The `kiln-vmm` binary.
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Where per-VM directories go (`$KILN_HOME/vms`).
    pub runtime_dir: PathBuf,
    /// Stop the VM when the launching thread's process dies (one-shot
    /// runs); a daemon's VMs instead outlive it.
    pub die_with_parent: bool,
    /// How long the guest may take to report ready.
    pub boot_timeout: Duration,
    /// Where the VMM writes its metrics (JSON) when the VM ends.
    pub metrics: Option<PathBuf>,
    /// virtio-blk drives in order: the first is the guest's `/dev/vda`.
    pub drives: Vec<Drive>,
    /// Words added to kiln-vmm's default kernel command line.
    pub kernel_args: Vec<String>,
    /// Jail the VMM (namespaces, unprivileged uid, a root of its own);
    /// false only for debugging (`kiln run --no-jail`).
    pub jail: bool,
    /// The VM's CPU share in thousandths of a CPU (its cgroup's cpu.max);
    /// None: one CPU per vCPU.
    pub cpu_millicores: Option<u32>,
    /// Restore this snapshot instead of booting: `kernel` and `initrd` are
    /// then only what it was made from, and `drives` must be its drives.
    pub restore: Option<SnapshotFiles>,
    /// Serve kiln-vmm's control socket, so that [`Machine::snapshot`] works.
    pub control_socket: bool,
}

/// A file the guest sees as a virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("cannot prepare the VM directory {path}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {vmm}")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM exited during boot ({status}): {detail}")]
    VmmExited { status: String, detail: String },
    #[error("the guest did not report ready within {0:?}; console ends with: {1}")]
    BootTimeout(Duration, String),
    #[error("the agent's first message was not `ready`: {0}")]
    NotReady(String),
    #[error("talking to the agent")]
    Control(#[source] std::io::Error),
    #[error("boot cancelled")]
    Cancelled,
}

/// What the agent said when it became ready.
#[derive(Clone, Debug)]
pub struct Ready {
    /// VMM start to the agent's `ready` message.
    pub boot: Duration,
    pub agent_version: String,
    /// Guest uptime when the agent was ready.
    pub guest_uptime_ms: u64,
    /// The kernel's exec of `/init` (the agent) to its `ready`.
    pub init_to_ready_ms: u64,
}

/// How the VMM process ended.
#[derive(Clone, Debug)]
pub struct VmmExit {
    /// `kiln-vmm`'s exit status (see `kiln-vmm --help`); None if killed.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

/// A frame from the agent, or the end of the control channel.
#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    /// A frame the agent sent could not be decoded.
    Garbled(String),
    /// The channel closed (the VM stopped, or the agent went away).
    Closed,
}

/// Sends frames to the agent; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<UnixStream>>);

impl Sender {
    pub fn send(&self, frame: &Frame) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&frame.encode())
    }
}

/// A running micro-VM whose agent is ready. Dropping it kills the VMM and
/// removes the VM's directory.
pub struct Machine {
    id: String,
    dir: PathBuf,
    child: Child,
    control: UnixStream,
    ready: Ready,
    console: Tail,
    vmm_log: Tail,
    exit: Option<VmmExit>,
}

/// Name of the VM's vsock socket inside its directory.
const VSOCK_SOCKET: &str = "vsock.sock";
/// Name of kiln-vmm's control socket inside the VM's directory (beside
/// the vsock socket: the one host directory a jailed VMM writes in).
const CONTROL_SOCKET: &str = "control.sock";
/// Where the VMM's jail has its root, inside the VM's directory.
const JAIL_ROOT: &str = "root";
/// Frames from the agent held for a slow reader: with frames of at most
/// [`kiln_protocol::MAX_FRAME`] bytes, 16 MiB at worst.
pub const EVENT_QUEUE: usize = 16;

impl Machine {
    /// Boots `spec` and waits for the agent's `ready`. On any failure the
    /// VMM is stopped and nothing is left behind.
    pub fn launch(spec: &Spec) -> Result<Machine, MachineError> {
        Self::launch_cancellable(spec, &|| false)
    }

    /// As [`Machine::launch`], giving up with [`MachineError::Cancelled`]
    /// as soon as `cancelled` returns true (it is polled while booting).
    pub fn launch_cancellable(
        spec: &Spec,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Machine, MachineError> {
        preflight(spec)?;
        let launched = Instant::now();
        let id = new_id();
        let dir = spec.runtime_dir.join(&id);
        let dir_err = |source| MachineError::Dir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&spec.runtime_dir).map_err(dir_err)?;
        std::fs::create_dir(&dir).map_err(dir_err)?;
        // From here on the guard removes the directory on every early return.
        let mut guard = DirGuard(Some(dir.clone()));
        let uds = dir.join(VSOCK_SOCKET);
        let control_path = PathBuf::from(format!("{}_{CONTROL_PORT}", uds.display()));
        let listener = UnixListener::bind(&control_path).map_err(dir_err)?;
        listener.set_nonblocking(true).map_err(dir_err)?;

        let mut cmd = Command::new(&spec.vmm);
        match &spec.restore {
            // The shape (vCPUs, memory, kernel, command line) is the snapshot's.
            Some(snap) => {
                cmd.arg("--restore")
                    .arg(&snap.state)
                    .arg("--mem-file")
                    .arg(&snap.mem);
            }
            None => {
                cmd.arg("--kernel")
                    .arg(&spec.kernel)
                    .arg("--initrd")
                    .arg(&spec.initrd)
                    .args(["--vcpus", &spec.vcpus.to_string()])
                    .args(["--mem-mib", &spec.mem_mib.to_string()]);
                // Appended, so kiln-vmm's own base command line stays its own.
                for a in &spec.kernel_args {
                    cmd.arg("--append").arg(a);
                }
            }
        }
        if spec.control_socket {
            cmd.arg("--api-sock").arg(dir.join(CONTROL_SOCKET));
        }
        cmd.arg("--vsock-uds")
            .arg(&uds)
            .arg("--serial-stdio")
            .arg("--cleanup")
            .arg(&dir)
            // The boot timeout covers a guest that never comes up, and a
            // ready agent reports usage every interval; an idle-guest
            // watchdog would only misfire on a slow, busy host.
            .args(["--watchdog-secs", "0"])
            .env("KILN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if spec.die_with_parent {
            cmd.arg("--die-with-parent");
        }
        if let Some(m) = &spec.metrics {
            cmd.arg("--metrics").arg(m);
        }
        if spec.jail {
            // In the VM's directory: removed with it, whoever cleans up.
            cmd.arg("--jail-root").arg(dir.join(JAIL_ROOT));
            if let Some(m) = spec.cpu_millicores {
                cmd.args(["--cpu-millicores", &m.to_string()]);
            }
        } else {
            cmd.arg("--no-jail");
        }
        for d in &spec.drives {
            cmd.arg(if d.read_only { "--drive-ro" } else { "--drive" })
                .arg(&d.path);
        }
        // SAFETY: setpgid is async-signal-safe. Its own process group keeps
        // the VMM out of the terminal's Ctrl-C, which the launcher handles.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| MachineError::Spawn {
            vmm: spec.vmm.clone(),
            source,
        })?;
        let mut booting = Booting {
            child: Some(child),
            console: Tail::default(),
            vmm_log: Tail::default(),
        };
        if let Some(c) = booting.child.as_mut() {
            if let Some(out) = c.stdout.take() {
                booting.console.drain(out);
            }
            if let Some(err) = c.stderr.take() {
                booting.vmm_log.drain(err);
            }
        }
        let (control, ready) = booting.await_ready(
            &listener,
            &control_path,
            launched,
            spec.boot_timeout,
            cancelled,
        )?;
        let Some(child) = booting.child.take() else {
            return Err(MachineError::NotReady("the VMM went away".into()));
        };
        guard.0 = None; // the machine's Drop owns the directory now
        Ok(Machine {
            id,
            dir,
            child,
            control,
            ready,
            console: booting.console.clone(),
            vmm_log: booting.vmm_log.clone(),
            exit: None,
        })
    }

    /// What the VMM and the console said last, for error messages.
    pub fn failure_detail(&self) -> String {
        failure_detail(&self.vmm_log, &self.console)
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The `kiln-vmm` process kiln started (a jailed VMM's supervisor):
    /// the one to signal.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The process that runs the VM, for its CPU time and memory: a jailed
    /// VMM's only child (its supervisor stays on the host), else [`Self::pid`].
    pub fn vmm_pid(&self) -> u32 {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(pid)
    }
    pub fn ready(&self) -> &Ready {
        &self.ready
    }
    /// The VM's hybrid-vsock socket (for SSH forwarding).
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }
    /// The guest console captured so far (its last 64 KiB).
    pub fn console(&self) -> String {
        self.console.text()
    }

    /// Snapshots the VM (paused for the while) into `dest`, a directory
    /// that must not exist yet; when another process stored one there
    /// first, that one stays. Take it while the agent waits for `start`.
    pub fn snapshot(&self, dest: &Path) -> Result<SnapshotFiles, SnapshotError> {
        let control = self.dir.join(CONTROL_SOCKET);
        if !control.exists() {
            return Err(SnapshotError::NoControlSocket);
        }
        // Written where the jailed VMM may write, then moved.
        let written = SnapshotFiles {
            state: self.dir.join("snapshot.state"),
            mem: self.dir.join("snapshot.mem"),
        };
        let taken = snapshot::take(&control, &written);
        let stored = taken.and_then(|()| snapshot::store(&written, dest));
        if stored.is_err() {
            let _ = std::fs::remove_file(&written.state);
            let _ = std::fs::remove_file(&written.mem);
        }
        stored
    }

    /// A handle for sending frames to the agent.
    pub fn sender(&self) -> Result<Sender, MachineError> {
        let s = self.control.try_clone().map_err(MachineError::Control)?;
        Ok(Sender(Arc::new(Mutex::new(s))))
    }

    /// Frames from the agent, read on their own thread until the channel
    /// closes. At most [`EVENT_QUEUE`] frames wait to be taken: past that
    /// the thread stops reading, and the guest waits on its vsock, rather
    /// than a flooding guest filling the host's memory.
    pub fn events(&self) -> Result<Receiver<Event>, MachineError> {
        let mut s = self.control.try_clone().map_err(MachineError::Control)?;
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        std::thread::Builder::new()
            .name("kiln-agent-events".into())
            .spawn(move || loop {
                let event = match read_frame(&mut s) {
                    Ok(Some(Ok(f))) => Event::Frame(f),
                    Ok(Some(Err(e))) => Event::Garbled(e.to_string()),
                    Ok(None) | Err(_) => Event::Closed,
                };
                let closed = matches!(event, Event::Closed);
                if tx.send(event).is_err() || closed {
                    return;
                }
            })
            .map_err(MachineError::Control)?;
        Ok(rx)
    }

    /// Stops the VM at once (the VMM's SIGTERM path: clean, no guest shutdown).
    pub fn stop(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Kills the VMM outright.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn signal(&self, sig: i32) {
        if self.exit.is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped, so its pid is ours.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// The VMM's status if it has exited.
    pub fn try_wait(&mut self) -> Option<VmmExit> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                self.exit = Some(VmmExit {
                    code: st.code(),
                    signal: st.signal(),
                });
            }
        }
        self.exit.clone()
    }

    /// Waits up to `timeout` for the VMM to exit; then stops it (SIGTERM,
    /// and SIGKILL a second later) and returns how it ended.
    pub fn wait(&mut self, timeout: Duration) -> VmmExit {
        let deadline = Instant::now() + timeout;
        let mut stopped_at = None;
        loop {
            if let Some(e) = self.try_wait() {
                return e;
            }
            let now = Instant::now();
            match stopped_at {
                None if now >= deadline => {
                    self.stop();
                    stopped_at = Some(now);
                }
                Some(t) if now.duration_since(t) > Duration::from_secs(1) => self.kill(),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A VMM process until its agent is ready; killed if dropped before.
struct Booting {
    child: Option<Child>,
    console: Tail,
    vmm_log: Tail,
}

impl Booting {
    fn await_ready(
        &mut self,
        listener: &UnixListener,
        control_path: &Path,
        launched: Instant,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(UnixStream, Ready), MachineError> {
        let deadline = launched + timeout;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(MachineError::Control(e)),
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                use std::os::unix::process::ExitStatusExt;
                let exit = VmmExit {
                    code: st.code(),
                    signal: st.signal(),
                };
                // Let the drain threads catch the last words.
                std::thread::sleep(Duration::from_millis(50));
                return Err(MachineError::VmmExited {
                    status: exit.to_string(),
                    detail: failure_detail(&self.vmm_log, &self.console),
                });
            }
            if Instant::now() >= deadline {
                return Err(MachineError::BootTimeout(timeout, self.console.last_line()));
            }
            if cancelled() {
                return Err(MachineError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The connection is made; the listening socket has served its purpose.
        let _ = std::fs::remove_file(control_path);
        stream
            .set_nonblocking(false)
            .map_err(MachineError::Control)?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_secs(1))))
            .map_err(MachineError::Control)?;
        let mut reader = &stream;
        let ready = match read_frame(&mut reader) {
            Ok(Some(Ok(Frame::Control(Message::Ready {
                agent_version,
                uptime_ms,
                init_to_ready_ms,
                ..
            })))) => Ready {
                boot: launched.elapsed(),
                agent_version,
                guest_uptime_ms: uptime_ms,
                init_to_ready_ms,
            },
            Ok(Some(Ok(other))) => return Err(MachineError::NotReady(format!("{other:?}"))),
            Ok(Some(Err(e))) => return Err(MachineError::NotReady(e.to_string())),
            Ok(None) => return Err(MachineError::NotReady("the channel closed".into())),
            Err(e) => return Err(MachineError::Control(e)),
        };
        stream
            .set_read_timeout(None)
            .map_err(MachineError::Control)?;
        Ok((stream, ready))
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn failure_detail(vmm_log: &Tail, console: &Tail) -> String {
    let log = vmm_log.last_line();
    let cause = cause::from_console(&console.text());
    let console = console.last_line();
    if let Some(cause) = cause {
        return format!("{cause} (console: {console})");
    }
    match (log.is_empty(), console.is_empty()) {
        (false, true) => log,
        (true, false) => format!("console: {console}"),
        (false, false) => format!("{log} (console: {console})"),
        (true, true) => "no output".to_string(),
    }
}

/// Removes a directory when dropped, unless emptied first.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The binary `name` next to the running executable, or the path in the
/// environment variable `var` (how kiln finds kiln-vmm and kiln-shim).
pub fn binary_beside_me(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .map(|me| me.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// A short, unique VM id: 8 random bytes in hex.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without randomness: pid and time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ ((std::process::id() as u64) << 40)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_vmm_that_fails_at_once_is_reported_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        let initrd = tmp.path().join("initrd");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        // A "VMM" that complains and exits 1, as kiln-vmm does on bad input.
        let vmm = tmp.path().join("fake-vmm");
        std::fs::write(
            &vmm,
            "#!/bin/sh\necho 'kiln-vmm: error: no good' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime = tmp.path().join("vms");
        let spec = Spec {
            vmm,
            kernel,
            initrd,
            vcpus: 1,
            mem_mib: 64,
            runtime_dir: runtime.clone(),
            die_with_parent: true,
            boot_timeout: Duration::from_secs(10),
            metrics: None,
            drives: Vec::new(),
            kernel_args: Vec::new(),
            jail: true,
            cpu_millicores: None,
            restore: None,
            control_socket: false,
        };
        match Machine::launch(&spec) {
            Err(MachineError::VmmExited { status, detail }) => {
                assert_eq!(status, "exit status 1");
                assert!(detail.contains("no good"), "{detail}");
            }
            Err(MachineError::Preflight(PreflightError::Kvm { .. })) => {
                // No /dev/kvm on this machine: the preflight said so first.
            }
            other => panic!("unexpected: {:?}", other.err()),
        }
        assert_eq!(std::fs::read_dir(&runtime).unwrap().count(), 0);
    }
}
