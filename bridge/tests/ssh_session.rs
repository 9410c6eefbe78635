//! The SSH client of the owned-host backend against a real OpenSSH server:
//! a private sshd per test (kiln-tests' `sshd` fixture), logged into as
//! root.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_bridge::backends::ssh::session::{
    Backoff, HostTarget, IdentityError, Link, Session, SessionError, STDOUT_LIMIT,
};
use kiln_tests::openssh::keygen;
use kiln_tests::sshd::{free_port, Sshd};

/// Generous: a busy test machine can be slow to fork a shell.
const T: Duration = Duration::from_secs(30);

fn target(sshd: &Sshd) -> HostTarget {
    HostTarget {
        address: sshd.address(),
        user: "root".into(),
        identity_file: sshd.client_key(),
        host_key: sshd.host_key(),
    }
}

/// `SHA256:…` of a public key file, as ssh-keygen prints it.
fn fingerprint(public: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(public)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_with_their_status_output_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let session = Session::connect(&target(&sshd), T).await.unwrap();

    let out = session
        .exec("echo hi; echo err >&2; exit 3", b"", T)
        .await
        .unwrap();
    assert_eq!(
        (out.status, out.signal.as_deref()),
        (Some(3), None),
        "{out:?}"
    );
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(!out.success());

    // 1 MiB that repeats no short pattern, through `cat` and back.
    let data: Vec<u8> = (0u32..1 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = session.exec("cat", &data, T).await.unwrap();
    assert!(out.success(), "{:?}", out.stderr);
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned other bytes");

    // A command that exits without reading its (large) stdin still ends.
    let out = session.exec("exit 0", &data.repeat(4), T).await.unwrap();
    assert!(out.success());

    // A command killed by a signal has no status, but the signal's name.
    let out = session.exec("kill -TERM $$", b"", T).await.unwrap();
    assert_eq!(
        (out.status, out.signal.as_deref()),
        (None, Some("TERM")),
        "{out:?}"
    );

    // More commands at once than sshd's MaxSessions (10): they share the
    // session's channels, and each gets its own output.
    let session = Arc::new(session);
    let runs: Vec<_> = (0..12)
        .map(|i| {
            let s = Arc::clone(&session);
            tokio::spawn(async move { s.exec(&format!("sleep 0.3; echo {i}"), b"", T).await })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.await.unwrap().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }

    // Too much stdout is an error, and the session goes on.
    let e = session
        .exec(&format!("head -c {} /dev/zero", STDOUT_LIMIT + 1), b"", T)
        .await
        .unwrap_err();
    assert!(matches!(e, SessionError::OutputTooLarge(_)), "{e:?}");
    assert!(!e.is_transient());
    let out = session.exec("echo $((6 * 7))", b"", T).await.unwrap();
    assert_eq!(out.stdout, b"42\n");
    assert!(!session.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_learned_on_first_use_is_the_hosts_and_pins_it() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let (session, learned) =
        Session::connect_learning_key(&sshd.address(), "root", &sshd.client_key(), T)
            .await
            .unwrap();
    let out = session.exec("echo hi", b"", T).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    // The key sshd has (its file has a comment; the learned key none).
    let mut hosts = sshd.host_key();
    hosts.truncate(hosts.rfind(' ').unwrap());
    assert_eq!(learned.host_key, hosts);
    assert_eq!(
        learned.pinned_fingerprint().unwrap(),
        fingerprint(&dir.path().join("host_key.pub"))
    );
    // What was learned is a pin the strict path accepts.
    let pinned = Session::connect(&learned, T).await.unwrap();
    assert!(pinned.exec("true", b"", T).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_offering_another_key_is_refused_before_any_command() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let other = tempfile::tempdir().unwrap();
    let pinned = keygen(other.path(), "pinned");
    let mut t = target(&sshd);
    t.host_key = std::fs::read_to_string(pinned.with_extension("pub")).unwrap();

    let marker = dir.path().join("ran");
    let ran = async {
        let session = Session::connect(&t, T).await?;
        session
            .exec(&format!("touch {}", marker.display()), b"", T)
            .await
    }
    .await;
    match ran {
        Err(SessionError::HostKeyMismatch {
            ref address,
            ref expected_fingerprint,
            ref offered_fingerprint,
        }) => {
            assert_eq!(address, &sshd.address());
            assert_eq!(
                expected_fingerprint,
                &fingerprint(&pinned.with_extension("pub"))
            );
            assert_eq!(
                offered_fingerprint,
                &fingerprint(&dir.path().join("host_key.pub"))
            );
        }
        other => panic!("{other:?}"),
    }
    let e = ran.unwrap_err();
    assert!(!e.is_transient());
    let text = e.to_string();
    assert!(text.contains("not the pinned SHA256:"), "{text}");
    assert!(!marker.exists());
    // Refused during the key exchange: the client never tried to log in.
    let log = sshd.log();
    assert!(!log.contains("Accepted publickey"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_host_does_not_know_or_cannot_be_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let other = tempfile::tempdir().unwrap();

    let mut t = target(&sshd);
    t.identity_file = keygen(other.path(), "stranger");
    let e = Session::connect(&t, T).await.err().unwrap();
    match &e {
        SessionError::AuthRejected { user, address } => {
            assert_eq!(
                (user.as_str(), address.as_str()),
                ("root", &*sshd.address())
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_transient());

    t.identity_file = other.path().join("missing");
    let e = Session::connect(&t, T).await.err().unwrap();
    assert!(
        matches!(&e, SessionError::Identity(p, IdentityError::Read(_)) if *p == t.identity_file),
        "{e:?}"
    );
    assert!(e.to_string().contains(&*t.identity_file.to_string_lossy()));
    assert!(!e.is_transient());

    // Encrypted with a passphrase, or not ed25519: refused as such, not
    // as a bad file.
    let make = |name: &str, kind: &str, passphrase: &str| {
        let path = other.path().join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", passphrase, "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        path
    };
    t.identity_file = make("locked", "ed25519", "passphrase");
    let e = Session::connect(&t, T).await.err().unwrap();
    assert!(
        matches!(&e, SessionError::Identity(_, IdentityError::Encrypted)),
        "{e:?}"
    );
    t.identity_file = make("ecdsa", "ecdsa", "");
    let e = Session::connect(&t, T).await.err().unwrap();
    assert!(
        matches!(&e, SessionError::Identity(_, IdentityError::NotEd25519(k)) if k == "ecdsa-sha2-nistp256"),
        "{e:?}"
    );
}

/// Polls the link until it gives a session, or panics after `within`.
async fn session_within(link: &Link, within: Duration) -> Arc<Session> {
    let deadline = Instant::now() + within;
    loop {
        match link.session().await {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("no session after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_backs_off_and_reconnects_when_the_host_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // The host's keys exist before it first runs, as a pinned host's do.
    let host_key = keygen(dir.path(), "host_key");
    let client = keygen(dir.path(), "client");
    let port = free_port();
    let t = HostTarget {
        address: format!("127.0.0.1:{port}"),
        user: "root".into(),
        identity_file: client,
        host_key: std::fs::read_to_string(host_key.with_extension("pub")).unwrap(),
    };
    let backoff = Backoff {
        first: Duration::from_secs(3),
        max: Duration::from_secs(6),
    };
    let link = Link::new(t, T).with_backoff(backoff);
    assert_eq!(link.unreachable_since(), None);

    // Nothing listens: a transient failure, and the link is down.
    let e = link.session().await.err().unwrap();
    let failed_at = Instant::now();
    assert!(matches!(e, SessionError::Unreachable(..)), "{e:?}");
    assert!(e.is_transient());
    let since = link.unreachable_since().unwrap();

    // The host is up now, but the link is backing off: it answers with the
    // last failure at once. A dial would have succeeded.
    let mut sshd = Sshd::start_on(dir.path(), port);
    let asked = Instant::now();
    let e = link.session().await.err().unwrap();
    assert!(matches!(e, SessionError::Unreachable(..)), "{e:?}");
    assert!(asked.elapsed() < Duration::from_millis(200));
    assert!(
        failed_at.elapsed() < backoff.first,
        "the host took too long to start"
    );
    assert_eq!(link.unreachable_since(), Some(since));

    // Once the backoff has passed, it dials again and is up.
    let first = session_within(&link, Duration::from_secs(10)).await;
    assert!(failed_at.elapsed() >= backoff.first);
    assert_eq!(link.unreachable_since(), None);
    assert!(first.exec("true", b"", T).await.unwrap().success());
    // The live session is shared, not redialed.
    assert!(Arc::ptr_eq(&first, &link.session().await.unwrap()));

    // The host goes away with its connections: the next command fails,
    // transiently, and the session is closed.
    sshd.kill();
    let e = first.exec("true", b"", T).await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(first.is_closed());
    let e = link.session().await.err().unwrap();
    assert!(matches!(e, SessionError::Unreachable(..)), "{e:?}");
    assert!(link.unreachable_since().is_some());

    // The host comes back (same keys): the link reconnects by itself.
    let _sshd = Sshd::start_on(dir.path(), port);
    let second = session_within(&link, Duration::from_secs(15)).await;
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(link.unreachable_since(), None);
    let out = second.exec("echo back", b"", T).await.unwrap();
    assert_eq!(out.stdout, b"back\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_past_its_timeout_is_given_up_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Declared before the server so that it is dropped after it: the
    // server then goes first, with whatever still runs under it.
    let session: Session;
    let sshd = Sshd::start(dir.path());
    session = Session::connect(&target(&sshd), T).await.unwrap();

    let started = Instant::now();
    let e = session
        .exec("sleep 30", b"", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, SessionError::Timeout(_)), "{e:?}");
    assert!(e.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    let out = session.exec("echo still here", b"", T).await.unwrap();
    assert_eq!(out.stdout, b"still here\n");

    // The sleep runs on: logged in as root, OpenSSH refuses the client's
    // kill (it honours signal requests only in privilege-separated
    // sessions, which root's are not). A command that still writes ends
    // once given up, as its output has nowhere to go. (An odd word, to
    // find this test's command among the host's processes.)
    let chatty = "while :; do echo tick-5f3a; sleep 0.1; done";
    let e = session
        .exec(chatty, b"", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, SessionError::Timeout(_)), "{e:?}");
    let gone = kiln_tests::wait_for(Duration::from_secs(10), || {
        kiln_tests::processes_mentioning("tick-5f3a")
            .is_empty()
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "{:?}\nsshd's log:\n{}",
        kiln_tests::processes_mentioning("tick-5f3a"),
        sshd.log()
    );
    assert!(session.exec("true", b"", T).await.unwrap().success());
}
