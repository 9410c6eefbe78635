//! A kiln-vmm started directly, as root, jails itself: its own namespaces
//! and uid, seccomp filters on, and a cgroup that holds it to its CPU share.
//! One VM serves every assertion; it need not finish booting.

use std::time::Duration;

use kiln_tests::jail::{cgroup_limits, jailed_child, nr_throttled, uid};
use kiln_tests::{guest_init, initramfs_with_init, kernel, VmmProcess};

#[test]
fn a_booting_guest_under_a_small_cpu_share_is_throttled_in_its_jail() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let vmdir = dir.path().join("vm");
    std::fs::create_dir(&vmdir).unwrap();
    let uds = vmdir.join("vm.sock");
    let mut vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--cpu-millicores",
        "100",
        "--die-with-parent",
    ]);
    let supervisor = vmm.pid() as u32;
    let child = vmm
        .poll(Duration::from_secs(60), || {
            // The child is the VMM once it has dropped root.
            jailed_child(supervisor).filter(|c| uid(*c) != 0)
        })
        .unwrap_or_else(|e| panic!("no jailed VMM: {e}"));
    let files = [kernel(), initrd.clone(), vmdir.clone()];
    kiln_tests::jail::assert_jailed(child, &files);
    let (cpu, memory) = cgroup_limits(child);
    assert_eq!(cpu, "10000 100000");
    assert_eq!(memory, (256 + 64 + 16) << 20);

    // The guest kernel's boot burns CPU: at a tenth of a CPU the cgroup
    // throttles it (a count, not a timing).
    vmm.poll(Duration::from_secs(300), || {
        (nr_throttled(child) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("never throttled: {e}"));
    // Filters are on by default (2: SECCOMP_MODE_FILTER).
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");

    // SAFETY: signalling the supervisor we started; it forwards SIGTERM.
    unsafe { libc::kill(supervisor as i32, libc::SIGTERM) };
    let (st, stderr) = vmm.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!uds.exists(), "the VMM's socket is gone");
}
