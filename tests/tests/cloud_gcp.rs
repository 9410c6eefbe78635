//! The gcp backend against the fake Compute API (Google ships no
//! emulator; the fake holds itself to Google's published discovery
//! document), through the real google-cloud-compute-v1 client, with
//! stand-ins for the instances (a namespace with the instance's private
//! address, where sshd answers with the grant's host key from its
//! startup script).
//!
//! After every test, no instance labelled with its bridge's id is left
//! but stopped or deleted ones.

use std::sync::Mutex;
use std::time::Duration;

use kiln_bridge::state::GrantState;
use kiln_bridge::view::GrantView;
use kiln_tests::gce::{self, FakeGce, GceInstances, OpFault};
use kiln_tests::kilnd::{request, Kilnd};
use kiln_tests::stand_in::StandIns;
use kiln_tests::wait_for;

/// The stand-ins' namespaces hold the fake's addresses: one test at a
/// time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const IMAGE: &str =
    "registry.example.test/app@sha256:0000000000000000000000000000000000000000000000000000000000000000";
const REGION: &str = "europe-west4";
const REGION_2: &str = "us-central1";
/// Intel, nested virtualization allowed.
const MACHINE_TYPE: &str = "n2-standard-8";

struct Cloud {
    gce: FakeGce,
    kilnd: Kilnd,
    stand_ins: Option<StandIns>,
    bridge_id: String,
    key: String,
    dir: tempfile::TempDir,
}

impl Cloud {
    fn start(regions: &[&str], keys: &str) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let gce = gce::start_for_stand_ins();
        let kilnd = Kilnd::with_backends_env(
            dir.path(),
            &gce::backend_table(&gce, regions, MACHINE_TYPE, keys),
            &[("RUST_LOG", "info,kiln_bridge=debug")],
        );
        let bridge_id = std::fs::read_to_string(dir.path().join("state/bridge-id"))
            .unwrap()
            .trim()
            .to_string();
        let stand_ins = StandIns::start(GceInstances::new(&gce, &bridge_id), dir.path());
        let inventory = wait_for(Duration::from_secs(30), || {
            let card = kilnd.client().capabilities().ok()?;
            let b = card.backends.into_iter().find(|b| b.name == "gcp")?;
            b.capabilities.cloud.filter(|c| !c.machine_types.is_empty())
        });
        assert!(inventory.is_some(), "no inventory\n{}", kilnd.log());
        let key = kiln_tests::openssh::keygen(dir.path(), "requester");
        let key = std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string();
        Cloud {
            gce,
            kilnd,
            stand_ins: Some(stand_ins),
            bridge_id,
            key,
            dir,
        }
    }

    fn submit(&self, id: &str) -> GrantView {
        let r = request(id, IMAGE, &self.key, Duration::from_secs(600), "true");
        self.kilnd.client().submit(&r).expect("submit")
    }

    fn wait_state(&self, id: &str, state: GrantState) -> GrantView {
        self.kilnd
            .wait_grant(id, Duration::from_secs(60), |g| g.state == state)
    }

    /// The grant's instances: (zone, name, status).
    fn of_grant(&self, id: &str) -> Vec<(String, String, String)> {
        self.gce
            .instance_names()
            .into_iter()
            .filter_map(|(zone, name)| {
                let body = self.gce.inserted_body(&zone, &name)?;
                let labels = &body["labels"];
                (labels["kiln-grant"] == id && labels["kiln-bridge"] == self.bridge_id.as_str())
                    .then(|| {
                        let status = self.gce.instance_status(&zone, &name).unwrap_or("GONE");
                        (zone, name, status.to_string())
                    })
            })
            .collect()
    }

    /// Every grant ended, then: none of this bridge's instances runs.
    fn assert_nothing_left(&self) {
        for g in self.kilnd.client().list().unwrap() {
            if !g.state.is_final() {
                let _ = self.kilnd.client().terminate(&g.grant.id);
            }
        }
        let live = || {
            self.gce
                .instance_names()
                .into_iter()
                .filter(|(zone, name)| {
                    let mine = self
                        .gce
                        .inserted_body(zone, name)
                        .is_some_and(|b| b["labels"]["kiln-bridge"] == self.bridge_id.as_str());
                    let status = self.gce.instance_status(zone, name).unwrap_or("GONE");
                    mine && status != "TERMINATED"
                })
                .collect::<Vec<_>>()
        };
        let clean = wait_for(Duration::from_secs(30), || live().is_empty().then_some(()));
        assert!(
            clean.is_some(),
            "instances left: {:?}\n{}",
            live(),
            self.kilnd.log()
        );
        assert!(
            self.gce.schema_violations().is_empty(),
            "{:?}",
            self.gce.schema_violations()
        );
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stand_ins.take();
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A grant runs on a GCE instance that answers with the grant's key from
/// its startup script; the card shows the machine type with TDX and KVM
/// as Google's rules give them; terminate (twice) deletes it.
#[test]
fn a_grant_runs_on_gce_and_ends_there() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "");
    let card = cloud.kilnd.client().capabilities().unwrap();
    let gcp = card.backends.iter().find(|b| b.name == "gcp").unwrap();
    let c = gcp.capabilities.cloud.as_ref().unwrap();
    assert_eq!(c.cloud, "gcp");
    assert_eq!(c.machine_types[0].name, MACHINE_TYPE);
    assert!(c.machine_types[0].kvm);

    cloud.submit("gcp-1");
    let g = cloud.wait_state("gcp-1", GrantState::Running);
    let conn = g.connection.clone().unwrap();
    assert_eq!(conn.backend, "gcp");
    assert!(conn.host.starts_with("198.18.1"), "{conn:?}");
    let made = cloud.of_grant("gcp-1");
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].1, conn.instance_id);
    let body = cloud.gce.inserted_body(&made[0].0, &made[0].1).unwrap();
    assert_eq!(
        body["advancedMachineFeatures"]["enableNestedVirtualization"],
        true
    );
    let script = body["metadata"]["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["key"] == "startup-script"))
        .and_then(|i| i["value"].as_str())
        .unwrap_or_default();
    let key = kiln_tests::stand_in::host_key_in(script).expect("host key in the startup script");
    let public = kiln_tests::stand_in::public_key_of(&key, cloud.dir.path());
    assert_eq!(
        public,
        conn.host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    cloud.kilnd.client().terminate("gcp-1").unwrap();
    cloud.wait_state("gcp-1", GrantState::Terminated);
    cloud.kilnd.client().terminate("gcp-1").unwrap();
    cloud.assert_nothing_left();
}

/// ZONE_RESOURCE_POOL_EXHAUSTED in zone a's DONE operation: the grant
/// lands in zone b, and zone a holds nothing.
#[test]
fn a_capacity_error_in_the_operation_moves_to_the_next_zone() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "");
    let zone_a = format!("{REGION}-a");
    cloud.gce.fail_zone(&zone_a, OpFault::Capacity);
    cloud.submit("gcp-cap");
    cloud.wait_state("gcp-cap", GrantState::Running);
    let made = cloud.of_grant("gcp-cap");
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].0, format!("{REGION}-b"));
    assert_eq!(cloud.gce.count("compute.instances.insert"), 2);
    cloud.assert_nothing_left();
}

/// QUOTA_EXCEEDED sets the region aside: the next region serves.
#[test]
fn a_quota_error_moves_to_the_next_region() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION, REGION_2], "");
    cloud.gce.fail_zone(&format!("{REGION}-a"), OpFault::Quota);
    cloud.submit("gcp-quota");
    cloud.wait_state("gcp-quota", GrantState::Running);
    let made = cloud.of_grant("gcp-quota");
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].0.starts_with(REGION_2), "{made:?}");
    // One insert in the first region, not one per zone.
    assert_eq!(cloud.gce.count("compute.instances.insert"), 2);
    cloud.assert_nothing_left();
}

/// An instance briefly missing after its insert (Compute reads lag) is
/// waited for, not created twice; what a crash mid-provision made is
/// deleted by the next kilnd.
#[test]
fn lagging_reads_and_a_crash_leave_one_instance_or_none() {
    let _one = lock();
    let mut cloud = Cloud::start(&[REGION], "ready_timeout_secs = 60");
    cloud.gce.hide_new_instances_for(3);
    cloud.submit("gcp-lag");
    cloud.wait_state("gcp-lag", GrantState::Running);
    assert_eq!(cloud.of_grant("gcp-lag").len(), 1);
    assert_eq!(cloud.gce.count("compute.instances.insert"), 1);

    // Instances made from now on never answer: kilnd is killed while it
    // waits, and the next one cleans up.
    for z in ["a", "b", "c"] {
        cloud
            .stand_ins
            .as_ref()
            .unwrap()
            .mute(&format!("{REGION}-{z}"));
    }
    cloud.gce.hide_new_instances_for(0);
    cloud.submit("gcp-crash");
    let made = wait_for(Duration::from_secs(30), || {
        let m = cloud.of_grant("gcp-crash");
        (!m.is_empty()).then_some(m)
    })
    .expect("an instance was inserted");
    assert_eq!(made.len(), 1);
    cloud.kilnd.kill();
    cloud.kilnd.start();
    cloud.wait_state("gcp-crash", GrantState::Failed);
    let gone = wait_for(Duration::from_secs(30), || {
        cloud
            .of_grant("gcp-crash")
            .iter()
            .all(|(_, _, s)| s == "GONE" || s == "TERMINATED")
            .then_some(())
    });
    assert!(gone.is_some(), "{:?}", cloud.of_grant("gcp-crash"));
    cloud.assert_nothing_left();
}

/// An instance GCE stops (a host event, a preemption) ends its grant as
/// lost; the stopped instance, which still holds its disk, is then
/// deleted by the reaper.
#[test]
fn an_instance_gce_stops_ends_its_grant_and_is_deleted() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "");
    cloud.submit("gcp-stop");
    cloud.wait_state("gcp-stop", GrantState::Running);
    let (zone, name, _) = cloud.of_grant("gcp-stop").remove(0);
    assert!(cloud.gce.force_status(&zone, &name, "TERMINATED"));
    let ended = cloud.wait_state("gcp-stop", GrantState::Failed);
    let reason = ended.reason.unwrap_or_default();
    assert!(reason.contains("stopped by the cloud"), "{reason}");
    let deleted = wait_for(Duration::from_secs(30), || {
        cloud
            .gce
            .instance_status(&zone, &name)
            .is_none()
            .then_some(())
    });
    assert!(
        deleted.is_some(),
        "{:?}",
        cloud.gce.instance_status(&zone, &name)
    );
    cloud.assert_nothing_left();
}
