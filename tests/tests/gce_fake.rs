//! The fake GCE Compute API over HTTP, as a client sees it: its answers
//! stay inside Google's published schemas, and its lifecycle, idempotency,
//! fault and consistency rules hold. No VMs; fast.

use kiln_tests::gce::{discovery, FakeGce, OpFault};
use serde_json::{json, Value};

const Z: &str = "us-central1-a";
const RID: &str = "3f1c2a9e-5b7d-4e21-9c3a-0d4b6e8f1a2c";

struct Client {
    base: String,
}

impl Client {
    fn new(gce: &FakeGce) -> Client {
        Client {
            base: format!("{}/compute/v1/projects/{}", gce.endpoint(), gce.project()),
        }
    }

    /// (status, body) of a call; `path` is below the project, with its
    /// query string.
    fn call(&self, verb: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/{path}", self.base);
        let req = ureq::request(verb, &url);
        let res = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{verb} {url}: {e}"),
        };
        let code = resp.status();
        let text = resp.into_string().unwrap();
        (code, serde_json::from_str(&text).unwrap())
    }

    fn ok(&self, verb: &str, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.call(verb, path, body);
        assert_eq!(code, 200, "{verb} {path}: {v}");
        v
    }
}

fn instance(name: &str) -> Value {
    json!({
        "name": name,
        "machineType": format!("zones/{Z}/machineTypes/n2-standard-8"),
        "labels": {"kiln-bridge": "b-1", "kiln-grant": "g-1"},
        "metadata": {"items": [{"key": "startup-script", "value": "#!/bin/sh\necho hi\n"}]},
        "advancedMachineFeatures": {"enableNestedVirtualization": true},
        "disks": [{"boot": true, "autoDelete": true, "initializeParams": {
            "sourceImage": "projects/debian-cloud/global/images/family/debian-12",
            "diskSizeGb": "20"}}],
        "networkInterfaces": [{"accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}],
    })
}

fn assert_schema(schema: &str, v: &Value) {
    let bad = discovery().violations(schema, v);
    assert!(bad.is_empty(), "{schema}: {bad:?}\n{v:#}");
}

fn assert_google_error(v: &Value, code: u16, status: &str, reason: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    assert_eq!(v["error"]["errors"][0]["reason"], reason, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[test]
fn every_answer_is_inside_the_published_schema() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    let q = "$alt=json&$apiVersion=2026-09-01";
    let op = c.ok(
        "POST",
        &format!("zones/{Z}/instances?requestId={RID}&{q}"),
        Some(instance("a")),
    );
    assert_schema("Operation", &op);
    let op_name = op["name"].as_str().unwrap();
    let checks = [
        (
            "GET",
            format!("zones/{Z}/operations/{op_name}?{q}"),
            "Operation",
        ),
        (
            "POST",
            format!("zones/{Z}/operations/{op_name}/wait?{q}"),
            "Operation",
        ),
        ("GET", format!("zones/{Z}/instances/a?{q}"), "Instance"),
        ("GET", format!("zones/{Z}/instances?{q}"), "InstanceList"),
        (
            "GET",
            format!("aggregated/instances?{q}"),
            "InstanceAggregatedList",
        ),
        (
            "GET",
            format!("zones/{Z}/machineTypes?{q}"),
            "MachineTypeList",
        ),
        ("GET", format!("zones?{q}"), "ZoneList"),
        ("GET", format!("zones/{Z}?{q}"), "Zone"),
        ("GET", format!("regions?{q}"), "RegionList"),
        ("GET", format!("regions/us-central1?{q}"), "Region"),
    ];
    for (verb, path, schema) in checks {
        let v = c.ok(verb, &path, None);
        assert_schema(schema, &v);
    }
    let inst = c.ok("GET", &format!("zones/{Z}/instances/a"), None);
    // Ids are numeric strings; addresses private and TEST-NET.
    assert!(inst["id"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(op["id"].as_str().unwrap().parse::<u64>().is_ok());
    let nic = &inst["networkInterfaces"][0];
    assert!(nic["networkIP"].as_str().unwrap().starts_with("10."));
    assert!(nic["accessConfigs"][0]["natIP"]
        .as_str()
        .unwrap()
        .starts_with("203.0.113."));
    assert_eq!(inst["metadata"]["items"][0]["key"], "startup-script");
    assert_eq!(inst["labels"]["kiln-grant"], "g-1");
    assert!(inst["machineType"]
        .as_str()
        .unwrap()
        .ends_with("/zones/us-central1-a/machineTypes/n2-standard-8"));
    assert!(inst["zone"]
        .as_str()
        .unwrap()
        .ends_with("/zones/us-central1-a"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(inst["creationTimestamp"].as_str().unwrap()).is_ok()
    );
    let del = c.ok("DELETE", &format!("zones/{Z}/instances/a?{q}"), None);
    assert_schema("Operation", &del);
    assert!(
        gce.schema_violations().is_empty(),
        "{:?}",
        gce.schema_violations()
    );
}

#[test]
fn operations_go_pending_running_done() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    let op = c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    assert_eq!(op["status"], "PENDING");
    assert_eq!(op["operationType"], "insert");
    let path = format!("zones/{Z}/operations/{}", op["name"].as_str().unwrap());
    assert_eq!(c.ok("GET", &path, None)["status"], "RUNNING");
    let done = c.ok("GET", &path, None);
    assert_eq!(done["status"], "DONE");
    assert!(done.get("error").is_none());
    assert_eq!(c.ok("GET", &path, None)["status"], "DONE");
    // Another zone does not have it.
    let (code, v) = c.call("GET", &path.replace(Z, "us-central1-b"), None);
    assert_eq!(code, 404);
    assert_google_error(&v, 404, "NOT_FOUND", "notFound");
    // wait: DONE at once.
    let op = c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("b")));
    let wait = format!("zones/{Z}/operations/{}/wait", op["name"].as_str().unwrap());
    assert_eq!(c.ok("POST", &wait, None)["status"], "DONE");
    assert_eq!(gce.count("compute.zoneOperations.wait"), 1);
}

#[test]
fn instances_go_provisioning_staging_running_and_delete_to_gone() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    let get = format!("zones/{Z}/instances/a");
    let seen: Vec<Value> = (0..4)
        .map(|_| c.ok("GET", &get, None)["status"].clone())
        .collect();
    assert_eq!(seen, ["PROVISIONING", "STAGING", "RUNNING", "RUNNING"]);
    let op = c.ok("DELETE", &get, None);
    assert_eq!(op["operationType"], "delete");
    assert_eq!(c.ok("GET", &get, None)["status"], "STOPPING");
    assert_eq!(c.ok("GET", &get, None)["status"], "TERMINATED");
    let (code, v) = c.call("GET", &get, None);
    assert_eq!(code, 404);
    assert_google_error(&v, 404, "NOT_FOUND", "notFound");
    let (code, _) = c.call("DELETE", &get, None);
    assert_eq!(code, 404);
}

#[test]
fn a_repeated_request_id_returns_the_same_operation_and_creates_nothing() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    let path = format!("zones/{Z}/instances?requestId={RID}");
    let first = c.ok("POST", &path, Some(instance("a")));
    let again = c.ok("POST", &path, Some(instance("a")));
    assert_eq!(first["name"], again["name"]);
    assert_eq!(first["id"], again["id"]);
    assert_eq!(gce.count("compute.instances.insert"), 2);
    assert_eq!(gce.created(), 1);
    // Not a UUID: refused, as Google refuses it.
    let (code, v) = c.call(
        "POST",
        &format!("zones/{Z}/instances?requestId=grant-1"),
        Some(instance("b")),
    );
    assert_eq!(code, 400);
    assert_google_error(&v, 400, "INVALID_ARGUMENT", "invalid");
}

#[test]
fn a_taken_name_is_409_already_exists() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    let (code, v) = c.call("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    assert_eq!(code, 409);
    assert_google_error(&v, 409, "ALREADY_EXISTS", "alreadyExists");
    assert_eq!(gce.created(), 1);
}

#[test]
fn capacity_and_quota_end_inside_the_done_operation() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    gce.fail_zone(Z, OpFault::Capacity);
    let op = c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    assert!(
        op.get("error").is_none(),
        "only a DONE operation carries it"
    );
    let wait = format!("zones/{Z}/operations/{}/wait", op["name"].as_str().unwrap());
    let done = c.ok("POST", &wait, None);
    assert_eq!(done["status"], "DONE");
    assert_eq!(
        done["error"]["errors"][0]["code"],
        "ZONE_RESOURCE_POOL_EXHAUSTED"
    );
    assert_eq!(done["httpErrorStatusCode"], 503);
    assert_schema("Operation", &done);
    assert_eq!(gce.created(), 0);

    gce.clear_faults();
    gce.fail_machine_type("n2-standard-8", OpFault::Quota);
    let op = c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    let path = format!("zones/{Z}/operations/{}", op["name"].as_str().unwrap());
    c.ok("GET", &path, None);
    let done = c.ok("GET", &path, None);
    assert_eq!(done["error"]["errors"][0]["code"], "QUOTA_EXCEEDED");
    assert_eq!(done["httpErrorStatusCode"], 403);
    assert_eq!(gce.created(), 0);
    assert!(gce.instance_names().is_empty());
}

#[test]
fn a_new_instance_may_be_missing_from_the_first_reads() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    gce.hide_new_instances_for(2);
    c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    let get = format!("zones/{Z}/instances/a");
    assert_eq!(c.call("GET", &get, None).0, 404);
    let listed = c.ok("GET", "aggregated/instances", None);
    assert!(listed["items"][format!("zones/{Z}")]
        .get("instances")
        .is_none());
    assert_eq!(c.ok("GET", &get, None)["name"], "a");
    assert_eq!(gce.instance_names(), [(Z.to_string(), "a".to_string())]);
}

#[test]
fn unknown_fields_and_parameters_are_refused() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    let mut body = instance("a");
    body["flavour"] = json!("vanilla");
    let (code, v) = c.call("POST", &format!("zones/{Z}/instances"), Some(body));
    assert_eq!(code, 400);
    assert_google_error(&v, 400, "INVALID_ARGUMENT", "invalid");
    assert!(v["error"]["message"].as_str().unwrap().contains("flavour"));
    let mut body = instance("a");
    body["disks"][0]["initializeParams"]["colour"] = json!(1);
    assert_eq!(
        c.call("POST", &format!("zones/{Z}/instances"), Some(body))
            .0,
        400
    );
    let (code, v) = c.call("GET", &format!("zones/{Z}/instances?flavour=x"), None);
    assert_eq!(code, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("flavour"));
    assert_eq!(c.call("GET", "zones?$alt=proto", None).0, 400);
    // A call the document does not describe.
    let (code, v) = c.call("GET", &format!("zones/{Z}/disks"), None);
    assert_eq!(code, 404);
    assert_google_error(&v, 404, "NOT_FOUND", "notFound");
    // Another project.
    let other = c.base.replace("kiln-test", "someone-else");
    let (code, _) = Client { base: other }.call("GET", "zones", None);
    assert_eq!(code, 404);
    assert_eq!(gce.created(), 0);
}

#[test]
fn lists_filter_by_label_and_page() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    let mut other = instance("b");
    other["labels"]["kiln-bridge"] = json!("b-2");
    other["machineType"] = json!("zones/us-central1-b/machineTypes/n2-standard-8");
    c.ok("POST", "zones/us-central1-b/instances", Some(other));
    c.ok(
        "POST",
        "zones/europe-west4-a/instances",
        Some(instance("c")),
    );

    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["items"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let filter = "labels.kiln-bridge+%3D+%22b-1%22";
    let v = c.ok(
        "GET",
        &format!("aggregated/instances?filter={filter}"),
        None,
    );
    assert_eq!(names(&v), ["a", "c"]);
    assert_eq!(
        v["items"]["zones/us-central1-b"]["warning"]["code"],
        "NO_RESULTS_ON_PAGE"
    );
    let both = "%28labels.kiln-bridge+%3D+b-1%29+AND+%28labels.kiln-grant+%3D+g-1%29";
    let v = c.ok("GET", &format!("aggregated/instances?filter={both}"), None);
    assert_eq!(names(&v), ["a", "c"]);
    let (code, _) = c.call(
        "GET",
        "aggregated/instances?filter=%28name+%3D+a%29+OR+%28name+%3D+b%29",
        None,
    );
    assert_eq!(code, 400);

    let v = c.ok("GET", &format!("zones/{Z}/instances?filter={filter}"), None);
    assert_eq!(v["items"][0]["name"], "a");

    gce.set_page_size(Some(2));
    let first = c.ok("GET", "aggregated/instances", None);
    let token = first["nextPageToken"].as_str().unwrap();
    let second = c.ok(
        "GET",
        &format!("aggregated/instances?pageToken={token}"),
        None,
    );
    assert!(second.get("nextPageToken").is_none());
    let mut all = names(&first);
    all.extend(names(&second));
    all.sort();
    assert_eq!(all, ["a", "b", "c"]);
}

#[test]
fn injected_http_errors_have_google_shapes() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    gce.fail_requests("compute.instances.insert", 429, 1);
    gce.fail_requests("compute.zones.list", 403, 1);
    let (code, v) = c.call("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    assert_eq!(code, 429);
    assert_google_error(&v, 429, "RESOURCE_EXHAUSTED", "rateLimitExceeded");
    let (code, v) = c.call("GET", "zones", None);
    assert_eq!(code, 403);
    assert_google_error(&v, 403, "PERMISSION_DENIED", "forbidden");
    // Each only once.
    c.ok("POST", &format!("zones/{Z}/instances"), Some(instance("a")));
    c.ok("GET", "zones", None);
    let log = gce.requests();
    assert_eq!(log.len(), 4);
    assert_eq!(log[0].status, 429);
    assert_eq!(log[0].method, "compute.instances.insert");
}

#[test]
fn catalogue_lists_zones_and_machine_types() {
    let gce = FakeGce::start();
    let c = Client::new(&gce);
    gce.set_zone_up("us-central1-f", false);
    let zones = c.ok("GET", "zones", None);
    let f = zones["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["name"] == "us-central1-f")
        .unwrap();
    assert_eq!(f["status"], "DOWN");
    assert!(f["region"]
        .as_str()
        .unwrap()
        .ends_with("/regions/us-central1"));
    let types = c.ok("GET", &format!("zones/{Z}/machineTypes"), None);
    let c3 = types["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "c3-standard-4")
        .unwrap();
    assert_eq!(c3["guestCpus"], 4);
    assert_eq!(c3["memoryMb"], 16384);
    assert_eq!(c3["zone"], Z);
    let region = c.ok("GET", "regions/us-central1", None);
    assert_eq!(region["zones"].as_array().unwrap().len(), 4);
    assert_eq!(c.call("GET", "regions/mars-north1", None).0, 404);
    assert_eq!(
        c.call("GET", "zones/mars-north1-a/machineTypes", None).0,
        404
    );
}
