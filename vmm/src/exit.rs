//! Why a VM stopped, and the VMM's exit status for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::timeline::Timeline;

/// Exit statuses of `kiln-vmm` (documented in `kiln-vmm --help`); their
/// home is the protocol crate, which launchers read them from.
pub use kiln_protocol::vmm::exit as code;

/// Most characters of the guest's panic line kept in the reason.
const MAX_PANIC_LINE: usize = 240;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset the machine (reboot, `reboot=k`).
    GuestReset,
    /// The guest powered off or halted for good.
    GuestShutdown,
    /// The guest kernel reported a panic (pvpanic port or KVM crash event),
    /// with its panic line from the console when there is one.
    GuestPanic { line: Option<String> },
    /// The guest's init (the kiln agent) reported a fatal error, then
    /// stopped the VM.
    InitFailed,
    /// A vCPU took a triple fault.
    TripleFault { vcpu: u8 },
    /// KVM could not emulate a guest instruction.
    EmulationFailure {
        vcpu: u8,
        rip: u64,
        suberror: u32,
        bytes: Vec<u8>,
    },
    /// The guest showed no activity for the watchdog period.
    Watchdog { idle_secs: u64 },
    /// The VMM was asked to stop by a signal (SIGTERM, SIGINT, or its parent's death).
    Signal { signal: i32 },
    /// The VMM itself failed.
    VmmError { message: String },
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestShutdown => code::GUEST_STOPPED,
            ExitReason::GuestPanic { .. } => code::GUEST_PANIC,
            ExitReason::InitFailed => code::INIT_FAILED,
            ExitReason::TripleFault { .. } => code::TRIPLE_FAULT,
            ExitReason::EmulationFailure { .. } => code::EMULATION_FAILURE,
            ExitReason::Watchdog { .. } => code::WATCHDOG,
            ExitReason::Signal { signal } => code::SIGNAL_BASE + signal,
            ExitReason::VmmError { .. } => code::VMM_ERROR,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset the VM"),
            ExitReason::GuestShutdown => write!(f, "guest powered off"),
            ExitReason::GuestPanic { line: None } => write!(f, "guest kernel panicked"),
            // The line is the guest's text: one line, no terminal controls.
            ExitReason::GuestPanic { line: Some(line) } => write!(
                f,
                "guest kernel panicked: {}",
                line.chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_PANIC_LINE)
                    .collect::<String>()
            ),
            ExitReason::InitFailed => write!(f, "the guest's init reported a fatal error"),
            ExitReason::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            ExitReason::EmulationFailure {
                vcpu,
                rip,
                suberror,
                bytes,
            } => {
                write!(
                    f,
                    "emulation failure on vCPU {vcpu} (suberror {suberror}) at RIP {rip:#x}, instruction bytes:"
                )?;
                if bytes.is_empty() {
                    write!(f, " unreadable")?;
                }
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            ExitReason::Watchdog { idle_secs } => write!(
                f,
                "watchdog: no guest activity for {idle_secs}s (a vCPU may be stuck in KVM_RUN)"
            ),
            ExitReason::Signal { signal } => write!(f, "stopped by signal {signal}"),
            ExitReason::VmmError { message } => write!(f, "VMM error: {message}"),
        }
    }
}

/// Counts of vCPU exits to userspace, by reason.
#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("io_in", &self.io_in),
            ("io_out", &self.io_out),
            ("mmio_read", &self.mmio_read),
            ("mmio_write", &self.mmio_write),
            ("interrupted", &self.interrupted),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What the vCPU threads, devices and event loop share about a running VM.
pub struct RunState {
    exit: Mutex<Option<ExitReason>>,
    exit_evt: EventFd,
    pub timeline: std::sync::Arc<Timeline>,
    pub exits: ExitCounters,
}

impl RunState {
    pub fn new(timeline: std::sync::Arc<Timeline>) -> std::io::Result<Self> {
        Ok(RunState {
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            timeline,
            exits: ExitCounters::default(),
        })
    }

    /// Records why the VM stops; the first reason wins.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut slot = crate::devices::bus::lock(&self.exit);
        if slot.is_none() {
            tracing::debug!("exit requested: {reason}");
            *slot = Some(reason);
        }
        let _ = self.exit_evt.write(1);
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.exit).clone()
    }

    pub fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn codes_are_distinct_and_first_reason_wins() {
        let all = [
            ExitReason::GuestReset.exit_code(),
            ExitReason::TripleFault { vcpu: 0 }.exit_code(),
            ExitReason::EmulationFailure {
                vcpu: 0,
                rip: 0,
                suberror: 1,
                bytes: vec![],
            }
            .exit_code(),
            ExitReason::Watchdog { idle_secs: 1 }.exit_code(),
            ExitReason::GuestPanic { line: None }.exit_code(),
            ExitReason::InitFailed.exit_code(),
            ExitReason::VmmError {
                message: String::new(),
            }
            .exit_code(),
        ];
        let mut sorted = all.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
        assert_eq!(ExitReason::Signal { signal: 15 }.exit_code(), 143);

        let s = RunState::new(std::sync::Arc::new(Timeline::new(Instant::now()))).unwrap();
        s.request_exit(ExitReason::GuestReset);
        s.request_exit(ExitReason::Watchdog { idle_secs: 3 });
        assert_eq!(s.exit_reason(), Some(ExitReason::GuestReset));
        assert_eq!(s.exit_event().read().unwrap(), 2);
    }

    #[test]
    fn panic_reason_is_one_clean_line() {
        let r = ExitReason::GuestPanic {
            line: Some("Kernel panic - not syncing: x\x1b[2J\ry".into()),
        };
        assert_eq!(
            r.to_string(),
            "guest kernel panicked: Kernel panic - not syncing: x[2Jy"
        );
        assert_eq!(r.exit_code(), 5);
    }

    #[test]
    fn emulation_failure_names_rip_and_bytes() {
        let r = ExitReason::EmulationFailure {
            vcpu: 1,
            rip: 0xffff_8000_0010_0000,
            suberror: 1,
            bytes: vec![0x0f, 0x01, 0xc1],
        };
        let s = r.to_string();
        assert!(
            s.contains("0xffff800000100000") && s.contains("0f 01 c1"),
            "{s}"
        );
    }
}
