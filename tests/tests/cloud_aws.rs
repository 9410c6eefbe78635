//! The aws backend against moto's EC2 server, through the real
//! aws-sdk-ec2, with a fault-injecting proxy between them for what moto
//! cannot do (capacity and quota errors, lost answers, failed terminates),
//! and stand-ins for the launched instances (a namespace with the
//! instance's private address, where sshd answers with the grant's host
//! key from the user data).
//!
//! After every test, no instance tagged with its bridge's id is left but
//! terminated ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use kiln_bridge::state::GrantState;
use kiln_bridge::view::GrantView;
use kiln_tests::ec2::{self, Fault, FaultProxy, Moto, MotoInstances, METAL, REGION, REGION_2};
use kiln_tests::kilnd::{request, Kilnd};
use kiln_tests::stand_in::{StandIns, SSH_PORT};
use kiln_tests::wait_for;

/// The tests make network namespaces holding moto's addresses, and moto
/// hands out the same addresses to each: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A digest reference: pinned at submit without a registry (the stand-ins
/// never pull it).
const IMAGE: &str =
    "registry.example.test/app@sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// moto, the proxy in front of it, a kilnd whose `aws` backend calls the
/// proxy, and the instances' stand-ins.
struct Cloud {
    moto: Moto,
    proxy: FaultProxy,
    kilnd: Kilnd,
    stand_ins: Option<StandIns>,
    bridge_id: String,
    /// The requester's public key.
    key: String,
    dir: tempfile::TempDir,
}

impl Cloud {
    /// `before`: backend tables ahead of the aws one; `keys`: extra keys
    /// of the aws table.
    fn start(regions: &[&str], before: &str, keys: &str) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let moto = Moto::start(dir.path());
        let proxy = FaultProxy::start(&moto);
        let backends = format!(
            "{before}\n{}",
            ec2::backend_table(&moto, &proxy.endpoint(), regions, keys)
        );
        let kilnd = Kilnd::with_backends_env(dir.path(), &backends, ec2::KILND_ENV);
        let bridge_id = std::fs::read_to_string(dir.path().join("state/bridge-id"))
            .unwrap()
            .trim()
            .to_string();
        let stand_ins = StandIns::start(MotoInstances::new(&moto, regions, &bridge_id), dir.path());
        // Grants are admitted by the machine types the cloud described.
        let inventory = wait_for(Duration::from_secs(30), || {
            let card = kilnd.client().capabilities().ok()?;
            let b = card.backends.into_iter().find(|b| b.name == "aws")?;
            b.capabilities.cloud.filter(|c| !c.machine_types.is_empty())
        });
        assert!(
            inventory.is_some(),
            "no inventory
{}",
            kilnd.log()
        );
        Cloud {
            moto,
            proxy,
            kilnd,
            stand_ins: Some(stand_ins),
            bridge_id,
            key: test_key(dir.path()),
            dir,
        }
    }

    fn stand_ins(&self) -> &StandIns {
        self.stand_ins.as_ref().unwrap()
    }

    fn submit(&self, id: &str, vcpus: u32) -> GrantView {
        let mut r = request(id, IMAGE, &self.key, Duration::from_secs(600), "true");
        r.vcpus = Some(vcpus);
        self.kilnd.client().submit(&r).expect("submit")
    }

    fn wait_state(&self, id: &str, state: GrantState) -> GrantView {
        self.kilnd
            .wait_grant(id, Duration::from_secs(60), |g| g.state == state)
    }

    /// This bridge's instances in `region`, by state.
    fn instances(&self, region: &str) -> BTreeMap<String, String> {
        self.moto
            .instances(region, "kiln-bridge", &self.bridge_id)
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect()
    }

    /// Instances of the grant in `region`, with their zones and states.
    fn of_grant(&self, region: &str, id: &str) -> Vec<(String, String, String)> {
        self.moto
            .instances(region, "kiln-grant", id)
            .into_iter()
            .filter(|i| i.tags.get("kiln-bridge") == Some(&self.bridge_id))
            .map(|i| (i.id, i.zone, i.state))
            .collect()
    }

    /// Every grant ended, then: nothing of this bridge's is left running.
    fn assert_nothing_left(&self, regions: &[&str]) {
        for g in self.kilnd.client().list().unwrap() {
            if !g.state.is_final() {
                let _ = self.kilnd.client().terminate(&g.grant.id);
            }
        }
        let clean = wait_for(Duration::from_secs(30), || {
            regions
                .iter()
                .all(|r| {
                    self.instances(r)
                        .values()
                        .all(|s| s == "terminated" || s == "shutting-down")
                })
                .then_some(())
        });
        assert!(
            clean.is_some(),
            "instances left: {:?}\nkilnd log:\n{}",
            regions
                .iter()
                .map(|r| self.instances(r))
                .collect::<Vec<_>>(),
            self.kilnd.log()
        );
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // Stand-ins first: their namespaces hold moto's addresses.
        self.stand_ins.take();
    }
}

fn test_key(dir: &Path) -> String {
    let key = kiln_tests::openssh::keygen(dir, "requester");
    std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A grant the local backend cannot hold goes to the cloud; the instance
/// answers with the grant's host key; terminate (twice) ends it there.
#[test]
fn a_grant_overflows_to_ec2_and_ends_there() {
    let _one = lock();
    let home = tempfile::tempdir().unwrap();
    // One vCPU here: a two-vCPU grant does not fit.
    let local = format!(
        "[[backend]]\nkind = \"local\"\nvcpus = 1\nram_mib = 1024\nkiln_home = \"{}\"\n",
        home.path().display()
    );
    let cloud = Cloud::start(&[REGION], &local, "");
    let card = cloud.kilnd.client().capabilities().unwrap();
    let aws = card.backends.iter().find(|b| b.name == "aws").unwrap();
    let cloud_card = aws.capabilities.cloud.clone().unwrap();
    assert_eq!(cloud_card.cloud, "aws");
    assert_eq!(cloud_card.machine_types[0].name, METAL);
    assert!(cloud_card.machine_types[0].kvm, "{cloud_card:?}");
    assert!(cloud_card.features.idempotent_create);
    let caps = cloud.kilnd.kiln(&["fleet", "caps"]);
    let caps = String::from_utf8_lossy(&caps.stdout);
    assert!(
        caps.lines().any(|l| l.starts_with("aws ")
            && l.contains("ready")
            && l.contains("0 of 3")
            && l.contains(METAL)),
        "{caps}"
    );

    cloud.submit("over-1", 2);
    let g = cloud.wait_state("over-1", GrantState::Running);
    let c = g.connection.clone().unwrap();
    assert_eq!(c.backend, "aws");
    assert!(c.host.starts_with("198.18."), "{c:?}");
    assert_eq!(c.ssh_port, SSH_PORT);
    // The stand-in answered with the key from the user data, and the
    // bridge checked it: the grant's pinned key is that key.
    let instances = cloud.of_grant(REGION, "over-1");
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].0, c.instance_id);
    let user_data = cloud.moto.user_data(REGION, &c.instance_id);
    let key = kiln_tests::stand_in::host_key_in(&user_data).unwrap();
    assert!(!user_data.contains("testing"), "credentials in user data");
    let public = kiln_tests::stand_in::public_key_of(&key, cloud.dir.path());
    assert_eq!(
        public,
        c.host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // `kiln grant show` names backend, region, zone and instance.
    let shown = cloud.kilnd.kiln(&["grant", "show", "over-1"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains(&c.instance_id), "{text}");
    let zone = &instances[0].1;
    assert!(
        text.contains(&format!("region {REGION}, zone {zone}, {METAL}")),
        "{text}"
    );

    cloud.kilnd.client().terminate("over-1").unwrap();
    let ended = cloud.wait_state("over-1", GrantState::Terminated);
    assert!(ended.reason.is_some());
    // Twice is fine.
    cloud.kilnd.client().terminate("over-1").unwrap();
    let states = cloud.of_grant(REGION, "over-1");
    assert!(
        states
            .iter()
            .all(|(_, _, s)| s == "terminated" || s == "shutting-down"),
        "{states:?}"
    );
    cloud.assert_nothing_left(&[REGION]);
}

/// No capacity in zone a: the grant lands in zone b, and nothing is left
/// in a.
#[test]
fn a_capacity_error_moves_to_the_next_zone() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "");
    let zone_a = format!("{REGION}a");
    cloud
        .proxy
        .add(Fault::error("RunInstances", 500, "InsufficientInstanceCapacity").in_zone(&zone_a));
    cloud.submit("cap-1", 1);
    let g = cloud.wait_state("cap-1", GrantState::Running);
    let runs = cloud.proxy.seen_of("RunInstances");
    assert_eq!(
        runs.iter()
            .map(|s| s.zone.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        [zone_a.clone(), format!("{REGION}b")],
        "{runs:?}"
    );
    // One failed try, no SDK retry in the same zone.
    assert_eq!(
        runs[0].fault.as_deref(),
        Some("InsufficientInstanceCapacity")
    );
    let made = cloud.of_grant(REGION, "cap-1");
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].1, format!("{REGION}b"));
    assert_eq!(made[0].0, g.connection.unwrap().instance_id);
    cloud.assert_nothing_left(&[REGION]);
}

/// A quota error sets the whole region aside: the grant goes to the next
/// region, and the card says which region cools down.
#[test]
fn a_quota_error_moves_to_the_next_region() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION, REGION_2], "", "");
    cloud
        .proxy
        .add(Fault::error("RunInstances", 400, "VcpuLimitExceeded").in_region(REGION));
    cloud.submit("quota-1", 1);
    cloud.wait_state("quota-1", GrantState::Running);
    let runs = cloud.proxy.seen_of("RunInstances");
    // One try in the first region (not one per zone), then the second.
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].region, REGION);
    assert_eq!(runs[1].region, REGION_2);
    assert!(cloud.of_grant(REGION, "quota-1").is_empty());
    assert_eq!(cloud.of_grant(REGION_2, "quota-1").len(), 1);
    let card = cloud.kilnd.client().capabilities().unwrap();
    let aws = card.backends.iter().find(|b| b.name == "aws").unwrap();
    let cooling = &aws.capabilities.cloud.as_ref().unwrap().cooling_regions;
    assert_eq!(cooling, &vec![REGION.to_string()]);
    cloud.assert_nothing_left(&[REGION, REGION_2]);
}

/// RunInstances acts but its answer is lost: the retry finds the instance
/// by the grant's tag instead of making a second.
#[test]
fn a_lost_create_answer_does_not_make_a_second_instance() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "");
    cloud.proxy.add(Fault {
        action: "RunInstances".into(),
        zone: None,
        region: None,
        times: 1,
        effect: kiln_tests::ec2::Effect::DropAnswer,
    });
    cloud.submit("lost-1", 1);
    let g = cloud.wait_state("lost-1", GrantState::Running);
    let made = cloud.of_grant(REGION, "lost-1");
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].0, g.connection.unwrap().instance_id);
    assert_eq!(cloud.proxy.seen_of("RunInstances").len(), 1);
    cloud.assert_nothing_left(&[REGION]);
}

/// An instance whose VM never answers is terminated before the next zone
/// is tried.
#[test]
fn an_instance_that_never_serves_is_terminated() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "ready_timeout_secs = 4");
    let zone_a = format!("{REGION}a");
    cloud.stand_ins().mute(&zone_a);
    cloud.submit("mute-1", 1);
    cloud.wait_state("mute-1", GrantState::Running);
    let made = cloud.of_grant(REGION, "mute-1");
    assert_eq!(made.len(), 2, "{made:?}");
    let in_a = made.iter().find(|(_, z, _)| *z == zone_a).unwrap();
    assert!(
        in_a.2 == "terminated" || in_a.2 == "shutting-down",
        "{made:?}"
    );
    cloud.assert_nothing_left(&[REGION]);
}

/// kilnd dies between the create and storing the instance: the next
/// kilnd terminates what was made; and a tagged instance no grant owns is
/// reaped.
#[test]
fn a_crash_mid_provision_and_an_orphan_leave_nothing_behind() {
    let _one = lock();
    let mut cloud = Cloud::start(&[REGION], "", "ready_timeout_secs = 60");
    // Never answers: the provision waits while kilnd is killed.
    for z in ["a", "b", "c"] {
        cloud.stand_ins().mute(&format!("{REGION}{z}"));
    }
    cloud.submit("crash-1", 1);
    let made = wait_for(Duration::from_secs(30), || {
        let m = cloud.of_grant(REGION, "crash-1");
        (!m.is_empty()).then_some(m)
    })
    .expect("an instance was created");
    assert_eq!(made.len(), 1);
    cloud.kilnd.kill();
    cloud.kilnd.start();
    let g = cloud.wait_state("crash-1", GrantState::Failed);
    assert!(g.reason.is_some());
    let gone = wait_for(Duration::from_secs(30), || {
        let m = cloud.of_grant(REGION, "crash-1");
        m.iter()
            .all(|(_, _, s)| s == "terminated" || s == "shutting-down")
            .then_some(())
    });
    assert!(gone.is_some(), "{:?}", cloud.of_grant(REGION, "crash-1"));

    // Someone (an older kilnd, a person) left a tagged instance.
    let zone_b = format!("{REGION}b");
    let subnets = cloud.moto.subnets(REGION, 200);
    let orphan = cloud.moto.run_tagged(
        REGION,
        &subnets[&zone_b],
        &[("kiln-bridge", &cloud.bridge_id), ("kiln-grant", "nobody")],
    );
    // Another bridge's instance is not this one's to reap.
    let foreign = cloud.moto.run_tagged(
        REGION,
        &subnets[&zone_b],
        &[("kiln-bridge", "another-bridge"), ("kiln-grant", "nobody")],
    );
    let reaped = wait_for(Duration::from_secs(30), || {
        let state = cloud.instances(REGION).get(&orphan).cloned()?;
        (state == "terminated" || state == "shutting-down").then_some(())
    });
    assert!(
        reaped.is_some(),
        "orphan {orphan} not reaped\n{}",
        cloud.kilnd.log()
    );
    let foreign_state = cloud
        .moto
        .instances(REGION, "kiln-bridge", "another-bridge")
        .into_iter()
        .find(|i| i.id == foreign)
        .unwrap()
        .state;
    assert_eq!(foreign_state, "running");
    cloud.assert_nothing_left(&[REGION]);
}

/// A terminate that fails is retried until the instance is gone.
#[test]
fn a_failed_terminate_is_retried() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "");
    cloud.submit("term-1", 1);
    let g = cloud.wait_state("term-1", GrantState::Running);
    cloud
        .proxy
        .add(Fault::error("TerminateInstances", 503, "Unavailable").times(1));
    cloud.kilnd.client().terminate("term-1").unwrap();
    cloud.wait_state("term-1", GrantState::Terminated);
    let id = g.connection.unwrap().instance_id;
    let state = cloud.instances(REGION).get(&id).cloned().unwrap();
    assert!(state == "terminated" || state == "shutting-down", "{state}");
    let terms = cloud.proxy.seen_of("TerminateInstances");
    assert!(terms.len() >= 2, "{terms:?}");
    assert_eq!(terms[0].fault.as_deref(), Some("Unavailable"));
    cloud.assert_nothing_left(&[REGION]);
}

/// Refused credentials mark the backend unhealthy in the card, and a grant
/// is refused with a reason rather than waiting.
#[test]
fn refused_credentials_mark_the_backend_unhealthy() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "");
    // Whatever the backend asks next is refused.
    for action in [
        "DescribeInstances",
        "DescribeAvailabilityZones",
        "RunInstances",
        "DescribeInstanceTypes",
    ] {
        cloud.proxy.add(Fault::error(action, 401, "AuthFailure"));
    }
    let card = wait_for(Duration::from_secs(20), || {
        let card = cloud.kilnd.client().capabilities().ok()?;
        let b = card.backends.into_iter().find(|b| b.name == "aws")?;
        b.capabilities
            .cloud
            .filter(|c| c.state == kiln_bridge::backend::HostState::Refused)
    })
    .unwrap_or_else(|| panic!("never unhealthy\n{}", cloud.kilnd.log()));
    assert!(card.message.unwrap_or_default().contains("AuthFailure"));
    cloud.submit("auth-1", 1);
    let g = cloud.wait_state("auth-1", GrantState::Failed);
    assert!(g.reason.is_some());
    assert!(cloud.proxy.seen_of("RunInstances").is_empty());
    cloud.proxy.clear();
    cloud.assert_nothing_left(&[REGION]);
}

/// An instance the cloud ends (a spot reclaim, someone's terminate) ends
/// its grant as lost, with the cloud's word for it.
#[test]
fn an_instance_the_cloud_ends_ends_its_grant() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "");
    cloud.submit("gone-1", 1);
    let g = cloud.wait_state("gone-1", GrantState::Running);
    let id = g.connection.unwrap().instance_id;
    // Behind the bridge's back.
    cloud.moto.call(
        REGION,
        &[("Action", "TerminateInstances"), ("InstanceId.1", &id)],
    );
    let ended = cloud.wait_state("gone-1", GrantState::Failed);
    let reason = ended.reason.unwrap_or_default();
    assert!(
        reason.contains(&id) && reason.contains("terminated by the cloud"),
        "{reason}"
    );
    assert_eq!(ended.failure, Some(kiln_bridge::state::FailureKind::Lost));
    cloud.assert_nothing_left(&[REGION]);
}

/// `max_instances` bounds the instances at once: a grant past it is
/// refused for capacity, and a terminated grant's slot is free again.
#[test]
fn max_instances_bounds_the_instances_at_once() {
    let _one = lock();
    let cloud = Cloud::start(&[REGION], "", "max_instances = 1");
    cloud.submit("max-1", 1);
    cloud.wait_state("max-1", GrantState::Running);
    cloud.submit("max-2", 1);
    let refused = cloud.wait_state("max-2", GrantState::Failed);
    assert_eq!(
        refused.failure,
        Some(kiln_bridge::state::FailureKind::NoCapacity),
        "{refused:?}"
    );
    assert!(cloud.of_grant(REGION, "max-2").is_empty());
    cloud.kilnd.client().terminate("max-1").unwrap();
    cloud.wait_state("max-1", GrantState::Terminated);
    cloud.submit("max-3", 1);
    cloud.wait_state("max-3", GrantState::Running);
    cloud.assert_nothing_left(&[REGION]);
}
