//! `kiln fleet add-host` against a real sshd, with no VM: the owned host
//! is a network namespace with Debian's sshd on its own address, and the
//! real `kiln` runs from a second namespace, as an operator's would from
//! the bridge's machine. The namespaces share this machine's filesystem,
//! so the test checks the installed files directly; the installed
//! `kiln host info`, and a kilnd given the printed table, check the rest.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::kilnd::Kilnd;
use kiln_tests::netns::NetNs;
use kiln_tests::openssh::{keygen, text};
use kiln_tests::sshd::Sshd;
use kiln_tests::{agent, bin, kernel, wait_for};

/// `kiln ARGS` with `local` as this machine's `KILN_HOME`, and no kilnd
/// settings in sight (add-host must not need any); with how long it took.
fn kiln(local: &Path, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(bin("kiln"))
        .args(args)
        .env("KILN_HOME", local)
        .env_remove("KILN_BRIDGE_URL")
        .env_remove("KILN_BRIDGE_TOKEN")
        .env_remove("KILN_VMM")
        .env_remove("KILN_SHIM")
        .stdin(Stdio::null())
        .output()
        .expect("run kiln");
    (out, start.elapsed())
}

/// The key part of an OpenSSH public key line (`ssh-ed25519 AAAA…`),
/// without its comment.
fn key_of(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The step lines of one run that say `word`.
fn count(stderr: &str, word: &str) -> usize {
    stderr.lines().filter(|l| l.contains(word)).count()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).ok() == std::fs::read(b).ok()
}

#[test]
fn add_host_installs_checks_and_upgrades_an_owned_host_over_ssh() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let pid = std::process::id();
    let subnet = format!("10.{}.9", 200 + pid % 50);
    let address = format!("{subnet}.2");
    let host = NetNs::new("addhost");
    let bridge = NetNs::new("addhost-br");
    bridge.link(
        &format!("kah{}", pid % 10_000),
        &format!("{subnet}.1/24"),
        &host,
        "eth0",
        &format!("{address}/24"),
    );
    let sshd_dir = work.join("sshd");
    std::fs::create_dir_all(&sshd_dir).unwrap();
    let ip = address.clone();
    let sshd = host.run(move || Sshd::start_at(&sshd_dir, &ip, 22));
    // From here on this thread, and what it starts, is on the bridge's side.
    bridge.enter();

    // This machine's KILN_HOME: the kernel and agent it gives hosts.
    let local = work.join("local");
    std::fs::create_dir_all(local.join("kernel")).unwrap();
    std::fs::create_dir_all(local.join("bin")).unwrap();
    std::os::unix::fs::symlink(kernel(), local.join("kernel/vmlinux")).unwrap();
    std::os::unix::fs::symlink(agent(), local.join("bin/kiln-agent")).unwrap();

    // The host's install goes into the test's directory.
    let prefix = work.join("host/lib");
    let home = work.join("host/home");
    let identity = sshd.client_key();
    let (prefix_s, home_s, identity_s) = (
        prefix.to_str().unwrap(),
        home.to_str().unwrap(),
        identity.to_str().unwrap(),
    );
    let run_as = |identity: &str, extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "add-host",
            &address,
            "--identity",
            identity,
            "--prefix",
            prefix_s,
            "--kiln-home",
            home_s,
        ];
        args.extend_from_slice(extra);
        kiln(&local, &args)
    };
    let run = |extra: &[&str]| run_as(identity_s, extra);
    let installed: [(PathBuf, PathBuf, u32); 5] = [
        (prefix.join("kiln"), bin("kiln"), 0o755),
        (prefix.join("kiln-vmm"), bin("kiln-vmm"), 0o755),
        (prefix.join("kiln-shim"), bin("kiln-shim"), 0o755),
        (home.join("bin/kiln-agent"), agent(), 0o755),
        (home.join("kernel/vmlinux"), kernel(), 0o644),
    ];

    // A fresh host: the key is trusted on first use, everything is sent.
    let (first, first_took) = run(&[]);
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert!(first.status.success(), "{stderr}\n{}", sshd.log());
    assert!(stderr.contains("trusted on first use"), "{stderr}");
    assert_eq!(count(&stderr, "uploaded"), 5, "{stderr}");
    let table: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    let section = &table["backend"]["host"][0];
    let host_key = key_of(&sshd.host_key());
    assert_eq!(section["address"].as_str(), Some(address.as_str()));
    assert_eq!(section["user"].as_str(), Some("root"));
    assert_eq!(section["identity_file"].as_str(), Some(identity_s));
    assert_eq!(section["host_key"].as_str(), Some(host_key.as_str()));
    let kiln_there = prefix.join("kiln");
    assert_eq!(section["kiln"].as_str(), kiln_there.to_str());
    assert_eq!(section["kiln_home"].as_str(), Some(home_s));
    for (there, here, mode) in &installed {
        assert!(
            same_file(there, here),
            "{} differs from {}",
            there.display(),
            here.display()
        );
        let meta = std::fs::metadata(there).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            *mode,
            "{}",
            there.display()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&prefix)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let host_toml = std::fs::read_to_string(home.join("host.toml")).unwrap();
    assert!(
        host_toml.contains(&format!("address = \"{address}\"")),
        "{host_toml}"
    );

    // The installed kiln answers as the host, its VMs at the SSH address.
    let info = Command::new(&kiln_there)
        .args(["host", "--home", home_s, "info"])
        .env_remove("KILN_VMM")
        .env_remove("KILN_SHIM")
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&info.stderr)));
    assert_eq!(info["ok"]["version"], env!("CARGO_PKG_VERSION"), "{info}");
    assert_eq!(info["ok"]["address"], address.as_str(), "{info}");
    assert!(info["ok"]["kvm"].is_string(), "{info}");

    // Again, pinned: nothing is sent, nothing replaced.
    let inode = std::fs::metadata(&kiln_there).unwrap().ino();
    let (second, second_took) = run(&["--host-key", &host_key, "--json"]);
    let stderr = text(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert_eq!(count(&stderr, "unchanged"), 5, "{stderr}");
    assert_eq!(count(&stderr, "uploaded"), 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["host_key_learned"], false, "{report}");
    assert_eq!(report["host_file_written"], false, "{report}");
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 5, "{report}");
    assert!(files.iter().all(|f| f["uploaded"] == false), "{report}");
    assert_eq!(report["section"].as_str(), Some(section_of(&stdout)));
    assert_eq!(std::fs::metadata(&kiln_there).unwrap().ino(), inode);

    // A wrong pin is refused, naming the host, before anything is sent:
    // a stale agent stays stale.
    let agent_there = home.join("bin/kiln-agent");
    std::fs::write(&agent_there, b"stale").unwrap();
    let stranger = keygen(work, "stranger");
    let stranger = std::fs::read_to_string(stranger.with_extension("pub")).unwrap();
    let (wrong, _) = run(&["--host-key", stranger.trim()]);
    let stderr = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&address) && stderr.contains("host key"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&agent_there).unwrap(), b"stale");

    // An upgrade sends only what changed.
    let (upgrade, _) = run(&["--host-key", &host_key]);
    let stderr = text(&upgrade.stderr);
    assert!(upgrade.status.success(), "{stderr}");
    assert_eq!(count(&stderr, "uploaded"), 1, "{stderr}");
    assert!(stderr.contains("guest agent: uploaded"), "{stderr}");
    assert_eq!(count(&stderr, "unchanged"), 4, "{stderr}");
    assert!(same_file(&agent_there, &agent()));

    // No identity file: one line, naming the host and the file.
    let none = work.join("no-such-key");
    let (missing, _) = run_as(none.to_str().unwrap(), &[]);
    let stderr = text(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&address) && stderr.contains(none.to_str().unwrap()),
        "{stderr}"
    );

    // kilnd, given the printed table as it is, finds the host ready.
    let config = format!("[[backend]]\nkind = \"ssh\"\nname = \"rack\"\n{stdout}");
    let kilnd = Kilnd::with_backends(&work.join("kilnd"), &config);
    let ready = wait_for(Duration::from_secs(60), || {
        let out = kilnd.kiln(&["fleet", "caps", "--json"]);
        let card: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (card["backends"][0]["hosts"][0]["state"] == "ready").then_some(())
    });
    assert!(
        ready.is_some(),
        "{}\n{}",
        text(&kilnd.kiln(&["fleet", "caps"]).stdout),
        kilnd.log()
    );

    eprintln!(
        "add-host: {:.2} s for a fresh host, {:.2} s with nothing to upload",
        first_took.as_secs_f64(),
        second_took.as_secs_f64()
    );
}

/// The `[[backend.host]]` table of a text run's output, without the
/// comments above it.
fn section_of(stdout: &str) -> &str {
    stdout
        .find("[[backend.host]]")
        .map_or(stdout, |at| &stdout[at..])
}
