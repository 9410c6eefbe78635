//! The mistakes `kiln run` users make, each answered by one line that says
//! what to do and exit code 125 (kiln's own failure), before any VM boots.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use kiln_tests::registry::{sh, Registry};
use kiln_tests::{agent, bin, kernel};

/// A busybox OCI layout `dir/oci:1`, optionally claiming another architecture.
fn layout(dir: &Path, arch: &str) -> String {
    sh(&format!(
        r#"mkdir -p {0}; cd {0}
        umoci init --layout oci
        umoci new --image oci:1
        umoci unpack --image oci:1 b >/dev/null
        mkdir -p b/rootfs/bin; cp /bin/busybox b/rootfs/bin/
        umoci repack --image oci:1 b
        umoci config --image oci:1 --architecture {arch} --config.cmd /bin/busybox
        rm -rf b; chmod -R a+rX oci"#,
        dir.display()
    ));
    format!("{}/oci:1", dir.display())
}

/// `$KILN_HOME` in `dir` with the agent, and the kernel unless `no_kernel`.
fn home(dir: &Path, with_kernel: bool) -> std::path::PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::create_dir_all(home.join("kernel")).unwrap();
    std::fs::copy(agent(), home.join("bin/kiln-agent")).unwrap();
    if with_kernel {
        std::fs::copy(kernel(), home.join("kernel/vmlinux")).unwrap();
    }
    home
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_VMM", bin("kiln-vmm"))
        .output()
        .expect("run kiln")
}

/// Exit 125 and a single line on stderr that contains every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("kiln: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
}

#[test]
fn registry_problems() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path(), true);
    let registry = Registry::start();
    let unknown = format!("{}/no/such-image:1", registry.addr);
    let out = kiln(&home, &["run", &unknown, "--", "true"]);
    assert_one_line_error(&out, &["HTTP 404", "no such image or tag"]);

    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = kiln(
        &home,
        &["run", &format!("127.0.0.1:{port}/x:1"), "--", "true"],
    );
    assert_one_line_error(&out, &["cannot reach", "check the registry address"]);
}

#[test]
fn host_and_image_problems() {
    let dir = tempfile::tempdir().unwrap();
    let amd64 = layout(&dir.path().join("amd64"), "amd64");
    let arm64 = layout(&dir.path().join("arm64"), "arm64");
    let good = home(&dir.path().join("good"), true);

    let out = kiln(&good, &["run", "--oci-layout", &arm64, "--", "true"]);
    assert_one_line_error(&out, &["linux/arm64", "use an amd64 build"]);

    let out = kiln(
        &good,
        &[
            "run",
            "--mem",
            "100000000",
            "--oci-layout",
            &amd64,
            "--",
            "true",
        ],
    );
    assert_one_line_error(&out, &["not enough memory", "--mem"]);

    // The initramfs path holds the image twice in guest RAM: refused, with
    // the figure, before any VM boots.
    let out = kiln(
        &good,
        &[
            "run",
            "--rootfs",
            "initramfs",
            "--mem",
            "40",
            "--oci-layout",
            &amd64,
            "--",
            "true",
        ],
    );
    assert_one_line_error(&out, &["40 MiB is too little", "at least", "--mem"]);

    let out = kiln(
        &good,
        &[
            "run",
            "--rootfs",
            "initramfs",
            "--disk",
            "1G",
            "--oci-layout",
            &amd64,
            "--",
            "true",
        ],
    );
    assert_one_line_error(&out, &["--disk needs a block root"]);

    let no_kernel = home(&dir.path().join("bare"), false);
    let out = kiln(&no_kernel, &["run", "--oci-layout", &amd64, "--", "true"]);
    assert_one_line_error(&out, &["guest kernel missing", "scripts/setup.sh"]);

    let out = kiln(
        &good,
        &["run", "--oci-layout", &amd64, "-e", "=x", "--", "true"],
    );
    assert_one_line_error(&out, &["-e \"=x\""]);

    // /dev/kvm without access: an unprivileged user, with everything
    // else it needs copied where any user can read it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let private = dir.path().join("nobody");
    let private_home = home(&private, true);
    std::fs::copy(bin("kiln-vmm"), private.join("kiln-vmm")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), private.join("kiln")).unwrap();
    sh(&format!("chmod -R a+rwX {}", dir.path().display()));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(private.join("kiln"))
        .args(["run", "--oci-layout", &amd64, "--", "true"])
        .env("KILN_HOME", &private_home)
        .env("KILN_VMM", private.join("kiln-vmm"))
        .current_dir(dir.path())
        .output()
        .expect("setpriv (util-linux)");
    assert_one_line_error(&out, &["/dev/kvm", "kvm group"]);
}

/// Usage errors of `kiln run` and `kiln demo` are kiln's own failures:
/// 125, never clap's 2, which a workload may return too. Other commands
/// keep 2, and help is 0. Out-of-range input is an error, never a panic.
#[test]
fn usage_errors_exit_125() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let cases: [&[&str]; 7] = [
        &["run"],
        &["run", "--timeout", "5x", "alpine"],
        &["run", "alpine", "--oci-layout", "layout:1"],
        &["run", "--no-such-flag", "alpine"],
        &["run", "--timeout", "18446744073709551615s", "alpine"],
        &["run", "--vcpus", "300", "alpine"],
        &["demo", "--no-such-flag"],
    ];
    for args in cases {
        let out = kiln(home, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let out = kiln(
        home,
        &["run", "--timeout", "18446744073709551615s", "alpine"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"18446744073709551615s\" is too long"),
        "{err}"
    );

    let out = kiln(home, &["image", "ls", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = kiln(home, &["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--timeout"));
}
