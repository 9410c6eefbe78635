//! The benchmark peer: QEMU's `-M microvm` booting the same kernel and
//! initramfs, and the timing helpers both benchmarks share.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use kiln_vmm::host::PvmCmdline;

/// The console line every benchmarked boot waits for.
pub const MARKER: &str = kiln_protocol::console::READY_MARKER;
/// kiln-vmm's default command line.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Whether this host's KVM is PVM (guest kernel code emulated).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// QEMU microvm with the same devices kiln-vmm gives a guest (serial,
/// virtio-rng; QEMU's vsock needs vhost-vsock, which a PVM host lacks).
/// `init_args` go after ` -- ` on the command line. On a PVM host QEMU
/// gets by hand what kiln-vmm's host profile adds, at the given `level`:
/// the workarounds without which no guest boots here, or also kiln's tuning.
pub fn qemu_microvm(
    kernel: &Path,
    initrd: &Path,
    vcpus: u8,
    mem_mib: u64,
    init_args: &str,
    level: PvmCmdline,
) -> Command {
    qemu_microvm_root(kernel, initrd, None, vcpus, mem_mib, init_args, level)
}

/// As [`qemu_microvm`], with `root` (a block root's image) as a read-only
/// virtio-blk disk and `kiln.root=vda` on the command line, as kiln-vmm
/// gives a block root.
pub fn qemu_microvm_root(
    kernel: &Path,
    initrd: &Path,
    root: Option<&Path>,
    vcpus: u8,
    mem_mib: u64,
    init_args: &str,
    level: PvmCmdline,
) -> Command {
    let pvm = pvm_host();
    let mut append = BASE_CMDLINE.to_string();
    if pvm {
        append = format!("{append} {}", kiln_vmm::host::pvm_cmdline(level).join(" "));
    }
    if root.is_some() {
        append.push_str(" kiln.root=vda");
    }
    if !init_args.is_empty() {
        append = format!("{append} -- {init_args}");
    }
    let mut q = Command::new("qemu-system-x86_64");
    // QEMU names its virtio-mmio devices on the kernel command line only
    // with ACPI off; kiln's guest kernel has no ACPI, so without it the
    // root disk never appears (the agent stops: /dev/vda did not appear).
    let machine = if root.is_some() {
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off"
    } else {
        "microvm,x-option-roms=off,rtc=off,isa-serial=on"
    };
    q.args(["-M", machine])
        .args(["-enable-kvm", "-cpu"])
        // On PVM hosts QEMU's `-cpu host` aborts setting
        // IA32_ARCH_CAPABILITIES, and needs the same masks kiln applies.
        .arg(if pvm {
            "host,-cx16,-arch-capabilities,kvm-pv-unhalt=off,kvm-pv-ipi=off,kvm-pv-sched-yield=off"
        } else {
            "host"
        })
        .args(["-m", &mem_mib.to_string(), "-smp", &vcpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-no-reboot", "-device", "virtio-rng-device"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append]);
    if let Some(root) = root {
        q.arg("-drive")
            .arg(format!(
                "file={},if=none,id=root,format=raw,readonly=on",
                root.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
    }
    q
}

/// Runs `cmd` until its stdout shows [`MARKER`]; returns that time, then
/// waits for it to exit (it must exit successfully).
pub fn time_to_marker(cmd: Command) -> Result<Duration, String> {
    time_to_marker_then(cmd, false)
}

/// As [`time_to_marker`]; with `kill`, the process is killed once the
/// marker is seen (for guests that go on working after it).
pub fn time_to_marker_then(mut cmd: Command, kill: bool) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if found.is_none() && line.contains(MARKER) {
            found = Some(start.elapsed());
            if kill {
                let _ = child.kill();
            }
        }
    }
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    match found {
        Some(t) if status.success() || kill => Ok(t),
        Some(_) => Err(format!("exited with {status}")),
        None => Err(format!("no marker; exited with {status}")),
    }
}

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
