//! The grant API end to end over real HTTP: validation, auth, lifecycle,
//! idempotent resubmission and termination, valid_to enforcement, metrics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_bridge::state::{GrantState, StopCause};
use serde_json::{json, Value};

fn one_backend(dir: &std::path::Path) -> (TestServer, Arc<SimBackend>) {
    let backend = Arc::new(SimBackend::new(
        "sim",
        &["home"],
        false,
        World::new(8, 8192),
    ));
    let server = TestServer::start(dir, vec![backend.clone()]);
    (server, backend)
}

fn good_body() -> Value {
    serde_json::to_value(request("home", 1, 256)).unwrap()
}

#[test]
fn every_bad_field_is_refused_naming_it_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    let url = server.url("/v1/grants");
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let cases: Vec<(&str, Value)> = vec![
        ("bogus", json!(true)),
        ("request_id", json!("a/b")),
        ("image", json!("")),
        ("image", json!("127.0.0.1:5055/../../etc/passwd")),
        ("vcpus", json!(0)),
        ("vcpus", json!(-2)),
        ("vcpus", json!(9)), // larger than any backend
        ("ram_mib", json!(0)),
        ("ram_mib", json!(-1)),
        ("ram_mib", json!(1_000_000)),
        ("region", json!("mars")),
        ("tdx", json!("required")), // no backend has TDX
        ("tdx", json!("sometimes")),
        ("ssh_keys", json!(["not a key"])),
        ("ssh_keys", json!("ssh-ed25519 AAAA")),
        ("valid_to", json!(past)),
        ("valid_to", json!("next tuesday")),
        ("command", json!("sh -c true")),
        ("env", json!({"": "x"})),
        ("publish", json!([8000, 8000])),
        ("publish", json!([0])),
        ("publish", json!("8000")),
    ];
    for (field, value) in cases {
        let mut body = good_body();
        body[field] = value.clone();
        let (status, text) = raw("POST", &url, Some(TOKEN), Some(&body.to_string()));
        assert_eq!(status, 422, "{field}={value}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap();
        let named = err["field"].as_str().unwrap_or_default();
        assert!(named.starts_with(field), "{field}={value}: {text}");
        assert!(!err["error"].as_str().unwrap_or_default().is_empty());
    }
    for body in ["{\"image\": ", "[]", ""] {
        let (status, text) = raw("POST", &url, Some(TOKEN), Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
    }
    assert!(server.client().list().unwrap().is_empty());
    assert_eq!(backend.calls(), 0);
}

#[test]
fn requests_without_the_right_token_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    let body = good_body().to_string();
    for token in [None, Some("wrong"), Some("")] {
        for (method, path, body) in [
            ("POST", "/v1/grants", Some(body.as_str())),
            ("GET", "/v1/grants", None),
            ("GET", "/v1/grants/x", None),
            ("GET", "/v1/grants/x/usage", None),
            ("DELETE", "/v1/grants/x", None),
            ("GET", "/v1/capabilities", None),
        ] {
            let (status, text) = raw(method, &server.url(path), token, body);
            assert_eq!(status, 401, "{method} {path} with {token:?}");
            assert!(text.contains("error"));
        }
    }
    assert_eq!(backend.calls(), 0);
    assert!(server.manager().store().list().unwrap().is_empty());
    assert_eq!(raw("GET", &server.url("/healthz"), None, None).0, 200);
    assert_eq!(raw("GET", &server.url("/metrics"), None, None).0, 200);
    assert_eq!(raw("GET", &server.url("/nope"), Some(TOKEN), None).0, 404);
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _backend) = one_backend(dir.path());
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = ureq::get(&server.url("/v1/grants"))
            .set("Authorization", &format!("{scheme} {TOKEN}"))
            .call();
        assert_eq!(r.map(|r| r.status()).ok(), Some(200), "{scheme}");
    }
}

#[test]
fn every_error_answer_has_a_json_body() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    let huge = format!("{{\"image\": \"{}\"}}", "x".repeat(200 * 1024));
    for (method, path, body, want) in [
        ("PUT", "/v1/grants", None, 405),
        ("PATCH", "/v1/grants/x", None, 405),
        ("POST", "/healthz", None, 405),
        ("POST", "/v1/grants", Some(huge.as_str()), 413),
        ("GET", "/nope", None, 404),
    ] {
        let (status, text) = raw(method, &server.url(path), Some(TOKEN), body);
        assert_eq!(status, want, "{method} {path}: {text}");
        let err: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        assert!(
            !err["error"].as_str().unwrap_or_default().is_empty(),
            "{text}"
        );
        if want == 413 {
            // Answered before any handler, once the body was read: a
            // client still sending it gets the answer, not a reset.
            assert!(
                err["error"].as_str().unwrap_or_default().contains("65536"),
                "{text}"
            );
        }
    }
    // Too many header fields, or too many header bytes.
    let many = (0..150).fold(ureq::get(&server.url("/v1/grants")), |r, i| {
        r.set(&format!("x-pad-{i}"), "x")
    });
    let big = ureq::get(&server.url("/v1/grants")).set("x-pad", &"x".repeat(100 * 1024));
    for req in [many, big] {
        let req = req.set("Authorization", &format!("Bearer {TOKEN}"));
        match req.call() {
            Err(ureq::Error::Status(431, r)) => {
                let err: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                assert!(err["error"].as_str().unwrap().contains("headers"), "{err}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(backend.calls(), 0);
}

#[test]
fn a_grant_runs_reports_usage_and_terminates_freeing_its_resources() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    let client = server.client();
    let mut req = request("home", 2, 1024);
    req.request_id = Some("job-1".into());
    req.publish = vec![8080, 22];
    let submitted = client.submit(&req).unwrap();
    assert_eq!(submitted.grant.id, "job-1");
    assert_eq!(submitted.grant.publish, [8080, 22]);
    assert!(matches!(
        submitted.state,
        GrantState::Pending | GrantState::Provisioning | GrantState::Running
    ));

    let running = wait_for("running", Duration::from_secs(5), || {
        let g = client.show("job-1").unwrap();
        (g.state == GrantState::Running).then_some(g)
    });
    let conn = running.connection.expect("connection details");
    assert_eq!((conn.backend.as_str(), conn.ssh_port), ("sim", 2200));
    // Each published guest port, where the backend said it listens.
    let published: Vec<(u16, &str, u16)> = conn
        .published
        .iter()
        .map(|p| (p.guest_port, p.host.as_str(), p.port))
        .collect();
    assert_eq!(
        published,
        [(8080, "127.0.0.1", 2300), (22, "127.0.0.1", 2301)]
    );
    let used = client.capabilities().unwrap().capacity.used;
    assert_eq!((used.vcpus, used.ram_mib), (2, 1024));
    // Usage so far is sampled and stored on its own while the grant runs,
    // and taken fresh on request.
    let stored = wait_for("a usage sample", Duration::from_secs(3), || {
        server.manager().store().latest_usage("job-1").unwrap()
    });
    assert!(!stored.r#final && stored.usage.exit_status.is_none());
    std::thread::sleep(Duration::from_millis(300));
    let usage = client.usage("job-1").unwrap();
    assert_eq!(usage.state, GrantState::Running);
    assert!(!usage.r#final);
    let so_far = usage.usage.expect("usage so far");
    assert!(so_far.guest.uptime_ms >= 250, "{so_far:?}");
    assert_eq!(so_far.exit_status, None);
    let later = client.usage("job-1").unwrap().usage.unwrap();
    assert!(later.guest.uptime_ms >= so_far.guest.uptime_ms);

    // Resubmitting the same request gives back the same grant.
    let again = client.submit(&req).unwrap();
    assert_eq!(again.grant.id, "job-1");
    assert_eq!(client.list().unwrap().len(), 1);
    assert_eq!(backend.calls(), 1);
    // The same id for something else is a conflict.
    let mut other = req.clone();
    other.ram_mib = 512;
    let err = client.submit(&other).unwrap_err();
    assert_eq!((err.status(), err.field()), (Some(409), Some("request_id")));

    let ended = client.terminate("job-1").unwrap();
    assert_eq!(ended.state, GrantState::Terminated);
    assert_eq!(ended.stop, Some(StopCause::Requested));
    let usage = client.usage("job-1").unwrap();
    assert!(usage.r#final);
    let metrics = usage.usage.expect("final usage");
    assert_eq!(
        metrics.exit_status,
        Some(kiln_protocol::ExitStatus::Signal(9))
    );
    assert!(metrics.host.vmm_rss_kib > 0);
    assert_eq!(client.capabilities().unwrap().capacity.used.vcpus, 0);
    assert_eq!(backend.world.live(), 0);

    // Terminating again is harmless and changes nothing.
    let twice = client.terminate("job-1").unwrap();
    assert_eq!(
        (twice.state, twice.updated_at),
        (ended.state, ended.updated_at)
    );
    let err = client.terminate("no-such-grant").unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(
        client.show("no-such-grant").unwrap_err().status(),
        Some(404)
    );
}

#[test]
fn terminating_while_provisioning_interrupts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    // Far longer than the server's stop_wait: only an interrupted
    // provision lets terminate answer with the grant ended.
    *backend.provision_delay.lock().unwrap() = Duration::from_secs(3600);
    let client = server.client();
    let g = client.submit(&request("home", 1, 128)).unwrap();
    wait_for("provisioning", Duration::from_secs(2), || {
        (client.show(&g.grant.id).unwrap().state == GrantState::Provisioning).then_some(())
    });
    let ended = client.terminate(&g.grant.id).unwrap();
    assert_eq!(ended.state, GrantState::Terminated);
    assert_eq!(ended.stop, Some(StopCause::Requested));
    assert_eq!(backend.calls(), 1);
    // It never came to exist, and what its provision held is released.
    assert_eq!(backend.world.total(), 0);
    assert_eq!(backend.world.ledger.snapshot().used.vcpus, 0);
    assert_eq!(*backend.abandoned.lock().unwrap(), vec![g.grant.id.clone()]);
    let usage = client.usage(&g.grant.id).unwrap();
    assert!(usage.r#final && usage.usage.is_none(), "{usage:?}");
}

#[test]
fn an_interrupted_provision_is_abandoned_on_the_backend_it_was_calling() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(8, 8192);
    let flaky = Arc::new(SimBackend::new("flaky", &["home"], false, world.clone()));
    flaky
        .fail_transiently
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let slow = Arc::new(SimBackend::new("slow", &["home"], false, world.clone()));
    *slow.provision_delay.lock().unwrap() = Duration::from_secs(3600);
    let server = TestServer::start(dir.path(), vec![flaky.clone(), slow.clone()]);
    let client = server.client();
    let g = client.submit(&request("home", 1, 128)).unwrap();
    let id = g.grant.id.clone();
    // Recorded before the call, so seen while the call runs.
    wait_for("slow to be called", Duration::from_secs(2), || {
        let record = server.manager().get(&id).unwrap();
        (record.provisioning_backend.as_deref() == Some("slow")).then_some(())
    });
    assert_eq!((flaky.calls(), slow.calls()), (1, 1));
    let ended = client.terminate(&id).unwrap();
    assert_eq!(ended.state, GrantState::Terminated);
    assert_eq!(*slow.abandoned.lock().unwrap(), [id]);
    assert!(flaky.abandoned.lock().unwrap().is_empty());
    assert_eq!(world.ledger.snapshot().used.vcpus, 0);
}

#[test]
fn a_workload_that_ends_is_recorded_as_exited_with_its_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    *backend.run_for.lock().unwrap() = Some(Duration::from_millis(300));
    let client = server.client();
    let g = client.submit(&request("home", 1, 128)).unwrap();
    let done = wait_for("exit", Duration::from_secs(5), || {
        let g = client.show(&g.grant.id).unwrap();
        g.state.is_final().then_some(g)
    });
    assert_eq!(done.state, GrantState::Exited);
    assert_eq!(done.reason.as_deref(), Some("exited with code 0"));
    let usage = client.usage(&done.grant.id).unwrap().usage.unwrap();
    assert!(usage.guest.uptime_ms >= 250, "{usage:?}");
    // The manager terminates ended instances so the backend frees them.
    assert_eq!(client.capabilities().unwrap().capacity.used.vcpus, 0);
}

#[test]
fn valid_to_terminates_the_grant_at_the_deadline_and_records_final_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    let client = server.client();
    let mut req = request("home", 1, 128);
    req.valid_to = chrono::Utc::now() + chrono::Duration::seconds(2);
    let g = client.submit(&req).unwrap();
    wait_for("running", Duration::from_secs(2), || {
        (client.show(&g.grant.id).unwrap().state == GrantState::Running).then_some(())
    });
    let done = wait_for("deadline", Duration::from_secs(6), || {
        let g = client.show(&g.grant.id).unwrap();
        g.state.is_final().then_some(g)
    });
    assert_eq!(done.state, GrantState::Terminated);
    assert_eq!(done.stop, Some(StopCause::Deadline));
    assert_eq!(done.reason.as_deref(), Some("valid_to reached"));
    let usage = client.usage(&done.grant.id).unwrap();
    let metrics = usage.usage.expect("final usage");
    assert!(usage.r#final);
    // Ended at the deadline, not long after (the sim polls every 20 ms).
    let late = metrics.ended_at - req.valid_to;
    assert!(
        late >= chrono::Duration::zero() && late < chrono::Duration::milliseconds(1500),
        "ended {late} after valid_to"
    );
    assert_eq!(backend.world.live(), 0);
    assert_eq!(backend.world.ledger.snapshot().used.vcpus, 0);
}

#[test]
fn a_transient_failure_everywhere_fails_the_grant_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (server, backend) = one_backend(dir.path());
    backend
        .fail_transiently
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let client = server.client();
    let g = client.submit(&request("home", 1, 128)).unwrap();
    let done = wait_for("failure", Duration::from_secs(5), || {
        let g = client.show(&g.grant.id).unwrap();
        g.state.is_final().then_some(g)
    });
    assert_eq!(done.state, GrantState::Failed);
    let reason = done.reason.unwrap();
    assert!(reason.contains("injected transient failure"), "{reason}");
    assert!(done.connection.is_none());
    // It never ran, and never will: its (empty) usage is final.
    let usage = client.usage(&g.grant.id).unwrap();
    assert_eq!(usage.state, GrantState::Failed);
    assert!(usage.r#final && usage.usage.is_none(), "{usage:?}");
}

#[test]
fn metrics_count_grants_by_state_running_vms_boot_times_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _backend) = one_backend(dir.path());
    let client = server.client();
    for _ in 0..2 {
        let g = client.submit(&request("home", 1, 256)).unwrap();
        wait_for("running", Duration::from_secs(5), || {
            (client.show(&g.grant.id).unwrap().state == GrantState::Running).then_some(())
        });
    }
    let (status, text) = raw("GET", &server.url("/metrics"), None, None);
    assert_eq!(status, 200);
    for line in [
        "kiln_grants{state=\"running\"} 2",
        "kiln_vms_running 2",
        "kiln_boot_seconds_count 2",
        "kiln_boot_seconds_bucket{le=\"+Inf\"} 2",
        "kiln_capacity_vcpus{backend=\"sim\",kind=\"used\"} 2",
        "kiln_capacity_vcpus{backend=\"sim\",kind=\"usable\"} 8",
        "kiln_capacity_ram_mib{backend=\"sim\",kind=\"used\"} 512",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
}
