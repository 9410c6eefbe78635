//! Ctrl-C (SIGINT), SIGTERM and SIGHUP, counted instead of fatal, for a
//! process that looks after a VM (`kiln run`, the shim): it decides what
//! the first and the second request mean.

use std::sync::atomic::{AtomicUsize, Ordering};

static STOPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOPS.fetch_add(1, Ordering::SeqCst);
}

/// From now on, stop signals only count.
pub fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// How many stop signals arrived.
pub fn count() -> usize {
    STOPS.load(Ordering::SeqCst)
}
