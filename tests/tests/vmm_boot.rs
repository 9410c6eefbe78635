//! Boots the project's guest kernel with the static test init on real KVM.
//! One VM serves every assertion: boots are slow on emulating hosts.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kiln_image::cpio::{Meta, Writer};
use kiln_protocol::console::{find_panic_line, KERNEL_PANIC_PREFIX, READY_MARKER};
use kiln_tests::{guest_init, initramfs_with_init, kernel, VmmProcess};

// Generous: boots are slow on emulating hosts, slower still on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Both tests boot 2-vCPU guests; they take turns. On a 2-core PVM host,
/// two such guests side by side (four vCPU threads) once left a guest
/// stalled for good in early boot (an RCU stall on CPU 0, then silence),
/// which this test is not about.
static ONE_SMP_GUEST: Mutex<()> = Mutex::new(());

fn read_line(s: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn kernel_boots_with_serial_vsock_rng_smp_and_reboots_cleanly() {
    let _turn = ONE_SMP_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let uds = dir.path().join("vm.sock");
    let serial = dir.path().join("serial.log");
    let metrics = dir.path().join("metrics.json");
    // Guest-initiated connections to host port 1234 land here.
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();

    let mut vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        "2",
        "--mem-mib",
        "256",
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--serial-log",
        serial.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();

    // Guest -> host: the guest says hello, we answer, it echoes our answer.
    listener.set_nonblocking(true).unwrap();
    let (mut conn, _) = vmm
        .poll(BOOT_TIMEOUT, || listener.accept().ok())
        .unwrap_or_else(|e| panic!("guest never connected: {e}\nserial:\n{}", serial_text()));
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(read_line(&mut conn), "hello from guest");
    conn.write_all(b"hi from host\n").unwrap();
    assert_eq!(read_line(&mut conn), "hi from host");
    drop(conn);

    // Host -> guest: CONNECT through the VM's socket once the guest listens.
    vmm.poll(Duration::from_secs(120), || {
        serial_text().contains("vsock-listening 5000").then_some(())
    })
    .unwrap_or_else(|e| panic!("guest never listened: {e}\nserial:\n{}", serial_text()));
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let host_port: u32 = ok.trim()[3..].parse().unwrap();
    assert!(host_port >= 1 << 30);
    host.write_all(b"ping\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "echo:ping\n");

    let (status, stderr) = vmm.wait(BOOT_TIMEOUT);
    // The guest's tty turns "\n" into "\r\n".
    let text = serial_text().replace('\r', "");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nserial:\n{text}");
    assert!(text.contains(READY_MARKER), "{text}");
    assert!(text.contains("nproc=2\n"), "{text}");
    let hwrng = text
        .lines()
        .find_map(|l| l.strip_prefix("hwrng="))
        .unwrap_or_else(|| panic!("no hwrng line: {text}"));
    assert_eq!(hwrng.len(), 32);
    assert_ne!(hwrng, "0".repeat(32));
    assert!(
        text.contains("vsock-guest-connect ok reply=hi from host"),
        "{text}"
    );
    assert!(text.contains("vsock-host-connect ok line=ping"), "{text}");
    assert!(text.contains("KILN_TEST_DONE"), "{text}");
    // The test init printed the kernel's panic text: no panic for that.
    assert!(
        text.contains(&format!(
            "{KERNEL_PANIC_PREFIX}: printed by a guest program"
        )),
        "{text}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("host profile:"), "{stderr}");

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["exit_code"], 0);
    assert!(m["time_to_first_kvm_run_ms"].as_f64().unwrap() > 0.0);
    let ready = m["ready_marker_ms"].as_f64().unwrap();
    let first = m["first_serial_output_ms"].as_f64().unwrap();
    assert!(first <= ready && ready <= m["total_ms"].as_f64().unwrap());
    assert!(m["vm_exits"]["mmio_write"].as_u64().unwrap() > 0);
    assert!(m["vmm_overhead_kib"].as_u64().unwrap() > 0);

    // The VM's socket is gone; the test's own listener socket is untouched.
    assert!(!uds.exists());
    assert!(dir.path().join("vm.sock_1234").exists());
}

#[test]
fn bzimage_boots_through_the_64_bit_linux_protocol() {
    let _turn = ONE_SMP_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs_with_init(dir.path(), &guest_init());
    let serial = dir.path().join("serial.log");
    let bzimage = kernel().with_file_name("bzImage");
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        bzimage.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet -- bench",
        // With one vCPU this boot stalls on PVM hosts after the core
        // initcalls (see the project notes); two boot.
        "--vcpus",
        "2",
        "--serial-log",
        serial.to_str().unwrap(),
    ]);
    let (status, stderr) = vmm.wait(BOOT_TIMEOUT);
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nserial:\n{text}");
    assert!(text.contains(READY_MARKER), "{text}");
    assert!(stderr.contains("Linux64 entry"), "{stderr}");
}

/// A guest kernel panic (here: an initramfs with no init at all) ends
/// kiln-vmm with status 5 and the kernel's panic line as its reason, not
/// with the clean-reset 0 that `panic=-1 reboot=k` makes of it. That a
/// guest *program* printing the panic text does not count is asserted by
/// the first test: its init prints that text and the VM still exits 0.
#[test]
fn guest_kernel_panic_exits_5_with_its_panic_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new(Vec::new());
    w.dir("dev", Meta::root(0o755)).unwrap();
    w.char_device("dev/console", Meta::root(0o600), 5, 1)
        .unwrap();
    let initrd = dir.path().join("no-init.cpio");
    std::fs::write(&initrd, w.finish().unwrap()).unwrap();
    let serial = dir.path().join("serial.log");
    let metrics = dir.path().join("metrics.json");
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--serial-log",
        serial.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let (status, stderr) = vmm.wait(BOOT_TIMEOUT);
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(status.code(), Some(5), "stderr: {stderr}\nserial:\n{text}");
    // Added on every host, whatever the base command line.
    assert!(stderr.contains(" kiln_pvpanic"), "{stderr}");
    let line = find_panic_line(&text).unwrap_or_else(|| panic!("no panic line:\n{text}"));
    let reason = format!("kiln-vmm: guest kernel panicked: {line}\n");
    assert!(
        stderr.ends_with(&reason),
        "{reason:?} not last in: {stderr}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["exit_code"], 5);
    assert_eq!(
        m["exit_reason"].as_str().unwrap(),
        reason.trim_end().trim_start_matches("kiln-vmm: ")
    );
}
