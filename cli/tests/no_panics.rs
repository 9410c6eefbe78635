//! `kiln` never panics on out-of-range input or on a closed standard
//! output (`kiln image ls | head -1`): it says what was wrong in one line,
//! or ends quietly as `ls` does.
//!
//! kilnd is a binary of kiln-bridge: build it first with
//! `cargo build -p kiln-bridge --bin kilnd`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kiln_tests::kilnd::{Kilnd, TOKEN};

fn kiln(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args)
        .env("KILN_HOME", home)
        .env("KILN_BRIDGE_TOKEN", TOKEN)
        .env_remove("KILN_BRIDGE_URL")
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` with its standard output a pipe nobody reads any more, as
/// when `head` has exited.
fn with_closed_stdout(cmd: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdout(writer).stderr(Stdio::piped()).output().unwrap()
}

/// Killed by SIGPIPE, nothing on stderr: what `ls | head` does to `ls`.
fn assert_quiet_end(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{what}: {err}");
    assert_eq!(err, "", "{what}");
}

#[test]
fn durations_out_of_range_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pub");
    std::fs::write(&key, "ssh-ed25519 AAAA test\n").unwrap();
    let submit = |valid_for: &str| {
        kiln(
            dir.path(),
            &["grant", "submit", "alpine", "--region", "home"],
        )
        .args(["--vcpus", "1", "--ram-mib", "128", "--ssh-key"])
        .arg(&key)
        .args(["--valid-for", valid_for])
        // Nothing listens here: the flags fail first.
        .args(["--bridge", "http://127.0.0.1:1"])
        .output()
        .unwrap()
    };
    let out = submit("10000000000h");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err, "kiln: --valid-for: too long\n");
    let out = submit("18446744073709551615s");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"18446744073709551615s\" is too long"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_ends_listings_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let out = with_closed_stdout(&mut kiln(dir.path(), &["image", "ls", "--json"]));
    assert_quiet_end(&out, "image ls");

    let kilnd = Kilnd::new(&dir.path().join("kilnd"), 1, 512);
    let out = with_closed_stdout(&mut kiln(
        dir.path(),
        &["grant", "list", "--bridge", &kilnd.url],
    ));
    assert_quiet_end(&out, "grant list");
}
