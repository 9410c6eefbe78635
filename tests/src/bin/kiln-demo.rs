//! `scripts/demo.sh`: boots a micro-VM with kiln's kernel and the test
//! guest program, streams its console, and prints the VMM's metrics.

use std::process::Command;

use kiln_tests::{bin, guest_init, initramfs_with_init, kernel};

fn main() {
    let vcpus = std::env::args().nth(1).unwrap_or_else(|| "2".to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let metrics = dir.path().join("metrics.json");
    println!("booting a micro-VM ({vcpus} vCPUs, 256 MiB) with kiln-vmm; on hosts that emulate guest kernel code this takes a while");
    let status = Command::new(bin("kiln-vmm"))
        .args(["--kernel", kernel().to_str().unwrap_or_default()])
        .args(["--initrd", initrd.to_str().unwrap_or_default()])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet -- demo"])
        .args(["--vcpus", &vcpus, "--mem-mib", "256", "--serial-stdio"])
        .args(["--metrics", metrics.to_str().unwrap_or_default()])
        .status()
        .expect("run kiln-vmm");
    let m: serde_json::Value = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let secs = |k: &str| {
        m[k].as_f64()
            .map_or("-".to_string(), |v| format!("{:.2} s", v / 1000.0))
    };
    println!("--");
    println!(
        "VM ended:            {}",
        m["exit_reason"].as_str().unwrap_or("?")
    );
    println!(
        "host profile:        {}",
        m["host_profile"].as_str().unwrap_or("?")
    );
    println!(
        "first KVM_RUN:       {:.2} ms",
        m["time_to_first_kvm_run_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!("guest ready (init):  {}", secs("ready_marker_ms"));
    println!("total:               {}", secs("total_ms"));
    println!(
        "VMM RSS overhead:    {:.2} MiB",
        m["vmm_overhead_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
    );
    std::process::exit(status.code().unwrap_or(1));
}
