//! `kiln run` benchmark: end-to-end wall time of `kiln run IMAGE -- true`
//! (warm image cache) against QEMU `-M microvm` booting the same kernel and
//! the same initramfs to the same readiness marker, alternating, in one
//! run. Also kiln-vmm's RSS minus the guest memory it touched.
//! Usage: kiln-bench-run [RUNS] (default 5). Needs scripts/setup.sh (the
//! demo image is the workload's image).

use std::process::Command;
use std::time::Instant;

use kiln_tests::peer::{median, pvm_host, qemu_microvm, time_to_marker_then, PvmCmdline, MARKER};
use kiln_tests::{bin, kernel, kiln_home};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let layout = format!("{}:demo", kiln_home().join("demo/oci").display());
    let kiln = bin("kiln");
    // Warm the cache and learn the initramfs both sides boot.
    let built = Command::new(&kiln)
        .args(["image", "build", "--json", "--oci-layout", &layout])
        .output()
        .expect("run kiln image build");
    if !built.status.success() {
        eprintln!(
            "kiln image build failed (run scripts/setup.sh): {}",
            String::from_utf8_lossy(&built.stderr)
        );
        std::process::exit(1);
    }
    let built: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap_or_default();
    let initrd = std::path::PathBuf::from(built["path"].as_str().unwrap_or_default());
    let kernel = kernel();
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "kernel {} | initramfs {} bytes (the demo image + agent) | 1 vCPU, 512 MiB | {runs} runs each, alternating | host: {}",
        kernel.display(),
        std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0),
        if pvm_host() { "PVM" } else { "hardware KVM" }
    );

    let (mut total, mut boot, mut qemu, mut overhead, mut init) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let metrics = dir.path().join(format!("metrics-{i}.json"));
        let start = Instant::now();
        let out = Command::new(&kiln)
            .args(["run", "--json", "--oci-layout", &layout, "--vmm-metrics"])
            .arg(&metrics)
            .args(["--", "true"])
            .output()
            .expect("run kiln");
        let wall = start.elapsed().as_secs_f64();
        if out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stats: serde_json::Value = stderr
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            let m: serde_json::Value = std::fs::read_to_string(&metrics)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            total.push(wall);
            boot.extend(stats["boot_ms"].as_f64().map(|ms| ms / 1000.0));
            init.extend(stats["guest_init_to_ready_ms"].as_f64());
            overhead.extend(m["vmm_overhead_kib"].as_f64());
            println!(
                "run {i}: kiln run  {wall:.2} s (boot to agent ready {:.2} s)",
                stats["boot_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0
            );
        } else {
            println!(
                "run {i}: kiln run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Without vsock (QEMU has none here) the agent prints its marker
        // at once, then runs the image's command: QEMU is stopped there.
        // QEMU gets the workarounds without which no guest boots here;
        // kiln-bench-boot also compares it with kiln's whole command line.
        let q = qemu_microvm(&kernel, &initrd, 1, 512, "", PvmCmdline::BootOnly);
        match time_to_marker_then(q, true) {
            Ok(t) => {
                qemu.push(t.as_secs_f64());
                println!("run {i}: qemu      {:.2} s to {MARKER}", t.as_secs_f64());
            }
            Err(e) => println!("run {i}: qemu failed: {e}"),
        }
    }
    if total.is_empty() || qemu.is_empty() {
        eprintln!("not enough successful runs to compare");
        std::process::exit(1);
    }
    let (k, q) = (median(&mut total), median(&mut qemu));
    println!(
        "median: `kiln run -- true` {k:.2} s end to end (boot {:.2} s), qemu microvm to {MARKER} {q:.2} s, ratio {:.2}",
        median(&mut boot),
        k / q
    );
    println!(
        "in the guest, kernel starting /init to the agent's ready: median {:.0} ms",
        median(&mut init)
    );
    println!(
        "kiln-vmm RSS minus guest memory touched: median {:.2} MiB",
        median(&mut overhead) / 1024.0
    );
}
