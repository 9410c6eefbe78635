//! `kiln run` benchmark: end-to-end wall time of `kiln run IMAGE -- true`
//! (warm image cache) against QEMU `-M microvm` booting the same kernel and
//! the same initramfs to the same readiness marker, alternating, in one
//! run. Also kiln-vmm's RSS minus the guest memory it touched.
//! Usage: kiln-bench-run [RUNS] (default 5). Needs scripts/setup.sh (the
//! demo image is the workload's image).
//! `kiln-bench-run python [RUNS] [--initramfs]` does the same for the
//! Debian+python3 image on a block root (the `python` module below).

use std::process::Command;
use std::time::Instant;

use kiln_tests::peer::{median, pvm_host, qemu_microvm, time_to_marker_then, PvmCmdline, MARKER};
use kiln_tests::{bin, kernel, kiln_home};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs_arg = |a: Option<&String>| a.and_then(|a| a.parse().ok()).unwrap_or(5);
    if args.first().is_some_and(|a| a == "python") {
        let initramfs = args.iter().any(|a| a == "--initramfs");
        python::bench(runs_arg(args.get(1)), initramfs);
        return;
    }
    let runs: usize = runs_arg(args.first());
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

/// The Debian bookworm + python3 image (176 MB unpacked): image build cold
/// against `umoci unpack` + `mksquashfs`, a cold and warm
/// `kiln run -- python3 -c pass` on a block root against QEMU microvm
/// booting the same kernel, agent initramfs and root image, the guest RAM
/// touched beyond the workload's own, a warm demo run for scale, and with
/// `--initramfs` one run on an initramfs root.
mod python {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Instant;

    use kiln_tests::images::python_layout;
    use kiln_tests::peer::{median, qemu_microvm_root, time_to_marker_then, PvmCmdline, MARKER};
    use kiln_tests::{bin, kernel, kiln_home};

    /// A `$KILN_HOME` with an empty image cache, sharing the kernel and
    /// agent of the real one.
    struct Home(tempfile::TempDir);

    impl Home {
        fn new() -> Home {
            let dir = tempfile::tempdir().expect("temp dir");
            let p = dir.path();
            for (link, target) in [
                ("kernel/vmlinux", kernel()),
                ("bin/kiln-agent", kiln_home().join("bin/kiln-agent")),
            ] {
                let link = p.join(link);
                if let Some(parent) = link.parent() {
                    std::fs::create_dir_all(parent).expect("home dir");
                }
                std::os::unix::fs::symlink(target, link).expect("home link");
            }
            Home(dir)
        }

        fn kiln(&self, args: &[&str]) -> Command {
            let mut c = Command::new(bin("kiln"));
            c.args(args).env("KILN_HOME", self.0.path());
            c
        }
    }

    /// One `kiln run`'s figures.
    struct Run {
        wall: f64,
        boot: f64,
        /// Guest RAM kiln-vmm saw touched, and the workload's peak, KiB.
        touched_kib: f64,
        workload_kib: f64,
        block_requests: f64,
    }

    fn kiln_run(home: &Home, extra: &[&str], layout: &str, cmd: &[&str]) -> Result<Run, String> {
        let metrics = home.0.path().join("metrics.json");
        let mut args = vec!["run", "--json", "--vmm-metrics"];
        let m = metrics.to_string_lossy().to_string();
        args.push(&m);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--oci-layout", layout, "--"]);
        args.extend_from_slice(cmd);
        let start = Instant::now();
        let out = home.kiln(&args).output().map_err(|e| e.to_string())?;
        let wall = start.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(stderr.to_string());
        }
        let stats: serde_json::Value = stderr
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let m: serde_json::Value = std::fs::read_to_string(&metrics)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        Ok(Run {
            wall,
            boot: f(&stats["boot_ms"]) / 1000.0,
            touched_kib: f(&m["guest_resident_kib"]),
            workload_kib: f(&stats["peak_memory_kib"]),
            block_requests: m["drives"]
                .as_array()
                .and_then(|d| d.first())
                .map(|d| f(&d["requests"]))
                .unwrap_or(f64::NAN),
        })
    }

    fn show(what: &str, r: &Result<Run, String>) {
        match r {
            Ok(r) => println!(
                "{what}: {:.1} s end to end (boot to agent ready {:.1} s), guest RAM touched {:.1} MiB, workload peak {:.1} MiB, root disk requests {:.0}",
                r.wall,
                r.boot,
                r.touched_kib / 1024.0,
                r.workload_kib / 1024.0,
                r.block_requests
            ),
            Err(e) => println!("{what}: failed: {}", e.trim()),
        }
    }

    fn timed(script: &str) -> f64 {
        let start = Instant::now();
        let st = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .status()
            .expect("bash");
        assert!(st.success(), "failed: {script}");
        start.elapsed().as_secs_f64()
    }

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    pub fn bench(runs: usize, initramfs: bool) {
        let dir = python_layout();
        let layout = format!("{}:py", dir.display());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "python image {layout} | 1 vCPU, 512 MiB | {runs} warm runs each, alternating | load {}",
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );

        // Image build, cold, from the local layout; the peer unpacks the
        // same layout to disk and packs it as squashfs.
        let build_home = Home::new();
        let start = Instant::now();
        let built = build_home
            .kiln(&[
                "image",
                "build",
                "--json",
                "--rootfs",
                "block",
                "--oci-layout",
                &layout,
            ])
            .output()
            .expect("kiln image build");
        let build_s = start.elapsed().as_secs_f64();
        assert!(
            built.status.success(),
            "kiln image build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let built: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap_or_default();
        let root_image = PathBuf::from(built["root_image"].as_str().unwrap_or_default());
        let work = tempfile::tempdir().expect("temp dir");
        let w = work.path().display();
        let peer_s = timed(&format!(
            "umoci unpack --image {layout} {w}/bundle >/dev/null && \
             mksquashfs {w}/bundle/rootfs {w}/root.sqfs -noappend -quiet >/dev/null"
        ));
        println!(
            "image build, cold: kiln image build --rootfs block {build_s:.1} s (erofs {:.1} MiB) | umoci unpack + mksquashfs {peer_s:.1} s (squashfs {:.1} MiB) | ratio {:.2}",
            size(&root_image) as f64 / (1 << 20) as f64,
            size(&work.path().join("root.sqfs")) as f64 / (1 << 20) as f64,
            build_s / peer_s
        );
        drop(work);

        // Cold: a fresh cache, so the run builds the image first.
        let home = Home::new();
        let cmd = ["python3", "-c", "pass"];
        show(
            "cold run (block root, build included)",
            &kiln_run(&home, &[], &layout, &cmd),
        );
        let artifacts = home
            .kiln(&[
                "image",
                "build",
                "--json",
                "--rootfs",
                "block",
                "--oci-layout",
                &layout,
            ])
            .output()
            .expect("kiln image build");
        let artifacts: serde_json::Value =
            serde_json::from_slice(&artifacts.stdout).unwrap_or_default();
        let initrd = PathBuf::from(artifacts["path"].as_str().unwrap_or_default());
        let root = PathBuf::from(artifacts["root_image"].as_str().unwrap_or_default());

        let (mut wall, mut boot, mut qemu, mut beyond) = (vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            let r = kiln_run(&home, &[], &layout, &cmd);
            show(&format!("run {i}: warm kiln run (block root)"), &r);
            if let Ok(r) = r {
                wall.push(r.wall);
                boot.push(r.boot);
                beyond.push((r.touched_kib - r.workload_kib) / 1024.0);
            }
            // Stopped at the agent's marker, as the demo benchmark does:
            // without vsock the agent then runs the image's own command.
            let q = qemu_microvm_root(
                &kernel(),
                &initrd,
                Some(&root),
                1,
                512,
                "",
                PvmCmdline::BootOnly,
            );
            match time_to_marker_then(q, true) {
                Ok(t) => {
                    qemu.push(t.as_secs_f64());
                    println!(
                        "run {i}: qemu microvm, same root disk, {:.1} s to {MARKER}",
                        t.as_secs_f64()
                    );
                }
                Err(e) => println!("run {i}: qemu failed: {e}"),
            }
        }
        let (k, b, q) = (median(&mut wall), median(&mut boot), median(&mut qemu));
        println!(
            "median warm: `kiln run -- python3 -c pass` {k:.1} s end to end, boot to agent ready {b:.1} s | qemu microvm to {MARKER} {q:.1} s | boot ratio {:.2}",
            b / q
        );
        println!(
            "guest RAM touched beyond the workload's peak: median {:.1} MiB",
            median(&mut beyond)
        );

        // Scale: the busybox demo, warm, in the same home's cache.
        let demo = format!("{}:demo", kiln_home().join("demo/oci").display());
        let _ = home
            .kiln(&["image", "build", "--oci-layout", &demo])
            .output();
        let d = kiln_run(&home, &[], &demo, &["true"]);
        show("warm demo run (busybox, `-- true`)", &d);
        if let Ok(d) = d {
            println!("python warm / demo warm: {:.2}", k / d.wall);
        }

        if initramfs {
            show(
                "initramfs root, once (build included)",
                &kiln_run(&home, &["--rootfs", "initramfs"], &layout, &cmd),
            );
        }
    }
}
