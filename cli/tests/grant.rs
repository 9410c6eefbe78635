//! `kiln grant`, `kiln fleet` and `kiln ssh` against a real kilnd on
//! 127.0.0.1 with a local backend. No grant here may fit, so no VM boots.
//!
//! kilnd is a binary of kiln-bridge: build it first with
//! `cargo build -p kiln-bridge --bin kilnd`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const TOKEN: &str = "grant-test-token";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc test@kiln";
/// An image no grant here gets far enough to fetch.
const IMAGE: &str = "127.0.0.1:1/kiln-test/never:1";

fn kilnd_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kilnd");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p kiln-bridge --bin kilnd`",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A kilnd with one local backend (2 vCPUs, 2048 MiB, region `home`),
/// stopped on drop.
struct Kilnd {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Kilnd {
    fn start() -> Kilnd {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("kilnd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\nstate_dir = \"{}\"\nauth_token_file = \"{}\"\n\
                 region = \"home\"\n\n[[backend]]\nkind = \"local\"\nvcpus = 2\n\
                 ram_mib = 2048\nkiln_home = \"{}\"\n",
                dir.path().join("state").display(),
                token.display(),
                dir.path().join("home").display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(kilnd_binary())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn kilnd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&listen).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("kilnd exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "kilnd did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Kilnd {
            child,
            dir,
            url: format!("http://{listen}"),
        }
    }

    /// `kiln ARGS` pointed at this kilnd, with its token file.
    fn kiln(&self, args: &[&str]) -> Output {
        kiln(
            &self.url,
            Some(&self.dir.path().join("token")),
            args,
            self.dir.path(),
        )
    }

    fn key_file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// `kiln ARGS... --bridge URL [--token-file TOKEN] [-- COMMAND]` (the
/// kilnd flags are global, so they may come last) in a clean environment: HOME is `home`,
/// no KILN_BRIDGE_* variables.
fn kiln(url: &str, token: Option<&Path>, args: &[&str], home: &Path) -> Output {
    // Before `--`, which ends kiln's flags.
    let end = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(&args[..end]).args(["--bridge", url]);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    cmd.args(&args[end..])
        .env_remove("KILN_BRIDGE_URL")
        .env_remove("KILN_BRIDGE_TOKEN")
        .env("HOME", home)
        .env("KILN_HOME", home.join("no-kiln-home"))
        .output()
        .expect("run kiln")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code `code` and one `kiln: ` line on stderr containing every part.
fn assert_fails(o: &Output, code: i32, parts: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert_eq!(err.lines().count(), 1, "not one line:\n{err}");
    assert!(err.starts_with("kiln: "), "{err}");
    for part in parts {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

/// `grant submit` with a valid request, then `extra` flags.
fn submit_args<'a>(key: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let base = [
        "grant",
        "submit",
        IMAGE,
        "--ram-mib",
        "512",
        "--valid-for",
        "2h",
        "--ssh-key",
        key,
    ];
    [&base[..], extra].concat()
}

#[test]
fn fleet_caps_shows_the_local_backend() {
    let k = Kilnd::start();
    let o = k.kiln(&["fleet", "caps"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("regions") && out.contains("home"), "{out}");
    assert!(out.contains("0 of 2 used"), "{out}");
    assert!(out.contains("0 of 2048 MiB used"), "{out}");
    assert!(out.contains("local"), "{out}");

    let o = k.kiln(&["fleet", "caps", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let card: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(card["regions"], serde_json::json!(["home"]));
    assert_eq!(card["capacity"]["usable"]["vcpus"], 2);
    assert_eq!(card["capacity"]["usable"]["ram_mib"], 2048);
    assert_eq!(card["backends"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_submissions_name_their_flag_and_nothing_is_created() {
    let k = Kilnd::start();
    let key = k.key_file("key.pub", &format!("{KEY}\n"));

    let o = k.kiln(&submit_args(&key, &["--region", "mars", "--vcpus", "1"]));
    assert_fails(&o, 1, &["region", "--region"]);

    let o = k.kiln(&submit_args(&key, &["--region", "home", "--vcpus", "0"]));
    assert_fails(&o, 1, &["vcpus", "--vcpus"]);

    // Larger than the whole fleet: refused at submission, nothing boots.
    let o = k.kiln(&submit_args(&key, &["--region", "home", "--vcpus", "64"]));
    assert_fails(&o, 1, &["larger than any backend", "--vcpus"]);

    // A key file whose second key is no key names the file and the line.
    let bad = k.key_file(
        "bad.pub",
        &format!("# keys\n{KEY}\nssh-ed25519 not-a-key\n"),
    );
    let o = k.kiln(&submit_args(&bad, &["--region", "home", "--vcpus", "1"]));
    assert_fails(&o, 1, &["ssh_keys[1]", "--ssh-key", "bad.pub", "line 3"]);

    let missing = k.dir.path().join("missing.pub");
    let o = k.kiln(&submit_args(
        missing.to_str().unwrap(),
        &["--region", "home", "--vcpus", "1"],
    ));
    assert_fails(&o, 1, &["--ssh-key", "missing.pub"]);

    // No --ssh-key: ~/.ssh/id_ed25519.pub, which this HOME lacks.
    let o = k.kiln(&[
        "grant",
        "submit",
        IMAGE,
        "--region",
        "home",
        "--vcpus",
        "1",
        "--ram-mib",
        "512",
        "--valid-for",
        "1h",
    ]);
    assert_fails(&o, 1, &["--ssh-key", ".ssh/id_ed25519.pub"]);

    // A JSON file as is: kilnd's field, named in the file.
    let file = k.key_file("grant.json", r#"{"image": "x", "colour": "blue"}"#);
    let o = k.kiln(&["grant", "submit", "--file", &file]);
    assert_fails(&o, 1, &["colour", "grant.json"]);

    // Usage errors are clap's.
    let o = k.kiln(&submit_args(&key, &["--region", "home"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = k.kiln(&submit_args(
        &key,
        &["--region", "home", "--vcpus", "1", "--valid-for", "soon"],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let o = k.kiln(&["grant", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap(),
        serde_json::json!([])
    );
    let o = k.kiln(&["grant", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().count(),
        1,
        "header only:\n{}",
        stdout(&o)
    );
}

#[test]
fn unknown_grants_fail_with_one_line() {
    let k = Kilnd::start();
    for cmd in [
        &["grant", "show", "nope"][..],
        &["grant", "usage", "nope"],
        &["grant", "terminate", "nope"],
        &["ssh", "nope"],
    ] {
        let o = k.kiln(cmd);
        assert_fails(&o, 1, &["nope"]);
    }
}

#[test]
fn wrong_token_and_no_kilnd_are_clear() {
    let k = Kilnd::start();
    let wrong = k.key_file("wrong-token", "not-the-token\n");
    for cmd in [&["fleet", "caps"][..], &["grant", "list"], &["ssh", "g-1"]] {
        let o = kiln(&k.url, Some(Path::new(&wrong)), cmd, k.dir.path());
        assert_fails(&o, 1, &["bearer token", "--token-file"]);
    }
    // The token from the environment.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    let o = cmd
        .args(["grant", "list", "--json"])
        .env("KILN_BRIDGE_URL", &k.url)
        .env("KILN_BRIDGE_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let token = k.dir.path().join("token");
    let nobody = format!("http://127.0.0.1:{}", free_port());
    for cmd in [&["fleet", "caps"][..], &["grant", "list"], &["ssh", "g-1"]] {
        let o = kiln(&nobody, Some(&token), cmd, k.dir.path());
        assert_fails(&o, 3, &["cannot reach kilnd", &nobody]);
    }

    let o = kiln(
        &k.url,
        Some(Path::new("/nonexistent/token")),
        &["grant", "list"],
        k.dir.path(),
    );
    assert_fails(&o, 1, &["/nonexistent/token"]);
}

#[test]
fn help_for_every_command() {
    for cmd in [
        &["grant"][..],
        &["grant", "submit"],
        &["grant", "list"],
        &["grant", "show"],
        &["grant", "usage"],
        &["grant", "terminate"],
        &["fleet"],
        &["fleet", "caps"],
        &["ssh"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(cmd)
            .arg("--help")
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("Usage: kiln"), "{cmd:?}:\n{out}");
        if cmd.len() > 1 || cmd == ["ssh"] {
            assert!(
                out.contains("--bridge") && out.contains("KILN_BRIDGE_URL"),
                "{cmd:?}:\n{out}"
            );
        }
    }
}

// What a real kilnd cannot show without booting a VM (`--wait`, a running
// grant, `kiln ssh`) is checked against a fake kilnd answering canned JSON.

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc";

/// A grant view as kilnd shows it; `connection` when it has one.
fn view(state: &str, connection: Option<&str>, reason: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "id": "g-1", "image": IMAGE, "vcpus": 1, "ram_mib": 512, "region": "home",
        "tdx": "no", "ssh_keys": [KEY], "valid_to": "2030-01-01T00:00:00Z",
        "submitted_at": "2026-01-01T00:00:00Z", "state": state,
        "updated_at": "2026-01-01T00:00:01Z",
    });
    if let Some(host_key) = connection {
        v["connection"] = serde_json::json!({
            "backend": "local", "instance_id": "i-1", "host": "127.0.0.1",
            "ssh_port": 2222, "user": "root", "host_key_fingerprint": "SHA256:fp",
            "host_key": host_key, "started_at": "2026-01-01T00:00:01Z",
        });
    }
    if let Some(r) = reason {
        v["reason"] = serde_json::json!(r);
    }
    v.to_string()
}

const USAGE: &str = r#"{"grant_id": "g-1", "state": "exited", "final": true,
  "taken_at": "2026-01-01T00:01:00Z",
  "usage": {"guest": {"uptime_ms": 60000, "cpu_user_ms": 1500, "cpu_system_ms": 250,
    "mem_used_kib": 1024, "mem_peak_kib": 2048, "net_rx_bytes": 1024, "net_tx_bytes": 10,
    "disk_read_bytes": 0, "disk_write_bytes": 0, "processes": 1, "workload": "exited"},
   "exit_status": {"code": 3}, "host": {"vcpu_cpu_ms": 1800, "vmm_rss_kib": 30000},
   "ended_at": "2026-01-01T00:01:00Z"}}"#;

type Answer = dyn Fn(&str, &str, usize) -> (u16, String) + Send + Sync;

/// An HTTP server on 127.0.0.1 answering `answer(method, path, n)`, n
/// counting earlier requests for the same method and path. Returns its URL
/// and the request bodies seen.
fn fake_kilnd(answer: Box<Answer>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            seen.lock().unwrap().push(String::from_utf8(body).unwrap());
            let n = counts.entry(format!("{method} {path}")).or_default();
            let (status, text) = answer(&method, &path, *n);
            *n += 1;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, bodies)
}

#[test]
fn submit_wait_prints_the_id_then_how_to_connect() {
    let (url, bodies) = fake_kilnd(Box::new(|method, path, n| match (method, path, n) {
        ("POST", "/v1/grants", _) => (201, view("pending", None, None)),
        ("GET", "/v1/grants/g-1", 0) => (200, view("provisioning", None, None)),
        ("GET", "/v1/grants/g-1", _) => (200, view("running", Some(HOST_KEY), None)),
        _ => (404, r#"{"error":"Not found"}"#.into()),
    }));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pub");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let o = kiln(
        &url,
        Some(&token),
        &[
            &submit_args(
                key.to_str().unwrap(),
                &["--region", "home", "--vcpus", "1", "--env", "A=1", "--wait"],
            )[..],
            &["--", "sleep", "9"],
        ]
        .concat(),
        dir.path(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(stdout(&o), "g-1\n");
    for part in [
        "pending",
        "provisioning",
        "running",
        "ssh -p 2222 root@127.0.0.1",
        "kiln ssh g-1",
    ] {
        assert!(err.contains(part), "{part:?} not in:\n{err}");
    }
    let sent: serde_json::Value = serde_json::from_str(&bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(sent["ssh_keys"], serde_json::json!([KEY]));
    assert_eq!(sent["command"], serde_json::json!(["sleep", "9"]));
    assert_eq!(sent["env"], serde_json::json!({"A": "1"}));
    assert_eq!(sent["vcpus"], 1);
}

#[test]
fn submit_wait_fails_with_the_reason() {
    let (url, _) = fake_kilnd(Box::new(|method, _, _| match method {
        "POST" => (201, view("pending", None, None)),
        _ => (200, view("failed", None, Some("no such image"))),
    }));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pub");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    std::fs::write(dir.path().join("token"), "t\n").unwrap();
    let o = kiln(
        &url,
        Some(&dir.path().join("token")),
        &submit_args(
            key.to_str().unwrap(),
            &["--region", "home", "--vcpus", "1", "--wait"],
        ),
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "g-1\n");
    let last = stderr(&o).lines().last().unwrap().to_string();
    assert!(
        last.starts_with("kiln: ") && last.contains("failed: no such image"),
        "{last}"
    );
}

/// A fake `ssh` that records its arguments and the known_hosts file it was
/// given, and exits 7.
fn fake_ssh(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let script = bin.join("ssh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > {d}/args\nfor a; do case \"$a\" in UserKnownHostsFile=*) \
             f=\"${{a#UserKnownHostsFile=}}\"; echo \"$f\" > {d}/kh_path; cat \"$f\" > {d}/known_hosts;; \
             esac; done\ncase \"$*\" in *sleepy*) exec sleep 30;; esac\nexit 7\n",
            d = dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn kiln_ssh(url: &str, dir: &Path, path: &str, args: &[&str]) -> Output {
    std::fs::write(dir.join("token"), "t\n").unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("ssh")
        .args(["--bridge", url, "--token-file"])
        .arg(dir.join("token"))
        .args(args)
        .env("PATH", path)
        .env_remove("KILN_BRIDGE_URL")
        .env_remove("KILN_BRIDGE_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn ssh_pins_the_host_key_and_returns_ssh_status() {
    let (url, _) = fake_kilnd(Box::new(|_, path, _| match path {
        "/v1/grants/g-1" => (200, view("running", Some(HOST_KEY), None)),
        "/v1/grants/nokey" => (200, view("running", Some(""), None)),
        "/v1/grants/pending" => (200, view("pending", None, None)),
        _ => (404, r#"{"error":"No grant"}"#.into()),
    }));
    let dir = tempfile::tempdir().unwrap();
    let path = fake_ssh(dir.path());

    let o = kiln_ssh(
        &url,
        dir.path(),
        &path,
        &["g-1", "-i", "/keys/id", "--", "uname", "-a"],
    );
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let kh_path = std::fs::read_to_string(dir.path().join("kh_path")).unwrap();
    assert_eq!(
        args.trim(),
        format!(
            "-p 2222 -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
             -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i /keys/id -- root@127.0.0.1 uname -a",
            kh_path.trim()
        )
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("known_hosts")).unwrap(),
        format!("[127.0.0.1]:2222 {HOST_KEY}\n")
    );
    assert!(
        !Path::new(kh_path.trim()).exists(),
        "the known_hosts file was left behind"
    );

    // No host key known: accept the first, say which fingerprint to expect.
    let o = kiln_ssh(&url, dir.path(), &path, &["nokey"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("SHA256:fp"), "{}", stderr(&o));
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    assert!(args.contains("StrictHostKeyChecking=accept-new"), "{args}");

    // A `kill` of kiln reaches ssh, and the file still goes.
    std::fs::remove_file(dir.path().join("kh_path")).unwrap();
    std::fs::write(dir.path().join("token"), "t\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["ssh", "g-1", "--bridge", &url, "--token-file"])
        .arg(dir.path().join("token"))
        .args(["--", "sleepy"])
        .env("PATH", &path)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.path().join("kh_path").exists() {
        assert!(Instant::now() < deadline, "ssh did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
    let kh_path = std::fs::read_to_string(dir.path().join("kh_path")).unwrap();
    assert!(
        !Path::new(kh_path.trim()).exists(),
        "the known_hosts file was left behind"
    );

    let o = kiln_ssh(&url, dir.path(), &path, &["pending"]);
    assert_fails(&o, 1, &["pending", "not running"]);
}

#[test]
fn list_show_usage_and_terminate() {
    let (url, _) = fake_kilnd(Box::new(|method, path, _| match (method, path) {
        ("DELETE", _) => (
            200,
            view("terminating", Some(HOST_KEY), Some("terminated on request")),
        ),
        (_, "/v1/grants/g-1/usage") => (200, USAGE.to_string()),
        (_, "/v1/grants") => (
            200,
            format!(
                r#"{{"grants": [{}, {}]}}"#,
                view("running", Some(HOST_KEY), None),
                view("failed", None, Some("no such image"))
            ),
        ),
        _ => (200, view("running", Some(HOST_KEY), None)),
    }));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t\n").unwrap();
    let token = dir.path().join("token");
    let o = kiln(&url, Some(&token), &["grant", "show", "g-1"], dir.path());
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for part in [
        "running",
        "127.0.0.1",
        "2222",
        "SHA256:fp",
        "ssh -p 2222 root@127.0.0.1",
        "kiln ssh g-1",
    ] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }
    let o = kiln(&url, Some(&token), &["grant", "list"], dir.path());
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("ID") && lines[0].ends_with("REASON"),
        "{out}"
    );
    assert!(
        lines[2].contains("failed") && lines[2].ends_with("no such image"),
        "{out}"
    );
    let o = kiln(
        &url,
        Some(&token),
        &["grant", "list", "--state", "running", "--json"],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["state"], "running");
    let o = kiln(
        &url,
        Some(&token),
        &["grant", "list", "--state", "odd"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let o = kiln(&url, Some(&token), &["grant", "usage", "g-1"], dir.path());
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for part in ["user 1.50 s", "peak 2.0 MiB", "received 1.0 KiB", "code 3"] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }
    let o = kiln(
        &url,
        Some(&token),
        &["grant", "usage", "g-1", "--json"],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["usage"]["guest"]["cpu_user_ms"], 1500);
    let o = kiln(
        &url,
        Some(&token),
        &["grant", "terminate", "g-1"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("terminating"), "{}", stdout(&o));
    assert!(stderr(&o).contains("still stopping"), "{}", stderr(&o));
}
