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

/// What the scratch-disk run writes, in MiB: more than the VM's RAM.
const FILL_MIB: u64 = 600;

/// Writes FILL_MIB to /root/fill in 4 MiB blocks with O_DIRECT from one
/// buffer, each block stamped with its index, then reads three blocks back
/// and prints the file size, the bad blocks, the guest's RAM and what the
/// scratch disk (vdb) was sent. O_DIRECT because buffered writes cost
/// emulated guest kernel work per 4 KiB page on a PVM host (~20 ms each
/// through overlayfs and ext4, docs/benchmarks.md "A real image"), and so
/// does filling a buffer from /dev/zero; direct writes of one buffer cost
/// ~0.1 s per MiB there, and prove the bytes reached the disk, not RAM.
const FILL_SCRIPT: &str = r#"
import mmap, os
MIB = 1 << 20
blocks = FILL_MIB // 4
buf = mmap.mmap(-1, 4 * MIB)
fd = os.open("/root/fill", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
for i in range(blocks):
    buf[0:8] = i.to_bytes(8, "little")
    os.write(fd, buf)
os.fsync(fd)
os.close(fd)
fd = os.open("/root/fill", os.O_RDONLY | os.O_DIRECT)
bad = 0
for i in (0, blocks // 2, blocks - 1):
    os.preadv(fd, [buf], i * 4 * MIB)
    bad += buf[0:8] != i.to_bytes(8, "little")
os.close(fd)
mem = [l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal:")][0]
written = int(open("/sys/block/vdb/stat").read().split()[6]) * 512
print("filled", os.stat("/root/fill").st_size, "bad", bad, "memtotal_kib", mem, "vdb_written", written)
"#;

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
/// disk, more than the VM's RAM; the disk's file is gone once the run
/// ends. An
/// image too big for the initramfs path at the memory asked for is refused
/// before any VM boots, naming the figure and `--mem`.
#[test]
fn python_image_scratch_disk_takes_writes_and_initramfs_memory_is_checked() {
    let home = Home::new();
    let layout = format!("{}:py", python_layout().display());
    let fill = FILL_SCRIPT.replace("FILL_MIB", &FILL_MIB.to_string());
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
            "python3",
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
    let fields: Vec<&str> = out.split_whitespace().collect();
    let figure = |name: &str| -> u64 {
        let at = fields.iter().position(|f| *f == name);
        at.and_then(|i| fields.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    };
    let wanted = FILL_MIB << 20;
    assert_eq!(figure("filled"), wanted, "{out}");
    assert_eq!(figure("bad"), 0, "{out}");
    // The file cannot have been held in the guest's RAM: it is larger, and
    // the scratch disk was sent at least its bytes.
    assert!(figure("memtotal_kib") * 1024 < wanted, "{out}");
    assert!(figure("vdb_written") >= wanted, "{out}");
    home.assert_clean();
}
