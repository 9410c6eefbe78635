//! Owned hosts over SSH, end to end: three "hosts" are network namespaces
//! of the test's own, each with Debian's sshd on its own address and host
//! key, and its own `$KILN_HOME`; kilnd, the registry and the requester's
//! stock `ssh` share a fourth namespace, joined to each host by a veth
//! pair. kilnd's one backend is `ssh`, listing the hosts in order: C
//! (pinned to the wrong host key), A (room for two grants), B (one).
//!
//! One test, so that its VMs serve every assertion: grants fill A, then B,
//! then fail for capacity; nothing ever reaches C; the requester gets into
//! each VM at its host's address; A cut off keeps its grants running, stops
//! one at its deadline by itself, completes a terminate once back, while
//! new grants go to B; and kilnd `kill -9` re-adopts grants on both hosts.

use std::path::Path;
use std::time::Duration;

use kiln_bridge::grant::GrantRequest;
use kiln_bridge::state::{FailureKind, GrantState, StopCause};
use kiln_bridge::view::GrantView;
use kiln_tests::fleet::{OwnedHost, ShellRc};
use kiln_tests::kilnd::{request, ssh_to_host, Kilnd, Requester, BOOT};
use kiln_tests::netns::NetNs;
use kiln_tests::openssh::text;
use kiln_tests::wait_for;

fn submit(kilnd: &Kilnd, req: &GrantRequest) -> String {
    kilnd.client().submit(req).expect("submit").grant.id
}

fn running(kilnd: &Kilnd, id: &str) -> GrantView {
    kilnd.wait_grant(id, BOOT, |g| {
        g.state == GrantState::Running || g.state.is_final()
    })
}

/// The requester's stock ssh, pinned, runs a command in the grant's VM.
fn ssh_echo(g: &GrantView, key: &Path, work: &Path) {
    let out = ssh_to_host(g, key, work).ssh(&[], "echo in-$((6*7))", b"");
    assert!(
        out.status.success() && text(&out.stdout) == "in-42\n",
        "ssh to {}: {out:?}",
        g.grant.id
    );
}

/// Polls `kiln fleet caps --json` until `check` holds for the card.
fn card_until(kilnd: &Kilnd, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let found = wait_for(Duration::from_secs(90), || {
        let out = kilnd.kiln(&["fleet", "caps", "--json"]);
        let card: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        check(&card).then_some(())
    });
    if found.is_none() {
        let out = kilnd.kiln(&["fleet", "caps"]);
        panic!("card never showed {what}:\n{}", text(&out.stdout));
    }
}

fn host_card<'a>(card: &'a serde_json::Value, address: &str) -> &'a serde_json::Value {
    card["backends"][0]["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["address"] == address))
        .unwrap_or(&serde_json::Value::Null)
}

#[test]
fn grants_spread_over_owned_hosts_reached_over_ssh() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let net = 100 + std::process::id() % 100;
    let bridge = NetNs::new("fleet-bridge");
    // The registry's address, on A's subnet: B and C reach it through the
    // bridge's namespace.
    let registry_ip = format!("10.{net}.1.1");
    let c = OwnedHost::start(
        work,
        "c",
        &bridge,
        &format!("10.{net}.3"),
        1,
        &registry_ip,
        ShellRc::AsIs,
    );
    let a = OwnedHost::start(
        work,
        "a",
        &bridge,
        &format!("10.{net}.1"),
        2,
        &registry_ip,
        ShellRc::AsIs,
    );
    let b = OwnedHost::start(
        work,
        "b",
        &bridge,
        &format!("10.{net}.2"),
        1,
        &registry_ip,
        ShellRc::AsIs,
    );
    // From here on this thread, and all it starts, is in the bridge's
    // namespace: kilnd, the registry, the requester's ssh.
    bridge.enter();
    let requester = Requester::on(work, &registry_ip);
    let (image, key) = (&requester.image, &requester.key);
    let public = requester.public_key.as_str();

    // C's pin is another host's key: it must be refused, never used.
    let config = format!(
        "insecure_registries = [\"{registry_ip}\"]\n\
         [[backend]]\nkind = \"ssh\"\nname = \"rack\"\n{}{}{}",
        c.section(&a.sshd.host_key()),
        a.section(&a.sshd.host_key()),
        b.section(&b.sshd.host_key()),
    );
    let mut kilnd = Kilnd::with_backends(work, &config);

    // Fill A, then B, then nothing is left.
    let long = Duration::from_secs(3600);
    let g1 = submit(&kilnd, &request("g1", image, public, long, "sleep 100000"));
    let g1v = running(&kilnd, &g1);
    assert_eq!(g1v.state, GrantState::Running, "{g1v:?}\n{}", kilnd.log());
    // g2 ends at its deadline while A is cut off, below.
    let g2_deadline = Duration::from_secs(240);
    let g2 = submit(
        &kilnd,
        &request("g2", image, public, g2_deadline, "sleep 100000"),
    );
    let g2v = running(&kilnd, &g2);
    let g3 = submit(&kilnd, &request("g3", image, public, long, "sleep 100000"));
    let g3v = running(&kilnd, &g3);
    let host_of = |g: &GrantView| g.connection.as_ref().map(|c| c.host.clone());
    // Requesters connect on the hosts' configured ports.
    for g in [&g1v, &g2v, &g3v] {
        let port = g.connection.as_ref().map_or(0, |c| c.ssh_port);
        assert!((23000..=23099).contains(&port), "{g:?}");
    }
    assert_eq!(
        host_of(&g1v).as_deref(),
        Some(a.address.as_str()),
        "{g1v:?}"
    );
    assert_eq!(
        host_of(&g2v).as_deref(),
        Some(a.address.as_str()),
        "{g2v:?}\n{}",
        kilnd.log()
    );
    assert_eq!(
        host_of(&g3v).as_deref(),
        Some(b.address.as_str()),
        "{g3v:?}"
    );
    let g4 = submit(&kilnd, &request("g4", image, public, long, "true"));
    let g4v = kilnd.wait_grant(&g4, BOOT, |g| g.state.is_final());
    assert_eq!(
        (g4v.state, g4v.failure),
        (GrantState::Failed, Some(FailureKind::NoCapacity)),
        "{g4v:?}"
    );

    // The requester's own ssh reaches each VM at its host's address.
    ssh_echo(&g1v, key, work);
    ssh_echo(&g3v, key, work);

    // The card lists each host: C refused for its key, A and B full.
    card_until(&kilnd, "A and B full, C refused", |card| {
        let (ca, cb, cc) = (
            host_card(card, &a.address),
            host_card(card, &b.address),
            host_card(card, &c.address),
        );
        ca["state"] == "ready"
            && ca["capacity"]["used"]["vcpus"] == 2
            && cb["state"] == "ready"
            && cb["capacity"]["used"]["vcpus"] == 1
            && cc["state"] == "refused"
            && cc["message"]
                .as_str()
                .is_some_and(|m| m.contains(&c.address) && m.contains("key"))
            && card["capacity"]["usable"]["vcpus"] == 3
            && card["capacity"]["used"]["vcpus"] == 3
    });

    // A is cut off. Its grants stay running; a terminate of g1 waits for
    // it; B, freed, takes the next grant.
    a.link(false);
    kilnd.client().terminate(&g1).expect("terminate g1");
    kilnd.client().terminate(&g3).expect("terminate g3");
    let g3v = kilnd.wait_grant(&g3, BOOT, |g| g.state.is_final());
    assert_eq!(g3v.state, GrantState::Terminated, "{g3v:?}");
    card_until(&kilnd, "A unreachable", |card| {
        host_card(card, &a.address)["state"] == "unreachable"
    });
    let g5 = submit(&kilnd, &request("g5", image, public, long, "sleep 100000"));
    let g5v = running(&kilnd, &g5);
    assert_eq!(
        host_of(&g5v).as_deref(),
        Some(b.address.as_str()),
        "{g5v:?}"
    );
    let g1v = kilnd.client().show(&g1).unwrap();
    assert_eq!(g1v.state, GrantState::Terminating, "{g1v:?}");

    // While cut off, A stops g2 at its deadline by itself, and g1 runs on.
    let g2_end = g2v.grant.valid_to;
    let stopped = wait_for(Duration::from_secs(400), || {
        let s = a.shim_state(&g2);
        (s["phase"] == "ended").then_some(s)
    })
    .expect("A never stopped g2 at its deadline");
    assert_eq!(stopped["deadline_reached"], true, "{stopped}");
    assert_eq!(a.shim_state(&g1)["phase"], "running");
    assert!(chrono::Utc::now() > g2_end);
    // kilnd, for its part, has asked for g2's stop, and waits for A.
    let g2v = kilnd.client().show(&g2).unwrap();
    assert_eq!(
        (g2v.state, g2v.stop),
        (GrantState::Terminating, Some(StopCause::Deadline)),
        "{g2v:?}"
    );

    // A is back: g1's terminate completes, g2's end is recorded with its
    // usage.
    a.link(true);
    let g1v = kilnd.wait_grant(&g1, BOOT, |g| g.state.is_final());
    assert_eq!(
        (g1v.state, g1v.stop),
        (GrantState::Terminated, Some(StopCause::Requested)),
        "{g1v:?}"
    );
    let g2v = kilnd.wait_grant(&g2, BOOT, |g| g.state.is_final());
    assert_eq!(
        (g2v.state, g2v.stop),
        (GrantState::Terminated, Some(StopCause::Deadline)),
        "{g2v:?}"
    );
    let usage = kilnd.client().usage(&g2).unwrap();
    let final_usage = usage.usage.clone().expect("g2 has a final usage");
    assert!(usage.r#final && final_usage.ended_at >= g2_end, "{usage:?}");

    // kilnd dies with grants on both hosts; restarted, it re-adopts them.
    let g6 = submit(&kilnd, &request("g6", image, public, long, "sleep 100000"));
    let g6v = running(&kilnd, &g6);
    assert_eq!(
        host_of(&g6v).as_deref(),
        Some(a.address.as_str()),
        "{g6v:?}"
    );
    kilnd.kill();
    kilnd.start();
    for id in [&g5, &g6] {
        let g = running(&kilnd, id);
        assert_eq!(g.state, GrantState::Running, "{g:?}");
        ssh_echo(&g, key, work);
        kilnd.client().terminate(id).expect("terminate");
    }
    for id in [&g5, &g6] {
        let g = kilnd.wait_grant(id, BOOT, |g| g.state.is_final());
        assert_eq!(g.state, GrantState::Terminated, "{g:?}");
    }

    // Nothing ever ran on C.
    assert!(!c.home.join("grants").exists() && !c.home.join("claims").exists());
}
