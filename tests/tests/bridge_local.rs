//! kilnd with the local backend, end to end: the real kilnd binary on
//! 127.0.0.1, real VMs (through kiln-shim and kiln-vmm), an image from a
//! real registry, the stock OpenSSH client. One kilnd and a handful of VMs
//! serve every assertion, since boots are slow on emulating hosts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kiln_bridge::state::GrantState;
use kiln_bridge::view::{GrantView, UsageView};
use kiln_tests::images::busybox_layout;
use kiln_tests::kilnd::{digest_of, request, ssh_to, Kilnd, Requester, BOOT};
use kiln_tests::openssh::text;
use kiln_tests::{processes_mentioning, wait_for};

/// What a grant's web server in the guest serves on the published port 8000.
const PAGE: &str = "hello-from-a-grant";
/// Serves PAGE over HTTP on the guest's port 8000, then sleeps.
const WEB: &str = "mkdir -p /www && echo hello-from-a-grant > /www/index.html \
                   && httpd -p 127.0.0.1:8000 -h /www && sleep 100000";

/// An HTTP GET of the page through host port `port` on loopback.
fn http_get(port: u16) -> Option<String> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    c.write_all(b"GET /index.html HTTP/1.0\r\nHost: kiln\r\n\r\n")
        .ok()?;
    let mut got = String::new();
    c.read_to_string(&mut got).ok()?;
    Some(got).filter(|g| !g.is_empty())
}

/// The host port that publishes guest port 8000 of a running grant, once
/// the page is served there.
fn serves_page(g: &GrantView) -> u16 {
    let c = g
        .connection
        .as_ref()
        .expect("a running grant has a connection");
    assert_eq!(c.published.len(), 1, "{c:?}");
    let p = &c.published[0];
    assert_eq!(
        (p.guest_port, p.host.as_str()),
        (8000, "127.0.0.1"),
        "{c:?}"
    );
    assert_ne!(p.port, c.ssh_port);
    // Running means the command started; httpd may take a moment more.
    let page = wait_for(Duration::from_secs(120), || {
        http_get(p.port).filter(|r| r.contains(PAGE))
    });
    let page = page.unwrap_or_else(|| panic!("no page on port {} of {}", p.port, g.grant.id));
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    p.port
}

#[test]
fn grants_on_this_host_from_submit_to_restart_and_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let requester = Requester::new(work);
    let (image, key) = (&requester.image, &requester.key);
    let public = requester.public_key.as_str();

    // Room for two 1-vCPU, 256 MiB VMs.
    let mut kilnd = Kilnd::new(work, 2, 600);

    // N + 3 at once: exactly N run, the rest fail for capacity.
    let ids: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
    let submitted: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let client = kilnd.client();
                // In millicores: the VM's cgroup must carry the grant's share.
                let mut req = request(id, image, public, Duration::from_secs(3600), WEB);
                (req.vcpus, req.cpu_millicores) = (None, Some(900));
                req.publish = vec![8000];
                s.spawn(move || client.submit(&req))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &submitted {
        assert!(s.is_ok(), "submit: {s:?}");
    }
    let ended_or_running = |g: &GrantView| g.state == GrantState::Running || g.state.is_final();
    let outcomes: Vec<GrantView> = ids
        .iter()
        .map(|id| kilnd.wait_grant(id, BOOT, ended_or_running))
        .collect();
    let running: Vec<&GrantView> = outcomes
        .iter()
        .filter(|g| g.state == GrantState::Running)
        .collect();
    let refused: Vec<&GrantView> = outcomes
        .iter()
        .filter(|g| g.state == GrantState::Failed)
        .collect();
    assert_eq!(running.len(), 2, "{outcomes:#?}\n{}", kilnd.log());
    assert_eq!(refused.len(), 3, "{outcomes:#?}");
    for g in &refused {
        let reason = g.reason.clone().unwrap_or_default().to_lowercase();
        assert!(reason.contains("capacity"), "{reason}");
    }
    assert_eq!(
        kilnd.client().list().unwrap().len(),
        5,
        "none lost or duplicated"
    );
    let caps = kilnd.client().capabilities().unwrap();
    assert_eq!(caps.capacity.used.vcpus, 2);

    // SSH into both, with `kiln ssh` (which pins the grant's host key) and
    // with the stock client; keep one busy for a while.
    let (a, b) = (running[0].clone(), running[1].clone());
    let busy = "echo hello-from-$(hostname); i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; \
                echo busy-done; exit 7";
    let key_arg = key.to_string_lossy().to_string();
    let out = kilnd.kiln(&["ssh", &a.grant.id, "-i", &key_arg, "--", busy]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(text(&out.stdout), "hello-from-kiln\nbusy-done\n");
    // While A runs, its usage so far shows that work (the agent reports
    // every second), with the VMM's own figures beside it.
    let so_far = wait_for(Duration::from_secs(30), || {
        let out = kilnd.kiln(&["grant", "usage", &a.grant.id, "--json"]);
        let view: UsageView = serde_json::from_slice(&out.stdout).ok()?;
        view.usage
            .filter(|u| !view.r#final && u.guest.cpu_user_ms >= 300)
    });
    let so_far = so_far
        .unwrap_or_else(|| panic!("no usage so far: {:?}", kilnd.client().usage(&a.grant.id)));
    assert_eq!(so_far.exit_status, None);
    assert!(
        so_far.host.vcpu_cpu_ms > 0 && so_far.host.vmm_rss_kib > 0,
        "{so_far:?}"
    );
    // The VM's SSH host key is not left on disk.
    let a_dir = kilnd.home().join("grants").join(&a.grant.id);
    assert!(a_dir.join("state.json").exists());
    assert!(!a_dir.join("launch.json").exists());
    // A's kiln-vmm is jailed as kiln run's is: an unprivileged uid, its own
    // namespaces, a root holding only its VM's files; its cgroup has the
    // grant's 900 millicores and its RAM plus the VMM's allowance.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a_dir.join("state.json")).unwrap()).unwrap();
    let shim = state["shim_pid"].as_u64().expect("A's shim pid") as u32;
    let supervisor = kiln_tests::jail::vmm_under(shim).expect("kiln-vmm under A's shim");
    let vmm = kiln_tests::jail::jailed_child(supervisor).unwrap_or_else(|| {
        panic!(
            "no jailed VMM under {supervisor} ({state}): {}",
            std::fs::read_to_string(format!("/proc/{supervisor}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
        )
    });
    let home = kilnd.home();
    let kernel = kiln_tests::kernel();
    let files = [
        home.join("kernel"),
        home.join("images"),
        home.join("grants").join(&a.grant.id),
        home.join("vms"),
        home.join("snapshots"),
        kernel.canonicalize().unwrap_or(kernel),
    ];
    kiln_tests::jail::assert_jailed(vmm, &files);
    let vm_dirs: std::collections::BTreeSet<_> = kiln_tests::jail::root_files(vmm)
        .into_iter()
        .filter_map(|f| {
            Some(
                f.strip_prefix(home.join("vms"))
                    .ok()?
                    .iter()
                    .next()?
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(vm_dirs.len(), 1, "only its own VM directory: {vm_dirs:?}");
    let (cpu, memory) = kiln_tests::jail::cgroup_limits(vmm);
    assert_eq!(cpu, "90000 100000");
    assert_eq!(memory, (256 + 64 + 16) << 20);
    let ssh_a = ssh_to(&a, key, work);
    let ssh_b = ssh_to(&b, key, work);
    assert!(ssh_b.ssh(&[], "true", b"").status.success());

    // Each serves its guest port 8000 on a host port of its own, which
    // `kiln grant show` names.
    let web_a = serves_page(&a);
    let web_b = serves_page(&b);
    assert_ne!(web_a, web_b);
    let out = kilnd.kiln(&["grant", "show", &a.grant.id]);
    assert!(
        text(&out.stdout).contains(&format!("127.0.0.1:{web_a} -> guest port 8000")),
        "{out:?}"
    );

    // kilnd dies; meanwhile B's workload ends (its sleep is killed).
    kilnd.kill();
    let out = ssh_b.ssh(&[], "kill $(pidof sleep)", b"");
    assert!(out.status.success(), "{out:?}");
    let b_dir = kilnd.home().join("grants").join(&b.grant.id);
    let b_ended = wait_for(Duration::from_secs(120), || {
        let state = std::fs::read_to_string(b_dir.join("state.json")).ok()?;
        state.contains("\"phase\": \"ended\"").then_some(())
    });
    assert!(b_ended.is_some(), "B's VM did not end");
    kilnd.start();

    // A was re-adopted and still answers, on SSH and on its published
    // port (which the new kilnd still reports); B is recorded as exited,
    // with usage.
    let a_now = kilnd.client().show(&a.grant.id).unwrap();
    assert_eq!(a_now.state, GrantState::Running, "{a_now:?}");
    assert!(ssh_a.ssh(&[], "true", b"").status.success());
    assert_eq!(a_now.connection, a.connection);
    assert_eq!(serves_page(&a_now), web_a);
    let b_now = kilnd.wait_grant(&b.grant.id, Duration::from_secs(60), |g| g.state.is_final());
    assert_eq!(b_now.state, GrantState::Exited, "{b_now:?}");
    let out = kilnd.kiln(&["grant", "usage", &b.grant.id, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let b_usage: kiln_bridge::view::UsageView = serde_json::from_slice(&out.stdout).unwrap();
    assert!(b_usage.r#final);
    let b_usage = b_usage.usage.expect("final usage of B");
    // SIGTERM ended it (as a signal, or as the shell's 143).
    assert!(
        matches!(
            b_usage.exit_status,
            Some(kiln_protocol::ExitStatus::Signal(15) | kiln_protocol::ExitStatus::Code(143))
        ),
        "{b_usage:?}"
    );
    assert!(b_usage.guest.uptime_ms > 0);

    // Terminate A (twice): stopped, usage shows the busy loop, room freed.
    let out = kilnd.kiln(&["grant", "terminate", &a.grant.id]);
    assert!(out.status.success(), "{out:?}");
    let a_end = kilnd.wait_grant(&a.grant.id, Duration::from_secs(120), |g| {
        g.state.is_final()
    });
    assert_eq!(a_end.state, GrantState::Terminated);
    assert_eq!(
        kilnd.client().terminate(&a.grant.id).unwrap().state,
        GrantState::Terminated
    );
    let a_usage = kilnd.client().usage(&a.grant.id).unwrap();
    let a_usage = a_usage.usage.expect("final usage of A");
    assert!(a_usage.guest.cpu_user_ms >= 300, "{a_usage:?}");
    assert!(
        a_usage.host.vcpu_cpu_ms > 0 && a_usage.host.vmm_rss_kib > 0,
        "{a_usage:?}"
    );
    let freed = wait_for(Duration::from_secs(30), || {
        let c = kilnd.client().capabilities().ok()?;
        (c.capacity.used.vcpus == 0).then_some(())
    });
    assert!(freed.is_some(), "capacity not released");
    // Its published port closed with it.
    assert!(TcpStream::connect(("127.0.0.1", web_a)).is_err());

    // kilnd dies while a grant provisions: the next kilnd marks it failed
    // and stops the VM that provision had started.
    kilnd
        .client()
        .submit(&request(
            "cut-short",
            image,
            public,
            Duration::from_secs(3600),
            "sleep 100000",
        ))
        .unwrap();
    let cut_dir = kilnd.home().join("grants").join("cut-short");
    let shim_up = wait_for(Duration::from_secs(120), || {
        cut_dir.join("shim.json").exists().then_some(())
    });
    assert!(shim_up.is_some(), "no shim for cut-short:\n{}", kilnd.log());
    kilnd.kill();
    assert!(!processes_mentioning(&cut_dir.to_string_lossy()).is_empty());
    kilnd.start();
    let cut = kilnd.client().show("cut-short").unwrap();
    assert_eq!(cut.state, GrantState::Failed, "{cut:?}");
    assert!(cut.reason.unwrap_or_default().contains("provisioning"));
    let stopped = wait_for(Duration::from_secs(90), || {
        processes_mentioning(&cut_dir.to_string_lossy())
            .is_empty()
            .then_some(())
    });
    assert!(
        stopped.is_some(),
        "{:?}",
        processes_mentioning(&cut_dir.to_string_lossy())
    );
    assert_eq!(
        kilnd.client().capabilities().unwrap().capacity.used.vcpus,
        0
    );

    // A deadline a few minutes ahead (boot takes a while here): the VM is
    // stopped then, and its final usage kept.
    let start = Instant::now();
    let valid_for = Duration::from_secs(150);
    kilnd
        .client()
        .submit(&request(
            "deadline",
            image,
            public,
            valid_for,
            "sleep 100000",
        ))
        .unwrap();
    // Beside it, a command that ends at once: the grant still ran, and is
    // recorded as exited with its status.
    kilnd
        .client()
        .submit(&request(
            "quick",
            image,
            public,
            Duration::from_secs(3600),
            "echo quick",
        ))
        .unwrap();
    let q = kilnd.wait_grant("quick", BOOT, |g| g.state.is_final());
    assert_eq!(q.state, GrantState::Exited, "{q:?}\n{}", kilnd.log());
    let q_usage = kilnd.client().usage("quick").unwrap().usage.expect("usage");
    assert_eq!(
        q_usage.exit_status,
        Some(kiln_protocol::ExitStatus::Code(0))
    );
    let d = kilnd.wait_grant("deadline", BOOT, |g| g.state.is_final());
    assert_eq!(d.state, GrantState::Terminated, "{d:?}");
    assert!(start.elapsed() >= valid_for - Duration::from_secs(2));
    assert_eq!(
        serde_json::to_value(d.stop).unwrap(),
        serde_json::json!("deadline")
    );
    if d.connection.is_some() {
        // It ran before the deadline: its final usage is kept.
        let u = kilnd.client().usage("deadline").unwrap();
        assert!(u.r#final && u.usage.is_some(), "{u:?}");
    }

    // The first grants booted and saved a snapshot of their ready VM;
    // later ones restored it. A restored grant answers SSH with its own
    // host key and keys (they came with `start`, after the snapshot).
    let start_of = |id: &str| -> serde_json::Value {
        let dir = kilnd.home().join("grants").join(id);
        let state = std::fs::read(dir.join("state.json")).unwrap_or_default();
        let state: serde_json::Value = serde_json::from_slice(&state).unwrap_or_default();
        state["start"].clone()
    };
    // Which two of the first five ran is the scheduler's choice.
    assert_eq!(start_of(&a.grant.id), serde_json::json!("cold"));
    assert_eq!(start_of("quick"), serde_json::json!("warm"));
    // Submitted with `kiln grant submit -p`: a restored VM serves its
    // published port too (the ports came with `start`).
    let public_file = key.with_extension("pub");
    let out = kilnd.kiln(&[
        "grant",
        "submit",
        image,
        "--region",
        "home",
        "--vcpus",
        "1",
        "--ram-mib",
        "256",
        "--ssh-key",
        &public_file.to_string_lossy(),
        "--valid-for",
        "1h",
        "--id",
        "warm",
        "-p",
        "8000",
        "--",
        "sh",
        "-c",
        WEB,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "warm\n");
    let w = kilnd.wait_grant("warm", BOOT, |g| {
        g.state == GrantState::Running || g.state.is_final()
    });
    assert_eq!(w.state, GrantState::Running, "{w:?}\n{}", kilnd.log());
    assert_eq!(start_of("warm"), serde_json::json!("warm"));
    assert_eq!(w.grant.publish, [8000]);
    serves_page(&w);
    let out = ssh_to(&w, key, work).ssh(
        &[],
        "hostname; pidof sleep >/dev/null && echo sleeping",
        b"",
    );
    assert_eq!(text(&out.stdout), "kiln\nsleeping\n", "{out:?}");
    kilnd.client().terminate("warm").unwrap();
    kilnd.wait_grant("warm", Duration::from_secs(120), |g| g.state.is_final());

    // A damaged snapshot (its checksum fails) is dropped: the grant boots
    // instead, says why in its shim's log, and saves a good one.
    let snapshots: Vec<_> = std::fs::read_dir(kilnd.home().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let state_file = snapshots[0].join("state");
    let mut damaged = std::fs::read(&state_file).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    std::fs::write(&state_file, &damaged).unwrap();
    kilnd
        .client()
        .submit(&request(
            "after-damage",
            image,
            public,
            Duration::from_secs(3600),
            "echo fine",
        ))
        .unwrap();
    let g = kilnd.wait_grant("after-damage", BOOT, |g| g.state.is_final());
    assert_eq!(g.state, GrantState::Exited, "{g:?}\n{}", kilnd.log());
    assert_eq!(start_of("after-damage"), serde_json::json!("cold"));
    let shim_log = std::fs::read_to_string(kilnd.home().join("grants/after-damage/shim.log"))
        .unwrap_or_default();
    assert!(
        shim_log.contains("the saved snapshot did not restore"),
        "{shim_log}"
    );
    assert_ne!(
        std::fs::read(&state_file).unwrap(),
        damaged,
        "not saved again"
    );

    // Nothing left: no shim or VMM, no VM directory.
    let home = kilnd.home();
    let gone = wait_for(Duration::from_secs(30), || {
        processes_mentioning(&home.to_string_lossy())
            .iter()
            .all(|p| !p.contains("kiln-shim") && !p.contains("kiln-vmm"))
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "{:?}",
        processes_mentioning(&home.to_string_lossy())
    );
    let vms: Vec<_> = std::fs::read_dir(home.join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(vms.is_empty(), "{vms:?}");
}

/// A registry that accepts connections and never answers: a build from it
/// stays in progress for as long as the test wants.
fn stalled_registry() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

#[test]
fn terminate_interrupts_a_build_or_a_boot_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let requester = Requester::new(work);
    let public = requester.public_key.as_str();
    let kilnd = Kilnd::new(work, 2, 600);
    let home = kilnd.home();
    let build_children = || -> Vec<String> {
        processes_mentioning(&home.to_string_lossy())
            .into_iter()
            .filter(|p| p.contains("--build-image"))
            .collect()
    };

    // A build that cannot finish (by digest, so nothing is resolved at
    // submit). It runs in a child of kilnd, so its memory is not kilnd's.
    let (_stalled, addr) = stalled_registry();
    let image = format!("{addr}/kiln/stalled@sha256:{}", "1".repeat(64));
    let c = kilnd.client();
    c.submit(&request(
        "building",
        &image,
        public,
        Duration::from_secs(3600),
        "true",
    ))
    .unwrap();
    let building = wait_for(Duration::from_secs(60), || {
        Some(build_children()).filter(|p| !p.is_empty())
    });
    assert!(building.is_some(), "no build child:\n{}", kilnd.log());
    assert_eq!(
        kilnd.client().show("building").unwrap().state,
        GrantState::Provisioning
    );
    // Terminate ends it at once, as terminated, and the build goes too.
    let out = kilnd.kiln(&["grant", "terminate", "building", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let ended: GrantView = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ended.state, GrantState::Terminated, "{ended:?}");
    assert_eq!(ended.reason.as_deref(), Some("terminated on request"));
    let gone = wait_for(Duration::from_secs(30), || {
        build_children().is_empty().then_some(())
    });
    assert!(gone.is_some(), "{:?}", build_children());
    assert_eq!(c.capabilities().unwrap().capacity.used.vcpus, 0);

    // A VM that is booting: terminate stops it, and the grant ends
    // terminated rather than running first. Its tag was pinned at submit
    // to the digest the registry named then.
    let first = digest_of(&requester.image);
    let submitted = c
        .submit(&request(
            "booting",
            &requester.image,
            public,
            Duration::from_secs(3600),
            "sleep 100000",
        ))
        .unwrap();
    assert_eq!(submitted.image_digest.as_deref(), Some(first.as_str()));
    let out = kilnd.kiln(&["grant", "show", "booting"]);
    assert!(text(&out.stdout).contains(&first), "{out:?}");
    let grant_dir = home.join("grants").join("booting");
    let shim_up = wait_for(BOOT, || grant_dir.join("shim.json").exists().then_some(()));
    assert!(shim_up.is_some(), "no shim:\n{}", kilnd.log());
    let ended = c.terminate("booting").unwrap();
    assert!(
        matches!(
            ended.state,
            GrantState::Terminated | GrantState::Terminating
        ),
        "{ended:?}"
    );
    let ended = kilnd.wait_grant("booting", Duration::from_secs(120), |g| g.state.is_final());
    assert_eq!(ended.state, GrantState::Terminated, "{ended:?}");
    // What was built is what was pinned.
    let built = std::fs::read_dir(home.join("images/refs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .any(|r| r["manifest"] == first.as_str());
    assert!(built, "no build of {first}");

    // The tag pushed again, as another manifest (Docker's format): the
    // next grant pins the new digest; the first keeps its own.
    requester.registry.push(
        &busybox_layout(&work.join("image-again")),
        "1",
        "kiln/busybox",
        "--format v2s2",
    );
    let second = digest_of(&requester.image);
    assert_ne!(first, second);
    let later = c
        .submit(&request(
            "later",
            &requester.image,
            public,
            Duration::from_secs(3600),
            "true",
        ))
        .unwrap();
    assert_eq!(later.image_digest.as_deref(), Some(second.as_str()));
    assert_eq!(
        c.show("booting").unwrap().image_digest.as_deref(),
        Some(first.as_str())
    );
    c.terminate("later").unwrap();
    let stopped = wait_for(Duration::from_secs(90), || {
        processes_mentioning(&grant_dir.to_string_lossy())
            .is_empty()
            .then_some(())
    });
    assert!(
        stopped.is_some(),
        "{:?}",
        processes_mentioning(&grant_dir.to_string_lossy())
    );
    assert_eq!(c.capabilities().unwrap().capacity.used.vcpus, 0);
}

/// A guest writing five times its grant's output cap to stdout: the grant
/// ends normally, `output.log` holds exactly the cap (ending with the
/// marker), `state.json` records the truncation, and kilnd still serves.
/// The cap is small because guest output is slow where KVM emulates the
/// guest kernel (a few KB/s here).
#[test]
fn a_flood_of_output_stops_at_the_output_cap() {
    const CAP: u64 = 16 << 10;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let requester = Requester::new(work);
    let kilnd = Kilnd::with_backend(work, 1, 600, "output_cap_kib = 16");
    kilnd
        .client()
        .submit(&request(
            "flood",
            &requester.image,
            &requester.public_key,
            Duration::from_secs(3600),
            "yes kiln-output-flood | head -c 81920; echo after-the-flood",
        ))
        .unwrap();
    let g = kilnd.wait_grant("flood", BOOT, |g| g.state.is_final());
    assert_eq!(g.state, GrantState::Exited, "{g:?}\n{}", kilnd.log());
    let grant_dir = kilnd.home().join("grants/flood");
    let log = std::fs::read(grant_dir.join("output.log")).unwrap();
    assert_eq!(log.len() as u64, CAP);
    let text = String::from_utf8_lossy(&log);
    assert!(text.starts_with("kiln-output-flood\n"), "{}", &text[..64]);
    assert!(
        text.ends_with(&format!(
            "[kiln: output.log reached its cap of {CAP} bytes; later output dropped]\n"
        )),
        "{}",
        &text[text.len() - 200..]
    );
    assert!(!text.contains("after-the-flood"));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(grant_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["output_truncated"], true, "{state}");
    let shim_log = std::fs::read_to_string(grant_dir.join("shim.log")).unwrap_or_default();
    assert!(shim_log.contains("reached its cap"), "{shim_log}");
    // kilnd is unaffected.
    assert!(kilnd.client().capabilities().is_ok());
    assert_eq!(kilnd.client().list().unwrap().len(), 1);
}
