//! Grant benchmark: from `POST /v1/grants` to the first command run over
//! SSH with the stock client, through a real kilnd, its local backend and
//! real VMs, with the image cache warm. Beside each grant's latency stands
//! the raw boot of that same VM (kiln-vmm start to the agent's `ready`, as
//! the shim measured it), so what the bridge adds is visible:
//! - to running: submit until the API says `running`, less the raw boot;
//!   split into the agent's part (`ready` to `started`: its SSH server and
//!   the command started, as the shim timed it) and the bridge's own
//!   (image lookup, shim and VMM start, noticing `started`, the API);
//! - first ssh: `running` until `ssh … true` has returned.
//!
//! Also grants per minute sustained (each grant is terminated once its SSH
//! works; CONCURRENCY grants in flight at a time).
//! Usage: kiln-bench-grants [GRANTS] [CONCURRENCY] [warm|cold] (default
//! 10 1 warm: grants restore the snapshot the warm-up grant saved; cold:
//! every grant boots).
//! Needs scripts/setup.sh and `cargo build --release --workspace`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use kiln_tests::bench::{percentile, GrantTimer, Sample};
use kiln_tests::kilnd::{Kilnd, Requester};

fn main() {
    let arg = |n: usize, default: usize| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
            .max(1)
    };
    let grants = arg(1, 10);
    let concurrency = arg(2, 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path();
    let requester = Requester::new(work);
    // `cold`: every grant boots; else (the default) grants restore the
    // snapshot that the warm-up grant saved.
    let cold = std::env::args().nth(3).as_deref() == Some("cold");
    let extra = if cold { "warm_start = false" } else { "" };
    let kilnd = Kilnd::with_backend(work, concurrency as u32, 320 * concurrency as u64, extra);
    let bench = GrantTimer {
        kilnd: &kilnd,
        requester: &requester,
        scratch: work,
        grants: kilnd.home().join("grants"),
    };
    println!(
        "{grants} grants, {concurrency} at a time, 1 vCPU / 256 MiB each, busybox image from a local registry, {}; host: {}",
        if cold { "every grant booted (warm_start = false)" } else { "restored from the warm-up grant's snapshot" },
        if kiln_tests::peer::pvm_host() {
            "nested PVM (guest kernels emulated)"
        } else {
            "hardware KVM"
        }
    );

    // The first grant fills the image cache; it is reported, not counted.
    match bench.one("warm-up") {
        Ok(s) => println!(
            "cold cache: submit to ssh {:.0} ms (raw boot {:.0} ms)",
            s.to_ssh, s.raw_boot
        ),
        Err(e) => {
            eprintln!("{e}\nkilnd log:\n{}", kilnd.log());
            std::process::exit(1);
        }
    }

    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= grants {
                    break;
                }
                let result = bench.one(&format!("bench-{i}"));
                match result {
                    Ok(sample) => {
                        println!(
                            "bench-{i}: submit→running {:.0} ms, →ssh {:.0} ms, raw boot {:.0} ms, bridge {:.0} ms (agent {:.0}, kilnd+shim {:.0})",
                            sample.to_running,
                            sample.to_ssh,
                            sample.raw_boot,
                            sample.bridge_to_running(),
                            sample.agent_ready_to_started(),
                            sample.bridge_own()
                        );
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
                    }
                    Err(e) => failures.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                }
            });
        }
    });
    let wall = start.elapsed();
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if samples.is_empty() {
        eprintln!("kilnd log:\n{}", kilnd.log());
        std::process::exit(1);
    }
    let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let rows: [(&str, Vec<f64>); 7] = [
        ("submit → ssh ready", column(|s| s.to_ssh)),
        ("submit → running", column(|s| s.to_running)),
        ("raw boot (same VMs)", column(|s| s.raw_boot)),
        ("bridge to running", column(Sample::bridge_to_running)),
        (
            "  of which agent: ready → started",
            column(Sample::agent_ready_to_started),
        ),
        ("  of which kilnd + shim", column(Sample::bridge_own)),
        ("first ssh after running", column(Sample::first_ssh)),
    ];
    println!(
        "\n| {} grants | p50 ms | p95 ms |\n|---|---|---|",
        samples.len()
    );
    for (name, v) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} |",
            percentile(v, 50.0),
            percentile(v, 95.0)
        );
    }
    println!("\nwhere each local provision's time went (kilnd's log):");
    for line in kilnd
        .log()
        .lines()
        .filter(|l| l.contains("local VM running"))
    {
        println!("  {line}");
    }
    let per_min = samples.len() as f64 / wall.as_secs_f64() * 60.0;
    println!(
        "sustained: {per_min:.2} grants/min ({} in {:.0} s, {concurrency} at a time); {} failed",
        samples.len(),
        wall.as_secs_f64(),
        failures.len()
    );
    let json = serde_json::json!({
        "grants": samples.len(),
        "failed": failures.len(),
        "concurrency": concurrency,
        "grants_per_min": per_min,
        "p50_ms": rows.iter().map(|(n, v)| (n.to_string(), serde_json::json!(percentile(v, 50.0)))).collect::<serde_json::Map<_, _>>(),
        "p95_ms": rows.iter().map(|(n, v)| (n.to_string(), serde_json::json!(percentile(v, 95.0)))).collect::<serde_json::Map<_, _>>(),
    });
    println!("{json}");
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
