//! `kiln image …` end to end: the real binary, an umoci-made image, a
//! temporary KILN_HOME.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .output()
        .expect("run kiln")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn image(dir: &Path) -> String {
    let script = format!(
        "set -e; cd {}; umoci init --layout oci; umoci new --image oci:v1; \
         umoci unpack --image oci:v1 b >/dev/null; echo hello > b/rootfs/hello; \
         umoci repack --image oci:v1 b; rm -rf b",
        dir.display()
    );
    let st = Command::new("bash")
        .args(["-c", &script])
        .status()
        .expect("bash");
    assert!(st.success(), "umoci (scripts/setup.sh installs it)");
    format!("{}/oci:v1", dir.display())
}

#[test]
fn build_ls_rm_prune() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::write(home.join("bin/kiln-agent"), b"agent").unwrap();

    let out = dir.path().join("out.cpio");
    let first: serde_json::Value = serde_json::from_str(&ok(kiln(
        &home,
        &[
            "image",
            "build",
            "--oci-layout",
            &layout,
            "--json",
            "-o",
            out.to_str().unwrap(),
        ],
    )))
    .unwrap();
    assert_eq!(first["cached"], false);
    assert_eq!(first["path"], out.to_str().unwrap());
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(first["size"], bytes.len() as u64);
    assert!(first["measurement"]
        .as_str()
        .unwrap()
        .starts_with("sha384:"));
    assert!(first["digest"].as_str().unwrap().starts_with("sha256:"));

    let second: serde_json::Value = serde_json::from_str(&ok(kiln(
        &home,
        &["image", "build", "--oci-layout", &layout, "--json"],
    )))
    .unwrap();
    assert_eq!(second["cached"], true);
    assert_eq!(second["measurement"], first["measurement"]);
    assert_eq!(
        std::fs::read(second["path"].as_str().unwrap()).unwrap(),
        bytes
    );

    let ls: serde_json::Value =
        serde_json::from_str(&ok(kiln(&home, &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["digest"], first["digest"]);

    let digest = first["digest"].as_str().unwrap();
    assert!(ok(kiln(&home, &["image", "rm", digest])).contains("removed"));
    let ls: serde_json::Value =
        serde_json::from_str(&ok(kiln(&home, &["image", "ls", "--json"]))).unwrap();
    assert!(ls.as_array().unwrap().is_empty());
    assert!(!kiln(&home, &["image", "rm", digest]).status.success());
    assert!(ok(kiln(&home, &["image", "prune"])).starts_with("freed"));

    // No agent: a clear error, nonzero exit.
    std::fs::remove_file(home.join("bin/kiln-agent")).unwrap();
    let fail = kiln(&home, &["image", "build", "--oci-layout", &layout]);
    assert!(!fail.status.success());
    assert!(String::from_utf8_lossy(&fail.stderr).contains("agent binary"));
}

#[test]
fn two_concurrent_builds_of_one_image_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    // A bigger agent makes the build window wide enough to overlap.
    let agent = dir.path().join("agent");
    std::fs::copy("/bin/busybox", &agent).unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "image",
                "build",
                "--json",
                "--compression",
                "gzip",
                "--oci-layout",
                &layout,
            ])
            .arg("--agent")
            .arg(&agent)
            .env("KILN_HOME", &home)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let results: Vec<serde_json::Value> = [a, b]
        .into_iter()
        .map(|c| serde_json::from_str(&ok(c.wait_with_output().unwrap())).unwrap())
        .collect();
    assert_eq!(results[0]["measurement"], results[1]["measurement"]);
    assert_eq!(results[0]["path"], results[1]["path"]);
    let fresh = results.iter().filter(|r| r["cached"] == false).count();
    assert_eq!(fresh, 1, "exactly one process builds: {results:?}");
    let bytes = std::fs::read(results[0]["path"].as_str().unwrap()).unwrap();
    assert_eq!(bytes.len() as u64, results[0]["size"]);
    let builds = std::fs::read_dir(home.join("images/builds"))
        .unwrap()
        .count();
    assert_eq!(builds, 2, "one initramfs and its record");
    assert_eq!(
        std::fs::read_dir(home.join("images/tmp")).unwrap().count(),
        0
    );
}

/// The files under `images/locks`.
fn locks(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("images/locks"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn build_lock_files_do_not_pile_up() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::write(home.join("bin/kiln-agent"), b"agent").unwrap();
    ok(kiln(&home, &["image", "build", "--oci-layout", &layout]));
    assert_eq!(locks(&home), Vec::<String>::new());
    // A build that fails after taking its key lock (over --max-size).
    let fail = kiln(
        &home,
        &[
            "image",
            "build",
            "--compression",
            "gzip",
            "--max-size",
            "10",
            "--oci-layout",
            &layout,
        ],
    );
    assert!(!fail.status.success());
    assert_eq!(locks(&home), Vec::<String>::new());
    // One left by a killed build or an older kiln: prune removes it.
    std::fs::write(home.join("images/locks/0123abcd"), b"").unwrap();
    ok(kiln(&home, &["image", "prune"]));
    assert_eq!(locks(&home), Vec::<String>::new());
}

#[test]
fn rm_takes_a_unique_prefix_of_what_ls_shows() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::write(home.join("bin/kiln-agent"), b"agent").unwrap();
    for c in ["none", "gzip"] {
        ok(kiln(
            &home,
            &[
                "image",
                "build",
                "--compression",
                c,
                "--oci-layout",
                &layout,
            ],
        ));
    }
    let ls = ok(kiln(&home, &["image", "ls"]));
    let rows: Vec<Vec<&str>> = ls.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{ls}");
    // The short key (first column) removes that build only.
    let out = ok(kiln(&home, &["image", "rm", rows[0][0]]));
    assert!(out.starts_with(&format!("removed {}", rows[0][0])), "{out}");
    let left = ok(kiln(&home, &["image", "ls"]));
    assert_eq!(left.lines().count(), 1);
    assert!(left.starts_with(rows[1][0]));
    // A key prefix shared by two builds is refused, naming the count.
    let record = |key: &str| home.join(format!("images/builds/{key}.json"));
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::fs::read_dir(home.join("images/builds"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "json"))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let key = json["key"].as_str().unwrap().to_string();
    let twin = format!("{}{}", &key[..6], "0".repeat(58));
    let mut copy = json.clone();
    copy["key"] = twin.clone().into();
    std::fs::write(record(&twin), copy.to_string()).unwrap();
    let amb = kiln(&home, &["image", "rm", &key[..6]]);
    assert!(!amb.status.success());
    let err = String::from_utf8_lossy(&amb.stderr);
    assert!(err.contains("matches 2 builds"), "{err}");
    assert_eq!(ok(kiln(&home, &["image", "ls"])).lines().count(), 2);
    // The short digest (`sha256:` and 12 hex) names the image: both go.
    let short_digest = rows[1].iter().find(|c| c.starts_with("sha256:")).unwrap();
    assert_eq!(short_digest.len(), 19);
    let out = ok(kiln(&home, &["image", "rm", short_digest]));
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(ok(kiln(&home, &["image", "ls"])).is_empty());
    let none = kiln(&home, &["image", "rm", "abc"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("no build matches"));
}

#[test]
fn another_user_gets_a_hint_and_never_an_empty_listing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::write(home.join("bin/kiln-agent"), b"agent").unwrap();
    ok(kiln(&home, &["image", "build", "--oci-layout", &layout]));
    // The real binary as an unprivileged user against root's cache.
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_HOME", &home)
            .output()
            .expect("setpriv")
    };
    for args in [
        &["image", "ls"][..],
        &["image", "ls", "--json"],
        &["image", "build", "--oci-layout", &layout],
    ] {
        let out = as_nobody(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a listing");
        assert!(
            err.contains("permission denied") && err.contains("KILN_HOME"),
            "{args:?}: {err}"
        );
    }
}

/// `--rootfs block`: an erofs root image next to an agent-only initramfs,
/// cached under its own key beside the initramfs build of the same image,
/// found again, chosen by `auto` only for large images, and removed with
/// its build.
#[test]
fn block_root_builds_are_cached_beside_initramfs_builds() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let layout = image(dir.path());
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::write(home.join("bin/kiln-agent"), b"agent").unwrap();
    let build = |rootfs: &str| -> serde_json::Value {
        serde_json::from_str(&ok(kiln(
            &home,
            &[
                "image",
                "build",
                "--oci-layout",
                &layout,
                "--rootfs",
                rootfs,
                "--json",
            ],
        )))
        .unwrap()
    };
    let block = build("block");
    assert_eq!(block["rootfs"], "block");
    assert_eq!(block["cached"], false);
    let root = std::path::PathBuf::from(block["root_image"].as_str().unwrap());
    let erofs = std::fs::read(&root).unwrap();
    // The erofs magic at byte 1024.
    assert_eq!(&erofs[1024..1028], &[0xe2, 0xe1, 0xf5, 0xe0]);
    let again = build("block");
    assert_eq!(again["cached"], true);
    assert_eq!(again["measurement"], block["measurement"]);

    // A tiny image: `auto` keeps the initramfs path, a build of its own.
    let auto = build("auto");
    assert_eq!(auto["rootfs"], "initramfs");
    assert_eq!(auto["cached"], false);
    assert!(auto["root_image"].is_null());
    assert_ne!(auto["measurement"], block["measurement"]);
    assert_eq!(build("initramfs")["cached"], true);

    let ls: serde_json::Value =
        serde_json::from_str(&ok(kiln(&home, &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let digest = block["digest"].as_str().unwrap();
    ok(kiln(&home, &["image", "rm", digest]));
    assert!(!root.exists(), "root image left behind");
}
