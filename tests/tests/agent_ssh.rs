//! The agent's SSH server in a real micro-VM, reached with the stock
//! OpenSSH client through the host-side TCP→vsock forwarder: exec with
//! output, environment and exit status, an interactive PTY session, scp in
//! and out, sftp, and a wrong key refused. One VM serves every assertion.

use std::io::Read;
use std::time::{Duration, Instant};

use kiln_protocol::forward::Forwarder;
use kiln_protocol::{Frame, Message, Workload, SSH_PORT};
use kiln_tests::openssh::{keygen, text, Client};
use kiln_tests::{agent, AgentVm, GuestRoot};

#[test]
fn openssh_client_reaches_the_agent_over_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "granted");
    let wrong = keygen(dir.path(), "stranger");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();

    let initrd = GuestRoot::new(&agent())
        .file(
            "kiln/config.json",
            br#"{"Cmd":["/bin/sh","-c","echo workload-done"],"Env":["FROM_IMAGE=1"]}"#,
        )
        .write(dir.path());
    let mut vm = AgentVm::boot(dir.path(), &initrd);
    assert!(matches!(
        vm.next_frame(),
        Frame::Control(Message::Ready { .. })
    ));
    let start = Frame::Control(Message::Start {
        workload: Workload::default(),
        authorized_keys: vec![public],
        ssh_host_key: None,
        usage_interval_ms: 1000,
        one_shot: false,
        identity: None,
        published_ports: Vec::new(),
    });
    vm.send(&start);
    // The workload ends at once; the VM must stay up for SSH.
    loop {
        if let Frame::Control(Message::Exited { .. }) = vm.next_frame() {
            break;
        }
    }

    let fwd = Forwarder::start("127.0.0.1:0", vm.uds(), SSH_PORT, |e| {
        eprintln!("forwarder: {e}")
    })
    .unwrap();
    let port = fwd.local_addr().port();

    // Connect-to-first-byte: the server's version line through the forwarder.
    let t = Instant::now();
    let mut probe = std::net::TcpStream::connect(fwd.local_addr()).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut banner = [0u8; 8];
    probe.read_exact(&mut banner).unwrap();
    let first_byte = t.elapsed();
    assert_eq!(&banner, b"SSH-2.0-");
    drop(probe);

    let client = Client::new(&key, port, "root");
    let t = Instant::now();
    let out = client.ssh(&[], "uname -a", b"");
    let uname_time = t.elapsed();
    assert!(
        out.status.success() && text(&out.stdout).starts_with("Linux kiln "),
        "{out:?}\nserial:\n{}",
        vm.serial()
    );
    eprintln!("ssh connect-to-first-byte {first_byte:?}; `ssh uname -a` {uname_time:?}");

    let out = client.ssh(&[], "exit 7", b"");
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    let out = client.ssh(
        &[],
        "echo $HOME:$USER:$LOGNAME:$SHELL:$FROM_IMAGE:$PATH; pwd; cat; echo err >&2",
        b"from-stdin\n",
    );
    assert_eq!(
        text(&out.stdout),
        "/root:root:root:/bin/sh:1:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         /root\nfrom-stdin\n",
        "{out:?}"
    );
    assert_eq!(text(&out.stderr), "err\n");

    let out = client.ssh(&["-tt"], "", b"echo pty-ok; tty; exit\n");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(shown.contains("pty-ok\r\n"), "{shown:?}");
    assert!(shown.contains("/dev/pts/"), "{shown:?}");

    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("payload.bin");
    std::fs::write(&local, &payload).unwrap();
    let out = client.scp(local.to_str().unwrap(), "root@127.0.0.1:/tmp/in.bin");
    assert!(out.status.success(), "scp in: {out:?}\n{}", vm.serial());
    let back = dir.path().join("back.bin");
    let out = client.scp("root@127.0.0.1:/tmp/in.bin", back.to_str().unwrap());
    if !out.status.success() {
        let again = client.scp_with(
            &["-v"],
            "root@127.0.0.1:/tmp/in.bin",
            back.to_str().unwrap(),
        );
        panic!(
            "scp out: {out:?}\nwith -v: {again:?}\nserial:\n{}",
            vm.serial()
        );
    }
    assert!(
        std::fs::read(&back).unwrap() == payload,
        "scp round trip differs"
    );

    let batch = format!(
        "mkdir d\nput {} d/f\nrename d/f d/moved\nls d\n",
        local.display()
    );
    let out = client.sftp(&batch);
    assert!(out.status.success(), "sftp: {out:?}\n{}", vm.serial());
    assert!(text(&out.stdout).contains("d/moved"), "{out:?}");

    let stranger = Client::new(&wrong, port, "root");
    let out = stranger.ssh(&[], "true", b"");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(text(&out.stderr).contains("Permission denied"), "{out:?}");

    drop(fwd);
    let bye = Frame::Control(Message::Shutdown { grace_ms: 1000 });
    vm.send(&bye);
    let (status, err, serial) = vm.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{err}\n{serial}");
}
