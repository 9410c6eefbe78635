//! `kiln-shim`: looks after one grant's VM, outside kilnd, so the VM keeps
//! running (and its usage keeps being recorded) while kilnd restarts.
//!
//! It boots the VM, forwards a loopback TCP port to the agent's SSH server
//! and one to each published guest port, sends the workload, and keeps
//! `state.json` in the grant's directory up to date: phase, SSH and
//! published ports, usage, exit status, host-side figures. SIGTERM
//! asks the workload to stop (grace period), then stops the VM.

use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kiln_protocol::forward::{Bound, ForwardError, Forwarder, Target};
use kiln_protocol::vmm::exit as vmm_exit;
use kiln_protocol::{ExitStatus, Frame, Message, Usage, Workload, SSH_PORT};
use serde::{Deserialize, Serialize};

use super::output::{Appended, OutputLog, DEFAULT_OUTPUT_CAP};
use crate::backend::{HostUsage, PublishedPort};
use crate::dir_lock::{DirLock, LockError};
use crate::error_chain;
use crate::machine::warm::{self, Start};
use crate::machine::{stop_signals, BootFiles, Event, Spec};

/// What the local backend asks the shim to run (`launch.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    /// The image build's initramfs, and a block root's image and kernel
    /// arguments.
    pub boot: BootFiles,
    pub vcpus: u8,
    /// The grant's CPU share, when it asked in millicores (the VMM's
    /// cgroup cpu.max); whole vCPUs otherwise.
    #[serde(default)]
    pub cpu_millicores: Option<u32>,
    pub mem_mib: u64,
    /// `$KILN_HOME/vms`.
    pub runtime_dir: PathBuf,
    pub workload: Workload,
    pub authorized_keys: Vec<String>,
    /// OpenSSH private key the agent serves.
    pub ssh_host_key: String,
    pub boot_timeout_ms: u64,
    /// How long the workload gets between SIGTERM and SIGKILL.
    pub stop_grace_ms: u64,
    /// The most bytes `output.log` may hold.
    #[serde(default = "default_output_cap")]
    pub output_cap: u64,
    /// Where snapshots of ready VMs are kept (`$KILN_HOME/snapshots`):
    /// the VM is restored from the one of its image if there is one, and
    /// else booted and saved there. None: always boot.
    #[serde(default)]
    pub snapshots: Option<PathBuf>,
    /// Guest TCP ports to publish, each on a host port of its own.
    #[serde(default)]
    pub publish: Vec<u16>,
    /// The host address the SSH port and the published ports listen on;
    /// [`LISTEN_HOST`] when absent.
    #[serde(default)]
    pub listen_host: Option<String>,
    /// The grant's deadline. The shim stops the VM a little after it on
    /// its own, so a grant ends on time even while no kilnd watches it
    /// (kilnd down, or a host cut off from its bridge).
    #[serde(default)]
    pub valid_to: Option<DateTime<Utc>>,
    /// The host ports to listen on (first, last); any free port when
    /// absent.
    #[serde(default)]
    pub ports: Option<(u16, u16)>,
}

/// The host address the SSH port and the published ports listen on when
/// the launch names none: only this host reaches them.
pub const LISTEN_HOST: &str = "127.0.0.1";

/// How long after `valid_to` the shim stops the VM itself: kilnd, when it
/// watches, stops it first and records why.
pub const DEADLINE_SLACK: Duration = Duration::from_secs(5);

fn default_output_cap() -> u64 {
    DEFAULT_OUTPUT_CAP
}

/// Where a grant's VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Booting,
    /// The agent serves SSH and has started the command.
    Running,
    /// The VM has stopped; the state is final.
    Ended,
}

/// `state.json`: what kilnd reads about the VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub phase: Phase,
    pub shim_pid: u32,
    pub vmm_pid: Option<u32>,
    pub ssh_port: Option<u16>,
    /// Where each published guest port listens, once it does.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// VMM start to the agent's `ready`.
    pub boot_ms: Option<u64>,
    /// VMM start to the agent's `started` (SSH served, command running):
    /// when the grant became usable, as the shim saw it.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// The latest report from the agent.
    pub usage: Option<Usage>,
    pub exit_status: Option<ExitStatus>,
    pub host: HostUsage,
    /// Why the VM could not boot or ended abnormally.
    pub error: Option<String>,
    /// `output.log` reached its cap and later output was dropped.
    #[serde(default)]
    pub output_truncated: bool,
    /// Booted, or restored from a saved snapshot.
    #[serde(default)]
    pub start: Option<Start>,
    /// The shim stopped the VM because the grant's deadline passed.
    #[serde(default)]
    pub deadline_reached: bool,
    pub updated_at: DateTime<Utc>,
}

impl State {
    /// A shim's first state: booting, nothing known yet.
    pub fn booting(shim_pid: u32) -> State {
        State {
            phase: Phase::Booting,
            shim_pid,
            vmm_pid: None,
            ssh_port: None,
            published: Vec::new(),
            boot_ms: None,
            started_ms: None,
            usage: None,
            exit_status: None,
            host: HostUsage::default(),
            error: None,
            output_truncated: false,
            start: None,
            deadline_reached: false,
            updated_at: Utc::now(),
        }
    }
}

pub const LAUNCH_FILE: &str = "launch.json";
pub const STATE_FILE: &str = "state.json";
/// Held by the grant's shim for its whole life.
pub const LOCK_FILE: &str = "shim.lock";
/// The workload's output, for the operator.
pub const OUTPUT_FILE: &str = "output.log";
const METRICS_FILE: &str = "vmm-metrics.json";
/// `state.json` is rewritten for a usage report at most this often: a
/// guest sending reports in a loop costs the host one write a second.
const USAGE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("invalid {0}")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("another shim looks after this grant")]
    Locked(#[from] LockError),
}

/// Reads `dir/state.json`, if the shim wrote one yet.
pub fn read_state(dir: &Path) -> Result<Option<State>, ShimError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ShimError::Parse(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShimError::Read(path, e)),
    }
}

/// Replaces `dir/state.json` atomically (a reader never sees half a file).
fn write_state(dir: &Path, state: &mut State) -> Result<(), ShimError> {
    state.updated_at = Utc::now();
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| ShimError::Parse(path.clone(), e))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| ShimError::Write(path, e))
}

/// The shim's whole life for the grant in `dir`; returns when the VM has
/// ended and the final state is written.
pub fn run(dir: &Path) -> Result<(), ShimError> {
    // Before launch.json is read or state.json written: a second shim of
    // this grant would boot a second VM and overwrite the first's state.
    let _lock = DirLock::acquire(dir, LOCK_FILE)?;
    stop_signals::catch_stop_signals();
    let launch_path = dir.join(LAUNCH_FILE);
    let text = std::fs::read(&launch_path).map_err(|e| ShimError::Read(launch_path.clone(), e))?;
    let launch: Launch =
        serde_json::from_slice(&text).map_err(|e| ShimError::Parse(launch_path.clone(), e))?;
    // It holds the VM's SSH host key, which has no business on disk once read.
    let _ = std::fs::remove_file(&launch_path);
    let mut state = State::booting(std::process::id());
    write_state(dir, &mut state)?;

    let spec = Spec {
        vmm: launch.vmm.clone(),
        kernel: launch.kernel.clone(),
        initrd: launch.boot.initrd.clone(),
        vcpus: launch.vcpus,
        mem_mib: launch.mem_mib,
        runtime_dir: launch.runtime_dir.clone(),
        die_with_parent: true,
        boot_timeout: Duration::from_millis(launch.boot_timeout_ms),
        metrics: Some(dir.join(METRICS_FILE)),
        drives: launch.boot.drives(),
        kernel_args: launch.boot.kernel_args.clone(),
        jail: true,
        cpu_millicores: launch.cpu_millicores,
        restore: None,
        control_socket: false,
    };
    // Grant-specific state (keys, host key, workload) only goes in with
    // `start`, after the snapshot point: clones share nothing of a grant.
    let snapshot_dir = launch.snapshots.as_deref().and_then(|root| {
        let measurement = launch.boot.measurement.as_deref()?;
        Some(warm::snapshot_dir(root, measurement, &spec))
    });
    let launched = warm::launch(&spec, snapshot_dir.as_deref(), &|| {
        stop_signals::count() > 0
    });
    let launched = match launched {
        Ok(l) => l,
        Err(e) => return ended(dir, &mut state, Some(error_chain(&e))),
    };
    if let Some(why) = &launched.restore_failed {
        tracing::warn!("the saved snapshot did not restore, booted instead: {why}");
    }
    if let Some(why) = &launched.save_failed {
        tracing::warn!("cannot save a snapshot of the ready VM: {why}");
    }
    state.start = Some(launched.start);
    let mut machine = launched.machine;
    // `launch` returns at the agent's `ready`; later steps count from here.
    let ready_at = Instant::now();
    let listen_host = launch.listen_host.as_deref().unwrap_or(LISTEN_HOST);
    let forwarder = bind(listen_host, launch.ports).and_then(|b| {
        b.serve(machine.vsock_uds(), Target::Vsock(SSH_PORT), |e| {
            tracing::warn!("ssh forwarding: {e}");
        })
    });
    let forwarder = match forwarder {
        Ok(f) => f,
        Err(e) => {
            machine.stop();
            machine.wait(Duration::from_secs(10));
            return ended(dir, &mut state, Some(format!("ssh forwarding: {e}")));
        }
    };
    // Listening before `start`: the agent serves them once it has it.
    let published = match publish(
        listen_host,
        launch.ports,
        &launch.publish,
        &machine.vsock_uds(),
    ) {
        Ok(p) => p,
        Err(e) => {
            machine.stop();
            machine.wait(Duration::from_secs(10));
            return ended(dir, &mut state, Some(format!("published ports: {e}")));
        }
    };
    let started = machine.sender().and_then(|s| {
        s.send(&Frame::Control(Message::Start {
            workload: launch.workload.clone(),
            authorized_keys: launch.authorized_keys.clone(),
            ssh_host_key: Some(launch.ssh_host_key.clone()),
            usage_interval_ms: 1000,
            one_shot: true,
            identity: kiln_protocol::Identity::from_host(None).ok(),
            published_ports: launch.publish.clone(),
        }))
        .map_err(crate::machine::MachineError::Control)
    });
    let events = machine.events();
    let (sender, events) = match (started.and(machine.sender()), events) {
        (Ok(s), Ok(e)) => (s, e),
        (Err(e), _) | (_, Err(e)) => {
            machine.stop();
            machine.wait(Duration::from_secs(10));
            return ended(dir, &mut state, Some(error_chain(&e)));
        }
    };
    // Still `booting` until the agent has started the command: it serves
    // SSH before that, so `running` means the requester can log in.
    state.vmm_pid = Some(machine.vmm_pid());
    state.ssh_port = Some(forwarder.local_addr().port());
    state.published = published
        .iter()
        .map(|(guest_port, f)| PublishedPort {
            guest_port: *guest_port,
            host: listen_host.to_string(),
            port: f.local_addr().port(),
        })
        .collect();
    state.boot_ms = Some(machine.ready().boot.as_millis() as u64);
    write_state(dir, &mut state)?;
    // The VMM is started and nothing is started after it: what the guest
    // sends from here on meets a shim that cannot exec, mount or trace.
    if let Err(e) = super::shim_filter::install() {
        tracing::warn!("{e}; the shim runs unfiltered");
    }

    let mut output = match OutputLog::open(&dir.join(OUTPUT_FILE), launch.output_cap) {
        Ok(log) => Some(log),
        Err(e) => {
            tracing::warn!("cannot open {OUTPUT_FILE}: {e}; the workload's output is dropped");
            None
        }
    };
    // The newest usage report not yet in state.json, and when it was last
    // written there.
    let mut usage_pending = false;
    let mut usage_written = Instant::now();
    let grace = Duration::from_millis(launch.stop_grace_ms);
    let mut stop_deadline: Option<Instant> = None;
    let valid_to = launch
        .valid_to
        .map(|t| t + chrono::Duration::from_std(DEADLINE_SLACK).unwrap_or_default());
    loop {
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Frame(Frame::Stdout(d) | Frame::Stderr(d))) => {
                match output.as_mut().map(|log| log.append(&d)) {
                    Some(Ok(Appended::Kept)) | None => {}
                    Some(Ok(Appended::Truncated { dropped })) => {
                        tracing::warn!(
                            cap = launch.output_cap,
                            dropped,
                            "{OUTPUT_FILE} reached its cap: later output is dropped"
                        );
                        state.output_truncated = true;
                        write_state(dir, &mut state)?;
                    }
                    Some(Err(e)) => {
                        // A full disk must not end the grant; the output is
                        // what gives way.
                        tracing::warn!("cannot write {OUTPUT_FILE}: {e}; later output is dropped");
                        output = None;
                    }
                }
            }
            Ok(Event::Frame(Frame::Control(Message::Started { .. }))) => {
                state.phase = Phase::Running;
                state.started_ms = state
                    .boot_ms
                    .map(|b| b + ready_at.elapsed().as_millis() as u64);
                write_state(dir, &mut state)?;
            }
            Ok(Event::Frame(Frame::Control(Message::Usage(u)))) => {
                state.usage = Some(u);
                usage_pending = true;
            }
            Ok(Event::Frame(Frame::Control(Message::Exited { status, usage }))) => {
                state.exit_status = Some(status);
                state.usage = Some(usage);
                usage_pending = false;
                write_state(dir, &mut state)?;
            }
            Ok(Event::Frame(Frame::Control(Message::NotStarted { message }))) => {
                state.error = Some(message);
            }
            Ok(Event::Frame(_)) | Ok(Event::Garbled(_)) => {}
            Ok(Event::Closed) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if usage_pending && usage_written.elapsed() >= USAGE_WRITE_INTERVAL {
            write_state(dir, &mut state)?;
            usage_pending = false;
            usage_written = Instant::now();
        }
        let past_deadline = valid_to.is_some_and(|t| Utc::now() >= t);
        if past_deadline && stop_deadline.is_none() {
            tracing::info!("valid_to passed and nobody stopped the VM: stopping it");
            state.deadline_reached = true;
        }
        if (stop_signals::count() > 0 || past_deadline) && stop_deadline.is_none() {
            tracing::info!("stop requested: the workload has {grace:?}");
            let _ = sender.send(&Frame::Control(Message::Shutdown {
                grace_ms: grace.as_millis() as u64,
            }));
            stop_deadline = Some(Instant::now() + grace + Duration::from_secs(5));
        }
        if stop_deadline.is_some_and(|d| Instant::now() >= d) || stop_signals::count() > 1 {
            machine.stop();
            break;
        }
        if machine.try_wait().is_some() {
            break;
        }
    }
    let vmm = machine.wait(Duration::from_secs(30));
    drop(forwarder);
    drop(published);
    state.host = host_usage(&dir.join(METRICS_FILE));
    let error = match vmm.code {
        Some(vmm_exit::GUEST_STOPPED | vmm_exit::STOPPED_BY_SIGTERM) => None,
        Some(vmm_exit::INIT_FAILED) => Some("the agent in the VM failed".to_string()),
        Some(vmm_exit::GUEST_PANIC) => Some(format!(
            "the guest kernel panicked: {}",
            kiln_protocol::console::find_panic_line(&machine.console())
                .map_or_else(|| machine.failure_detail(), str::to_string)
        )),
        _ => Some(format!(
            "kiln-vmm ended with {vmm}: {}",
            machine.failure_detail()
        )),
    };
    drop(machine);
    let error = state.error.take().or(error);
    ended(dir, &mut state, error)
}

/// `host`:`port`, brackets around an IPv6 address.
fn socket_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A listener on `host`: on a free port of `range` (tried from a place
/// of its own, so shims starting together rarely race for one), or on
/// any free port.
fn bind(host: &str, range: Option<(u16, u16)>) -> Result<Bound, ForwardError> {
    let Some((first, last)) = range else {
        return Forwarder::bind(socket_address(host, 0));
    };
    let span = u32::from(last.saturating_sub(first)) + 1;
    let start = std::process::id() % span;
    let mut last_error = None;
    for i in 0..span {
        let port = first + ((start + i) % span) as u16;
        match Forwarder::bind(socket_address(host, port)) {
            Ok(b) => return Ok(b),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| ForwardError::Listen {
        addr: socket_address(host, first),
        source: std::io::ErrorKind::AddrInUse.into(),
    }))
}

/// A listener on `host` (a port of `range`, if set) for each guest TCP
/// port, joined through the VM's vsock socket `uds` to the agent.
fn publish(
    host: &str,
    range: Option<(u16, u16)>,
    ports: &[u16],
    uds: &Path,
) -> Result<Vec<(u16, Forwarder)>, ForwardError> {
    ports
        .iter()
        .map(|&port| {
            let f = bind(host, range)?.serve(uds, Target::Tcp(port), move |e| {
                tracing::warn!("published port {port}: {e}");
            })?;
            Ok((port, f))
        })
        .collect()
}

fn ended(dir: &Path, state: &mut State, error: Option<String>) -> Result<(), ShimError> {
    if let Some(e) = &error {
        tracing::error!("{e}");
    }
    state.phase = Phase::Ended;
    state.error = error;
    write_state(dir, state)
}

/// vCPU time and peak RSS from the VMM's metrics file.
fn host_usage(metrics: &Path) -> HostUsage {
    let m: serde_json::Value = std::fs::read(metrics)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let ms = |k: &str| m[k].as_f64().unwrap_or(0.0);
    HostUsage {
        vcpu_cpu_ms: (ms("vmm_user_cpu_ms") + ms("vmm_system_cpu_ms")) as u64,
        vmm_rss_kib: m["peak_rss_kib"].as_u64().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), None);
        let mut s = State {
            phase: Phase::Running,
            shim_pid: 7,
            vmm_pid: Some(8),
            ssh_port: Some(2222),
            published: vec![PublishedPort {
                guest_port: 8000,
                host: LISTEN_HOST.to_string(),
                port: 2223,
            }],
            boot_ms: Some(100),
            started_ms: Some(150),
            usage: None,
            exit_status: Some(ExitStatus::Code(3)),
            host: HostUsage::default(),
            error: None,
            output_truncated: false,
            start: Some(Start::Warm),
            deadline_reached: false,
            updated_at: Utc::now(),
        };
        write_state(dir.path(), &mut s).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(s));
        assert!(!dir.path().join(format!(".{STATE_FILE}.tmp")).exists());
        std::fs::write(dir.path().join(STATE_FILE), b"{").unwrap();
        assert!(matches!(read_state(dir.path()), Err(ShimError::Parse(..))));
    }

    #[test]
    fn listeners_take_free_ports_of_their_range_only() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let first = bind("127.0.0.1", Some((free, free))).unwrap();
        assert_eq!(first.local_addr().port(), free);
        // The range's one port is taken: nothing else is tried.
        assert!(matches!(
            bind("127.0.0.1", Some((free, free))),
            Err(ForwardError::Listen { .. })
        ));
        assert_ne!(bind("127.0.0.1", None).unwrap().local_addr().port(), 0);
        assert_eq!(socket_address("::1", 22), "[::1]:22");
    }

    #[test]
    fn host_usage_from_vmm_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(
            &p,
            br#"{"vmm_user_cpu_ms": 10.5, "vmm_system_cpu_ms": 20.0, "peak_rss_kib": 5000}"#,
        )
        .unwrap();
        assert_eq!(
            host_usage(&p),
            HostUsage {
                vcpu_cpu_ms: 30,
                vmm_rss_kib: 5000
            }
        );
        assert_eq!(host_usage(&dir.path().join("none")), HostUsage::default());
    }
}
