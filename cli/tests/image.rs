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
