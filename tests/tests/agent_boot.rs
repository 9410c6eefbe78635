//! The agent as PID 1 in a real micro-VM: readiness, a workload run with
//! the requested env, cwd and user, output and exit code over vsock, usage
//! reports, the per-VM identity (hostname, clock, entropy), and power-off
//! when the workload ends. One VM for all of it.

use std::collections::HashMap;
use std::time::Duration;

use kiln_protocol::console::{AGENT_FATAL_MARKER, READY_MARKER};
use kiln_protocol::{ExitStatus, Frame, Identity, Message, Workload};
use kiln_tests::{agent, AgentVm, GuestRoot};

#[test]
fn agent_runs_the_workload_and_reports_over_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = GuestRoot::new(&agent())
        .file(
            "kiln/config.json",
            br#"{"Cmd":["/bin/sh","-c","echo default"],"Env":["FROM_IMAGE=1","FOO=image"],"WorkingDir":"/"}"#,
        )
        .write(dir.path());
    let mut vm = AgentVm::boot(dir.path(), &initrd);
    match vm.next_frame() {
        Frame::Control(Message::Ready {
            agent_version,
            uptime_ms,
            init_to_ready_ms,
            ..
        }) => {
            assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
            assert!(uptime_ms > 0);
            assert!(init_to_ready_ms < uptime_ms);
        }
        other => panic!("expected ready, got {other:?}"),
    }

    let script = "echo out:$FOO:$FROM_IMAGE:${KILN_AGENT_STARTED_MS:-unset}:${GLIBC_TUNABLES%%,*}; echo err >&2; id -u; id -g; pwd; echo $HOME; \
                  echo $(cat /proc/sys/kernel/hostname) $(busybox date -u +%Y-%m-%d); \
                  i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo last; exit 3";
    let start = Frame::Control(Message::Start {
        workload: Workload {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["FOO=bar".into()],
            working_dir: Some("/tmp".into()),
            user: Some("app".into()),
            interactive: false,
        },
        authorized_keys: vec![],
        ssh_host_key: None,
        usage_interval_ms: 200,
        one_shot: true,
        // 2031-10-17; the entropy's effect is shown on restored clones
        // (two clones of one snapshot draw different bytes).
        identity: Some(Box::new(Identity {
            entropy: vec![7; 64],
            unix_time_ms: Some(1_950_000_000_000),
            hostname: Some("clone-7".into()),
        })),
        published_ports: Vec::new(),
    });
    vm.send(&start);

    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let (status, usage) = loop {
        match vm.next_frame() {
            Frame::Stdout(d) => stdout.extend(d),
            Frame::Stderr(d) => stderr.extend(d),
            Frame::Control(Message::Started { pid }) => {
                assert!(pid > 1);
                *counts.entry("started").or_default() += 1;
            }
            Frame::Control(Message::Usage(u)) => {
                assert!(u.uptime_ms > 0 && u.processes > 0 && u.mem_used_kib > 0);
                *counts.entry("usage").or_default() += 1;
            }
            Frame::Control(Message::Exited { status, usage }) => break (status, usage),
            other => panic!("unexpected {other:?}"),
        }
    };
    let stdout = String::from_utf8(stdout).unwrap();
    assert_eq!(
        stdout,
        // glibc stays off AVX in workloads too, whether the tunable came
        // from a PVM host's command line or from the agent's re-exec.
        "out:bar:1:unset:glibc.cpu.hwcaps=-AVX\n1000\n1000\n/tmp\n/home/app\nclone-7 2031-10-17\nlast\n"
    );
    assert_eq!(String::from_utf8(stderr).unwrap(), "err\n");
    assert_eq!(status, ExitStatus::Code(3));
    assert_eq!(counts.get("started"), Some(&1));
    assert!(counts.get("usage").copied().unwrap_or(0) >= 1);
    assert!(usage.cpu_user_ms + usage.cpu_system_ms > 0, "{usage:?}");
    assert_eq!(usage.workload, "exited");

    // One-shot: the agent powers the VM off and the VMM exits cleanly.
    let (code, err, text) = vm.wait(Duration::from_secs(120));
    assert_eq!(code.code(), Some(0), "{err}\n{text}");
    assert!(text.contains(READY_MARKER), "{text}");
    assert!(
        !text.contains("identity:"),
        "the identity was refused:\n{text}"
    );
}

/// PID 1 must never just die: a fatal agent error is written to the
/// console and the VM stops with kiln-vmm's init-failure status (6), which
/// a host can tell apart from a clean power-off (0).
#[test]
fn a_fatal_agent_error_stops_the_vm_with_a_distinct_status() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = GuestRoot::new(&agent()).write(dir.path());
    let serial = dir.path().join("serial.log");
    let vmm = kiln_tests::VmmProcess::spawn(&[
        "--kernel",
        kiln_tests::kernel().to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 quiet kiln.fault=panic",
        "--serial-log",
        serial.to_str().unwrap(),
        "--watchdog-secs",
        "0",
    ]);
    let (status, stderr) = vmm.wait(Duration::from_secs(600));
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(kiln_protocol::vmm::exit::INIT_FAILED),
        "stderr: {stderr}\nconsole:\n{console}"
    );
    assert!(
        console.contains(AGENT_FATAL_MARKER) && console.contains("kiln.fault=panic"),
        "{console}"
    );
    assert!(stderr.contains("init reported a fatal error"), "{stderr}");
}
