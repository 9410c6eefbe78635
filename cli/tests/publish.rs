//! `kiln run -p`: guest TCP ports published on the host over vsock (the
//! VM has no network device). The real binary, real KVM, the real agent;
//! one VM per start (cold, then restored from its snapshot) serves every
//! assertion about forwarding. Traffic stays on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{finish, Home};
use kiln_tests::images::busybox_layout;
use kiln_tests::wait_for;

/// Generous: VMs boot slowly where KVM emulates the guest kernel.
const LIMIT: Duration = Duration::from_secs(900);
const BODY: &str = "hello-from-the-guest";

/// Serves BODY over HTTP on guest port 8000, "bye" once on 8001, then
/// once on 8003 the byte count of what it reads to the end, and exits.
/// Nothing listens on 8002.
const SCRIPT: &str = "mkdir -p /www && echo hello-from-the-guest > /www/index.html \
                      && httpd -p 127.0.0.1:8000 -h /www \
                      && echo bye | nc -l -p 8001 && nc -l -p 8003 -e wc -c && echo served";

/// N distinct free ports: held open together while they are picked (one
/// after another, the kernel may hand out the same port again).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A `kiln run` that a failed assertion must not leave running.
struct Running(Option<Child>);

impl Running {
    fn finish(mut self) -> std::process::Output {
        finish(self.0.take().expect("child"), LIMIT)
    }

    /// Polls `f` every 50 ms until it returns Some; fails at once, with
    /// kiln's output, if kiln ends first, and after [`LIMIT`].
    fn until<T>(&mut self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(v) = f() {
                return v;
            }
            let child = self.0.as_mut().expect("child");
            if !matches!(child.try_wait(), Ok(None)) {
                let out = finish(self.0.take().expect("child"), LIMIT);
                panic!(
                    "kiln ended before {what}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "no {what} in {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the host reads after sending `request` (and nothing, on a refusal).
fn exchange(port: u16, request: &[u8]) -> Option<Vec<u8>> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    // A refusal may close the connection before our request is written,
    // and read as a reset when it was not read.
    let _ = c.write_all(request);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    Some(got)
}

fn http_get(port: u16) -> Option<String> {
    let got = exchange(port, b"GET /index.html HTTP/1.0\r\nHost: kiln\r\n\r\n")?;
    Some(String::from_utf8_lossy(&got).into_owned()).filter(|r| !r.is_empty())
}

/// Cold, then warm (restored from the snapshot the cold run saved): an HTTP
/// GET through one published port reads the guest's page; a guest port
/// nothing listens on closes the connection without a byte; the guest's
/// half-close reaches the host client, which can still send, and the host
/// client's half-close reaches the guest server, which can still answer;
/// `--json` lists the ports; when the run ends nothing listens on them.
#[test]
fn published_ports_reach_guest_servers_cold_and_warm() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let image = format!("{}:1", layout.display());
    for start in ["cold", "warm"] {
        let [web, bye, silent, count] = free_ports();
        let specs = [
            format!("127.0.0.1:{web}:8000"),
            format!("{bye}:8001/tcp"),
            format!("127.0.0.1:{silent}:8002"),
            format!("127.0.0.1:{count}:8003"),
        ];
        let mut args = vec!["run", "--json"];
        for s in &specs {
            args.extend_from_slice(&["-p", s]);
        }
        args.extend_from_slice(&["--oci-layout", &image, "--", "sh", "-c", SCRIPT]);
        let mut run = Running(Some(home.kiln(&args).spawn().unwrap()));

        // Bound before the VM is up; refused (closed) until httpd serves.
        let page = run.until(&format!("a page on port {web} ({start})"), || {
            http_get(web).filter(|r| r.contains(BODY))
        });
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        // Several connections, one after another, through the same port.
        for _ in 0..3 {
            let again = http_get(web).unwrap_or_default();
            assert!(again.contains(BODY), "{again}");
        }

        let nothing = exchange(silent, b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(nothing.as_deref(), Some(&b""[..]), "{start}");

        // nc's stdin ends after "bye": its half-close reaches us as an EOF
        // while our side stays open; our close then ends that nc.
        let mut c = run.until(&format!("a bye on port {bye} ({start})"), || {
            let mut c = TcpStream::connect(("127.0.0.1", bye)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            let mut got = Vec::new();
            c.read_to_end(&mut got).ok()?;
            (got == b"bye\n").then_some(c)
        });
        c.write_all(b"still open\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        drop(c);

        // wc answers only after our end-of-stream: a half-close, not a
        // close, must reach it. Its answer ends the run.
        let counted = wait_for(Duration::from_secs(120), || {
            let mut c = TcpStream::connect(("127.0.0.1", count)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            c.write_all(b"12345").ok()?;
            c.shutdown(Shutdown::Write).ok()?;
            let mut got = String::new();
            c.read_to_string(&mut got).ok()?;
            Some(got).filter(|g| !g.is_empty())
        });
        assert_eq!(counted.as_deref(), Some("5\n"), "port {count} ({start})");

        let out = run.finish();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(stdout, "still open\nserved\n", "{stderr}");
        let stats: serde_json::Value = stderr
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no statistics in:\n{stderr}"));
        assert_eq!(stats["start"], start, "{stderr}");
        assert_eq!(
            stats["published"],
            serde_json::json!([
                {"host": format!("127.0.0.1:{web}"), "guest_port": 8000, "protocol": "tcp"},
                {"host": format!("127.0.0.1:{bye}"), "guest_port": 8001, "protocol": "tcp"},
                {"host": format!("127.0.0.1:{silent}"), "guest_port": 8002, "protocol": "tcp"},
                {"host": format!("127.0.0.1:{count}"), "guest_port": 8003, "protocol": "tcp"},
            ])
        );
        for port in [web, bye, silent, count] {
            assert!(
                TcpStream::connect(("127.0.0.1", port)).is_err(),
                "port {port} still open after the run"
            );
        }
    }
    home.assert_clean();
}

/// A taken host port, a UDP port and the same host port twice are refused
/// before any image is read or VM started.
#[test]
fn bad_publish_flags_fail_before_the_vm() {
    let home = Home::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let run = |spec: &[&str]| {
        let mut args = vec!["run"];
        args.extend_from_slice(spec);
        args.extend_from_slice(&["--oci-layout", "/nonexistent:1", "--", "true"]);
        let out = home.kiln(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, err) = run(&["-p", &format!("{port}:80")]);
    assert_eq!(code, Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("kiln: cannot listen on 127.0.0.1:{port}: ")),
        "{err}"
    );

    let (code, err) = run(&["-p", "8080:80/udp"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.contains("only TCP ports can be published, not \"udp\"")),
        "{err}"
    );

    let [free] = free_ports();
    let (a, b) = (format!("{free}:80"), format!("127.0.0.1:{free}:81"));
    let (code, err) = run(&["-p", &a, "-p", &b]);
    assert_eq!(code, Some(125), "{err}");
    assert_eq!(
        err.trim_end(),
        format!("kiln: host port 127.0.0.1:{free} is published twice")
    );
    home.assert_clean();
}
