//! Restore benchmark: boots the test init counting on its console (`--
//! snap`) once, snapshots it through the control socket, then restores
//! the snapshot RUNS times, one after another. Prints the medians of
//! kiln-vmm's start to vCPUs running (its own metric: the first KVM_RUN)
//! and to the guest's first console line after the restore (which waits
//! out the rest of the guest's 200 ms pause between counts, so it is an
//! upper bound for "the guest runs again"). Usage: kiln-bench-restore [RUNS]
//! (default 10).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::peer::{median, BASE_CMDLINE};
use kiln_tests::{bin, guest_init, initramfs_with_init, kernel, wait_for};

fn api(sock: &Path, request: &str) -> Result<(), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("control socket: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.contains("\"ok\":true") {
        Ok(())
    } else {
        Err(format!("{request}: {line}"))
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(bin("kiln-vmm"))
        .args(args)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn kiln-vmm")
}

fn count_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("count="))
        .count()
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let initrd = initramfs_with_init(d, &guest_init());
    let (serial, sock) = (d.join("orig.log"), d.join("orig.api"));
    let (state, mem) = (d.join("vm.state"), d.join("vm.mem"));
    let mut orig = spawn(&[
        "--kernel",
        kernel().to_str().unwrap_or_default(),
        "--initrd",
        initrd.to_str().unwrap_or_default(),
        "--cmdline",
        &format!("{BASE_CMDLINE} -- snap"),
        "--vcpus",
        "2",
        "--mem-mib",
        "128",
        "--serial-log",
        serial.to_str().unwrap_or_default(),
        "--api-sock",
        sock.to_str().unwrap_or_default(),
        "--vsock-uds",
        d.join("orig.sock").to_str().unwrap_or_default(),
        // A boot on a busy host may go quiet for minutes; this is not a
        // test of the watchdog.
        "--watchdog-secs",
        "0",
    ]);
    if wait_for(Duration::from_secs(900), || {
        (count_lines(&serial) > 0).then_some(())
    })
    .is_none()
    {
        let _ = orig.kill();
        panic!("the guest never counted");
    }
    let snap = Instant::now();
    api(&sock, r#"{"op":"pause"}"#).expect("pause");
    api(
        &sock,
        &format!(
            r#"{{"op":"snapshot","state":"{}","mem":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    )
    .expect("snapshot");
    let snap_ms = snap.elapsed().as_secs_f64() * 1000.0;
    let _ = orig.kill();
    let _ = orig.wait();
    println!(
        "snapshot (pause + save, 128 MiB guest, 2 vCPUs): {snap_ms:.0} ms; state {} bytes; {runs} restores",
        std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0)
    );

    let (mut first_run, mut first_line) = (vec![], vec![]);
    for i in 0..runs {
        let log = d.join(format!("clone-{i}.log"));
        let metrics = d.join(format!("clone-{i}.json"));
        let api_sock = d.join(format!("clone-{i}.api"));
        let start = Instant::now();
        let mut clone = spawn(&[
            "--restore",
            state.to_str().unwrap_or_default(),
            "--mem-file",
            mem.to_str().unwrap_or_default(),
            "--vsock-uds",
            d.join(format!("clone-{i}.sock"))
                .to_str()
                .unwrap_or_default(),
            "--serial-log",
            log.to_str().unwrap_or_default(),
            "--metrics",
            metrics.to_str().unwrap_or_default(),
            "--api-sock",
            api_sock.to_str().unwrap_or_default(),
        ]);
        let line = wait_for(Duration::from_secs(60), || {
            (count_lines(&log) > 0).then(|| start.elapsed())
        });
        let _ = wait_for(Duration::from_secs(5), || api_sock.exists().then_some(()));
        let _ = api(&api_sock, r#"{"op":"stop"}"#);
        let _ = clone.wait();
        let m: serde_json::Value = std::fs::read_to_string(&metrics)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        match (line, m["time_to_first_kvm_run_ms"].as_f64()) {
            (Some(l), Some(r)) => {
                first_line.push(l.as_secs_f64() * 1000.0);
                first_run.push(r);
            }
            _ => eprintln!("restore {i}: no count line or no metrics"),
        }
    }
    println!(
        "kiln-vmm start -> vCPUs running: median {:.1} ms (n={})",
        median(&mut first_run),
        first_run.len()
    );
    println!(
        "kiln-vmm start -> first guest console line: median {:.1} ms (n={})",
        median(&mut first_line),
        first_line.len()
    );
}
