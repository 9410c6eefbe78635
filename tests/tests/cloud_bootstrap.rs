//! The cloud bootstrap, end to end: the user-data script a cloud instance
//! would run, rendered by the bridge, runs for real in a network namespace
//! standing in for the instance. A second namespace stands in for the
//! internet: it serves the kiln bundle over HTTP (from this test), the
//! grant's image (a registry), and holds the requester's stock `ssh`.
//!
//! One test, so that one VM serves every assertion: a bundle whose SHA-256
//! differs from the pin is refused with nothing installed; the right one
//! is installed, the grant's VM boots, and the requester's `ssh` gets in
//! pinned to the host key the bridge made (another key is refused); the
//! script watches the grant to its end and exits without powering
//! anything off; run again, it does not start the grant a second time.
//!
//! The script is rendered with `power_off: false` (no power-off command in
//! it at all), run with `KILN_BOOTSTRAP_POWEROFF=0`, and with stubs of
//! every power-off command first on its PATH, so that nothing it runs can
//! stop this machine.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kiln_bridge::backend::ProvisionedInstance;
use kiln_bridge::backends::cloud::bootstrap::{self, Bootstrap};
use kiln_bridge::grant::{Grant, TdxPolicy};
use kiln_bridge::host::wire::{parse_reply, Reply};
use kiln_bridge::host_key::HostKey;
use kiln_tests::kilnd::{Requester, BOOT};
use kiln_tests::netns::NetNs;
use kiln_tests::openssh::{text, Client};
use kiln_tests::{agent, bin, kernel, processes_mentioning, wait_for};

/// The instance port the grant's SSH is reached on.
const SSH_PORT: u16 = 2200;
/// Commands that could stop the machine; the script finds these stubs
/// first, which only record that they were called.
const POWER_COMMANDS: &[&str] = &[
    "poweroff",
    "shutdown",
    "halt",
    "reboot",
    "systemctl",
    "init",
];

/// Serves one file over HTTP/1.1 on an address of the calling thread's
/// network namespace, counting the requests for it; stops on drop.
struct FileServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    fn start(ip: &str, file: &Path) -> FileServer {
        let listener = TcpListener::bind((ip, 0)).expect("bind the file server");
        let addr = listener.local_addr().unwrap();
        let (stop, served) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let name = format!("/{}", file.file_name().unwrap().to_string_lossy());
        let (file, stop2, served2) = (file.to_path_buf(), stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = stream {
                    if serve(s, &name, &file) {
                        served2.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        FileServer {
            addr,
            stop,
            served,
            thread: Some(thread),
        }
    }

    fn url(&self, file: &Path) -> String {
        format!(
            "http://{}/{}",
            self.addr,
            file.file_name().unwrap().to_string_lossy()
        )
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// Answers one request: the file for its path (true), 404 for any other.
fn serve(stream: TcpStream, name: &str, file: &Path) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return false;
    }
    // The rest of the head, up to its blank line.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut out = &stream;
    let wanted = request.split_whitespace().nth(1) == Some(name);
    if !wanted || request.split_whitespace().next() != Some("GET") {
        let _ = out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return false;
    }
    let mut body = std::fs::File::open(file).unwrap();
    let size = body.metadata().unwrap().len();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    );
    out.write_all(head.as_bytes()).is_ok() && std::io::copy(&mut body, &mut out).is_ok()
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the stop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kills, on drop, every process whose command line names `dir`: the
/// scripts, shims and VMMs the instance started, however the test ended.
struct KillUnder(PathBuf);

impl Drop for KillUnder {
    fn drop(&mut self) {
        for p in processes_mentioning(&self.0.to_string_lossy()) {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process this test's instance started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Builds the bundle with `kiln fleet bundle` from this build's binaries
/// and the test's agent and kernel: (path, SHA-256, size), and how long
/// the command took.
fn build_bundle(work: &Path) -> (PathBuf, String, u64, Duration) {
    let home = work.join("source-home");
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::create_dir_all(home.join("kernel")).unwrap();
    std::os::unix::fs::symlink(kernel(), home.join("kernel/vmlinux")).unwrap();
    std::os::unix::fs::symlink(agent(), home.join("bin/kiln-agent")).unwrap();
    let begun = Instant::now();
    let out = Command::new(bin("kiln"))
        .args(["fleet", "bundle", "--json", "--out"])
        .arg(work.join("bundle"))
        .env("KILN_HOME", &home)
        .env_remove("KILN_VMM")
        .env_remove("KILN_SHIM")
        .output()
        .unwrap();
    let took = begun.elapsed();
    assert!(out.status.success(), "kiln fleet bundle: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = PathBuf::from(v["path"].as_str().unwrap());
    let sha = v["sha256"].as_str().unwrap().to_string();
    (path, sha, v["bytes"].as_u64().unwrap(), took)
}

/// Stubs of the power commands in `dir`, each appending its name to
/// `dir/called`.
fn power_stubs(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for name in POWER_COMMANDS {
        let stub = dir.join(name);
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho {name} >>'{}'\nexit 0\n",
                dir.join("called").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.join("called")
}

/// The rendered script, started in the instance's namespace as cloud-init
/// would, its output in `name.out` and `name.err` beside it.
fn start_script(ns: &NetNs, work: &Path, name: &str, script: &str, stubs: &Path) -> Child {
    let path = work.join(format!("{name}.sh"));
    std::fs::write(&path, script).unwrap();
    let (out, err) = (
        std::fs::File::create(work.join(format!("{name}.out"))).unwrap(),
        std::fs::File::create(work.join(format!("{name}.err"))).unwrap(),
    );
    let tmp = work.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let system_path = std::env::var("PATH").unwrap_or_default();
    let path_var = format!("{}:{system_path}", stubs.display());
    ns.run(move || {
        Command::new("/bin/sh")
            .arg(&path)
            .env("PATH", path_var)
            .env("TMPDIR", tmp)
            .env("KILN_BOOTSTRAP_POWEROFF", "0")
            .env("KILN_BOOTSTRAP_POLL", "1")
            .env_remove("KILN_HOME")
            .env_remove("KILN_VMM")
            .env_remove("KILN_SHIM")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("run the bootstrap script")
    })
}

/// Waits for `child` to exit (killing it after `timeout`): its status
/// code and standard error.
fn finish(mut child: Child, work: &Path, name: &str, timeout: Duration) -> (Option<i32>, String) {
    let status = wait_for(timeout, || child.try_wait().ok().flatten());
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{name} still running after {timeout:?}:\n{}",
            read(&work.join(format!("{name}.err")))
        )
    });
    (status.code(), read(&work.join(format!("{name}.err"))))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn known_hosts(work: &Path, name: &str, ip: &str, key: &str) -> PathBuf {
    let path = work.join(name);
    std::fs::write(&path, format!("[{ip}]:{SSH_PORT} {key}\n")).unwrap();
    path
}

#[test]
fn the_bootstrap_serves_a_grant_on_a_stand_in_instance() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let net = 100 + std::process::id() % 100;
    let (cloud_ip, instance_ip) = (format!("10.{net}.60.1"), format!("10.{net}.60.2"));
    let cloud = NetNs::new("cloud-net");
    let instance = NetNs::new("cloud-vm");
    cloud.link(
        &format!("kcb{}", std::process::id() % 10_000),
        &format!("{cloud_ip}/24"),
        &instance,
        "eth0",
        &format!("{instance_ip}/24"),
    );
    // Dropped before the namespaces: whatever the instance left running.
    let _stop = KillUnder(work.to_path_buf());

    let (bundle, sha, bytes, bundled) = build_bundle(work);
    eprintln!(
        "bundle: {:.1} MiB, written in {:.1} s",
        bytes as f64 / f64::from(1 << 20),
        bundled.as_secs_f64()
    );

    // From here on this thread, and all it starts, is on the "internet":
    // the bundle's server, the registry, the requester's ssh.
    cloud.enter();
    let requester = Requester::on(work, &cloud_ip);
    let server = FileServer::start(&cloud_ip, &bundle);
    let registry = requester.registry.addr.clone();

    let host_key = HostKey::generate().unwrap();
    let grant = Grant {
        id: "cloud-g1".into(),
        image: requester.image.clone(),
        vcpus: 1,
        cpu_millicores: None,
        ram_mib: 256,
        region: "cloud".into(),
        tdx: TdxPolicy::No,
        ssh_keys: vec![requester.public_key.clone()],
        valid_to: Utc::now() + chrono::Duration::hours(1),
        command: Some(vec!["sh".into(), "-c".into(), "sleep 100000".into()]),
        env: BTreeMap::new(),
        publish: Vec::new(),
        submitted_at: Utc::now(),
    };
    let (prefix, home) = (work.join("instance/prefix"), work.join("instance/home"));
    let (prefix_s, home_s) = (
        prefix.to_string_lossy().into_owned(),
        home.to_string_lossy().into_owned(),
    );
    let url = server.url(&bundle);
    let registries = vec![registry];
    let rendered = |sha: &str| {
        let text = bootstrap::script(&Bootstrap {
            bundle_url: &url,
            bundle_sha256: sha,
            grant: &grant,
            host_key: &host_key,
            ssh_port: SSH_PORT,
            kiln_home: &home_s,
            prefix: &prefix_s,
            insecure_registries: &registries,
            power_off: false,
        })
        .unwrap();
        for word in POWER_COMMANDS {
            assert!(!text.contains(word), "the script names {word}");
        }
        text
    };
    let called = power_stubs(&work.join("stubs"));

    // A bundle whose SHA-256 is not the pinned one: refused, nothing
    // installed.
    let mut wrong = sha.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let child = start_script(
        &instance,
        work,
        "wrong",
        &rendered(&wrong),
        &work.join("stubs"),
    );
    let (code, err) = finish(child, work, "wrong", Duration::from_secs(300));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "has SHA-256 {sha}, not {wrong}; refused, nothing was installed"
        )),
        "{err}"
    );
    assert!(!prefix.exists() && !home.exists(), "{err}");
    assert_eq!(std::fs::read_dir(work.join("tmp")).unwrap().count(), 0);
    assert_eq!(server.served(), 1);

    // The pinned bundle: the grant runs, and the requester gets in.
    let started = Instant::now();
    let mut child = start_script(
        &instance,
        work,
        "boot",
        &rendered(&sha),
        &work.join("stubs"),
    );
    let state = home.join("bootstrap").join(&grant.id);
    let up = wait_for(BOOT, || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the script ended ({status}):\n{}",
                read(&work.join("boot.err"))
            );
        }
        state.join("instance.json").exists().then_some(())
    });
    assert!(
        up.is_some(),
        "not up in {BOOT:?}:\n{}",
        read(&work.join("boot.err"))
    );
    let running = started.elapsed();
    let pinned = known_hosts(
        work,
        "known_hosts",
        &instance_ip,
        &host_key.public_openssh().unwrap(),
    );
    let out = Client::new(&requester.key, SSH_PORT, "root")
        .at(&instance_ip)
        .pinned(&pinned)
        .ssh(&[], "echo in-$((6*7))", b"");
    assert!(
        out.status.success() && text(&out.stdout) == "in-42\n",
        "ssh: {out:?}\n{}",
        read(&work.join("boot.err"))
    );
    let in_vm = started.elapsed();
    eprintln!(
        "bootstrap: grant running {:.1} s after the script started, ssh in at {:.1} s",
        running.as_secs_f64(),
        in_vm.as_secs_f64()
    );

    // What the host answered is the bridge's key, on the grant's port.
    let reply: Reply<ProvisionedInstance> =
        parse_reply(read(&state.join("instance.json")).as_bytes()).unwrap();
    let Reply::Ok(instance_seen) = reply else {
        panic!("{reply:?}");
    };
    assert_eq!(instance_seen.host_key_fingerprint, host_key.fingerprint());
    assert_eq!(instance_seen.host_key, host_key.public_openssh().unwrap());
    assert_eq!(instance_seen.ssh_port, SSH_PORT);
    assert!(text(&std::fs::read(work.join("boot.out")).unwrap()).contains(&host_key.fingerprint()));
    // The key file went once the VM had it; the grant is root's alone.
    assert!(!state.join("host_key").exists());
    let mode = std::fs::metadata(state.join("grant.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(server.served(), 2);

    // Pinned to another key, the same ssh is refused.
    let other = HostKey::generate().unwrap();
    let wrong_pin = known_hosts(
        work,
        "known_hosts-other",
        &instance_ip,
        &other.public_openssh().unwrap(),
    );
    let out = Client::new(&requester.key, SSH_PORT, "root")
        .at(&instance_ip)
        .pinned(&wrong_pin)
        .ssh(&[], "echo in-$((6*7))", b"");
    assert!(!out.status.success() && out.stdout.is_empty(), "{out:?}");

    // The grant ends (as at its deadline, or a terminate): the script
    // sees it and exits, powering nothing off.
    let kiln = prefix.join("kiln");
    let out = Command::new(&kiln)
        .args(["host", "--home", &home_s, "terminate", &grant.id])
        .output()
        .unwrap();
    assert!(out.status.success(), "terminate: {out:?}");
    let (code, err) = finish(child, work, "boot", Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("grant cloud-g1 has ended"), "{err}");
    assert!(!called.exists(), "{}", read(&called));

    // Run again (as after a restart), it does not start the grant again.
    let child = start_script(
        &instance,
        work,
        "again",
        &rendered(&sha),
        &work.join("stubs"),
    );
    let (code, err) = finish(child, work, "again", Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("already started on this instance"), "{err}");
    assert_eq!(server.served(), 2);
    assert!(!called.exists(), "{}", read(&called));
    let gone = wait_for(Duration::from_secs(20), || {
        processes_mentioning(&home_s).is_empty().then_some(())
    });
    assert!(gone.is_some(), "{:?}", processes_mentioning(&home_s));
}
