//! `kiln-vmm` refuses bad input with a clear one-line error, leaves no
//! files behind, and stops cleanly on signals and on its parent's death.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_tests::{bin, guest_init, initramfs_with_init, kernel, run_vmm, wait_for, VmmProcess};

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_error(args: &[&str], needle: &str) {
    let (code, stderr) = run_vmm(args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("initrd"), b"070701").unwrap();
    std::fs::write(d.join("garbage"), vec![0x42u8; 8192]).unwrap();
    let initrd = d.join("initrd");
    let initrd = initrd.to_str().unwrap();
    let uds = d.join("vm.sock");
    let uds = uds.to_str().unwrap();
    let log = d.join("serial.log");
    let log = log.to_str().unwrap();
    let before = files_in(d);

    let missing = d.join("no-such-kernel");
    assert_error(
        &[
            "--kernel",
            missing.to_str().unwrap(),
            "--initrd",
            initrd,
            "--vsock-uds",
            uds,
            "--serial-log",
            log,
        ],
        "kernel not found",
    );
    let garbage = d.join("garbage");
    assert_error(
        &[
            "--kernel",
            garbage.to_str().unwrap(),
            "--initrd",
            initrd,
            "--vsock-uds",
            uds,
            "--serial-log",
            log,
        ],
        "neither an ELF vmlinux nor a bzImage",
    );
    let k = kernel();
    let k = k.to_str().unwrap();
    assert_error(
        &["--kernel", k, "--initrd", initrd, "--mem-mib", "100000000"],
        "exceeds this host",
    );
    assert_error(
        &["--kernel", k, "--initrd", initrd, "--vcpus", "0"],
        "vcpus must be between 1 and 32",
    );
    assert_error(
        &["--kernel", k, "--initrd", d.join("nope").to_str().unwrap()],
        "initramfs not found",
    );
    assert_error(&["--kernel", k, "--initrd", initrd, "--tdx"], "TDX");
    assert_eq!(files_in(d), before, "a failed start must leave no files");

    // The boot tests' waits end when the VMM does, with its reason, rather
    // than running out their (long) timeouts.
    let mut early = VmmProcess::spawn(&["--kernel", k, "--initrd", "/no/such/initrd"]);
    let waited = early.poll(Duration::from_secs(30), || None::<()>);
    let why = waited.expect_err("nothing to wait for");
    assert!(
        why.contains("exited") && why.contains("initramfs not found"),
        "{why}"
    );

    // A socket path that exists belongs to someone else: refused, untouched.
    std::fs::write(d.join("vm.sock"), b"not ours").unwrap();
    assert_error(
        &[
            "--kernel",
            k,
            "--initrd",
            initrd,
            "--vsock-uds",
            uds,
            "--serial-log",
            log,
        ],
        "already exists",
    );
    assert_eq!(std::fs::read(d.join("vm.sock")).unwrap(), b"not ours");
    assert!(!d.join("serial.log").exists());
}

#[test]
fn kvm_permission_error_is_explained() {
    // As an unprivileged user, /dev/kvm (root-only here) cannot be opened.
    // The binary is copied where that user can reach it, wherever the
    // checkout lives.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vmm = dir.path().join("kiln-vmm");
    std::fs::copy(bin("kiln-vmm"), &vmm).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&vmm)
            .args(extra)
            .args([
                "--kernel",
                kernel().to_str().unwrap(),
                "--initrd",
                "/dev/null",
            ])
            .output()
            .expect("setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };
    // Jailing takes root: said plainly, never skipped quietly.
    let stderr = run(&[]);
    assert!(stderr.contains("the jail needs root"), "{stderr}");
    let stderr = run(&["--no-jail"]);
    assert!(
        stderr.contains("permission denied opening /dev/kvm"),
        "{stderr}"
    );
}

#[test]
fn capabilities_report_this_host() {
    let out = Command::new(bin("kiln-vmm"))
        .args(["--capabilities", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["kvm"], true);
    let expected = if Path::new("/sys/module/kvm_pvm").exists() {
        "pvm"
    } else {
        caps["virtualization"].as_str().unwrap()
    };
    assert_eq!(caps["virtualization"], expected);
    assert!(caps["max_vcpus"].as_u64().unwrap() >= 1);
    assert!(caps["tdx"].is_boolean());
    let types: Vec<u64> = caps["vm_types"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(caps["tdx"], types.contains(&5));
}

/// Starts a VM whose guest will not finish on its own soon.
fn start_vm(dir: &Path) -> (VmmProcess, std::path::PathBuf) {
    let initrd = initramfs_with_init(dir, &guest_init());
    let uds = dir.join("vm.sock");
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    assert!(wait_for(Duration::from_secs(10), || uds.exists().then_some(())).is_some());
    (vmm, uds)
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (vmm, uds) = start_vm(dir.path());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vmm.pid(), libc::SIGTERM) };
    let (status, stderr) = vmm.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(!uds.exists());
}

#[test]
fn the_vmm_does_not_outlive_a_parent_that_asked_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let uds = dir.path().join("vm.sock");
    let pidfile = dir.path().join("pid");
    // A shell parent starts the VMM with --die-with-parent, then is killed.
    let script = format!(
        "{vmm} --kernel {k} --initrd {i} --vsock-uds {u} --die-with-parent 2>/dev/null & echo $! > {p}; wait",
        vmm = bin("kiln-vmm").display(),
        k = kernel().display(),
        i = initrd.display(),
        u = uds.display(),
        p = pidfile.display()
    );
    let mut parent = Command::new("sh").arg("-c").arg(script).spawn().unwrap();
    let pid: i32 = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .expect("VMM pid");
    assert!(wait_for(Duration::from_secs(10), || uds.exists().then_some(())).is_some());
    parent.kill().unwrap();
    parent.wait().unwrap();
    // SAFETY: kill(pid, 0) only probes for existence.
    let gone = wait_for(Duration::from_secs(10), || {
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    assert!(gone.is_some(), "VMM {pid} outlived its parent");
    assert!(!uds.exists(), "socket left behind");
}

#[test]
fn reserved_guest_cids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.sock");
    let k = kernel();
    for cid in ["0", "1", "2", "4294967295", "4294967296"] {
        let args = [
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/dev/null",
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--guest-cid",
            cid,
        ];
        let refused = format!("guest CID must be between 3 and 4294967294 (0-2 are reserved, 4294967295 is VMADDR_CID_ANY), got {cid}");
        assert_error(&args, &refused);
        // Without a vsock device the flag is still checked, not ignored.
        let no_vsock: Vec<&str> = args[..4].iter().chain(&args[6..]).copied().collect();
        assert_error(&no_vsock, &refused);
    }
    // Past u64 too: clap's usage error, with kiln-vmm's status for a bad
    // configuration (clap's own 2 would read as a triple fault).
    let (code, stderr) = run_vmm(&["--guest-cid", "18446744073709551616"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--guest-cid"), "{stderr}");
    assert_eq!(run_vmm(&["--help"]).0, Some(0));
    assert_eq!(files_in(dir.path()), Vec::<String>::new());
}
