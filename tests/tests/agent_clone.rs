//! Per-clone identity after a snapshot restore: the agent, snapshotted
//! while it waits for its start, is restored twice; each clone's agent
//! connects again (its vsock connection was reset), says ready, takes its
//! own identity from the host, and then draws its own random bytes, has
//! its own boot id and hostname. One boot, two restores.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kiln_protocol::{ExitStatus, Frame, Identity, Message, Workload};
use kiln_tests::{agent, AgentVm, GuestRoot};

fn api(sock: &Path, request: &str) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains(r#""ok":true"#), "{request}: {line}");
}

/// What a clone prints: 32 random bytes in hex, its boot id, its hostname.
const PROBE: &str = "busybox od -An -tx1 -N32 /dev/urandom | busybox tr -d ' \\n'; echo; \
                     cat /proc/sys/kernel/random/boot_id; cat /proc/sys/kernel/hostname";

fn run_clone(vm: &mut AgentVm, name: &str) -> Vec<String> {
    match vm.next_frame() {
        Frame::Control(Message::Ready { resumed, .. }) => assert!(resumed, "{name}"),
        other => panic!("{name}: expected ready, got {other:?}"),
    }
    vm.send(&Frame::Control(Message::Start {
        workload: Workload {
            argv: vec!["/bin/sh".into(), "-c".into(), PROBE.into()],
            ..Workload::default()
        },
        authorized_keys: vec![],
        ssh_host_key: None,
        usage_interval_ms: 1000,
        one_shot: true,
        identity: Some(Identity::from_host(Some(name.into())).unwrap()),
        published_ports: Vec::new(),
    }));
    let mut out = Vec::new();
    loop {
        match vm.next_frame() {
            Frame::Stdout(d) => out.extend(d),
            Frame::Control(Message::Exited { status, .. }) => {
                assert_eq!(status, ExitStatus::Code(0), "{name}: {}", vm.serial());
                break;
            }
            _ => {}
        }
    }
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn two_clones_of_one_snapshot_each_take_their_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let initrd = GuestRoot::new(&agent()).write(d);
    let api_sock = d.join("vm.api");
    let mut vm = AgentVm::boot_with(d, &initrd, &["--api-sock", api_sock.to_str().unwrap()]);
    match vm.next_frame() {
        Frame::Control(Message::Ready { resumed, .. }) => assert!(!resumed),
        other => panic!("expected ready, got {other:?}"),
    }
    // Snapshot the agent waiting for its start, as a warm pool would.
    api(&api_sock, r#"{"op":"pause"}"#);
    let (state, mem) = (d.join("vm.state"), d.join("vm.mem"));
    api(
        &api_sock,
        &format!(
            r#"{{"op":"snapshot","state":"{}","mem":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    drop(vm);

    let mut one = AgentVm::restore(d, "one", &state, &mem);
    let mut two = AgentVm::restore(d, "two", &state, &mem);
    let a = run_clone(&mut one, "clone-one");
    let b = run_clone(&mut two, "clone-two");
    assert_eq!(a.len(), 3, "{a:?}\n{}", one.serial());
    assert_eq!(b.len(), 3, "{b:?}\n{}", two.serial());
    assert_eq!(a[0].len(), 64, "{a:?}");
    assert_ne!(a[0], b[0], "both clones drew the same random bytes");
    assert_ne!(a[1], b[1], "both clones have one boot id");
    assert_eq!((a[2].as_str(), b[2].as_str()), ("clone-one", "clone-two"));
    for (vm, name) in [(one, "one"), (two, "two")] {
        let (status, err, console) = vm.wait(Duration::from_secs(120));
        assert_eq!(status.code(), Some(0), "{name}: {err}\n{console}");
    }
}
