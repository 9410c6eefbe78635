//! `kiln run`: one image, one fresh micro-VM, one command, like
//! `docker run --rm`. Output streams live; the exit code is the workload's.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_bridge::machine::stop_signals as signals;
use kiln_bridge::machine::{
    binary_beside_me, warm, BootFiles, Drive, Event, Machine, MachineError, Sender, Spec,
};
use kiln_image::build::Options;
use kiln_image::cache::Cache;
use kiln_protocol::forward::Forwarder;
use kiln_protocol::vmm::exit as vmm_exit;
use kiln_protocol::{console, valid_env_name, Frame, Message, Usage, Workload};
use serde::Serialize;

use crate::image::Rootfs;
use crate::publish::{self, PortSpec, Published};
use crate::{exit_code, image, scratch};

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Registry reference (alpine:3.20, 127.0.0.1:5000/x:1, …@sha256:…).
    #[arg(required_unless_present_any = ["docker_archive", "oci_layout"])]
    pub image: Option<String>,
    /// Run a `docker save` tarball instead.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["image", "oci_layout"])]
    pub docker_archive: Option<PathBuf>,
    /// Run an image from an OCI layout directory or archive (PATH[:TAG]).
    #[arg(long, value_name = "PATH[:TAG]", conflicts_with = "image")]
    pub oci_layout: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub mem: u64,
    /// Stop the VM if the command runs longer than this (e.g. 30s, 5m;
    /// boot time not counted) and exit 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Set an environment variable (KEY=VAL, or KEY to pass kiln's own).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// Working directory inside the VM.
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as (name, uid, user:group or uid:gid).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Forward standard input to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Publish a guest TCP port on the host (repeatable): connections to
    /// IP:HOSTPORT (IP defaults to 127.0.0.1, unlike docker's 0.0.0.0; give
    /// 0.0.0.0 to listen on every address) reach GUESTPORT on the guest's
    /// loopback over vsock. Only TCP; the host port is bound before the VM
    /// starts.
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOSTPORT:GUESTPORT[/tcp]", value_parser = publish::parse_spec)]
    pub publish: Vec<PortSpec>,
    /// Print boot time, run time, CPU seconds and peak memory at the end
    /// (on standard error, like `time`).
    #[arg(long)]
    pub stats: bool,
    /// Print the statistics as one JSON object on standard error instead.
    #[arg(long)]
    pub json: bool,
    /// A registry (host[:port]) to reach over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Root filesystem: the image in the initramfs, on a read-only virtio-blk
    /// disk under a writable overlay, or picked by the image's size.
    #[arg(long, value_name = "auto|initramfs|block", value_parser = image::parse_rootfs, default_value = "auto")]
    pub rootfs: Rootfs,
    /// Give the VM a scratch disk of SIZE (e.g. 1G, 512M) for everything it
    /// writes (a block root's overlay); removed when the run ends.
    #[arg(long, value_name = "SIZE", value_parser = scratch::parse_size)]
    pub disk: Option<u64>,
    /// Guest kernel [default: $KILN_HOME/kernel/vmlinux].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Run kiln-vmm without its jail (namespaces, unprivileged uid, a root
    /// of its own): for debugging only, a VMM bug then gives the guest the host.
    #[arg(long)]
    pub no_jail: bool,
    /// Boot the VM, even where a snapshot of this image's ready VM is
    /// saved, and save none. Without it, the first run of an image (with
    /// the same kernel, vCPUs and memory) saves its VM as the agent becomes
    /// ready, and later runs restore that instead of booting; runs with
    /// --disk always boot.
    #[arg(long)]
    pub cold: bool,
    /// Have kiln-vmm write its metrics (JSON) to FILE (for benchmarks).
    #[arg(long, value_name = "FILE", hide = true)]
    pub vmm_metrics: Option<PathBuf>,
    /// The command and its arguments (default: the image's entrypoint and cmd).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// What `--stats` and `--json` report.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// VMM start to the agent's `ready`.
    pub boot_ms: u64,
    /// Inside the guest: the kernel's exec of the agent (`/init`) to `ready`.
    pub guest_init_to_ready_ms: u64,
    /// Command start to its exit, as the host saw it.
    pub run_ms: u64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub peak_memory_kib: u64,
    pub exit_code: i32,
    /// `exited`, `timeout`, `interrupted` or `not_started`.
    pub outcome: &'static str,
    /// `cold` (booted) or `warm` (restored from a saved snapshot).
    pub start: warm::Start,
    /// The ports `-p` published (absent without any).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<Published>,
}

/// Grace period the workload gets after the first Ctrl-C.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a guest may take to power off after its workload ended.
const POWER_OFF_WAIT: Duration = Duration::from_secs(30);
/// How long the guest may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs the image; returns the exit code for kiln.
pub fn run(cache: &Cache, home: &Path, a: RunArgs) -> Result<i32> {
    let workload = workload(&a)?;
    publish::check_unique(&a.publish)?;
    // Before the image and the VM: a taken port fails the run at once.
    let listeners = publish::Listeners::bind(&a.publish)?;
    let published = listeners.published();
    let published_ports = listeners.guest_ports();
    let opts = Options {
        input: image::input(
            a.image.clone(),
            a.docker_archive.clone(),
            a.oci_layout.clone(),
        )?,
        agent: home.join("bin/kiln-agent"),
        compression: kiln_image::compress::Compression::None,
        max_expanded: kiln_image::assemble::DEFAULT_MAX_EXPANDED,
        insecure: a.insecure.clone(),
        docker_config: None,
        refresh: false,
        output: None,
        // A scratch disk only has a place on a block root.
        root: match (a.rootfs.kind(), a.disk) {
            (None, Some(_)) => Some(kiln_image::root::RootKind::Block),
            (kind, _) => kind,
        },
    };
    if a.disk.is_some() && a.rootfs == Rootfs::Initramfs {
        bail!("--disk needs a block root: leave out --rootfs initramfs");
    }
    let built = image::build_with_progress(cache, &opts)?;
    // As a grant boots it: the root image first, read-only.
    let boot = BootFiles::of(&built);
    let mut drives = boot.drives();
    let mut kernel_args = boot.kernel_args.clone();
    // Held open (and already unlinked) until kiln-vmm has exited.
    let scratch = match a.disk {
        Some(size) => {
            let disk = scratch::Disk::create(&home.join("vms"), size)?;
            drives.push(Drive {
                path: disk.path(),
                read_only: false,
            });
            kernel_args.push(scratch::KERNEL_ARG.to_string());
            Some(disk)
        }
        None => None,
    };
    let spec = Spec {
        vmm: binary_beside_me("KILN_VMM", "kiln-vmm"),
        kernel: a
            .kernel
            .clone()
            .unwrap_or_else(|| home.join("kernel/vmlinux")),
        initrd: boot.initrd.clone(),
        vcpus: a.vcpus,
        mem_mib: a.mem,
        runtime_dir: home.join("vms"),
        die_with_parent: true,
        boot_timeout: BOOT_TIMEOUT,
        metrics: a.vmm_metrics.clone(),
        drives,
        kernel_args,
        jail: !a.no_jail,
        cpu_millicores: None,
        restore: None,
        control_socket: false,
    };
    // A scratch disk is formatted and mounted before the agent is ready:
    // a snapshot would hold another VM's disk.
    let snapshot_dir = (!a.cold && a.disk.is_none())
        .then(|| warm::snapshot_dir(&home.join(warm::SNAPSHOTS_DIR), &built.measurement, &spec));
    signals::catch_stop_signals();
    let launched = warm::launch(&spec, snapshot_dir.as_deref(), &|| signals::count() > 0);
    let launched = match launched {
        Ok(l) => l,
        Err(MachineError::Cancelled) => return Ok(exit_code::INTERRUPTED),
        Err(e) => return Err(e).context("cannot start the micro-VM"),
    };
    if let Some(why) = &launched.restore_failed {
        eprintln!(
            "kiln: the saved snapshot did not restore, booting instead: {}",
            why.lines().next().unwrap_or_default()
        );
    }
    if let Some(why) = &launched.save_failed {
        eprintln!("kiln: warning: cannot save a snapshot for later runs: {why}");
    }
    let (mut machine, start) = (launched.machine, launched.start);
    tracing::info!(vm = machine.id(), boot = ?machine.ready().boot, start = start.as_str(), "agent ready");
    // Stop listening when the run ends, before the VM is waited for.
    let forwarders = listeners.serve(&machine.vsock_uds())?;
    let session = Session::start(
        &machine,
        workload,
        published_ports,
        a.interactive,
        a.timeout,
    )?;
    let ended = session.follow(&mut machine, forwarders)?;
    let stats = stats(&machine, &ended, start, published);
    if a.json {
        eprintln!("{}", serde_json::to_string(&stats)?);
    } else if a.stats {
        eprintln!("{}", stats.line());
    }
    if let Some(message) = &ended.not_started {
        eprintln!("kiln: {message}: {}", not_started_advice(ended.code));
    }
    drop(scratch);
    Ok(ended.code)
}

/// The agent's `Workload` from the flags.
fn workload(a: &RunArgs) -> Result<Workload> {
    let mut env = Vec::with_capacity(a.env.len());
    for e in &a.env {
        match e.split_once('=') {
            Some((k, _)) if valid_env_name(k) => env.push(e.clone()),
            None if valid_env_name(e) => {
                // Docker's `-e KEY`: pass kiln's own value, if it has one.
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
            _ => bail!("-e {e:?}: expected KEY=VALUE with a non-empty KEY without `=`"),
        }
    }
    Ok(Workload {
        argv: a.cmd.clone(),
        env,
        working_dir: a.workdir.clone(),
        user: a.user.clone(),
        interactive: a.interactive,
    })
}

/// `30s`, `5m`, `1h`, `250ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.');
    let (num, unit) = split.map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 30s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too long"))
}

/// One workload in one VM, from `start` to its end.
struct Session {
    sender: Sender,
    events: std::sync::mpsc::Receiver<Event>,
    timeout: Option<Duration>,
}

/// How the session ended.
struct Ended {
    code: i32,
    outcome: &'static str,
    run: Duration,
    usage: Option<Usage>,
    not_started: Option<String>,
}

impl Session {
    fn start(
        machine: &Machine,
        workload: Workload,
        published_ports: Vec<u16>,
        interactive: bool,
        timeout: Option<Duration>,
    ) -> Result<Session> {
        let sender = machine.sender()?;
        let events = machine.events()?;
        sender
            .send(&Frame::Control(Message::Start {
                workload,
                authorized_keys: Vec::new(),
                ssh_host_key: None,
                usage_interval_ms: 1000,
                one_shot: true,
                identity: kiln_protocol::Identity::from_host(None).ok(),
                published_ports,
            }))
            .context("cannot send the command to the agent")?;
        if interactive {
            forward_stdin(sender.clone());
        }
        Ok(Session {
            sender,
            events,
            timeout,
        })
    }

    /// Streams output until the workload ends, the timeout passes or the
    /// user gives up; then closes the published ports and sees the VM stopped.
    fn follow(self, machine: &mut Machine, forwarders: Vec<Forwarder>) -> Result<Ended> {
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        let mut started: Option<Instant> = None;
        let mut usage = None;
        let mut not_started = None;
        let mut stop_requested = false;
        let ended = loop {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Frame(Frame::Stdout(d))) => {
                    // A closed stdout (`| head`) must not stop the workload.
                    let _ = out.write_all(&d).and_then(|_| out.flush());
                }
                Ok(Event::Frame(Frame::Stderr(d))) => {
                    let _ = err.write_all(&d).and_then(|_| err.flush());
                }
                Ok(Event::Frame(Frame::Control(m))) => match m {
                    Message::Started { .. } => started = Some(Instant::now()),
                    Message::NotStarted { message } => not_started = Some(message),
                    Message::Usage(u) => usage = Some(u),
                    Message::Exited { status, usage: u } => {
                        break Ended {
                            code: status.shell_code(),
                            outcome: if not_started.is_some() {
                                "not_started"
                            } else {
                                "exited"
                            },
                            run: started.map_or(Duration::ZERO, |s| s.elapsed()),
                            usage: Some(u),
                            not_started: not_started.take(),
                        };
                    }
                    Message::Error { message } => tracing::warn!("agent: {message}"),
                    other => tracing::debug!("ignoring {other:?}"),
                },
                Ok(Event::Frame(_)) => {}
                Ok(Event::Garbled(e)) => tracing::warn!("unreadable frame from the agent: {e}"),
                Ok(Event::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(vm_stopped_early(machine));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let stops = signals::count();
            if stops >= 2 {
                machine.stop();
                break Ended::cut(exit_code::INTERRUPTED, "interrupted", started, usage);
            }
            if stops == 1 && !stop_requested {
                stop_requested = true;
                eprintln!("kiln: stopping the command (press Ctrl-C again to stop the VM at once)");
                let _ = self.sender.send(&Frame::Control(Message::Shutdown {
                    grace_ms: STOP_GRACE.as_millis() as u64,
                }));
            }
            if let (Some(limit), Some(s)) = (self.timeout, started) {
                if s.elapsed() >= limit {
                    machine.stop();
                    eprintln!("kiln: the command ran longer than {limit:?}; VM stopped");
                    break Ended::cut(exit_code::TIMEOUT, "timeout", started, usage);
                }
            }
        };
        drop(forwarders);
        let vmm = machine.wait(POWER_OFF_WAIT);
        tracing::debug!("kiln-vmm ended: {vmm}");
        Ok(ended)
    }
}

impl Ended {
    /// A session kiln ended before the workload did.
    fn cut(
        code: i32,
        outcome: &'static str,
        started: Option<Instant>,
        usage: Option<Usage>,
    ) -> Ended {
        Ended {
            code,
            outcome,
            run: started.map_or(Duration::ZERO, |s| s.elapsed()),
            usage,
            not_started: None,
        }
    }
}

/// Why the VM ended without the workload's exit status.
fn vm_stopped_early(machine: &mut Machine) -> anyhow::Error {
    let vmm = machine.wait(Duration::from_secs(5));
    let console = machine.console();
    let why = match vmm.code {
        Some(vmm_exit::INIT_FAILED) => format!(
            "the agent in the VM failed: {}",
            console::find_agent_fatal(&console).unwrap_or_default()
        ),
        Some(vmm_exit::GUEST_PANIC) => format!(
            "the guest kernel panicked: {}",
            console::find_panic_line(&console)
                .map_or_else(|| machine.failure_detail(), str::to_string)
        ),
        _ => format!("kiln-vmm {vmm}: {}", machine.failure_detail()),
    };
    anyhow::anyhow!("the VM stopped before the command finished: {why}")
}

/// Copies standard input to the agent until EOF.
fn forward_stdin(sender: Sender) {
    let spawned = std::thread::Builder::new()
        .name("kiln-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = sender.send(&Frame::StdinEof);
                        return;
                    }
                    Ok(n) => {
                        if sender.send(&Frame::Stdin(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot forward standard input: {e}");
    }
}

fn stats(machine: &Machine, ended: &Ended, start: warm::Start, published: Vec<Published>) -> Stats {
    let u = ended.usage.clone().unwrap_or_default();
    Stats {
        boot_ms: machine.ready().boot.as_millis() as u64,
        guest_init_to_ready_ms: machine.ready().init_to_ready_ms,
        run_ms: ended.run.as_millis() as u64,
        cpu_user_seconds: u.cpu_user_ms as f64 / 1000.0,
        cpu_system_seconds: u.cpu_system_ms as f64 / 1000.0,
        peak_memory_kib: u.mem_peak_kib,
        exit_code: ended.code,
        outcome: ended.outcome,
        start,
        published,
    }
}

impl Stats {
    /// One line for humans, in the spirit of `time`.
    pub fn line(&self) -> String {
        format!(
            "boot {:.3}s ({})  run {:.3}s  cpu {:.2}s (user {:.2}s, sys {:.2}s)  peak memory {:.1} MiB  exit {}",
            self.boot_ms as f64 / 1000.0,
            self.start.as_str(),
            self.run_ms as f64 / 1000.0,
            self.cpu_user_seconds + self.cpu_system_seconds,
            self.cpu_user_seconds,
            self.cpu_system_seconds,
            self.peak_memory_kib as f64 / 1024.0,
            self.exit_code,
        )
    }
}

fn not_started_advice(code: i32) -> &'static str {
    match code {
        exit_code::NOT_FOUND => "the image has no such program; give an existing one after `--` (as in `kiln run IMAGE -- /bin/sh -c ...`)",
        exit_code::NOT_EXECUTABLE => "check the command's permissions and the image's user and working directory",
        _ => "check the command and the image's configuration",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in [
            "",
            "s",
            "0",
            "-1s",
            "10x",
            "1e400",
            "18446744073709551615s",
            "1e300h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_flags() {
        let mut a = RunArgs {
            image: Some("x".into()),
            docker_archive: None,
            oci_layout: None,
            vcpus: 1,
            mem: 512,
            timeout: None,
            env: vec!["A=1".into(), "B=".into(), "C=x=y".into()],
            workdir: None,
            user: None,
            interactive: false,
            publish: vec![],
            stats: false,
            json: false,
            insecure: vec![],
            kernel: None,
            vmm_metrics: None,
            no_jail: false,
            cold: false,
            rootfs: Rootfs::Auto,
            disk: None,
            cmd: vec!["true".into()],
        };
        let w = workload(&a).unwrap();
        assert_eq!(w.env, ["A=1", "B=", "C=x=y"]);
        assert_eq!(w.argv, ["true"]);
        a.env = vec!["=1".into()];
        assert!(workload(&a).unwrap_err().to_string().contains("\"=1\""));
        a.env = vec!["KILN_TEST_SURELY_UNSET_VAR".into()];
        assert!(workload(&a).unwrap().env.is_empty());
    }
}
