//! `GcpApi` (Google's Rust Compute client underneath) against the fake
//! GCE API from kiln-tests: create, idempotency, errors inside DONE
//! operations, lag after insert, listing by labels, terminate, and the
//! catalogue calls. Loopback only; no VMs.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_bridge::backends::cloud::api::{
    CloudApi, CloudErrorKind, CloudState, CreateSpec, Placement, BRIDGE_TAG, GRANT_TAG,
};
use kiln_bridge::backends::gcp::{GcpApi, Polling};
use kiln_tests::gce::{FakeGce, OpFault};

const REGION: &str = "us-central1";
const ZONE: &str = "us-central1-a";
const IMAGE: &str = "projects/debian-cloud/global/images/family/debian-12";

async fn api(gce: &FakeGce) -> GcpApi {
    GcpApi::new(gce.project().to_string(), Some(gce.endpoint()), None)
        .await
        .unwrap()
        .with_polling(Polling {
            interval: Duration::from_millis(5),
            limit: Duration::from_secs(20),
            visible_tries: 5,
        })
}

fn tags(bridge: &str, grant: &str) -> BTreeMap<String, String> {
    [
        (BRIDGE_TAG.to_string(), bridge.to_string()),
        (GRANT_TAG.to_string(), grant.to_string()),
    ]
    .into()
}

fn spec(name: &str, token: &str, zone: &str) -> CreateSpec {
    CreateSpec {
        name: name.to_string(),
        token: token.to_string(),
        placement: Placement {
            region: zone.rsplit_once('-').unwrap().0.to_string(),
            zone: zone.to_string(),
            machine_type: "n2-standard-8".to_string(),
        },
        image: IMAGE.to_string(),
        user_data: "#!/bin/sh\necho kiln\n".to_string(),
        tags: tags("b-0a1b", name.trim_start_matches("kiln-")),
        nested_virtualization: true,
    }
}

/// Every call the client made was one the fake (and so the published
/// schema) accepted.
fn assert_clean(gce: &FakeGce) {
    assert!(
        gce.schema_violations().is_empty(),
        "{:?}",
        gce.schema_violations()
    );
    let refused: Vec<_> = gce
        .requests()
        .into_iter()
        .filter(|r| r.status == 400 || r.method == "unknown")
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

#[tokio::test]
async fn create_waits_for_the_operation_and_returns_the_instance() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let s = spec("kiln-g1", "token-g1", ZONE);
    let i = api.create(&s).await.unwrap();
    assert_eq!(i.id, "kiln-g1");
    assert_eq!(i.placement, s.placement);
    assert_eq!(i.state, CloudState::Pending);
    assert_eq!(i.tags, s.tags);
    assert_eq!(i.grant(), Some("g1"));
    assert!(i.private_ip.unwrap().to_string().starts_with("10."));
    assert!(i.public_ip.unwrap().to_string().starts_with("203.0.113."));
    assert!(i.launched_at.is_some());
    // The operation was polled to DONE, not waited on.
    assert_eq!(gce.count("compute.zoneOperations.get"), 2);
    assert_eq!(gce.count("compute.zoneOperations.wait"), 0);

    // What GCE was asked for.
    let body = gce.inserted_body(ZONE, "kiln-g1").unwrap();
    assert_eq!(body["metadata"]["items"][0]["key"], "startup-script");
    assert_eq!(body["metadata"]["items"][0]["value"], s.user_data);
    assert_eq!(
        body["advancedMachineFeatures"]["enableNestedVirtualization"],
        true
    );
    assert_eq!(body["disks"][0]["initializeParams"]["sourceImage"], IMAGE);
    assert_eq!(body["disks"][0]["boot"], true);
    assert_eq!(
        body["networkInterfaces"][0]["accessConfigs"][0]["type"],
        "ONE_TO_ONE_NAT"
    );
    assert_eq!(body["labels"][GRANT_TAG], "g1");
    let insert = gce
        .requests()
        .into_iter()
        .find(|r| r.method == "compute.instances.insert")
        .unwrap();
    let q = |k: &str| {
        insert
            .query
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let rid = q("requestId").unwrap();
    assert_eq!(uuid::Uuid::parse_str(&rid).unwrap().get_version_num(), 4);
    // The client's system parameters, which the fake accepts as Google does.
    assert_eq!(q("$alt").as_deref(), Some("json"));
    assert!(q("$apiVersion").is_some());

    // Then it runs.
    let mut state = i.state;
    for _ in 0..5 {
        state = api
            .describe(&i.placement, &i.id)
            .await
            .unwrap()
            .unwrap()
            .state;
        if state == CloudState::Running {
            break;
        }
    }
    assert_eq!(state, CloudState::Running);
    assert_clean(&gce);
}

#[tokio::test]
async fn the_same_token_creates_one_instance() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let s = spec("kiln-g1", "token-g1", ZONE);
    let a = api.create(&s).await.unwrap();
    let b = api.create(&s).await.unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(gce.count("compute.instances.insert"), 2);
    assert_eq!(gce.created(), 1);
    assert_clean(&gce);
}

#[tokio::test]
async fn a_taken_name_returns_the_existing_instance_if_it_is_the_grants() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let first = api.create(&spec("kiln-g1", "token-1", ZONE)).await.unwrap();
    // A restarted bridge with a new token: 409, then the instance.
    let again = api.create(&spec("kiln-g1", "token-2", ZONE)).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(gce.created(), 1);
    assert!(gce
        .requests()
        .iter()
        .any(|r| r.method == "compute.instances.insert" && r.status == 409));
    // The same name for another grant: a conflict, not someone else's VM.
    let mut other = spec("kiln-g1", "token-3", ZONE);
    other.tags = tags("b-0a1b", "g2");
    let e = api.create(&other).await.unwrap_err();
    assert_eq!(e.kind, CloudErrorKind::Conflict);
}

#[tokio::test]
async fn capacity_and_quota_inside_done_operations_are_sorted() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    gce.fail_zone(ZONE, OpFault::Capacity);
    let e = api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap_err();
    assert_eq!(e.kind, CloudErrorKind::Capacity);
    assert_eq!(e.code, "ZONE_RESOURCE_POOL_EXHAUSTED");
    assert_eq!((e.cloud, e.call), ("gcp", "insert"));

    gce.fail_zone("us-central1-b", OpFault::CapacityWithDetails);
    let e = api
        .create(&spec("kiln-g2", "t2", "us-central1-b"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, CloudErrorKind::Capacity);

    gce.clear_faults();
    gce.fail_machine_type("n2-standard-8", OpFault::Quota);
    let e = api.create(&spec("kiln-g3", "t3", ZONE)).await.unwrap_err();
    assert_eq!(e.kind, CloudErrorKind::Quota);
    assert_eq!(e.code, "QUOTA_EXCEEDED");
    assert_eq!(gce.created(), 0);
    assert_clean(&gce);
}

#[tokio::test]
async fn http_errors_are_sorted_and_not_retried_by_the_client() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    for (code, kind) in [
        (429, CloudErrorKind::Throttled),
        (403, CloudErrorKind::Auth),
        (401, CloudErrorKind::Auth),
        (503, CloudErrorKind::Transient),
        (500, CloudErrorKind::Transient),
    ] {
        gce.fail_requests("compute.instances.insert", code, 1);
        let e = api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap_err();
        assert_eq!(e.kind, kind, "{code}: {e}");
    }
    // One request each: the client's own retry is off.
    assert_eq!(gce.count("compute.instances.insert"), 5);
    assert_eq!(gce.created(), 0);
    let p = spec("kiln-nope", "t", ZONE).placement;
    assert_eq!(api.describe(&p, "kiln-nope").await.unwrap(), None);
}

#[tokio::test]
async fn a_lagging_read_after_insert_is_tolerated() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    gce.hide_new_instances_for(3);
    let i = api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap();
    assert_eq!(i.id, "kiln-g1");
    assert_eq!(gce.count("compute.instances.get"), 4);

    // Longer than the client waits: NotFound, and nothing created twice.
    gce.hide_new_instances_for(50);
    let e = api.create(&spec("kiln-g2", "t2", ZONE)).await.unwrap_err();
    assert_eq!(e.kind, CloudErrorKind::NotFound);
    assert_eq!(gce.created(), 2);
}

#[tokio::test]
async fn list_finds_the_region_and_labels_asked_for() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap();
    api.create(&spec("kiln-g2", "t2", "us-central1-b"))
        .await
        .unwrap();
    api.create(&spec("kiln-g3", "t3", "europe-west4-a"))
        .await
        .unwrap();
    let mut other = spec("kiln-g4", "t4", ZONE);
    other.tags = tags("b-ffff", "g4");
    api.create(&other).await.unwrap();

    let mine: BTreeMap<String, String> = [(BRIDGE_TAG.to_string(), "b-0a1b".to_string())].into();
    gce.set_page_size(Some(1));
    let found = api.list(REGION, &mine).await.unwrap();
    let ids: Vec<&str> = found.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["kiln-g1", "kiln-g2"]);
    assert!(gce.count("compute.instances.aggregatedList") >= 2, "paged");
    let filters: Vec<String> = gce
        .requests()
        .into_iter()
        .filter(|r| r.method == "compute.instances.aggregatedList")
        .filter_map(|r| {
            r.query
                .into_iter()
                .find(|(k, _)| k == "filter")
                .map(|q| q.1)
        })
        .collect();
    assert!(
        filters
            .iter()
            .all(|f| f == "(labels.kiln-bridge = \"b-0a1b\")"),
        "{filters:?}"
    );

    let one = api.list(REGION, &tags("b-0a1b", "g2")).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].placement.zone, "us-central1-b");
    assert_eq!(api.list("europe-west4", &mine).await.unwrap().len(), 1);
    assert_clean(&gce);
}

#[tokio::test]
async fn terminate_waits_and_is_fine_twice() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let i = api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap();
    api.terminate(&i).await.unwrap();
    assert!(gce.instance_names().is_empty());
    api.terminate(&i).await.unwrap();
    assert_eq!(api.describe(&i.placement, &i.id).await.unwrap(), None);
    assert!(api.list(REGION, &i.tags).await.unwrap().is_empty());
    assert_clean(&gce);
}

#[tokio::test]
async fn a_stopped_instance_reads_stopped() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let i = api.create(&spec("kiln-g1", "t1", ZONE)).await.unwrap();
    // GCE's TERMINATED (after a preemption, say) is stopped, not gone.
    assert!(gce.force_status(ZONE, "kiln-g1", "TERMINATED"));
    let d = api.describe(&i.placement, &i.id).await.unwrap().unwrap();
    assert_eq!(d.state, CloudState::Stopped);
    assert!(d.state.is_over());
    assert_eq!(d.public_ip, None);
}

#[tokio::test]
async fn zones_and_machine_types() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    gce.set_zone_up("us-central1-f", false);
    assert_eq!(
        api.zones(REGION).await.unwrap(),
        ["us-central1-a", "us-central1-b", "us-central1-c"]
    );
    gce.set_page_size(Some(2));
    let types = api.machine_types(REGION, ZONE).await.unwrap();
    let get = |n: &str| types.iter().find(|t| t.name == n).unwrap();
    let c3 = get("c3-standard-4");
    assert!(c3.kvm && c3.tdx);
    assert_eq!((c3.vcpus, c3.ram_mib), (4, 16384));
    assert!(get("n2-standard-8").kvm);
    assert!(!get("n2-standard-8").tdx);
    assert!(!get("e2-standard-4").kvm);
    assert!(!get("n2d-standard-8").kvm);
    assert!(!get("t2a-standard-4").kvm);
    assert_eq!(types.len(), 9, "every page");
    assert_clean(&gce);
}

#[tokio::test]
async fn bad_names_and_tags_are_refused_before_any_request() {
    let gce = FakeGce::start();
    let api = api(&gce).await;
    let mut s = spec("kiln-g1", "t1", ZONE);
    s.tags.insert("Owner".into(), "x".into());
    assert_eq!(
        api.create(&s).await.unwrap_err().kind,
        CloudErrorKind::Invalid
    );
    let s = spec("Kiln_G1", "t1", ZONE);
    assert_eq!(
        api.create(&s).await.unwrap_err().kind,
        CloudErrorKind::Invalid
    );
    assert!(gce.requests().is_empty());
    assert_eq!(api.cloud(), "gcp");
    assert!(api.features().idempotent_create);
}
