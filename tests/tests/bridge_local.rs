//! kilnd with the local backend, end to end: the real kilnd binary on
//! 127.0.0.1, real VMs (through kiln-shim and kiln-vmm), an image from a
//! real registry, the stock OpenSSH client. One kilnd and a handful of VMs
//! serve every assertion, since boots are slow on emulating hosts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use kiln_bridge::client::Client;
use kiln_bridge::grant::{GrantRequest, TdxPolicy};
use kiln_bridge::state::GrantState;
use kiln_bridge::view::GrantView;
use kiln_tests::images::busybox_layout;
use kiln_tests::openssh::{keygen, text, Client as Ssh};
use kiln_tests::registry::Registry;
use kiln_tests::{agent, bin, kernel, processes_mentioning, wait_for};

const TOKEN: &str = "bridge-local-token";
/// Generous: VMs boot slowly where KVM emulates the guest kernel.
const BOOT: Duration = Duration::from_secs(900);

/// A kilnd with one local backend, restartable on the same state.
struct Kilnd {
    dir: PathBuf,
    config: PathBuf,
    url: String,
    child: Option<Child>,
}

impl Kilnd {
    fn new(dir: &Path, vcpus: u32, ram_mib: u64) -> Kilnd {
        let home = dir.join("home");
        std::fs::create_dir_all(home.join("kernel")).unwrap();
        std::fs::create_dir_all(home.join("bin")).unwrap();
        std::os::unix::fs::symlink(kernel(), home.join("kernel/vmlinux")).unwrap();
        std::os::unix::fs::symlink(agent(), home.join("bin/kiln-agent")).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("kilnd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nauth_token_file = \"{}\"\n\
                 region = \"home\"\n[[backend]]\nkind = \"local\"\nvcpus = {vcpus}\n\
                 ram_mib = {ram_mib}\nkiln_home = \"{}\"\n",
                dir.join("state").display(),
                dir.join("token").display(),
                home.display()
            ),
        )
        .unwrap();
        let mut k = Kilnd {
            dir: dir.to_path_buf(),
            config,
            url: format!("http://127.0.0.1:{port}"),
            child: None,
        };
        k.start();
        k
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kilnd.log"))
            .unwrap();
        let child = Command::new(bin("kilnd"))
            .arg("--config")
            .arg(&self.config)
            .env("KILN_VMM", bin("kiln-vmm"))
            .env("KILN_SHIM", bin("kiln-shim"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kilnd");
        self.child = Some(child);
        let client = self.client();
        assert!(
            wait_for(Duration::from_secs(30), || client.capabilities().ok()).is_some(),
            "kilnd did not come up; log:\n{}",
            self.log()
        );
    }

    /// `kill -9`, as a crash would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, TOKEN)
    }

    /// The `kiln` command line, pointed at this kilnd.
    fn kiln(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("kiln"))
            .args(args)
            .env("KILN_BRIDGE_URL", &self.url)
            .env("KILN_BRIDGE_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kilnd.log")).unwrap_or_default()
    }

    /// Polls the grant until `done` holds.
    fn wait_grant(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&GrantView) -> bool,
    ) -> GrantView {
        let client = self.client();
        wait_for(limit, || client.show(id).ok().filter(|g| done(g))).unwrap_or_else(|| {
            panic!(
                "grant {id}: {:?}\nkilnd log:\n{}",
                client.show(id).map(|g| (g.state, g.reason)),
                self.log()
            )
        })
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.kill();
        // Whatever VMs a failed test left: stop their shims.
        for p in processes_mentioning(&self.home().to_string_lossy()) {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn request(id: &str, image: &str, key: &str, valid_for: Duration, cmd: &str) -> GrantRequest {
    GrantRequest {
        request_id: Some(id.to_string()),
        image: image.to_string(),
        vcpus: Some(1),
        cpu_millicores: None,
        ram_mib: 256,
        region: "home".to_string(),
        tdx: TdxPolicy::No,
        ssh_keys: vec![key.to_string()],
        valid_to: Utc::now() + chrono::Duration::from_std(valid_for).unwrap(),
        command: Some(vec!["sh".into(), "-c".into(), cmd.into()]),
        env: Default::default(),
    }
}

/// The stock ssh client, pinned to the grant's host key.
fn ssh_to(grant: &GrantView, key: &Path, dir: &Path) -> Ssh {
    let c = grant
        .connection
        .as_ref()
        .expect("a running grant has a connection");
    assert_eq!(c.host, "127.0.0.1");
    assert!(c.host_key.starts_with("ssh-ed25519 "), "{c:?}");
    assert!(c.host_key_fingerprint.starts_with("SHA256:"), "{c:?}");
    let known = dir.join(format!("known_hosts-{}", grant.grant.id));
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", c.ssh_port, c.host_key),
    )
    .unwrap();
    Ssh::new(key, c.ssh_port, &c.user).pinned(&known)
}

#[test]
fn grants_on_this_host_from_submit_to_restart_and_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let registry = Registry::start();
    registry.push(
        &busybox_layout(&work.join("image")),
        "1",
        "kiln/busybox",
        "",
    );
    let image = format!("{}/kiln/busybox:1", registry.addr);
    let key = keygen(work, "requester");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let public = public.trim();

    // Room for two 1-vCPU, 256 MiB VMs.
    let mut kilnd = Kilnd::new(work, 2, 600);

    // N + 3 at once: exactly N run, the rest fail for capacity.
    let ids: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
    let submitted: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let client = kilnd.client();
                let req = request(
                    id,
                    &image,
                    public,
                    Duration::from_secs(3600),
                    "sleep 100000",
                );
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
    let ssh_a = ssh_to(&a, &key, work);
    let ssh_b = ssh_to(&b, &key, work);
    assert!(ssh_b.ssh(&[], "true", b"").status.success());

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

    // A was re-adopted and still answers; B is recorded as exited, with usage.
    let a_now = kilnd.client().show(&a.grant.id).unwrap();
    assert_eq!(a_now.state, GrantState::Running, "{a_now:?}");
    assert!(ssh_a.ssh(&[], "true", b"").status.success());
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

    // A deadline a few minutes ahead (boot takes a while here): the VM is
    // stopped then, and its final usage kept.
    let start = Instant::now();
    let valid_for = Duration::from_secs(150);
    kilnd
        .client()
        .submit(&request(
            "deadline",
            &image,
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
            &image,
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
