//! Moments of a VM's life, shared by the vCPU threads, the devices and the
//! event loop: boot milestones for metrics, and the last sign of guest
//! activity for the watchdog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const UNSET: u64 = u64::MAX;

/// Microseconds since the VMM started, recorded once each (activity: always).
pub struct Timeline {
    start: Instant,
    first_kvm_run: AtomicU64,
    first_serial_output: AtomicU64,
    ready_marker: AtomicU64,
    init_failed: AtomicU64,
    last_activity: AtomicU64,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            first_kvm_run: AtomicU64::new(UNSET),
            first_serial_output: AtomicU64::new(UNSET),
            ready_marker: AtomicU64::new(UNSET),
            init_failed: AtomicU64::new(UNSET),
            last_activity: AtomicU64::new(0),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn mark_once(slot: &AtomicU64, now: u64) {
        let _ = slot.compare_exchange(UNSET, now, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn mark_first_kvm_run(&self) {
        Self::mark_once(&self.first_kvm_run, self.now_us());
    }

    pub fn mark_serial_output(&self) {
        let now = self.now_us();
        Self::mark_once(&self.first_serial_output, now);
        self.last_activity.store(now, Ordering::Release);
    }

    pub fn mark_ready(&self) {
        Self::mark_once(&self.ready_marker, self.now_us());
    }

    /// The guest's init announced a fatal error on the console.
    pub fn mark_init_failed(&self) {
        Self::mark_once(&self.init_failed, self.now_us());
    }

    /// Any sign of life from the guest: a device access or a queue event.
    pub fn mark_activity(&self) {
        self.last_activity.store(self.now_us(), Ordering::Release);
    }

    pub fn since_last_activity(&self) -> Duration {
        let last = self.last_activity.load(Ordering::Acquire);
        Duration::from_micros(self.now_us().saturating_sub(last))
    }

    fn get(slot: &AtomicU64) -> Option<Duration> {
        match slot.load(Ordering::Acquire) {
            UNSET => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn first_kvm_run(&self) -> Option<Duration> {
        Self::get(&self.first_kvm_run)
    }
    pub fn first_serial_output(&self) -> Option<Duration> {
        Self::get(&self.first_serial_output)
    }
    pub fn ready_marker(&self) -> Option<Duration> {
        Self::get(&self.ready_marker)
    }
    pub fn init_failed(&self) -> Option<Duration> {
        Self::get(&self.init_failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_recorded_once() {
        let t = Timeline::new(Instant::now());
        assert!(t.ready_marker().is_none());
        t.mark_ready();
        let first = t.ready_marker().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.mark_ready();
        assert_eq!(t.ready_marker().unwrap(), first);
        t.mark_activity();
        assert!(t.since_last_activity() < Duration::from_secs(1));
    }
}
