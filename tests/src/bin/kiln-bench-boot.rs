//! Boot benchmark: the same kernel and initramfs booted alternately by
//! kiln-vmm and by QEMU's microvm machine, each to the same serial marker.
//! On a PVM host QEMU runs twice per round: with the guest command-line
//! workarounds a guest needs to boot there at all, and with kiln's whole
//! command line (its tuning too), so the ratio shows what the tuning buys.
//! Prints medians, the ratios, and kiln-vmm's time to first KVM_RUN and RSS
//! overhead. Usage: kiln-bench-boot [RUNS] [VCPUS] (default 5, 1).

use std::process::Command;

use kiln_tests::peer::{
    median, pvm_host, qemu_microvm, time_to_marker, PvmCmdline, BASE_CMDLINE, MARKER,
};
use kiln_tests::{bin, guest_init, initramfs_with_init, kernel};

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let vcpus: u8 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let kernel = kernel();
    let pvm = pvm_host();
    println!(
        "kernel {} | initramfs {} bytes | {vcpus} vCPU, 256 MiB | {runs} runs each, alternating | host: {}",
        kernel.display(),
        std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0),
        if pvm { "PVM" } else { "hardware KVM" }
    );

    // QEMU's command lines: just the boot workarounds; kiln's whole one.
    let peers: &[(PvmCmdline, &str)] = if pvm {
        &[
            (PvmCmdline::BootOnly, "qemu (boot workarounds)"),
            (PvmCmdline::Tuned, "qemu (kiln's cmdline)"),
        ]
    } else {
        &[(PvmCmdline::BootOnly, "qemu")]
    };
    let (mut kiln, mut first_run, mut overhead) = (vec![], vec![], vec![]);
    let mut qemu: Vec<Vec<f64>> = vec![vec![]; peers.len()];
    for i in 0..runs {
        let metrics = dir.path().join(format!("metrics-{i}.json"));
        let mut k = Command::new(bin("kiln-vmm"));
        k.args(["--kernel", kernel.to_str().unwrap_or_default()])
            .args(["--initrd", initrd.to_str().unwrap_or_default()])
            .args(["--cmdline", &format!("{BASE_CMDLINE} -- bench")])
            .args([
                "--vcpus",
                &vcpus.to_string(),
                "--mem-mib",
                "256",
                "--serial-stdio",
            ])
            .args(["--metrics", metrics.to_str().unwrap_or_default()])
            .env("KILN_LOG", "warn");
        match time_to_marker(k) {
            Ok(t) => {
                kiln.push(t.as_secs_f64());
                let m: serde_json::Value = std::fs::read_to_string(&metrics)
                    .ok()
                    .and_then(|s| serde_json::from_str(&s).ok())
                    .unwrap_or_default();
                first_run.extend(m["time_to_first_kvm_run_ms"].as_f64());
                overhead.extend(m["vmm_overhead_kib"].as_f64());
                println!("run {i}: kiln-vmm {:.2} s", t.as_secs_f64());
            }
            Err(e) => println!("run {i}: kiln-vmm failed: {e}"),
        }
        for ((level, name), times) in peers.iter().zip(qemu.iter_mut()) {
            let q = qemu_microvm(&kernel, &initrd, vcpus, 256, "bench", *level);
            match time_to_marker(q) {
                Ok(t) => {
                    times.push(t.as_secs_f64());
                    println!("run {i}: {name} {:.2} s", t.as_secs_f64());
                }
                Err(e) => println!("run {i}: {name} failed: {e}"),
            }
        }
    }
    if kiln.is_empty() || qemu.iter().any(Vec::is_empty) {
        eprintln!("not enough successful runs to compare");
        std::process::exit(1);
    }
    let k = median(&mut kiln);
    println!("median time to {MARKER}: kiln-vmm {k:.2} s");
    for ((_, name), times) in peers.iter().zip(qemu.iter_mut()) {
        let q = median(times);
        println!(
            "median time to {MARKER}: {name} {q:.2} s, ratio kiln/qemu {:.2}",
            k / q
        );
    }
    if !first_run.is_empty() {
        println!(
            "kiln-vmm start -> first KVM_RUN: median {:.2} ms",
            median(&mut first_run)
        );
    }
    if !overhead.is_empty() {
        println!(
            "kiln-vmm RSS minus guest memory touched: median {:.2} MiB",
            median(&mut overhead) / 1024.0
        );
    }
}
