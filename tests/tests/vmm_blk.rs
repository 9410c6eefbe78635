//! virtio-blk on real KVM: one boot of a static guest program with a
//! read-only drive (/dev/vda) and a writable one (/dev/vdb).

use std::time::Duration;

use kiln_tests::{initramfs_with_init, kernel, static_guest_binary, VmmProcess};

// Generous: boots are slow on emulating hosts, slower still on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const DRIVE_SIZE: usize = 64 * 1024;
/// What kiln-test-blk writes on /dev/vdb: 4 KiB at 8 KiB.
const WRITE_OFFSET: usize = 8192;
const WRITE_LEN: usize = 4096;

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Bytes no partition table parser recognises, different per `seed`.
fn contents(seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut data: Vec<u8> = (0..DRIVE_SIZE)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    // No MBR signature.
    data[510] = 0;
    data
}

#[test]
fn guest_reads_both_drives_cannot_write_the_read_only_one_and_syncs_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let init = static_guest_binary("kiln-tests", "kiln-test-blk");
    let initrd = initramfs_with_init(dir.path(), &init);
    let ro = dir.path().join("ro.img");
    let rw = dir.path().join("rw.img");
    let ro_data = contents(1);
    let rw_data = contents(2);
    std::fs::write(&ro, &ro_data).unwrap();
    std::fs::write(&rw, &rw_data).unwrap();
    let serial = dir.path().join("serial.log");
    let metrics = dir.path().join("metrics.json");

    let vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        "2",
        "--mem-mib",
        "256",
        "--drive-ro",
        ro.to_str().unwrap(),
        "--drive",
        rw.to_str().unwrap(),
        "--serial-log",
        serial.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let (status, stderr) = vmm.wait(BOOT_TIMEOUT);
    let text = std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .replace('\r', "");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nserial:\n{text}");
    assert!(text.contains("KILN_TEST_DONE"), "{text}");
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        )
    };

    // Both drives read back exactly, in the order given.
    has(&format!(
        "vda bytes={DRIVE_SIZE} fnv={:016x}",
        fnv1a(&ro_data)
    ));
    has(&format!(
        "vdb bytes={DRIVE_SIZE} fnv={:016x}",
        fnv1a(&rw_data)
    ));
    // The guest sees which is read-only, and each drive's id.
    has("vda ro=1");
    has("vdb ro=0");
    has("vda serial=kiln-vda");
    has("vdb serial=kiln-vdb");

    // A write to the read-only drive fails in the guest and changes nothing.
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("vda write refused "))
        .unwrap_or_else(|| panic!("write to vda not refused:\n{text}"));
    assert!(
        ["EROFS", "EPERM", "EACCES", "EIO"].contains(&refused),
        "{refused}"
    );
    assert_eq!(std::fs::read(&ro).unwrap(), ro_data);

    // The synced write to the writable drive is in the host file.
    let block: Vec<u8> = (0..WRITE_LEN).map(|i| (i * 7 % 256) as u8).collect();
    has(&format!("vdb write ok fnv={:016x}", fnv1a(&block)));
    let after = std::fs::read(&rw).unwrap();
    let mut expected = rw_data.clone();
    expected[WRITE_OFFSET..WRITE_OFFSET + WRITE_LEN].copy_from_slice(&block);
    assert!(after == expected, "rw.img does not hold the guest's write");

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let drives = m["drives"].as_array().expect("drives in metrics");
    assert_eq!(drives.len(), 2, "{m}");
    assert_eq!(drives[0]["read_only"], true);
    assert!(drives[0]["bytes_read"].as_u64().unwrap() >= DRIVE_SIZE as u64);
    assert_eq!(drives[0]["bytes_written"], 0);
    assert!(drives[1]["bytes_written"].as_u64().unwrap() >= WRITE_LEN as u64);
    assert!(drives[1]["flushes"].as_u64().unwrap() >= 1, "{m}");
}

#[test]
fn a_drive_whose_size_is_not_whole_sectors_is_refused_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let initrd = dir.path().join("unused.cpio");
    std::fs::write(&initrd, b"").unwrap();
    let (code, stderr) = kiln_tests::run_vmm(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--drive",
        odd.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "drive {} is 1000 bytes, not a multiple of 512",
            odd.display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}
