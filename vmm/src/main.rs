//! `kiln-vmm`: boots one micro-VM and exits with the guest's fate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use kiln_vmm::config::{
    default_kernel_path, DriveConfig, NetConfig, VmConfig, VsockConfig, DEFAULT_GUEST_CID,
};
use kiln_vmm::exit::code;
use kiln_vmm::jail::cgroup::Limits;
use kiln_vmm::jail::{self, JailConfig, Role};
use kiln_vmm::seccomp::SeccompMode;
use kiln_vmm::snapshot::{PreparedRestore, RestoreOptions};
use kiln_vmm::{capabilities, Payload, SerialOutput, Vm};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    the guest powered off or reset the VM (reboot)
  1    the VMM failed (a bad flag or configuration, KVM error, ...)
  2    triple fault in the guest
  3    KVM could not emulate a guest instruction (RIP and bytes are printed)
  4    watchdog: no guest activity for --watchdog-secs
  5    the guest kernel reported a panic
  6    the guest's init (kiln-agent) reported a fatal error, then stopped the VM
  128+N  stopped by signal N (SIGTERM, SIGINT, or the parent's death)";

#[derive(Parser, Debug)]
#[command(name = "kiln-vmm", version, about = "Boot one KVM micro-VM", after_help = EXIT_STATUS_HELP)]
struct Args {
    /// Kernel: uncompressed vmlinux (PVH) or bzImage [default: $KILN_HOME/kernel/vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio, optionally compressed)
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Base kernel command line (devices and host workarounds are appended)
    #[arg(long)]
    cmdline: Option<String>,
    /// One more kernel argument after the base command line (repeatable);
    /// unlike --cmdline it keeps kiln-vmm's defaults
    #[arg(long = "append", value_name = "ARG")]
    append: Vec<String>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Back guest memory with 2 MiB huge pages
    #[arg(long)]
    hugepages: bool,
    /// Host Unix socket for the guest's vsock device
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    guest_cid: u64,
    /// Append the guest console to this file
    #[arg(long, conflicts_with = "serial_stdio")]
    serial_log: Option<PathBuf>,
    /// Guest console on standard output, standard input to the guest
    #[arg(long)]
    serial_stdio: bool,
    /// Leave out the virtio-rng device
    #[arg(long)]
    no_rng: bool,
    /// Attach a file or block device as a read-write virtio-blk drive
    /// (repeatable). --drive and --drive-ro attach in the order given,
    /// together: the first is /dev/vda in the guest, then /dev/vdb, ...
    /// Given, they replace the config file's drives
    #[arg(long, value_name = "PATH")]
    drive: Vec<PathBuf>,
    /// Attach a read-only virtio-blk drive (repeatable; ordered with --drive)
    #[arg(long, value_name = "PATH")]
    drive_ro: Vec<PathBuf>,
    /// Attach a virtio-net card to this host TAP (it must exist, or
    /// kiln-vmm must be allowed to create it); the jail attaches to it
    /// before it enters its empty network namespace
    #[arg(long, value_name = "NAME")]
    net_tap: Option<String>,
    /// The virtio-net card's MAC (aa:bb:cc:dd:ee:ff) [default: the guest picks one]
    #[arg(
        long,
        value_name = "MAC",
        requires = "net_tap",
        conflicts_with = "restore"
    )]
    net_mac: Option<String>,
    /// --drive and --drive-ro merged in command-line order.
    #[arg(skip)]
    drives_in_order: Vec<DriveConfig>,
    /// Console text that marks the guest ready (for metrics)
    #[arg(long)]
    ready_marker: Option<String>,
    /// Stop the VM after this many seconds without guest activity (0: never)
    #[arg(long)]
    watchdog_secs: Option<u64>,
    /// Require an Intel TDX guest
    #[arg(long)]
    tdx: bool,
    /// VM configuration as JSON; flags override its fields
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write boot and resource metrics as JSON here when the VM ends
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Stop the VM (SIGTERM) when the process that started kiln-vmm dies
    #[arg(long)]
    die_with_parent: bool,
    /// Remove this file or directory tree when the VMM exits, however the
    /// VM ended (repeatable); lets a launcher that dies leave nothing behind
    #[arg(long, value_name = "PATH")]
    cleanup: Vec<PathBuf>,
    /// Restore the VM saved in this snapshot state file instead of booting
    /// (with --mem-file; --vsock-uds, --net-tap, --drive/--drive-ro,
    /// --serial-log, --watchdog-secs give the clone its own)
    #[arg(long, value_name = "STATE", requires = "mem_file")]
    restore: Option<PathBuf>,
    /// The snapshot's guest memory file (mapped copy-on-write, never changed)
    #[arg(long, value_name = "MEM", requires = "restore")]
    mem_file: Option<PathBuf>,
    /// Serve the control socket here: one JSON request per line
    /// ({"op":"pause"|"resume"|"metrics"},
    /// {"op":"snapshot","state":PATH,"mem":PATH} or {"op":"stop"}, which
    /// ends the VM as SIGTERM does), one JSON answer per line
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run the VMM without its jail (namespaces, unprivileged uid, private
    /// root): for debugging only, a VMM bug then gives the guest the host
    #[arg(long)]
    no_jail: bool,
    /// Where the jail's root is mounted (an empty directory is made there)
    /// [default: a directory in $TMPDIR]
    #[arg(long, value_name = "DIR")]
    jail_root: Option<PathBuf>,
    /// The uids (and gids) jailed VMMs run as, one per VM
    #[arg(long, value_name = "FIRST-LAST", default_value = jail::DEFAULT_UID_RANGE)]
    jail_uids: String,
    /// What the per-thread seccomp filters do with a system call they have
    /// no rule for: kill the VMM, log it (kernel log) and allow it, or no
    /// filters at all
    #[arg(long, value_name = "kill|log|off")]
    seccomp: Option<SeccompMode>,
    /// CPU time the VM may use, in thousandths of a CPU (its cgroup's
    /// cpu.max) [default: 1000 per vCPU]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    cpu_millicores: Option<u32>,
    /// Print what this host offers micro-VMs and exit
    #[arg(long)]
    capabilities: bool,
    /// With --capabilities: print JSON
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let started = Instant::now();
    kiln_vmm::signals::block_stop_signals();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person: logs often go to files (shim.log, journals).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let matches = match Args::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => {
            let _ = e.print();
            // clap's 2 would read as a triple fault: a bad flag is a bad
            // configuration, status 1. Help and version are 0.
            let status = if e.use_stderr() { code::VMM_ERROR } else { 0 };
            return ExitCode::from(status as u8);
        }
    };
    let args = parse_args(matches);
    let mut cleanup = Cleanup(args.cleanup.clone());
    match run(args, started, &mut cleanup) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("kiln-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, started: Instant, cleanup: &mut Cleanup) -> anyhow::Result<i32> {
    if args.capabilities {
        let caps = capabilities::probe();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&caps)?);
        } else {
            println!("kvm:             {}", if caps.kvm { "yes" } else { "no" });
            if let Some(e) = &caps.kvm_error {
                println!("kvm error:       {e}");
            }
            println!("virtualization:  {:?}", caps.virtualization);
            println!("max vcpus:       {}", caps.max_vcpus);
            println!("tdx:             {}", if caps.tdx { "yes" } else { "no" });
            println!(
                "hugepages (2M):  {} free of {}",
                caps.hugepages_2m_free, caps.hugepages_2m_total
            );
        }
        return Ok(0);
    }
    if args.die_with_parent {
        die_with_parent()?;
    }
    let mut metrics = args.metrics.clone();
    // Absolute: a jailed VMM binds it from the jail's root.
    let api_sock = args.api_sock.as_deref().map(jail::absolute);
    // A restore reads its state file here, before any jail: the clone's
    // configuration comes from it.
    let mut restore = match (&args.restore, &args.mem_file) {
        (Some(state), Some(mem)) => {
            let serial = if args.serial_stdio {
                SerialOutput::Stdio
            } else {
                args.serial_log
                    .clone()
                    .map_or(SerialOutput::None, SerialOutput::File)
            };
            let opts = RestoreOptions {
                state: state.clone(),
                // Absolute, as the jail needs it (and harmless without it).
                mem: jail::absolute(mem),
                vsock_uds: args.vsock_uds.clone(),
                net_tap: args.net_tap.clone(),
                drives: args.drives_in_order.clone(),
                serial,
                watchdog_secs: args.watchdog_secs,
            };
            Some(PreparedRestore::load(&opts)?)
        }
        _ => None,
    };
    let mut config = match &restore {
        Some(r) => r.config.clone(),
        None => merge_config(&args)?,
    };
    if args.no_jail {
        eprintln!(
            "kiln-vmm: WARNING: --no-jail: this VMM runs as root with the host's \
             filesystem and network; a VMM bug gives the guest the host"
        );
    } else if let Some(why) = unjailed_api_sock(api_sock.as_deref(), &config) {
        eprintln!("kiln-vmm: note: this VM runs without the jail: {why}");
    } else {
        // Bad input is reported before the fork, as without the jail.
        config.validate()?;
        jail::absolute_paths(&mut config, &mut metrics);
        let jail = JailConfig {
            root: args.jail_root.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("kiln-jail-{}", std::process::id()))
            }),
            uids: args.jail_uids.parse()?,
            lock_dir: PathBuf::from(jail::UID_LOCK_DIR),
            limits: Limits::for_vm(
                config.vcpus,
                config.mem_mib,
                args.cpu_millicores
                    .unwrap_or(u32::from(config.vcpus) * 1000),
            ),
        };
        let also_read: Vec<PathBuf> = restore.iter().map(|r| r.mem.clone()).collect();
        match jail::enter(
            &jail,
            &mut config,
            metrics.as_deref(),
            &also_read,
            api_sock.is_some(),
        )? {
            Role::Supervisor(code) => return Ok(code),
            // The supervisor outside cleans up; here those paths are the jail's.
            Role::Vmm => {
                cleanup.0.clear();
                tracing::debug!("jailed {:?} after start", started.elapsed());
            }
        }
    }
    let mut vm = match restore.take() {
        Some(mut r) => {
            // The jail may have moved drives (see `jail::enter`).
            r.config = config;
            Vm::restore_prepared(r, started)?
        }
        None => Vm::build(config, Payload::Kernel, started)?,
    };
    if let Some(path) = &api_sock {
        vm.serve_api(path)?;
    }
    let outcome = vm.run();
    if let Some(path) = &metrics {
        outcome
            .metrics
            .write_to(path)
            .with_context(|| format!("cannot write metrics to {}", path.display()))?;
    }
    let code = outcome.reason.exit_code();
    if code == 0 {
        tracing::info!("{}", outcome.reason);
    } else {
        eprintln!("kiln-vmm: {}", outcome.reason);
    }
    Ok(code)
}

/// Why a VM with a control socket at `api_sock` cannot be jailed, if it
/// cannot: the socket, and the snapshots its clients ask for, must be in
/// the VM's sockets directory (the vsock socket's), the one directory of
/// the host's the jail lets the VMM write in.
fn unjailed_api_sock(api_sock: Option<&Path>, config: &VmConfig) -> Option<&'static str> {
    let api_dir = api_sock?.parent()?.canonicalize().ok();
    let vsock_dir = config
        .vsock
        .as_ref()
        .and_then(|v| v.uds_path.parent()?.canonicalize().ok());
    match (api_dir, vsock_dir) {
        (Some(a), Some(v)) if a == v => None,
        (_, None) => Some("--api-sock needs a vsock device, whose directory the jail keeps"),
        _ => Some("--api-sock is outside the vsock socket's directory, the one the jail keeps"),
    }
}

fn merge_config(args: &Args) -> anyhow::Result<VmConfig> {
    let mut c = match &args.config {
        Some(path) => VmConfig::from_file(path)?,
        None => {
            let kernel = args.kernel.clone().unwrap_or_else(default_kernel_path);
            VmConfig::new(kernel)
        }
    };
    if let Some(k) = &args.kernel {
        c.kernel = k.clone();
    }
    if args.kernel.is_none() && args.config.is_none() && !c.kernel.exists() {
        return Err(kiln_vmm::config::ConfigError::NoDefaultKernel(c.kernel).into());
    }
    if let Some(i) = &args.initrd {
        c.initrd = Some(i.clone());
    }
    if c.initrd.is_none() {
        anyhow::bail!("no initramfs: pass --initrd PATH");
    }
    if let Some(s) = &args.cmdline {
        c.cmdline = s.clone();
    }
    for a in &args.append {
        c.cmdline.push(' ');
        c.cmdline.push_str(a);
    }
    if let Some(v) = args.vcpus {
        c.vcpus = v;
    }
    if let Some(m) = args.mem_mib {
        c.mem_mib = m;
    }
    c.hugepages |= args.hugepages;
    // Checked even without --vsock-uds: a bad flag is never ignored.
    kiln_vmm::config::check_guest_cid(args.guest_cid)?;
    if let Some(p) = &args.vsock_uds {
        c.vsock = Some(VsockConfig {
            guest_cid: args.guest_cid,
            uds_path: p.clone(),
        });
    }
    if let Some(p) = &args.serial_log {
        c.serial = SerialOutput::File(p.clone());
    }
    if args.serial_stdio {
        c.serial = SerialOutput::Stdio;
    }
    if args.no_rng {
        c.rng = false;
    }
    if !args.drives_in_order.is_empty() {
        c.drives = args.drives_in_order.clone();
    }
    if let Some(tap) = &args.net_tap {
        // The config file's rate limits stay; the flags name the card.
        let net = NetConfig {
            tap: tap.clone(),
            mac: args.net_mac.clone(),
            ..c.net.clone().unwrap_or_else(|| NetConfig {
                tap: tap.clone(),
                mac: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
        };
        net.validate()?;
        c.net = Some(net);
    }
    if let Some(m) = &args.ready_marker {
        c.ready_marker = m.clone();
    }
    if let Some(w) = args.watchdog_secs {
        c.watchdog_secs = w;
    }
    c.tdx |= args.tdx;
    if let Some(m) = args.seccomp {
        c.seccomp = m;
    }
    Ok(c)
}

fn parse_args(matches: ArgMatches) -> Args {
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    args.drives_in_order = drives_in_order(&matches);
    args
}

/// --drive and --drive-ro in the order they were given: that order is the
/// guest's vda, vdb, ...
fn drives_in_order(matches: &ArgMatches) -> Vec<DriveConfig> {
    let mut drives = Vec::new();
    for (name, read_only) in [("drive", false), ("drive_ro", true)] {
        if let (Some(indices), Some(paths)) =
            (matches.indices_of(name), matches.get_many::<PathBuf>(name))
        {
            drives.extend(indices.zip(paths).map(|(i, path)| {
                let drive = DriveConfig {
                    path: path.clone(),
                    read_only,
                    id: None,
                };
                (i, drive)
            }));
        }
    }
    drives.sort_by_key(|(i, _)| *i);
    drives.into_iter().map(|(_, d)| d).collect()
}

/// Paths removed when `main` returns.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let is_dir = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
            let gone = if is_dir {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if let Err(e) = gone {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("kiln-vmm: cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

/// Asks the kernel to send SIGTERM when the parent dies, and checks that
/// the parent did not die before that was in place.
fn die_with_parent() -> anyhow::Result<()> {
    // SAFETY: getppid and prctl(PR_SET_PDEATHSIG) have no memory effects.
    let parent = unsafe { libc::getppid() };
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot watch the parent process");
    }
    // SAFETY: as above.
    if unsafe { libc::getppid() } != parent {
        anyhow::bail!("parent process exited before the VM started");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_attach_in_command_line_order() {
        let matches = Args::command().get_matches_from([
            "kiln-vmm",
            "--drive-ro",
            "/root.img",
            "--mem-mib",
            "64",
            "--drive",
            "/scratch.img",
            "--drive-ro",
            "/extra.img",
        ]);
        let got: Vec<(String, bool)> = parse_args(matches)
            .drives_in_order
            .iter()
            .map(|d| (d.path.display().to_string(), d.read_only))
            .collect();
        assert_eq!(
            got,
            [
                ("/root.img".to_string(), true),
                ("/scratch.img".to_string(), false),
                ("/extra.img".to_string(), true),
            ]
        );
    }
}
