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

/// Something that is not kilnd on a loopback port: every request gets a
/// plain-text 404, as a stray web server would answer.
fn not_kilnd() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\
                  Content-Length: 19\r\nConnection: close\r\n\r\n404 page not found\n",
            );
        }
    });
    url
}

#[test]
fn a_server_that_is_not_kilnd_is_unreadable_not_a_refusal() {
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let url = not_kilnd();
    for cmd in [
        &["fleet", "caps"][..],
        &["grant", "list"],
        &["grant", "show", "g-1"],
    ] {
        let o = kiln(&url, Some(&token), cmd, home.path());
        assert_fails(&o, 3, &["404", "page not found"]);
    }
}

#[test]
fn a_tag_that_cannot_be_resolved_is_refused_at_submit() {
    let k = Kilnd::start();
    let key = k.key_file("key.pub", &format!("{KEY}\n"));
    // The tag is pinned to a digest at submit; nothing answers on port 1.
    let o = k.kiln(&submit_args(&key, &["--region", "home", "--vcpus", "1"]));
    assert_fails(&o, 1, &["image", "cannot resolve the tag", "127.0.0.1:1"]);
    let o = k.kiln(&["grant", "list", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn a_failed_grant_reports_final_usage() {
    let k = Kilnd::start();
    let key = k.key_file("key.pub", &format!("{KEY}\n"));
    // By digest (nothing to resolve at submit), from a port where nothing
    // listens: the build fails, so the grant does.
    let image = format!("127.0.0.1:1/kiln-test/never@sha256:{}", "0".repeat(64));
    let o = k.kiln(&[
        "grant",
        "submit",
        &image,
        "--region",
        "home",
        "--vcpus",
        "1",
        "--ram-mib",
        "512",
        "--valid-for",
        "1h",
        "--ssh-key",
        &key,
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let view: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let id = view["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = k.kiln(&["grant", "show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        if v["state"] == "failed" {
            break;
        }
        assert!(Instant::now() < deadline, "not failed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = k.kiln(&["grant", "usage", &id, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let usage: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(usage["final"], true, "{usage}");
    let o = k.kiln(&["grant", "usage", &id]);
    let out = stdout(&o);
    assert!(
        out.contains("yes") && !out.contains("still running"),
        "{out}"
    );
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
    // add-host and bundle ask no kilnd: none of its flags.
    for (cmd, flag) in [("add-host", "--identity"), ("bundle", "--out")] {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["fleet", cmd, "--help"])
            .output()
            .unwrap();
        let out = stdout(&o);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.contains(flag) && !out.contains("--bridge"), "{out}");
    }
}
