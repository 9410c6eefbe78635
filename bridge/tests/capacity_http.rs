//! Capacity over HTTP: with room for N grants, N+3 concurrent submissions
//! give exactly N running and 3 capacity failures, none lost or duplicated.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_bridge::state::{FailureKind, GrantState};
use kiln_bridge::view::GrantView;

const ROOM: usize = 4;

#[test]
fn concurrent_submissions_never_overcommit() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(ROOM as u32, 4096);
    let backend = Arc::new(SimBackend::new("sim", &["home"], false, world.clone()));
    let server = TestServer::start(dir.path(), vec![backend.clone()]);

    let handles: Vec<_> = (0..ROOM + 3)
        .map(|i| {
            let client = server.client();
            std::thread::spawn(move || {
                let mut req = request("home", 1, 512);
                req.request_id = Some(format!("cap-{i}"));
                client.submit(&req).map(|g| g.grant.id)
            })
        })
        .collect();
    let ids: BTreeSet<String> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("accepted"))
        .collect();
    assert_eq!(ids.len(), ROOM + 3);

    let client = server.client();
    let grants = wait_for("all settled", Duration::from_secs(10), || {
        let all = client.list().unwrap();
        all.iter()
            .all(|g| matches!(g.state, GrantState::Running | GrantState::Failed))
            .then_some(all)
    });
    assert_eq!(grants.len(), ROOM + 3, "none lost, none duplicated");
    let listed: BTreeSet<String> = grants.iter().map(|g| g.grant.id.clone()).collect();
    assert_eq!(listed, ids);
    let running = grants
        .iter()
        .filter(|g| g.state == GrantState::Running)
        .count();
    let refused: Vec<&GrantView> = grants
        .iter()
        .filter(|g| g.state == GrantState::Failed)
        .collect();
    assert_eq!(running, ROOM);
    assert_eq!(refused.len(), 3);
    for g in &refused {
        // A kind to act on, and words for people.
        assert_eq!(g.failure, Some(FailureKind::NoCapacity), "{g:?}");
        let reason = g.reason.clone().unwrap_or_default();
        assert!(reason.starts_with("No capacity"), "{reason}");
    }
    assert_eq!(
        world.total(),
        ROOM,
        "no instance beyond capacity was created"
    );
    assert_eq!(world.ledger.snapshot().used.vcpus, ROOM as u32);

    // Terminating one makes room for exactly one more.
    let first = grants
        .iter()
        .find(|g| g.state == GrantState::Running)
        .unwrap();
    client.terminate(&first.grant.id).unwrap();
    let again = client.submit(&request("home", 1, 512)).unwrap();
    let settled = wait_for("new grant", Duration::from_secs(5), || {
        let g = client.show(&again.grant.id).unwrap();
        (g.state != GrantState::Pending && g.state != GrantState::Provisioning).then_some(g)
    });
    assert_eq!(settled.state, GrantState::Running);
}
