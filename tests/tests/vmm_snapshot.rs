//! Snapshot and restore of a real guest (the project's kernel and the
//! static test init counting on its console): the count goes on after
//! snapshot, kill and restore, a tmpfs file survives, vsock works again,
//! and two clones of one snapshot run at once without touching its memory
//! file. One boot serves every assertion.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_tests::{guest_init, initramfs_with_init, kernel, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const MEM_MIB: &str = "128";

/// Answers each guest connection on `<uds>_1234` with `pong-<name>`.
fn serve_vsock(uds: &Path, name: &'static str) {
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {}
            let _ = conn.write_all(format!("pong-{name}\n").as_bytes());
        }
    });
}

fn api(sock: &Path, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true, "{request}: {reply}");
    reply
}

/// (count, file, vsock) of each complete `count=` line.
fn counts(serial: &str) -> Vec<(u64, String, String)> {
    serial
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("count=")?;
            let mut words = rest.split(' ');
            let n = words.next()?.parse().ok()?;
            let file = words.next()?.strip_prefix("file=")?.to_string();
            let vsock = words.next()?.strip_prefix("vsock=")?.to_string();
            Some((n, file, vsock))
        })
        .collect()
}

fn digest(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

struct Clone {
    vmm: VmmProcess,
    serial: PathBuf,
    api: PathBuf,
}

fn restore(dir: &Path, name: &'static str, state: &Path, mem: &Path) -> Clone {
    // Each jailed VMM owns its sockets directory.
    let dir = dir.join(name);
    std::fs::create_dir(&dir).unwrap();
    let uds = dir.join(format!("{name}.sock"));
    serve_vsock(&uds, name);
    let serial = dir.join(format!("{name}.log"));
    let api = dir.join(format!("{name}.api"));
    let vmm = VmmProcess::spawn(&[
        "--restore",
        state.to_str().unwrap(),
        "--mem-file",
        mem.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--serial-log",
        serial.to_str().unwrap(),
        "--api-sock",
        api.to_str().unwrap(),
        "--die-with-parent",
    ]);
    Clone { vmm, serial, api }
}

#[test]
fn a_counting_guest_counts_on_in_two_clones_after_snapshot_kill_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let initrd = initramfs_with_init(d, &guest_init());
    let uds = d.join("orig.sock");
    serve_vsock(&uds, "orig");
    let serial = d.join("orig.log");
    let sock = d.join("orig.api");
    let mut vmm = VmmProcess::spawn(&[
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet -- snap",
        "--vcpus",
        "2",
        "--mem-mib",
        MEM_MIB,
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--serial-log",
        serial.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--die-with-parent",
    ]);
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    // Counting, with the tmpfs file and vsock answered.
    vmm.poll(BOOT_TIMEOUT, || {
        counts(&text(&serial))
            .iter()
            .any(|(_, f, v)| f == "before-snapshot" && v == "pong-orig")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("guest never counted: {e}\nserial:\n{}", text(&serial)));

    api(&sock, r#"{"op":"pause"}"#);
    let (state, mem) = (d.join("vm.state"), d.join("vm.mem"));
    api(
        &sock,
        &format!(
            r#"{{"op":"snapshot","state":"{}","mem":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    let before = counts(&text(&serial)).last().map(|c| c.0).unwrap();
    // Killed, not stopped: a snapshot must not need the original.
    drop(vmm);
    let mem_digest = digest(&mem);

    let mut clones = [
        restore(d, "c1", &state, &mem),
        restore(d, "c2", &state, &mem),
    ];
    for (name, clone) in ["c1", "c2"].iter().zip(clones.iter_mut()) {
        let pong = format!("pong-{name}");
        let seen = clone
            .vmm
            .poll(BOOT_TIMEOUT, || {
                let c = counts(&text(&clone.serial));
                c.iter().any(|(_, _, v)| *v == pong).then_some(c)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{name} never reached the host over vsock: {e}\nserial:\n{}",
                    text(&clone.serial)
                )
            });
        let first = seen[0].0;
        assert!(
            first > before && first <= before + 2,
            "{name}: the count went from {before} to {first}"
        );
        assert!(
            seen.iter().all(|(_, f, _)| f == "before-snapshot"),
            "{name}: {seen:?}"
        );
        let metrics = api(&clone.api, r#"{"op":"metrics"}"#);
        assert_eq!(metrics["metrics"]["paused"], false);
    }
    for clone in clones {
        api(&clone.api, r#"{"op":"stop"}"#);
        let (status, stderr) = clone.vmm.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(143), "{stderr}");
    }
    assert_eq!(digest(&mem), mem_digest, "the memory file was written to");
}
