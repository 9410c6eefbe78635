//! The SSH hop's cost: grants from submit to `running` and to the first
//! command over SSH on owned hosts reached over SSH, against the same on
//! kilnd's local backend, in one run. Three kilnds: one with a local
//! backend, and two with an `ssh` backend whose one host is a network
//! namespace on this machine (its own sshd, `$KILN_HOME` and address,
//! running the same kiln: `kiln_tests::fleet::OwnedHost`). The two hosts
//! differ only in what root's login shell reads before each command: this
//! machine's `~/.bashrc` as it is, or none (see `ShellRc`), because every
//! `kiln host` call pays for it. All serve the same busybox image from
//! one registry; each side's image cache and warm-start snapshot are
//! filled by an untimed grant first. Then GRANTS grants on each side, one
//! at a time, the sides in turn (each grant terminated and ended before
//! the next), timed as `kiln-bench-grants` times them.
//!
//! Then the bridge's calls to each host, CALLS times each, as the `ssh`
//! backend makes them (`RemoteHost::call` on its long-lived session):
//! `kiln host info` and `status`, beside a bare `true` on the same kind of
//! session; and once: a new session, `kiln host info` run directly (no
//! SSH), `Host::open` in this process and the `kiln-vmm --capabilities`
//! it runs, and root's shell started as sshd starts it, with and without
//! its rc file.
//!
//! Usage: kiln-bench-fleet [GRANTS] [CALLS] (default 10 20; GRANTS 0 times
//! the calls only). Runs as root (network and mount namespaces, sshd);
//! needs scripts/setup.sh and a build of the workspace (`cargo build
//! --workspace`, with or without `--release`): it runs the kilnd, kiln,
//! kiln-shim and kiln-vmm beside it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_bridge::backends::ssh::remote::RemoteHost;
use kiln_bridge::backends::ssh::session::{HostTarget, Session};
use kiln_bridge::host::wire::{FailureKind, HostInfo, InstanceStatus};
use kiln_bridge::host::Host;
use kiln_tests::bench::{percentile, timed, GrantTimer, Sample};
use kiln_tests::fleet::{OwnedHost, ShellRc};
use kiln_tests::kilnd::{Kilnd, Requester, BOOT};
use kiln_tests::netns::NetNs;
use kiln_tests::{bin, peer};

/// How long one of the timed host calls may take.
const CALL: Duration = Duration::from_secs(30);

/// One side of the comparison.
struct Side<'a> {
    name: &'static str,
    timer: GrantTimer<'a>,
    samples: Vec<Sample>,
}

impl Side<'_> {
    /// Times grant `id`, then waits (untimed) until it has ended.
    fn grant(&mut self, id: &str) -> Result<Sample, String> {
        let sample = self.timer.one(id)?;
        self.timer
            .kilnd
            .wait_grant(id, BOOT, |g| g.state.is_final());
        Ok(sample)
    }

    fn column(&self, f: impl Fn(&Sample) -> Option<f64>) -> Vec<f64> {
        self.samples.iter().filter_map(f).collect()
    }

    /// p50 and p95 of a column.
    fn p(&self, f: impl Fn(&Sample) -> Option<f64>) -> (f64, f64) {
        let v = self.column(f);
        (percentile(&v, 50.0), percentile(&v, 95.0))
    }
}

/// A row of the grants table: its name and what it reads of a sample.
type Row = (&'static str, fn(&Sample) -> Option<f64>);

const ROWS: [Row; 8] = [
    ("submit → ssh ready", |s| Some(s.to_ssh)),
    ("submit → running", |s| Some(s.to_running)),
    ("restore (shim: VMM start → `ready`)", |s| {
        Some(s.raw_boot)
    }),
    (
        "running, less the VM's `started`: kilnd + shim (+ hop)",
        |s| Some(s.bridge_own()),
    ),
    ("  submit → grant directory made (image found)", |s| {
        s.to_dir
    }),
    (
        "  grant directory → running, less the VM's `started`",
        Sample::dir_to_running_less_vm,
    ),
    (
        "  host's instance record → running",
        Sample::recorded_to_running,
    ),
    ("first ssh after running", |s| Some(s.first_ssh())),
];

fn main() {
    // Returns first, so that the VMs, kilnds, hosts and namespaces are
    // stopped and removed before the process exits.
    std::process::exit(run());
}

/// The benchmark; its exit status.
fn run() -> i32 {
    let arg = |n: usize, default: usize| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (grants, calls) = (arg(1, 10), arg(2, 20).max(1));
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path();
    let net = 100 + std::process::id() % 100;
    let bridge = NetNs::new("bench-bridge");
    // The registry's address, the bridge's end of the first host's veth
    // pair; the second host reaches it through the bridge's namespace.
    let registry_ip = format!("10.{net}.1.1");
    let host = |tag, subnet, rc| {
        let subnet = format!("10.{net}.{subnet}");
        OwnedHost::start(work, tag, &bridge, &subnet, 2, &registry_ip, rc)
    };
    let hosts = [
        ("ssh", host("h", 1, ShellRc::AsIs)),
        ("ssh, no rc", host("q", 2, ShellRc::Skipped)),
    ];
    // This thread, and all it starts, is in the bridge's namespace from
    // here on: the kilnds, the registry, the requester's ssh.
    bridge.enter();
    println!(
        "host: {}, {} CPUs",
        if peer::pvm_host() {
            "nested PVM (guest kernels emulated)"
        } else {
            "hardware KVM"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut json = serde_json::Map::new();
    let ok = grants == 0 || compare(work, &hosts, &registry_ip, grants, &mut json);

    let mut breakdown = Vec::new();
    for (k, (name, host)) in hosts.iter().enumerate() {
        // Its side's first timed grant (sides: local, then the hosts).
        let id = format!("g{}-0", k + 1);
        breakdown.extend(
            host_calls(host, &id, calls)
                .into_iter()
                .map(|(call, v)| (format!("{call}, {name}"), v)),
        );
    }
    breakdown.extend(
        machine_calls(&hosts[0].1, calls)
            .into_iter()
            .map(|(call, v)| (call.to_string(), v)),
    );
    println!("\n| {calls} calls each, one at a time | p50 ms | p95 ms |\n|---|---|---|");
    for (name, v) in &breakdown {
        let (p50, p95) = (percentile(v, 50.0), percentile(v, 95.0));
        println!("| {name} | {p50:.1} | {p95:.1} |");
        json.insert(
            name.trim().to_string(),
            serde_json::json!({"p50": p50, "p95": p95}),
        );
    }
    println!("{}", serde_json::Value::Object(json));
    i32::from(!ok)
}

/// GRANTS grants on each side, in turn; prints the table and adds its
/// figures to `json`. False if any grant failed.
fn compare(
    work: &Path,
    hosts: &[(&'static str, OwnedHost)],
    registry_ip: &str,
    grants: usize,
    json: &mut serde_json::Map<String, serde_json::Value>,
) -> bool {
    let requester = Requester::on(work, registry_ip);
    let registries = format!("insecure_registries = [\"{registry_ip}\"]\n");
    let local_dir = work.join("local");
    let local = Kilnd::with_backends(
        &local_dir,
        &format!(
            "{registries}[[backend]]\nkind = \"local\"\nvcpus = 2\nram_mib = 640\nkiln_home = \"{}\"\n",
            local_dir.join("home").display()
        ),
    );
    let fleets: Vec<Kilnd> = hosts
        .iter()
        .enumerate()
        .map(|(i, (_, host))| {
            Kilnd::with_backends(
                &work.join(format!("ssh-{i}")),
                &format!(
                    "{registries}[[backend]]\nkind = \"ssh\"\nname = \"owned\"\n{}",
                    host.section(&host.sshd.host_key())
                ),
            )
        })
        .collect();
    let side = |name, kilnd, grants| Side {
        name,
        timer: GrantTimer {
            kilnd,
            requester: &requester,
            scratch: work,
            grants,
        },
        samples: Vec::new(),
    };
    let mut sides = vec![side("local", &local, local.home().join("grants"))];
    for ((name, host), kilnd) in hosts.iter().zip(&fleets) {
        sides.push(side(name, kilnd, host.home.join("grants")));
    }
    println!(
        "{grants} grants on each side, in turn, one at a time, 1 vCPU / 256 MiB each, \
         busybox from a registry, warm image cache and snapshot on each side"
    );

    // Fills each side's image cache and warm-start snapshot.
    for (k, side) in sides.iter_mut().enumerate() {
        match side.grant(&format!("warm-up-{k}")) {
            Ok(s) => println!(
                "{} warm-up (cold cache, booted): submit → running {:.0} ms, → ssh {:.0} ms",
                side.name, s.to_running, s.to_ssh
            ),
            Err(e) => {
                eprintln!("{e}\nkilnd log:\n{}", side.timer.kilnd.log());
                return false;
            }
        }
    }

    let mut failures = 0;
    for i in 0..grants {
        // A different side goes first each round.
        for j in 0..sides.len() {
            let k = (i + j) % sides.len();
            let side = &mut sides[k];
            let id = format!("g{k}-{i}");
            match side.grant(&id) {
                Ok(s) => {
                    println!(
                        "{id} ({}): submit→running {:.0} ms, →ssh {:.0} ms, restore {:.0} ms, \
                         kilnd+shim(+hop) {:.0} ms (to its directory {:.0}, after the VM {:.0})",
                        side.name,
                        s.to_running,
                        s.to_ssh,
                        s.raw_boot,
                        s.bridge_own(),
                        s.to_dir.unwrap_or(f64::NAN),
                        s.dir_to_running_less_vm().unwrap_or(f64::NAN),
                    );
                    side.samples.push(s);
                }
                Err(e) => {
                    eprintln!("failed: {e}");
                    failures += 1;
                }
            }
        }
    }
    if sides.iter().any(|s| s.samples.is_empty()) {
        for side in &sides {
            eprintln!("{} kilnd log:\n{}", side.name, side.timer.kilnd.log());
        }
        return false;
    }

    let cell = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.0}")
        }
    };
    print!("\n| ms, p50 / p95 |");
    for side in &sides {
        print!(" {} |", side.name);
    }
    println!("\n|---|{}", "---|".repeat(sides.len()));
    for (name, f) in ROWS {
        print!("| {name} |");
        let mut figures = serde_json::Map::new();
        for side in &sides {
            let (p50, p95) = side.p(f);
            print!(" {} / {} |", cell(p50), cell(p95));
            figures.insert(side.name.into(), serde_json::json!([p50, p95]));
        }
        println!();
        json.insert(name.trim().to_string(), figures.into());
    }
    let local = &sides[0];
    println!(
        "\nwhat the SSH hop adds, p50 / p95 (that side less local; {} grants each, {failures} failed):",
        local.samples.len()
    );
    for side in &sides[1..] {
        let less = |f: fn(&Sample) -> Option<f64>| {
            let ((s50, s95), (l50, l95)) = (side.p(f), local.p(f));
            format!("{} / {}", cell(s50 - l50), cell(s95 - l95))
        };
        println!(
            "  {}: kilnd + shim (+ hop) {} ms; submit → running {} ms; submit → ssh ready {} ms",
            side.name,
            less(|s| Some(s.bridge_own())),
            less(|s| Some(s.to_running)),
            less(|s| Some(s.to_ssh)),
        );
    }
    println!("\nwhere each local provision's time went (local kilnd's log):");
    for line in local
        .timer
        .kilnd
        .log()
        .lines()
        .filter(|l| l.contains("local VM running"))
    {
        println!("  {line}");
    }
    json.insert("failed".into(), serde_json::json!(failures));
    failures == 0
}

/// The bridge's calls to `host`, `n` times each: what a `kiln host` call
/// costs over the `ssh` backend's session, beside a bare command.
fn host_calls(host: &OwnedHost, id: &str, n: usize) -> Vec<(&'static str, Vec<f64>)> {
    let runtime = runtime();
    let target = target(host);
    let home = host.home.to_string_lossy().to_string();
    let remote = RemoteHost::new(target.clone(), &bin("kiln").to_string_lossy(), Some(&home));
    let info = || {
        let i = runtime.block_on(remote.call::<HostInfo>("info", b"", CALL));
        must("kiln host info", i.is_ok());
    };
    // Dials the backend's session, untimed.
    info();
    let session = runtime
        .block_on(Session::connect(&target, CALL))
        .expect("an SSH session");
    let bare = timed(n, || {
        let out = runtime.block_on(session.exec("true", b"", CALL));
        must("true", out.is_ok_and(|o| o.success()));
    });
    let infos = timed(n, info);
    // A calls-only run has no such grant: "not found" is as much a whole
    // call.
    let args = format!("status {id}");
    let status = timed(n, || {
        let s = runtime.block_on(remote.call::<InstanceStatus>(&args, b"", CALL));
        must(
            "kiln host status",
            s.is_ok() || s.is_err_and(|e| e.kind() == Some(FailureKind::NotFound)),
        );
    });
    // Ended inside the runtime, whose tasks serve them.
    runtime.block_on(async move { drop((session, remote)) });
    vec![
        ("`true` on an open session", bare),
        ("`kiln host info` (RemoteHost::call)", infos),
        ("`kiln host status ID` (RemoteHost::call)", status),
    ]
}

/// The parts of a call that do not depend on the host's shell, `n` times
/// each, and that shell's start.
fn machine_calls(host: &OwnedHost, n: usize) -> Vec<(&'static str, Vec<f64>)> {
    let runtime = runtime();
    let target = target(host);
    let connect = timed(n, || {
        runtime.block_on(async {
            let s = Session::connect(&target, CALL).await;
            must("connect", s.is_ok());
        })
    });
    let home = host.home.to_string_lossy().to_string();
    let kiln = bin("kiln");
    let direct = timed(n, || {
        let out = Command::new(&kiln)
            .args(["host", "--home", &home, "info"])
            .output();
        must(
            "kiln host info (direct)",
            out.is_ok_and(|o| o.status.success()),
        );
    });
    let open = timed(n, || must("Host::open", Host::open(&host.home).is_ok()));
    let vmm = bin("kiln-vmm");
    let caps = timed(n, || {
        let out = Command::new(&vmm)
            .args(["--capabilities", "--json"])
            .output();
        must("kiln-vmm --capabilities", out.is_ok());
    });
    let shell = root_shell();
    let start = |norc: bool| {
        timed(n, || {
            let mut cmd = Command::new(&shell);
            if norc {
                cmd.arg("--norc");
            }
            // As sshd runs it: bash reads ~/.bashrc when SSH_CLIENT is
            // set and it is a top-level shell.
            let status = cmd
                .args(["-c", "true"])
                .env("SSH_CLIENT", "10.0.0.1 40000 22")
                .env_remove("SHLVL")
                .stdin(Stdio::null())
                .status();
            must("the login shell", status.is_ok_and(|s| s.success()));
        })
    };
    let mut rows = vec![
        ("new SSH session (dial, key exchange, auth)", connect),
        ("`kiln host info`, run directly (no SSH)", direct),
        ("  of which Host::open (in process)", open),
        ("    of which `kiln-vmm --capabilities`", caps),
    ];
    // `--norc` is bash's; bash is what reads an rc file for commands.
    if shell.ends_with("/bash") {
        rows.push(("root's bash as sshd starts it: `-c true`", start(false)));
        rows.push(("  the same, `--norc`", start(true)));
    }
    rows
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn target(host: &OwnedHost) -> HostTarget {
    HostTarget {
        address: host.address.clone(),
        user: "root".into(),
        identity_file: host.sshd.client_key(),
        host_key: host.sshd.host_key(),
    }
}

/// root's login shell, from the password file.
fn root_shell() -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines()
                .find(|l| l.starts_with("root:"))
                .and_then(|l| l.rsplit(':').next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/bin/sh".into())
}

fn must(what: &str, ok: bool) {
    assert!(ok, "{what} failed");
}
