//! The built initramfs boots on kiln-vmm (real KVM): a script agent as
//! /init lists the image's files from inside the guest, proving the
//! whiteouts were applied and the run config is where the agent looks, and
//! that large files (page-aligned in the archive, handed to the page cache
//! as they are by the tuned guest kernel), hardlinks, set-uid bits and
//! symlinks arrive intact.

use kiln_tests::{bin, kernel, VmmProcess};
use std::process::Command;
use std::time::Duration;

const AGENT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
echo "kiln-boot-begin"
for p in /etc/keep /etc/new /etc/drop /gone /kiln/config.json /dev/console; do
  if [ -e $p ]; then echo "present $p"; else echo "absent $p"; fi
done
echo "hostname $($bb cat /etc/hostname)"
$bb sha256sum /data/big /data/big-link /data/suid /data/small /bin/busybox
$bb stat -c 'stat %n %a %h %s' /data/big /data/big-link /data/suid /data/small
echo "link $($bb readlink /data/bb-link)"
echo "kiln-boot-end"
$bb reboot -f
"#;

#[test]
fn built_initramfs_boots_and_shows_the_flattened_tree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let st = Command::new("bash")
        .args(["-euc", &format!(
            "cd {d}; umoci init --layout oci; umoci new --image oci:t; \
             umoci unpack --image oci:t b >/dev/null; r=b/rootfs; \
             mkdir -p $r/bin $r/etc $r/gone; cp /bin/busybox $r/bin/; \
             echo booted > $r/etc/hostname; echo k > $r/etc/keep; echo d > $r/etc/drop; echo g > $r/gone/g; \
             mkdir $r/data; head -c 300001 /dev/urandom > $r/data/big; ln $r/data/big $r/data/big-link; \
             head -c 65536 /dev/urandom > $r/data/suid; chmod 4755 $r/data/suid; \
             head -c 16384 /dev/urandom > $r/data/small; ln -s ../bin/busybox $r/data/bb-link; \
             (cd $r && sha256sum data/big data/big-link data/suid data/small bin/busybox) > {d}/sums; \
             umoci repack --image oci:t b; rm -rf $r/etc/drop $r/gone; echo n > $r/etc/new; \
             umoci repack --image oci:t b"
        )])
        .status()
        .unwrap();
    assert!(st.success(), "umoci image");
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, AGENT).unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    let out = Command::new(bin("kiln"))
        .args(["image", "build", "--oci-layout"])
        .arg(format!("{d}/oci:t"))
        .arg("--agent")
        .arg(&agent)
        .arg("-o")
        .arg(&initrd)
        .env("KILN_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let serial = dir.path().join("serial.log");
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem-mib",
        "256",
        "--serial-log",
        serial.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let (status, stderr) = vmm.wait(Duration::from_secs(300));
    let text = std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .replace('\r', "");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nserial:\n{text}");
    let begin = text
        .find("kiln-boot-begin")
        .unwrap_or_else(|| panic!("agent never ran:\n{text}"));
    let report = &text[begin..];
    // The guest's checksums are the host's, file by file.
    let sums = std::fs::read_to_string(dir.path().join("sums")).unwrap();
    assert_eq!(sums.lines().count(), 5);
    for line in sums.lines() {
        let (sum, path) = line.split_once("  ").unwrap();
        let guest = format!("{sum}  /{path}");
        assert!(report.contains(&guest), "missing {guest:?} in:\n{report}");
    }
    for line in [
        "stat /data/big 644 2 300001",
        "stat /data/big-link 644 2 300001",
        "stat /data/suid 4755 1 65536",
        "stat /data/small 644 1 16384",
        "link ../bin/busybox",
        "present /etc/keep",
        "present /etc/new",
        "absent /etc/drop",
        "absent /gone",
        "present /kiln/config.json",
        "present /dev/console",
        "hostname booted",
        "kiln-boot-end",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
}

/// A block-root boot whose disk is missing: the real agent (PID 1) says
/// why on the console with its fatal marker, and kiln-vmm reports an init
/// failure (6) instead of hanging or panicking the guest.
#[test]
fn block_root_without_its_disk_fails_with_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let st = Command::new("bash")
        .args([
            "-euc",
            &format!(
                "cd {d}; umoci init --layout oci; umoci new --image oci:t; \
             umoci unpack --image oci:t b >/dev/null; mkdir -p b/rootfs/bin; \
             cp /bin/busybox b/rootfs/bin/; umoci repack --image oci:t b"
            ),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "umoci image");
    let initrd = dir.path().join("boot.cpio");
    let out = Command::new(bin("kiln"))
        .args(["image", "build", "--rootfs", "block", "--oci-layout"])
        .arg(format!("{d}/oci:t"))
        .arg("--agent")
        .arg(kiln_tests::agent())
        .arg("-o")
        .arg(&initrd)
        .env("KILN_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("boot.cpio.erofs").is_file());

    let serial = dir.path().join("serial.log");
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet kiln.root=vda",
        "--mem-mib",
        "256",
        "--serial-log",
        serial.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let (status, stderr) = vmm.wait(Duration::from_secs(300));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(status.code(), Some(6), "stderr: {stderr}\nserial:\n{text}");
    assert!(
        text.contains("KILN_AGENT_FATAL block root: device /dev/vda did not appear"),
        "{text}"
    );
}
