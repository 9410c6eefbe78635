//! Real-KVM checks of the VMM core without a kernel: a few instructions of
//! 32-bit code prove serial output, vCPU exit handling and each way a VM ends.

use std::time::Instant;

use kiln_vmm::seccomp::SeccompMode;
use kiln_vmm::{ExitReason, Payload, SerialOutput, Vm, VmConfig};

/// `mov edx, 0x3f8`, then `mov al, c; out dx, al` for each byte.
fn print(text: &str) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03, 0x00, 0x00];
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]);
    }
    code
}

/// `mov al, 0xfe; out 0x64, al`: reset through the keyboard controller.
const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
/// `jmp $`
const SPIN: [u8; 2] = [0xeb, 0xfe];

fn run(code: Vec<u8>, watchdog_secs: u64) -> (ExitReason, String, kiln_vmm::metrics::Metrics) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut config = VmConfig::new("/nonexistent".into());
    config.mem_mib = 32;
    config.serial = SerialOutput::File(log.clone());
    config.ready_marker = "OK".into();
    config.watchdog_secs = watchdog_secs;
    // `Vm::run` installs the event loop's filters on the thread that calls
    // it, here a thread of the test harness, which goes on to make calls
    // they do not allow. The filters are tested where kiln-vmm is its own
    // process (every real boot, tests/tests/vmm_jail.rs).
    config.seccomp = SeccompMode::Off;
    let vm = Vm::build(config, Payload::Code(code), Instant::now()).expect("build VM");
    let outcome = vm.run();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    (outcome.reason, serial, outcome.metrics)
}

#[test]
fn prints_on_serial_and_resets_cleanly() {
    let mut code = print("KILN_PAYLOAD_OK\n");
    code.extend_from_slice(&RESET);
    code.extend_from_slice(&SPIN);
    let (reason, serial, metrics) = run(code, 30);
    assert_eq!(reason, ExitReason::GuestReset, "serial: {serial}");
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(serial, "KILN_PAYLOAD_OK\n");
    assert!(metrics.first_serial_output_ms.is_some());
    assert!(metrics.ready_marker_ms.is_some());
    assert!(metrics.time_to_first_kvm_run_ms.is_some());
    assert!(metrics.vm_exits["io_out"] >= 17, "{:?}", metrics.vm_exits);
}

#[test]
fn watchdog_ends_a_guest_that_stops_responding() {
    let mut code = print("spin\n");
    code.extend_from_slice(&SPIN);
    let (reason, serial, _) = run(code, 1);
    assert_eq!(reason, ExitReason::Watchdog { idle_secs: 1 });
    assert_eq!(reason.exit_code(), 4);
    assert_eq!(serial, "spin\n");
}

#[test]
fn a_fault_with_no_idt_ends_the_vm_with_a_reason() {
    // ud2 with an empty IDT: #UD cannot be delivered -> #GP -> #DF -> triple
    // fault on hardware; an emulator that cannot deliver it reports that instead.
    let mut code = print("fault\n");
    code.extend_from_slice(&[0x0f, 0x0b]);
    let (reason, serial, _) = run(code, 30);
    assert_eq!(serial, "fault\n");
    match &reason {
        ExitReason::TripleFault { vcpu: 0 } => {}
        ExitReason::EmulationFailure { vcpu: 0, rip, .. } => {
            assert_eq!(*rip, 0x10_0000 + 5 + 3 * 6, "{reason}")
        }
        other => panic!("unexpected end: {other}"),
    }
    assert_ne!(reason.exit_code(), 0);
}
