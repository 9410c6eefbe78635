//! The kilnd binary: configuration errors name the key and exit non-zero;
//! a valid configuration (with a local backend) serves; a second kilnd on
//! the same state, or a second shim of one grant, changes nothing.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{raw, wait_for};
use kiln_bridge::backends::local::shim::{self, Launch};
use kiln_bridge::dir_lock::DirLock;
use kiln_bridge::grant::{Grant, ValidationContext};
use kiln_bridge::state::GrantState;
use kiln_bridge::store::Store;

fn run_kilnd(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kilnd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_text(dir: &Path, token: &Path, listen: &str) -> String {
    format!(
        "listen = \"{listen}\"\nstate_dir = \"{}\"\nauth_token_file = \"{}\"\nregion = \"home\"\n",
        dir.join("state").display(),
        token.display()
    )
}

fn base_config(dir: &Path, listen: &str) -> String {
    let token = dir.join("token");
    std::fs::write(&token, "bin-token\n").unwrap();
    config_text(dir, &token, listen)
}

/// A well-formed host key (the one in OpenSSH's own test data would do as
/// well: only its shape matters here).
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

/// An `ssh` backend of one host.
fn ssh_host(address: &str, identity: &str, host_key: &str) -> String {
    format!(
        "[[backend]]\nkind = \"ssh\"\nname = \"rack\"\n[[backend.host]]\n\
         address = \"{address}\"\nidentity_file = \"{identity}\"\nhost_key = \"{host_key}\"\n"
    )
}

#[test]
fn config_errors_name_the_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_config(dir.path(), "127.0.0.1:0");
    let cases = [
        (format!("{base}colour = \"blue\"\n"), "colour"),
        (
            format!("{base}[capacity]\nreserve_ram = 1\n"),
            "reserve_ram",
        ),
        (
            format!("{base}[capacity]\novercommit = 0.1\n"),
            "capacity.overcommit",
        ),
        (
            format!("{base}[[backend]]\nkind = \"local\"\novercommit = 0.1\n"),
            "backend[0].overcommit",
        ),
        (format!("{base}[[backend]]\nkind = \"azure\"\n"), "azure"),
        // A cloud backend whose service-account key cannot be read is
        // refused at start, naming the backend and the file.
        (
            format!(
                "{base}[[backend]]\nkind = \"gcp\"\nname = \"g\"\nregions = [\"europe-west4\"]\n\
                 machine_types = [\"n2-standard-8\"]\nmax_instances = 1\nimage = \"i\"\n\
                 bundle_url = \"https://b.example/k.tgz\"\nbundle_sha256 = \"{}\"\n\
                 project = \"p\"\ncredentials_file = \"/nonexistent/sa.json\"\n",
                "0".repeat(64)
            ),
            "Backend g: unusable GCP settings: Cannot read the service-account key /nonexistent/sa.json",
        ),
        (
            format!("{base}[[backend]]\nkind = \"local\"\nvcpus = 0\n"),
            "backend[0].vcpus",
        ),
        (
            format!("{base}[[backend]]\nkind = \"local\"\nports = \"3000-2000\"\n"),
            "backend[0].ports",
        ),
        (
            format!(
                "{base}[[backend]]\nkind = \"local\"\n\
                 [[backend]]\nkind = \"local\"\nname = \"two\"\nkiln_home = \"/var/lib/kiln\"\n"
            ),
            "backend[1].kiln_home",
        ),
        (format!("{base}[capacity\n"), "line 5"),
        (
            format!("{base}[[backend]]\nkind = \"local\"\nkeep_ended_days = 4294967295\n"),
            "backend[0].keep_ended_days",
        ),
        (
            config_text(dir.path(), Path::new("/nonexistent/token"), "127.0.0.1:0"),
            "auth_token_file",
        ),
        // Owned hosts: each bad key names the host, or the table if there
        // is none.
        (
            format!("{base}[[backend]]\nkind = \"ssh\"\nname = \"rack\"\nhost = []\n"),
            "backend[0].host",
        ),
        (
            format!(
                "{base}{}",
                ssh_host("10.0.0.7", "/nonexistent/key", "ssh-ed25519 AAAA")
            ),
            "host 10.0.0.7",
        ),
        (
            format!(
                "{base}{}",
                ssh_host("10.0.0.7 :22", "/nonexistent/key", HOST_KEY)
            ),
            "backend[0].host[0].address",
        ),
        (
            format!(
                "{base}{}",
                ssh_host("10.0.0.8", "/nonexistent/key", HOST_KEY)
            ),
            "host 10.0.0.8: identity_file /nonexistent/key",
        ),
        (
            format!(
                "{base}{}",
                ssh_host(
                    "10.0.0.9",
                    &dir.path().join("token").display().to_string(),
                    HOST_KEY
                )
            ),
            "host 10.0.0.9: identity_file",
        ),
    ];
    let path = dir.path().join("kilnd.toml");
    for (text, key) in cases {
        std::fs::write(&path, &text).unwrap();
        let (ok, stderr) = run_kilnd(&path);
        assert!(!ok, "accepted:\n{text}");
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    }
    let (ok, stderr) = run_kilnd(&dir.path().join("missing.toml"));
    assert!(!ok && stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn a_non_loopback_address_without_tls_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kilnd.toml");
    // 0.0.0.0 is every address, not loopback; the port is never bound.
    std::fs::write(&path, base_config(dir.path(), "0.0.0.0:7878")).unwrap();
    let (ok, stderr) = run_kilnd(&path);
    assert!(!ok, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(
        stderr.contains("listen") && stderr.contains("not a loopback address"),
        "{stderr}"
    );
    assert!(stderr.contains("insecure_http"), "{stderr}");
    // Refused before the state directory was touched.
    assert!(!dir.path().join("state").exists());
}

#[test]
fn a_valid_config_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Pick a free port, then let kilnd bind it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let path = dir.path().join("kilnd.toml");
    let text = format!(
        "{}[[backend]]\nkind = \"local\"\nvcpus = 2\nram_mib = 2048\nkiln_home = \"{}\"\n",
        base_config(dir.path(), &listen),
        dir.path().join("home").display()
    );
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kilnd");
    let base = format!("http://{listen}");
    let up = std::panic::catch_unwind(|| {
        wait_for("kilnd to listen", Duration::from_secs(10), || {
            ureq::get(&format!("{base}/healthz")).call().ok()
        });
        let (status, text) = raw(
            "GET",
            &format!("{base}/v1/capabilities"),
            Some("bin-token"),
            None,
        );
        assert_eq!(status, 200, "{text}");
        let card: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(card["regions"], serde_json::json!(["home"]), "{text}");
        assert!(text.contains("\"local\""), "{text}");
        assert!(text.contains("2048"), "{text}");
        assert_eq!(
            raw("GET", &format!("{base}/v1/grants"), Some("nope"), None).0,
            401
        );
    });
    // SIGTERM: a clean stop.
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(up.is_ok(), "kilnd did not serve:\n{stderr}");
    assert!(status.success(), "exit {status:?}:\n{stderr}");
    assert!(dir.path().join("state").join("bridge.sqlite3").exists());
}

#[test]
fn a_second_kilnd_on_the_same_state_exits_naming_the_first_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let path = dir.path().join("kilnd.toml");
    std::fs::write(&path, base_config(dir.path(), &listen)).unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kilnd");
    let base = format!("http://{listen}");
    let outcome = std::panic::catch_unwind(|| {
        wait_for("kilnd to listen", Duration::from_secs(10), || {
            ureq::get(&format!("{base}/healthz")).call().ok()
        });
        // A grant the first kilnd is (as far as the store knows) still
        // provisioning: restart recovery in a second kilnd would fail it.
        let state = dir.path().join("state");
        let store = Store::open(&state).unwrap();
        let ctx = ValidationContext {
            regions: ["home".to_string()].into(),
            now: chrono::Utc::now(),
        };
        let mut body = serde_json::to_value(common::request("home", 1, 128)).unwrap();
        body["request_id"] = "busy".into();
        let grant = Grant::from_json(body.to_string().as_bytes(), &ctx).unwrap();
        store.insert_grant(&grant).unwrap();
        assert!(store
            .transition(
                "busy",
                &[GrantState::Pending],
                GrantState::Provisioning,
                None
            )
            .unwrap());
        let events = store.events("busy").unwrap();
        drop(store);

        let out = Command::new(env!("CARGO_BIN_EXE_kilnd"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .output()
            .expect("run kilnd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
        assert!(stderr.contains(&first.id().to_string()), "{stderr}");

        let store = Store::open(&state).unwrap();
        let busy = store.get("busy").unwrap().unwrap();
        assert_eq!(busy.state, GrantState::Provisioning, "{busy:?}");
        assert_eq!(store.events("busy").unwrap(), events);
        // The first one never noticed.
        assert_eq!(raw("GET", &format!("{base}/healthz"), None, None).0, 200);
    });
    let _ = first.kill();
    let _ = first.wait();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn a_second_shim_of_a_grant_exits_naming_the_first_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        vmm: "/bin/false".into(),
        kernel: dir.path().join("vmlinux"),
        boot: kiln_bridge::machine::BootFiles {
            initrd: dir.path().join("initrd"),
            root_image: None,
            kernel_args: Vec::new(),
            measurement: None,
        },
        vcpus: 1,
        cpu_millicores: None,
        mem_mib: 128,
        runtime_dir: dir.path().join("vms"),
        workload: Default::default(),
        authorized_keys: vec![common::SSH_KEY.to_string()],
        ssh_host_key: String::new(),
        boot_timeout_ms: 1000,
        stop_grace_ms: 1000,
        output_cap: 1 << 20,
        snapshots: None,
        publish: Vec::new(),
        listen_host: None,
        valid_to: None,
        ports: None,
    };
    let launch_path = dir.path().join(shim::LAUNCH_FILE);
    std::fs::write(&launch_path, serde_json::to_vec(&launch).unwrap()).unwrap();
    // This test stands in for the grant's first shim.
    let _held = DirLock::acquire(dir.path(), shim::LOCK_FILE).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .arg(dir.path())
        .output()
        .expect("run kiln-shim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(stderr.contains(&std::process::id().to_string()), "{stderr}");
    assert!(launch_path.exists(), "the second shim took the launch");
    assert!(!dir.path().join(shim::STATE_FILE).exists());
}
