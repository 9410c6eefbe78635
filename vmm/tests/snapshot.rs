//! Real-KVM snapshot and restore of a VM without a kernel: a few bytes of
//! 32-bit code count in a register and store the count in guest memory;
//! the control socket pauses, snapshots and resumes it, and restored
//! clones must count on from the saved value.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::snapshot::RestoreOptions;
use kiln_vmm::{ExitReason, Payload, SerialOutput, Vm, VmConfig, VsockConfig};

/// Where the guest stores its count.
const COUNTER: u64 = 0x20_0000;
const MEM_MIB: u64 = 32;

/// `xor ecx, ecx; 1: inc ecx; mov [COUNTER], ecx; jmp 1b`
fn counting_code() -> Vec<u8> {
    let mut code = vec![0x31, 0xc9, 0x41, 0x89, 0x0d];
    code.extend_from_slice(&(COUNTER as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf7]);
    code
}

struct Running {
    api: BufReader<UnixStream>,
    thread: std::thread::JoinHandle<ExitReason>,
}

impl Running {
    fn start(mut vm: Vm, sock: &Path) -> Running {
        vm.serve_api(sock).expect("control socket");
        let thread = std::thread::spawn(move || vm.run().reason);
        let api = UnixStream::connect(sock).expect("connect to the control socket");
        api.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Running {
            api: BufReader::new(api),
            thread,
        }
    }

    fn ask(&mut self, request: &str) -> serde_json::Value {
        let stream = self.api.get_mut();
        let sent = stream
            .write_all(request.as_bytes())
            .and_then(|_| stream.write_all(b"\n"));
        sent.unwrap_or_else(|e| panic!("{request}: {e}"));
        let mut line = String::new();
        self.api
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{request}: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn ok(&mut self, request: &str) {
        let reply = self.ask(request);
        assert_eq!(reply["ok"], true, "{request}: {reply}");
    }

    fn snapshot(&mut self, state: &Path, mem: &Path) {
        self.ok(&format!(
            r#"{{"op":"snapshot","state":"{}","mem":"{}"}}"#,
            state.display(),
            mem.display()
        ));
    }

    /// Resumes, then stops the VM through the socket.
    fn resume_and_stop(mut self) {
        self.ok(r#"{"op":"resume"}"#);
        self.ok(r#"{"op":"stop"}"#);
        let reason = self.thread.join().unwrap();
        assert_eq!(reason, ExitReason::Signal { signal: 15 });
    }
}

fn config(dir: &Path, name: &str) -> VmConfig {
    let mut config = VmConfig::new("/nonexistent".into());
    config.mem_mib = MEM_MIB;
    config.serial = SerialOutput::None;
    // The guest loops without exits: it would look idle.
    config.watchdog_secs = 0;
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.join(format!("{name}.vsock")),
    });
    config
}

fn count_in(mem: &Path) -> u32 {
    let bytes = std::fs::read(mem).unwrap();
    let at = COUNTER as usize;
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn hash(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn restore_opts(dir: &Path, state: &Path, mem: &Path, name: &str) -> RestoreOptions {
    RestoreOptions {
        state: state.to_path_buf(),
        mem: mem.to_path_buf(),
        vsock_uds: Some(dir.join(format!("{name}.vsock"))),
        ..Default::default()
    }
}

/// Waits until the guest has counted past zero (it starts at once, but
/// under emulation the first stores take a moment).
fn let_it_count() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn paused_vm_snapshots_and_clones_count_on_from_the_saved_count() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let vm = Vm::build(
        config(dir.path(), "orig"),
        Payload::Code(counting_code()),
        Instant::now(),
    )
    .expect("build VM");
    let mut orig = Running::start(vm, &p("orig.api"));
    let_it_count();

    let reply = orig.ask(&format!(
        r#"{{"op":"snapshot","state":"{}","mem":"{}"}}"#,
        p("s").display(),
        p("m").display()
    ));
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"], "the VM must be paused first");
    let reply = orig.ask(r#"{"op":"reboot"}"#);
    assert_eq!(reply["ok"], false, "{reply}");

    orig.ok(r#"{"op":"pause"}"#);
    let metrics = orig.ask(r#"{"op":"metrics"}"#);
    assert_eq!(metrics["metrics"]["paused"], true, "{metrics}");
    orig.snapshot(&p("a.state"), &p("a.mem"));
    let saved = count_in(&p("a.mem"));
    assert!(saved > 0, "the guest counted before the snapshot");
    assert_eq!(std::fs::metadata(p("a.mem")).unwrap().len(), MEM_MIB << 20);
    // Paused means paused: a second snapshot holds the same count.
    orig.snapshot(&p("a2.state"), &p("a2.mem"));
    assert_eq!(count_in(&p("a2.mem")), saved);
    orig.resume_and_stop();
    assert!(!p("orig.api").exists() && !p("orig.vsock").exists());

    // Two clones of one snapshot at once, each with its own vsock socket.
    let mem_hash = hash(&p("a.mem"));
    let mut clones = Vec::new();
    for name in ["c1", "c2"] {
        let vm = Vm::restore(
            &restore_opts(dir.path(), &p("a.state"), &p("a.mem"), name),
            Instant::now(),
        )
        .unwrap_or_else(|e| panic!("restore {name}: {e}"));
        clones.push(Running::start(vm, &p(&format!("{name}.api"))));
    }
    let_it_count();
    for (i, clone) in clones.iter_mut().enumerate() {
        clone.ok(r#"{"op":"pause"}"#);
        let (state, mem) = (p(&format!("c{i}.state")), p(&format!("c{i}.mem")));
        clone.snapshot(&state, &mem);
        let now = count_in(&mem);
        // From the saved count on, not from 0: the register came back too.
        assert!(now > saved, "clone {i}: {now} after {saved}");
    }
    for clone in clones {
        clone.resume_and_stop();
    }
    assert_eq!(hash(&p("a.mem")), mem_hash, "the memory file is untouched");

    // Bad input: each a clear error, and no socket left behind.
    let bad = |opts: RestoreOptions, want: &str| {
        let e = Vm::restore(&opts, Instant::now())
            .err()
            .unwrap_or_else(|| panic!("restore accepted {want}"));
        let text = e.to_string();
        assert!(text.contains(want), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(!opts.vsock_uds.unwrap().exists(), "{want}: socket left");
    };
    let short = p("short.mem");
    std::fs::write(&short, vec![0u8; 4 << 20]).unwrap();
    bad(
        restore_opts(dir.path(), &p("a.state"), &short, "bad1"),
        "the snapshot's guest has 33554432",
    );
    bad(
        restore_opts(dir.path(), &p("a.state"), &p("missing.mem"), "bad2"),
        "cannot open memory file",
    );
    let mut other = std::fs::read(p("a.state")).unwrap();
    other[8] = 99;
    std::fs::write(p("other.state"), &other).unwrap();
    bad(
        restore_opts(dir.path(), &p("other.state"), &p("a.mem"), "bad3"),
        "is snapshot format 99",
    );
    let state = std::fs::read(p("a.state")).unwrap();
    std::fs::write(p("cut.state"), &state[..state.len() / 2]).unwrap();
    bad(
        restore_opts(dir.path(), &p("cut.state"), &p("a.mem"), "bad4"),
        "is truncated",
    );
    let mut flipped = state.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 0x20;
    std::fs::write(p("flip.state"), &flipped).unwrap();
    bad(
        restore_opts(dir.path(), &p("flip.state"), &p("a.mem"), "bad5"),
        "checksum mismatch",
    );
    let mut no_vsock = restore_opts(dir.path(), &p("a.state"), &p("a.mem"), "bad6");
    no_vsock.vsock_uds = None;
    let e = Vm::restore(&no_vsock, Instant::now()).err().unwrap();
    assert!(e.to_string().contains("--vsock-uds"), "{e}");

    // The binary: status 1 and one line naming the problem.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(["--restore"])
        .arg(p("a.state"))
        .arg("--mem-file")
        .arg(&short)
        .arg("--vsock-uds")
        .arg(p("bin.vsock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("memory file"), "{stderr}");
    assert!(!p("bin.vsock").exists());
}
