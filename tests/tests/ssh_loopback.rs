//! The agent's SSH server on this host, with no VM: the same server code
//! fed TCP connections from loopback instead of vsock, and the stock
//! OpenSSH client against it. This covers the SSH behaviour where KVM is
//! slow or missing; `agent_ssh` covers the guest and the vsock path.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::process::Command;

use kiln_tests::openssh::{keygen, text, Client};

/// The user this test runs as (sessions run as the login user).
fn me() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    text(&out.stdout).trim().to_string()
}

#[test]
fn openssh_client_against_the_agent_server_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "granted");
    let wrong = keygen(dir.path(), "stranger");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();

    // The host picks the host key (so it can pin it); the client checks it.
    let host_key = keygen(dir.path(), "host");
    let host_private = std::fs::read_to_string(&host_key).unwrap();
    let host_public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    kiln_agent::ssh::start_on(&[public], Some(&host_private), move || {
        let (s, _) = listener.accept()?;
        Ok(File::from(OwnedFd::from(s)))
    })
    .unwrap();

    let user = me();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_public}")).unwrap();
    let client = Client::new(&key, port, &user).pinned(&known_hosts);
    let out = client.ssh(&[], "uname -s; echo $USER:$LOGNAME; cat", b"in\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), format!("Linux\n{user}:{user}\nin\n"));

    // Far more input than the channel's message queue holds.
    let big = vec![b'x'; 8 << 20];
    let out = client.ssh(&[], "wc -c", &big);
    assert_eq!(text(&out.stdout).trim(), (8 << 20).to_string(), "{out:?}");

    let out = client.ssh(&[], "echo oops >&2; exit 7", b"");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(text(&out.stderr), "oops\n");

    let out = client.ssh(&["-tt"], "", b"echo pty-ok; tty; stty size; exit\n");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(shown.contains("pty-ok\r\n"), "{shown:?}");
    assert!(shown.contains("/dev/pts/"), "{shown:?}");

    // A command killed by a signal is reported as such (ssh exits 255).
    let out = client.ssh(&[], "kill -TERM $$", b"");
    assert_ne!(out.status.code(), Some(0), "{out:?}");

    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("payload.bin");
    std::fs::write(&local, &payload).unwrap();
    let remote_dir = dir.path().join("remote");
    std::fs::create_dir(&remote_dir).unwrap();
    let remote = remote_dir.join("in.bin");
    let out = client.scp(
        local.to_str().unwrap(),
        &client.remote(remote.to_str().unwrap()),
    );
    assert!(out.status.success(), "scp in: {out:?}");
    assert!(std::fs::read(&remote).unwrap() == payload, "scp in differs");
    let back = dir.path().join("back.bin");
    let out = client.scp(
        &client.remote(remote.to_str().unwrap()),
        back.to_str().unwrap(),
    );
    assert!(out.status.success(), "scp out: {out:?}");
    assert!(std::fs::read(&back).unwrap() == payload, "scp out differs");

    let d = remote_dir.join("d");
    let batch = format!(
        "mkdir {d}\nput {l} {d}/f\nrename {d}/f {d}/moved\nls {d}\nrm {d}/moved\nrmdir {d}\n",
        d = d.display(),
        l = local.display()
    );
    let out = client.sftp(&batch);
    assert!(out.status.success(), "sftp: {out:?}");
    assert!(text(&out.stdout).contains("/d/moved"), "{out:?}");
    assert!(!d.exists());

    let out = Client::new(&wrong, port, &user).ssh(&[], "true", b"");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(text(&out.stderr).contains("Permission denied"), "{out:?}");
}

/// Accepts any host key (the test's server is its own).
struct AnyHostKey;

impl russh::client::Handler for AnyHostKey {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Reads the channel until its output contains `want`.
async fn read_until(ch: &mut russh::Channel<russh::client::Msg>, seen: &mut String, want: &str) {
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !seen.contains(want) {
            match ch.wait().await {
                Some(russh::ChannelMsg::Data { data }) => {
                    seen.push_str(&String::from_utf8_lossy(&data))
                }
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    assert!(
        found.is_ok() && seen.contains(want),
        "{want:?} not in {seen:?}"
    );
}

/// A PTY session follows the client's window-size changes (what a
/// terminal's resize sends; the OpenSSH client only does it from a tty).
#[test]
fn a_pty_follows_window_changes() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "granted");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    kiln_agent::ssh::start_on(&[public], None, move || {
        let (s, _) = listener.accept()?;
        Ok(File::from(OwnedFd::from(s)))
    })
    .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let config = Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect(config, ("127.0.0.1", port), AnyHostKey)
            .await
            .unwrap();
        let private = russh::keys::load_secret_key(&key, None).unwrap();
        let auth = session
            .authenticate_publickey(
                me(),
                russh::keys::PrivateKeyWithHashAlg::new(Arc::new(private), None),
            )
            .await
            .unwrap();
        assert!(auth.success());
        let mut ch = session.channel_open_session().await.unwrap();
        ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
            .await
            .unwrap();
        ch.request_shell(true).await.unwrap();
        let mut seen = String::new();
        ch.data_bytes(&b"stty size\n"[..]).await.unwrap();
        read_until(&mut ch, &mut seen, "24 80").await;
        ch.window_change(132, 43, 0, 0).await.unwrap();
        ch.data_bytes(&b"stty size; exit\n"[..]).await.unwrap();
        read_until(&mut ch, &mut seen, "43 132").await;
    });
}
