//! The cloud backends' own overhead: grants overflowing to each cloud,
//! from submit to `running`, against the emulators (moto for EC2, the fake
//! Compute API for GCE) with stand-ins for the instances (`stand_in`),
//! split into: until the instance was created, until its stand-in answered
//! (the "VM"), and the rest, which is the bridge's own (its readiness
//! polling and host-key probe, the store, the API). The cloud calls one
//! provision makes are counted. Then the reaper: an instance of the
//! bridge that no grant owns, created behind its back, timed until it is
//! terminated (`sync_secs = 1`).
//!
//! Usage: kiln-bench-cloud [GRANTS] (default 10). Runs as root (network
//! namespaces, sshd); needs scripts/setup.sh (moto's venv) and a build of
//! the workspace: it runs the kilnd and kiln beside it.

use std::time::{Duration, Instant};

use kiln_bridge::state::GrantState;
use kiln_tests::bench::percentile;
use kiln_tests::ec2::{self, FaultProxy, Moto, MotoInstances, REGION};
use kiln_tests::gce::{self, GceInstances};
use kiln_tests::kilnd::{request, Kilnd};
use kiln_tests::stand_in::StandIns;
use kiln_tests::wait_for;

const IMAGE: &str =
    "registry.example.test/app@sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// One provision's figures, in ms from its submit.
struct Sample {
    created: f64,
    answered: f64,
    running: f64,
    calls: usize,
}

fn main() {
    let grants: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("temp dir");
    let key = kiln_tests::openssh::keygen(dir.path(), "requester");
    let key = std::fs::read_to_string(key.with_extension("pub"))
        .expect("key")
        .trim()
        .to_string();

    // EC2: moto behind the (fault-free) proxy, which counts the calls.
    let aws_dir = dir.path().join("aws");
    std::fs::create_dir_all(&aws_dir).unwrap();
    let moto = Moto::start(&aws_dir);
    let proxy = FaultProxy::start(&moto);
    let table = ec2::backend_table(&moto, &proxy.endpoint(), &[REGION], "");
    let kilnd = Kilnd::with_backends_env(&aws_dir, &table, ec2::KILND_ENV);
    let aws_bridge = bridge_id(&aws_dir);
    let stand_ins = StandIns::start(MotoInstances::new(&moto, &[REGION], &aws_bridge), &aws_dir);
    wait_inventory(&kilnd, "aws");
    let mut aws = Vec::new();
    for n in 0..grants {
        let id = format!("bench-aws-{n}");
        let before = proxy.seen().len();
        let t0 = Instant::now();
        let instance = provision(&kilnd, &id, &key);
        let running = ms(t0.elapsed());
        let seen = proxy.seen();
        let created = seen[before..]
            .iter()
            .find(|s| s.action == "RunInstances")
            .map_or(f64::NAN, |s| ms(s.at.duration_since(t0)));
        let answered = stand_ins
            .answered_at(&instance)
            .map_or(f64::NAN, |at| ms(at.duration_since(t0)));
        aws.push(Sample {
            created,
            answered,
            running,
            calls: seen.len() - before,
        });
        end(&kilnd, &id);
    }
    let subnet = moto
        .subnets(REGION, 200)
        .into_values()
        .next()
        .expect("a subnet");
    let t0 = Instant::now();
    let orphan = moto.run_tagged(
        REGION,
        &subnet,
        &[("kiln-bridge", &aws_bridge), ("kiln-grant", "nobody")],
    );
    let reaped = wait_for(Duration::from_secs(60), || {
        moto.instances(REGION, "kiln-bridge", &aws_bridge)
            .into_iter()
            .find(|i| i.id == orphan)
            .filter(|i| i.state != "running" && i.state != "pending")
            .map(|_| ms(t0.elapsed()))
    })
    .expect("the orphan was reaped");
    drop(stand_ins);
    drop(kilnd);

    // GCE: the fake Compute API, which counts its own requests.
    let gcp_dir = dir.path().join("gcp");
    std::fs::create_dir_all(&gcp_dir).unwrap();
    let fake = gce::start_for_stand_ins();
    let table = gce::backend_table(&fake, &["europe-west4"], "n2-standard-8", "");
    let kilnd = Kilnd::with_backends_env(&gcp_dir, &table, &[]);
    let stand_ins = StandIns::start(GceInstances::new(&fake, &bridge_id(&gcp_dir)), &gcp_dir);
    wait_inventory(&kilnd, "gcp");
    let mut gcp = Vec::new();
    for n in 0..grants {
        let id = format!("bench-gcp-{n}");
        let before = fake.requests().len();
        let t0 = Instant::now();
        let instance = provision(&kilnd, &id, &key);
        let running = ms(t0.elapsed());
        let answered = stand_ins
            .answered_at(&instance)
            .map_or(f64::NAN, |at| ms(at.duration_since(t0)));
        gcp.push(Sample {
            // The fake keeps no times; the insert's operation is waited
            // for inside the create, so it is part of "answered".
            created: f64::NAN,
            answered,
            running,
            calls: fake.requests().len() - before,
        });
        end(&kilnd, &id);
    }
    drop(stand_ins);

    println!("{grants} grants per cloud, each submit → running, ms (p50 / p95):");
    for (name, samples) in [("aws (moto)", &aws), ("gcp (fake)", &gcp)] {
        report(name, samples);
    }
    println!("aws orphan: created → terminated by the reaper (sync_secs = 1): {reaped:.0} ms");
}

fn report(name: &str, samples: &[Sample]) {
    let pick = |f: fn(&Sample) -> f64| -> (f64, f64) {
        let mut v: Vec<f64> = samples.iter().map(f).filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        (percentile(&v, 50.0), percentile(&v, 95.0))
    };
    let (c50, c95) = pick(|s| s.created);
    let (a50, a95) = pick(|s| s.answered);
    let (r50, r95) = pick(|s| s.running);
    let (o50, o95) = pick(|s| s.running - s.answered);
    let (n50, n95) = pick(|s| s.calls as f64);
    println!(
        "  {name}: to create {c50:.0} / {c95:.0}; to the stand-in answering {a50:.0} / {a95:.0}; \
         to running {r50:.0} / {r95:.0}; the bridge after the answer {o50:.0} / {o95:.0}; \
         cloud calls {n50:.0} / {n95:.0}"
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn bridge_id(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("state/bridge-id"))
        .expect("bridge-id")
        .trim()
        .to_string()
}

fn wait_inventory(kilnd: &Kilnd, backend: &str) {
    let ok = wait_for(Duration::from_secs(30), || {
        let card = kilnd.client().capabilities().ok()?;
        let b = card.backends.into_iter().find(|b| b.name == backend)?;
        b.capabilities.cloud.filter(|c| !c.machine_types.is_empty())
    });
    assert!(ok.is_some(), "no inventory\n{}", kilnd.log());
}

/// Submits and waits until running (polling every 20 ms); the instance id.
fn provision(kilnd: &Kilnd, id: &str, key: &str) -> String {
    let client = kilnd.client();
    client
        .submit(&request(id, IMAGE, key, Duration::from_secs(600), "true"))
        .expect("submit");
    let g = wait_for(Duration::from_secs(60), || {
        client
            .show(id)
            .ok()
            .filter(|g| g.state == GrantState::Running || g.state.is_final())
    })
    .unwrap_or_else(|| panic!("{id} never ran\n{}", kilnd.log()));
    assert_eq!(
        g.state,
        GrantState::Running,
        "{:?}\n{}",
        g.reason,
        kilnd.log()
    );
    g.connection.expect("a connection").instance_id
}

fn end(kilnd: &Kilnd, id: &str) {
    kilnd.client().terminate(id).expect("terminate");
    kilnd.wait_grant(id, Duration::from_secs(60), |g| g.state.is_final());
}
