//! Signals of a running VMM: SIGTERM, SIGINT and SIGHUP stop the VM
//! through a signalfd watched by the event loop, and a real-time signal
//! with an empty handler kicks vCPU threads out of `KVM_RUN`.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::FromRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitReason, RunState};

const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it
/// starts later), so that one arriving while the VM is built waits for the
/// VM's signalfd instead of killing the process uncleanly.
pub fn block_stop_signals() {
    // SAFETY: plain sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The stop signals, taken through a signalfd while the VM runs; the old
/// signal mask comes back when dropped.
pub struct SignalWatch {
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    old_mask: libc::sigset_t,
}

impl SignalWatch {
    pub fn new(state: Arc<RunState>) -> std::io::Result<Self> {
        // SAFETY: plain sigset manipulation on local values.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            // Blocked here, inherited by the vCPU threads: only the signalfd sees them.
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(e);
            }
            Ok(SignalWatch {
                subscriber: Arc::new(Mutex::new(SignalSubscriber {
                    file: File::from_raw_fd(fd),
                    state,
                })),
                old_mask: old,
            })
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in new().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

struct SignalSubscriber {
    file: File,
    state: Arc<RunState>,
}

impl MutEventSubscriber for SignalSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.file, EventSet::IN));
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        if self.file.read_exact(&mut info).is_ok() {
            let signal = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
            self.state.request_exit(ExitReason::Signal { signal });
        }
    }
}

/// The signal that interrupts a vCPU thread's `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::vcpu::on_kick();
}

/// The vCPU kick signal interrupts KVM_RUN; its handler only makes sure a
/// KVM_RUN about to start returns at once too.
pub fn install_kick_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}
