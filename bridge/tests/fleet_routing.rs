//! Fleet routing with two backends of different regions and capacities plus
//! one that fails on demand: first match in order, failover, capability union.

mod common;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_bridge::backend::{Backend, ProvisionedInstance};
use kiln_bridge::backends::{self, BuildContext};
use kiln_bridge::config::{BackendSection, LocalSection};
use kiln_bridge::fleet::{Fleet, FleetError};
use kiln_bridge::grant::{Grant, TdxPolicy, ValidationContext};

struct Setup {
    fleet: Fleet,
    eu_small: Arc<SimBackend>,
    flaky: Arc<SimBackend>,
    us_big: Arc<SimBackend>,
}

fn setup() -> Setup {
    let eu_small = Arc::new(SimBackend::new(
        "eu-small",
        &["eu"],
        false,
        World::new(2, 2048),
    ));
    let flaky = Arc::new(SimBackend::new(
        "flaky",
        &["eu", "us"],
        false,
        World::new(64, 65536),
    ));
    let us_big = Arc::new(SimBackend::new(
        "us-big",
        &["us"],
        true,
        World::new(16, 32768),
    ));
    flaky.fail_transiently.store(true, Ordering::SeqCst);
    let fleet = Fleet::new(vec![
        eu_small.clone() as Arc<dyn Backend>,
        flaky.clone(),
        us_big.clone(),
    ])
    .unwrap();
    Setup {
        fleet,
        eu_small,
        flaky,
        us_big,
    }
}

/// Provisions without recording where: these tests look at the outcome.
async fn provision(fleet: &Fleet, grant: &Grant) -> Result<ProvisionedInstance, FleetError> {
    let Ok(outcome) = fleet.provision(grant, |_| Ok::<_, Infallible>(())).await;
    outcome
}

fn grant(fleet: &Fleet, region: &str, vcpus: u32, tdx: TdxPolicy) -> Grant {
    let mut req = request(region, vcpus, 512);
    req.tdx = tdx;
    let ctx = ValidationContext {
        regions: fleet.regions(),
        now: chrono::Utc::now(),
    };
    Grant::from_json(&serde_json::to_vec(&req).unwrap(), &ctx).unwrap()
}

#[tokio::test]
async fn first_match_in_order_then_failover_past_transient_failures() {
    let s = setup();
    // eu: eu-small comes first and fits.
    let a = provision(&s.fleet, &grant(&s.fleet, "eu", 1, TdxPolicy::No))
        .await
        .unwrap();
    assert_eq!(a.backend, "eu-small");
    assert_eq!(s.flaky.calls(), 0);

    // us: eu-small cannot; flaky fails transiently; us-big takes it.
    let b = provision(&s.fleet, &grant(&s.fleet, "us", 2, TdxPolicy::No))
        .await
        .unwrap();
    assert_eq!(b.backend, "us-big");
    assert_eq!(s.flaky.calls(), 1);

    // eu, too big for eu-small, and flaky fails: nobody else serves eu.
    let err = provision(&s.fleet, &grant(&s.fleet, "eu", 4, TdxPolicy::No))
        .await
        .unwrap_err();
    assert!(matches!(err, FleetError::AllFailed { ref backend, .. } if backend == "flaky"));
    assert!(!err.is_capacity());
    assert!(kiln_bridge::error_chain(&err).contains("injected transient failure"));

    // Once flaky recovers it takes what eu-small has no room for.
    s.flaky.fail_transiently.store(false, Ordering::SeqCst);
    let c = provision(&s.fleet, &grant(&s.fleet, "eu", 1, TdxPolicy::No))
        .await
        .unwrap();
    assert_eq!(c.backend, "eu-small");
    let d = provision(&s.fleet, &grant(&s.fleet, "eu", 1, TdxPolicy::No))
        .await
        .unwrap();
    assert_eq!(d.backend, "flaky", "eu-small is full");

    // Later calls go to the backend named in the instance.
    s.fleet.terminate(&b).await.unwrap();
    assert_eq!(s.us_big.world.ledger.snapshot().used.vcpus, 0);
    s.fleet.terminate(&b).await.unwrap();
    let usage = s.fleet.watch_until_exit(&b).await.unwrap();
    assert!(usage.exit_status.is_some());
    assert_eq!(s.eu_small.world.ledger.snapshot().used.vcpus, 2);
    let mut stray = a.clone();
    stray.backend = "gone".into();
    assert!(matches!(
        s.fleet.terminate(&stray).await,
        Err(FleetError::UnknownBackend(_))
    ));
}

#[tokio::test]
async fn a_fatal_failure_stops_the_search() {
    let s = setup();
    s.flaky.fail_transiently.store(false, Ordering::SeqCst);
    s.flaky.fail_fatally.store(true, Ordering::SeqCst);
    let err = provision(&s.fleet, &grant(&s.fleet, "us", 1, TdxPolicy::No))
        .await
        .unwrap_err();
    assert!(matches!(err, FleetError::Fatal { ref backend, .. } if backend == "flaky"));
    assert_eq!(s.us_big.calls(), 0);
}

#[tokio::test]
async fn tdx_policy_decides_which_backends_are_tried_first_or_at_all() {
    let s = setup();
    let g = grant(&s.fleet, "eu", 1, TdxPolicy::Required);
    let err = s.fleet.check_admissible(&g).unwrap_err();
    assert_eq!(err.field(), Some("tdx"));
    let g = grant(&s.fleet, "us", 1, TdxPolicy::Required);
    s.fleet.check_admissible(&g).unwrap();
    let inst = provision(&s.fleet, &g).await.unwrap();
    assert_eq!(inst.backend, "us-big");
    assert_eq!(s.flaky.calls(), 0, "flaky has no TDX");
    // Preferred: a TDX backend first, even behind a healthy one without.
    s.flaky.fail_transiently.store(false, Ordering::SeqCst);
    let preferred = provision(&s.fleet, &grant(&s.fleet, "us", 1, TdxPolicy::Preferred))
        .await
        .unwrap();
    assert_eq!(preferred.backend, "us-big");
    let plain = provision(&s.fleet, &grant(&s.fleet, "us", 1, TdxPolicy::No))
        .await
        .unwrap();
    assert_eq!(plain.backend, "flaky");
    // ...and one without when no TDX backend serves the region.
    let preferred = provision(&s.fleet, &grant(&s.fleet, "eu", 1, TdxPolicy::Preferred))
        .await
        .unwrap();
    assert_eq!(preferred.backend, "eu-small");
    let too_big = grant(&s.fleet, "eu", 3, TdxPolicy::No);
    s.fleet.check_admissible(&too_big).unwrap(); // flaky is big enough
    let too_big = grant(&s.fleet, "eu", 65, TdxPolicy::No);
    assert_eq!(
        s.fleet.check_admissible(&too_big).unwrap_err().field(),
        Some("vcpus")
    );
}

#[test]
fn capabilities_are_the_union_over_http() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        dir.path(),
        vec![s.eu_small.clone(), s.flaky.clone(), s.us_big.clone()],
    );
    let card = server.client().capabilities().unwrap();
    assert_eq!(
        card.regions.iter().cloned().collect::<Vec<_>>(),
        ["eu", "us"]
    );
    assert!(card.tdx);
    assert_eq!(card.capacity.usable.vcpus, 2 + 64 + 16);
    assert_eq!(card.capacity.usable.ram_mib, 2048 + 65536 + 32768);
    let names: Vec<&str> = card.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["eu-small", "flaky", "us-big"]);
    assert!(!card.backends[0].capabilities.tdx && card.backends[2].capabilities.tdx);
    assert!(Fleet::new(vec![
        s.eu_small.clone() as Arc<dyn Backend>,
        s.eu_small.clone()
    ])
    .is_err());
}

/// The same routing with two real local backends (this host split into an
/// `eu` and a `us` pool of different sizes) around the flaky one. Their
/// provisions fail at the image (a registry port nobody listens on), which
/// shows which backend the fleet chose without booting a VM.
#[tokio::test]
async fn two_local_backends_around_a_flaky_one() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = BuildContext {
        region: "eu".into(),
        state_dir: dir.path().join("state"),
        insecure_registries: Vec::new(),
        bridge_id: "test".into(),
        live_grants: None,
    };
    let local = |name: &str, region: Option<&str>, vcpus: u32, ram_mib: u64| {
        BackendSection::Local(LocalSection {
            name: Some(name.into()),
            region: region.map(str::to_string),
            vcpus: Some(vcpus),
            ram_mib: Some(ram_mib),
            kiln_home: Some(dir.path().join(name)),
            ..LocalSection::default()
        })
    };
    let built = backends::build(
        &[
            local("local-eu", None, 2, 2048),
            local("local-us", Some("us"), 8, 8192),
        ],
        &ctx,
    )
    .unwrap();
    let flaky = Arc::new(SimBackend::new(
        "flaky",
        &["eu", "us"],
        false,
        World::new(64, 65536),
    ));
    flaky.fail_transiently.store(true, Ordering::SeqCst);
    let fleet = Fleet::new(vec![built[0].clone(), flaky.clone(), built[1].clone()]).unwrap();

    let card = fleet.capabilities();
    assert_eq!(
        card.regions.iter().cloned().collect::<Vec<_>>(),
        ["eu", "us"]
    );
    assert_eq!(card.capacity.usable.vcpus, 2 + 64 + 8);
    assert_eq!(card.capacity.usable.ram_mib, 2048 + 65536 + 8192);
    let regions: Vec<Vec<String>> = card
        .backends
        .iter()
        .map(|b| b.capabilities.regions.iter().cloned().collect())
        .collect();
    assert_eq!(regions, [vec!["eu"], vec!["eu", "us"], vec!["us"]]);

    let unreachable = |region: &str, vcpus: u32| {
        let mut g = grant(&fleet, region, vcpus, TdxPolicy::No);
        g.image = "127.0.0.1:1/kiln/none:1".into();
        g
    };
    // eu and it fits: the first backend, local-eu, takes it.
    let err = provision(&fleet, &unreachable("eu", 1)).await.unwrap_err();
    assert!(
        matches!(err, FleetError::Fatal { ref backend, .. } if backend == "local-eu"),
        "{err:?}"
    );
    assert!(kiln_bridge::error_chain(&err).contains("cannot build the image"));
    assert_eq!(flaky.calls(), 0);
    // us: not local-eu's region; flaky fails transiently; local-us next.
    let err = provision(&fleet, &unreachable("us", 4)).await.unwrap_err();
    assert!(
        matches!(err, FleetError::Fatal { ref backend, .. } if backend == "local-us"),
        "{err:?}"
    );
    assert_eq!(flaky.calls(), 1);
    // eu but bigger than local-eu: only flaky is left, and it fails.
    let err = provision(&fleet, &unreachable("eu", 4)).await.unwrap_err();
    assert!(
        matches!(err, FleetError::AllFailed { ref backend, .. } if backend == "flaky"),
        "{err:?}"
    );
    // A failed provision holds nothing.
    assert_eq!(fleet.capabilities().capacity.used.vcpus, 0);
}

#[tokio::test]
async fn each_backend_is_reported_before_it_is_called() {
    let s = setup();
    // us: eu-small is not asked at all; flaky fails; us-big takes it.
    let mut attempts = Vec::new();
    let Ok(outcome) = s
        .fleet
        .provision(&grant(&s.fleet, "us", 1, TdxPolicy::No), |b| {
            attempts.push(b.to_string());
            Ok::<_, Infallible>(())
        })
        .await;
    assert_eq!(outcome.unwrap().backend, "us-big");
    assert_eq!(attempts, ["flaky", "us-big"]);

    // A report that cannot be made stops the search before that backend.
    let mut reports = 0;
    let stopped = s
        .fleet
        .provision(&grant(&s.fleet, "us", 1, TdxPolicy::No), |b| {
            reports += 1;
            if b == "us-big" {
                return Err("cannot record");
            }
            Ok(())
        })
        .await;
    assert!(matches!(stopped, Err("cannot record")), "{stopped:?}");
    assert_eq!(reports, 2);
    assert_eq!((s.flaky.calls(), s.us_big.calls()), (2, 1));
    assert_eq!(s.us_big.world.ledger.snapshot().used.vcpus, 1);
}

#[tokio::test]
async fn an_interrupted_provision_is_abandoned_on_the_backend_it_was_calling() {
    let s = setup();
    // us: flaky fails at once, then us-big boots for an hour.
    *s.us_big.provision_delay.lock().unwrap() = Duration::from_secs(3600);
    let g = grant(&s.fleet, "us", 1, TdxPolicy::No);
    let mut calling = None;
    let interrupted = tokio::time::timeout(
        Duration::from_millis(200),
        s.fleet.provision(&g, |b| {
            calling = Some(b.to_string());
            Ok::<_, Infallible>(())
        }),
    )
    .await;
    assert!(interrupted.is_err(), "the provision finished");
    assert_eq!(calling.as_deref(), Some("us-big"));
    assert_eq!(s.us_big.world.ledger.snapshot().used.vcpus, 0);

    let abandoned = |b: &SimBackend| b.abandoned.lock().unwrap().clone();
    s.fleet.abandon(&g.id, calling.as_deref()).await;
    assert_eq!(abandoned(&s.us_big), [g.id.as_str()]);
    assert!(abandoned(&s.flaky).is_empty() && abandoned(&s.eu_small).is_empty());

    // Nothing recorded, or a backend no longer configured: every one.
    for recorded in [None, Some("gone")] {
        s.fleet.abandon("other", recorded).await;
        for b in [&s.eu_small, &s.flaky, &s.us_big] {
            assert_eq!(abandoned(b).last().map(String::as_str), Some("other"));
        }
    }
    assert_eq!(abandoned(&s.eu_small), ["other", "other"]);
}
