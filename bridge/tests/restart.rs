//! Restart: a new server on the same state directory re-adopts what the
//! old one left, as if kilnd had been killed with -9 in between.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_bridge::grant::{Grant, ValidationContext};
use kiln_bridge::state::{GrantState, StopCause};
use kiln_bridge::store::Store;

fn sim(world: &Arc<World>) -> Arc<SimBackend> {
    Arc::new(SimBackend::new("sim", &["home"], false, world.clone()))
}

fn wait_state(server: &TestServer, id: &str, want: GrantState) {
    let client = server.client();
    wait_for(&format!("{id} {want}"), Duration::from_secs(5), || {
        (client.show(id).unwrap().state == want).then_some(())
    });
}

#[test]
fn running_grants_are_readopted_and_ended_ones_recorded_as_exited() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(8, 8192);

    let first = sim(&world);
    let server = TestServer::start(dir.path(), vec![first.clone()]);
    let client = server.client();
    let mut long = request("home", 1, 256);
    long.request_id = Some("long".into());
    client.submit(&long).unwrap();
    wait_state(&server, "long", GrantState::Running);

    *first.run_for.lock().unwrap() = Some(Duration::from_millis(800));
    let mut short = request("home", 1, 256);
    short.request_id = Some("short".into());
    client.submit(&short).unwrap();
    wait_state(&server, "short", GrantState::Running);

    *first.run_for.lock().unwrap() = None;
    let mut deadline = request("home", 1, 256);
    deadline.request_id = Some("deadline".into());
    deadline.valid_to = chrono::Utc::now() + chrono::Duration::milliseconds(1200);
    client.submit(&deadline).unwrap();
    wait_state(&server, "deadline", GrantState::Running);

    let mut done = request("home", 1, 256);
    done.request_id = Some("done".into());
    client.submit(&done).unwrap();
    wait_state(&server, "done", GrantState::Running);
    client.terminate("done").unwrap();

    drop(server); // kill -9: nothing is terminated
    assert_eq!(world.live(), 3);

    // While kilnd is down: `short` ends, `deadline` passes its valid_to,
    // one grant is stored but not yet provisioned, and one was caught
    // mid-provisioning.
    wait_for("short to end", Duration::from_secs(3), || {
        (world.live() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    {
        let store = Store::open(dir.path()).unwrap();
        let ctx = ValidationContext {
            regions: ["home".to_string()].into(),
            now: chrono::Utc::now(),
        };
        for id in ["queued", "interrupted"] {
            let mut req = request("home", 1, 256);
            req.request_id = Some(id.into());
            let grant = Grant::from_json(&serde_json::to_vec(&req).unwrap(), &ctx).unwrap();
            store.insert_grant(&grant).unwrap();
        }
        assert!(store
            .transition(
                "interrupted",
                &[GrantState::Pending],
                GrantState::Provisioning,
                None
            )
            .unwrap());
    }

    let second = sim(&world);
    let server = TestServer::start(dir.path(), vec![second.clone()]);
    let client = server.client();

    wait_state(&server, "short", GrantState::Exited);
    let usage = client.usage("short").unwrap();
    assert!(usage.r#final);
    let usage = usage
        .usage
        .expect("usage of the grant that ended while down");
    assert_eq!(usage.exit_status, Some(kiln_protocol::ExitStatus::Code(0)));
    assert!(usage.guest.uptime_ms >= 700, "{usage:?}");

    wait_state(&server, "deadline", GrantState::Terminated);
    let d = client.show("deadline").unwrap();
    assert_eq!(d.stop, Some(StopCause::Deadline));
    assert!(client.usage("deadline").unwrap().r#final);

    wait_state(&server, "queued", GrantState::Running);
    assert_eq!(second.calls(), 1, "only the queued grant was provisioned");
    let interrupted = client.show("interrupted").unwrap();
    assert_eq!(interrupted.state, GrantState::Failed);
    assert!(interrupted.reason.unwrap().contains("provisioning"));
    // Whatever that provision left is the backends' to clean up.
    wait_for("abandon", Duration::from_secs(3), || {
        let abandoned = second.abandoned.lock().unwrap().clone();
        (abandoned == ["interrupted"]).then_some(())
    });
    assert_eq!(client.show("done").unwrap().state, GrantState::Terminated);

    // `long` is still running, supervised by the new server.
    std::thread::sleep(Duration::from_millis(200));
    let long = client.show("long").unwrap();
    assert_eq!(long.state, GrantState::Running);
    assert!(long.connection.is_some());
    let ended = client.terminate("long").unwrap();
    assert_eq!(ended.state, GrantState::Terminated);
    assert!(client.usage("long").unwrap().r#final);
    client.terminate("queued").unwrap();
    assert_eq!(world.live(), 0);
    assert_eq!(world.ledger.snapshot().used.vcpus, 0);
    assert_eq!(server.manager().supervised(), 0);
}

#[test]
fn a_grant_caught_provisioning_is_abandoned_on_the_backend_recorded_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(8, 8192);
    {
        // As a kilnd killed mid-provision left it: one grant whose
        // provision had reached backend b, one from before that was
        // recorded.
        let store = Store::open(dir.path()).unwrap();
        let ctx = ValidationContext {
            regions: ["home".to_string()].into(),
            now: chrono::Utc::now(),
        };
        for id in ["recorded", "unrecorded"] {
            let mut req = request("home", 1, 256);
            req.request_id = Some(id.into());
            let grant = Grant::from_json(&serde_json::to_vec(&req).unwrap(), &ctx).unwrap();
            store.insert_grant(&grant).unwrap();
            assert!(store
                .transition(id, &[GrantState::Pending], GrantState::Provisioning, None)
                .unwrap());
        }
        store.record_provisioning_backend("recorded", "b").unwrap();
    }
    let a = Arc::new(SimBackend::new("a", &["home"], false, world.clone()));
    let b = Arc::new(SimBackend::new("b", &["home"], false, world.clone()));
    let server = TestServer::start(dir.path(), vec![a.clone(), b.clone()]);
    let abandoned = |s: &SimBackend| {
        let mut ids = s.abandoned.lock().unwrap().clone();
        ids.sort();
        ids
    };
    wait_for("abandon", Duration::from_secs(3), || {
        (abandoned(&a) == ["unrecorded"] && abandoned(&b) == ["recorded", "unrecorded"])
            .then_some(())
    });
    for id in ["recorded", "unrecorded"] {
        assert_eq!(server.client().show(id).unwrap().state, GrantState::Failed);
    }
    assert_eq!(a.calls() + b.calls(), 0);
}
