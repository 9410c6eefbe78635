//! The built initramfs boots on kiln-vmm (real KVM): a script agent as
//! /init lists the image's files from inside the guest, proving the
//! whiteouts were applied and the run config is where the agent looks.

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
    for line in [
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
