//! `kiln run` of a real distribution image: Debian bookworm minbase with
//! python3 (built with debootstrap + umoci by scripts/build-python-image.sh,
//! cached outside the repository), through a real registry on 127.0.0.1,
//! real KVM and the real agent. Each VM serves several assertions: boots
//! of this image are slow where KVM emulates the guest kernel.

mod common;

use common::{finish, Home};

use std::time::Duration;

use kiln_tests::images::python_layout;
use kiln_tests::registry::Registry;

/// Generous: on an emulating, busy host this image took minutes to build
/// (several builds side by side), a minute to boot and 2-3 minutes for
/// python3 to import sqlite3 and ssl.
const LIMIT: Duration = Duration::from_secs(1800);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// What the scratch-disk run writes, in MiB (see its test).
const FILL_MIB: u64 = 4;

/// After python: writes under /tmp and /root and over an image file (the
/// overlay's upper takes them), and a write to the read-only lower disk.
const OVERLAY_CHECKS: &str = r#"
echo tmp-ok > /tmp/t && echo "tmp $(cat /tmp/t)"
echo root-ok > /root/r && echo "root $(cat /root/r)"
echo changed > /etc/debian_version && echo "etc $(cat /etc/debian_version)"
grep -q '^overlay / overlay ' /proc/mounts && echo "root is an overlay"
echo "vda ro $(cat /sys/block/vda/ro)"
if (echo x > /dev/vda) 2>/dev/null; then echo "lower written"; else echo "lower refused"; fi
"#;

/// The python image from a registry with the default `--mem`: auto picks
/// the block root, python3 imports sqlite3 and ssl and prints 42, files
/// written under /tmp, /root and over the image land in the overlay, and
/// the root disk underneath refuses writes.
#[test]
fn python_image_from_a_registry_runs_on_a_block_root() {
    let home = Home::new();
    let layout = python_layout();
    let registry = Registry::start();
    registry.push(&layout, "py", "kiln/python", "");
    let image = format!("{}/kiln/python:py", registry.addr);
    let script =
        format!("python3 -c 'import sqlite3, ssl; print(6*7)' || exit 9\n{OVERLAY_CHECKS}");
    let run = home
        .kiln(&["run", &image, "--", "sh", "-c", &script])
        .spawn()
        .expect("spawn kiln");
    let out = finish(run, LIMIT);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    assert!(stdout.starts_with("42\n"), "{stdout}");
    for line in [
        "tmp tmp-ok",
        "root root-ok",
        "etc changed",
        "root is an overlay",
        "vda ro 1",
        "lower refused",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    home.assert_clean();
}

/// What the python image's workload writes goes to a `--disk` scratch
/// disk (so it could write more than the VM's RAM; see FILL_MIB for why
/// it writes less here); the disk's file is gone once the run ends. An
/// image too big for the initramfs path at the memory asked for is refused
/// before any VM boots, naming the figure and `--mem`.
#[test]
fn python_image_scratch_disk_takes_writes_and_initramfs_memory_is_checked() {
    let home = Home::new();
    let layout = format!("{}:py", python_layout().display());
    // The issue asks for 600 MB with 512 MiB of RAM. On the PVM host this
    // was written on, buffered writes through the overlay onto the ext4
    // scratch disk ran at ~60-190 KB/s: emulated guest kernel work per page
    // (docs/benchmarks.md, "A real image"), not the device. 600 MB cannot
    // finish in a test's time there. FILL_MIB is the largest size that kept
    // the run near 2 minutes; raise it to 600 where guest kernel code runs
    // natively.
    let fill = format!(
        "dd if=/dev/zero of=/root/fill bs=1M count={FILL_MIB} 2>/dev/null && sync \
         && echo \"filled $(stat -c %s /root/fill)\""
    );
    let disk = home
        .kiln(&[
            "run",
            "--disk",
            "1G",
            "--mem",
            "512",
            "--oci-layout",
            &layout,
            "--",
            "sh",
            "-c",
            &fill,
        ])
        .spawn()
        .expect("spawn kiln");
    let small = home
        .kiln(&[
            "run",
            "--rootfs",
            "initramfs",
            "--mem",
            "64",
            "--oci-layout",
            &layout,
            "--",
            "true",
        ])
        .spawn()
        .expect("spawn kiln");

    let small = finish(small, LIMIT);
    let err = text(&small.stderr);
    assert_eq!(small.status.code(), Some(125), "{err}");
    // One line with the figures and the flag (build progress may precede it).
    let refusal = err.lines().last().unwrap_or_default();
    assert!(
        refusal.starts_with("kiln: ")
            && refusal.contains("64 MiB is too little for this image")
            && refusal.contains("MiB with --mem"),
        "{err}"
    );

    let disk = finish(disk, LIMIT);
    let (out, err) = (text(&disk.stdout), text(&disk.stderr));
    assert_eq!(
        disk.status.code(),
        Some(0),
        "stderr:\n{err}\nstdout:\n{out}"
    );
    assert_eq!(out, format!("filled {}\n", FILL_MIB << 20));
    home.assert_clean();
}
