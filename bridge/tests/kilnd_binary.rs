//! The kilnd binary: configuration errors name the key and exit non-zero;
//! a valid configuration (with a local backend) serves.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{raw, wait_for};

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
        (format!("{base}[[backend]]\nkind = \"gcp\"\n"), "gcp"),
        (
            config_text(dir.path(), Path::new("/nonexistent/token"), "127.0.0.1:0"),
            "auth_token_file",
        ),
    ];
    let path = dir.path().join("kilnd.toml");
    for (text, key) in cases {
        std::fs::write(&path, &text).unwrap();
        let (ok, stderr) = run_kilnd(&path);
        assert!(!ok, "accepted:\n{text}");
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    let (ok, stderr) = run_kilnd(&dir.path().join("missing.toml"));
    assert!(!ok && stderr.contains("missing.toml"), "{stderr}");
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
