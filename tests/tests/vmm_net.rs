//! virtio-net on real KVM: a network namespace of the test's own with a
//! TAP in it (10.77.0.1/24), a jailed kiln-vmm started there with
//! `--net-tap` (the jail attaches to the TAP before it enters its own,
//! empty, network namespace), and a
//! static guest program that brings eth0 up as 10.77.0.2 and exchanges
//! 64 KiB each way over TCP with a listener the test runs in the
//! namespace. The namespace, and the TAP with it, are removed by name
//! whatever happens.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use kiln_tests::netns::NetNs;
use kiln_tests::{initramfs_with_init, kernel, static_guest_binary, VmmProcess};

// Generous: boots are slow on emulating hosts, slower still on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// What kiln-test-net sends and expects: 64 KiB each way.
const PAYLOAD: usize = 64 * 1024;
const TAP: &str = "ktap0";
const MAC: &str = "02:00:00:00:77:02";

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The test's namespace, with a TAP in it.
fn namespace_with_tap() -> NetNs {
    let ns = NetNs::new("net-test");
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    ns
}

/// The host side: accept one connection, read the guest's bytes to their
/// end, answer with their FNV-1a and a pattern of our own.
fn serve(listener: TcpListener) -> Result<u64, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    let theirs = fnv1a(&got);
    let ours = host_pattern();
    stream
        .write_all(format!("fnv={theirs:016x} bytes={}\n", got.len()).as_bytes())
        .and_then(|_| stream.write_all(&ours))
        .map_err(|e| format!("write: {e}"))?;
    Ok(theirs)
}

fn host_pattern() -> Vec<u8> {
    (0..PAYLOAD).map(|i| (i * 13 % 253) as u8).collect()
}

#[test]
fn guest_exchanges_tcp_with_a_listener_behind_its_tap() {
    let dir = tempfile::tempdir().unwrap();
    let init = static_guest_binary("kiln-tests", "kiln-test-net");
    let initrd = initramfs_with_init(dir.path(), &init);
    let serial = dir.path().join("serial.log");
    let metrics = dir.path().join("metrics.json");
    let ns = namespace_with_tap();
    let server = ns.spawn(|| {
        let listener = TcpListener::bind("10.77.0.1:7777").map_err(|e| e.to_string())?;
        serve(listener)
    });

    let vmm = VmmProcess::spawn_in_netns(
        &ns.name,
        &[
            "--kernel",
            kernel().to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem-mib",
            "256",
            "--net-tap",
            TAP,
            "--net-mac",
            MAC,
            "--serial-log",
            serial.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
            "--die-with-parent",
        ],
    );
    let (status, stderr) = vmm.wait(BOOT_TIMEOUT);
    let text = std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .replace('\r', "");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}\nserial:\n{text}");
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        )
    };
    has(&format!("eth0 address={MAC}"));
    has("eth0 up");
    has("net connected");
    let guest: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 % 251) as u8).collect();
    let guest_fnv = fnv1a(&guest);
    has(&format!("net sent bytes={PAYLOAD} fnv={guest_fnv:016x}"));
    // What the host received is what the guest sent, and back.
    has(&format!(
        "net host said fnv={guest_fnv:016x} bytes={PAYLOAD}"
    ));
    has(&format!(
        "net got bytes={PAYLOAD} fnv={:016x}",
        fnv1a(&host_pattern())
    ));
    assert_eq!(server.join().unwrap(), Ok(guest_fnv));

    // The card's counters: at least the payloads, each way.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let net = &m["net"];
    assert_eq!(net["tap"], TAP, "{m}");
    assert!(net["tx_bytes"].as_u64().unwrap() >= PAYLOAD as u64, "{m}");
    assert!(net["rx_bytes"].as_u64().unwrap() >= PAYLOAD as u64, "{m}");
    assert_eq!(net["tx_dropped"], 0, "{m}");
    drop(ns);
}

#[test]
fn bad_net_flags_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("unused.cpio");
    std::fs::write(&initrd, b"").unwrap();
    let k = kernel();
    let base = [
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ];
    for (extra, says) in [
        (
            &["--net-tap", TAP, "--net-mac", "01:00:5e:00:00:01"][..],
            "invalid MAC address \"01:00:5e:00:00:01\"",
        ),
        (
            &["--no-jail", "--net-tap", TAP, "--net-mac", "02:00:00:00:00"][..],
            "invalid MAC address",
        ),
        (&["--no-jail", "--net-tap", "a/b"][..], "TAP name \"a/b\""),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (code, stderr) = kiln_tests::run_vmm(&args);
        assert_eq!(code, Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("WARNING: --no-jail"))
            .collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
    }
}
