//! The guest kernel's panic report: with `kiln_pvpanic` on its command line
//! (kiln-vmm always adds it), the guest kernel (patch 0014) writes
//! PANICKED to I/O port 0x505 from its panic notifier, before
//! `panic=-1 reboot=k` resets the VM. Without this device that reset looks
//! exactly like a clean reboot. A port write needs guest kernel code, so
//! text a guest program prints cannot fake it.

use super::BusDevice;

/// The port QEMU's ISA pvpanic device uses too.
pub const PORT: u64 = 0x505;
/// The guest kernel parameter that turns the report on.
pub const CMDLINE_PARAM: &str = "kiln_pvpanic";
/// The event bit the guest writes (the pvpanic ABI's PVPANIC_PANICKED).
const PANICKED: u8 = 1;

/// Calls `on_panic` when the guest reports a panic.
pub struct PvPanic {
    on_panic: Box<dyn Fn() + Send>,
}

impl PvPanic {
    pub fn new(on_panic: Box<dyn Fn() + Send>) -> Self {
        PvPanic { on_panic }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device understands, as a pvpanic device answers.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PANICKED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|b| b & PANICKED != 0) {
            (self.on_panic)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_the_panicked_bit_reports() {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let mut dev = PvPanic::new(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], PANICKED);
        // PVPANIC_CRASH_LOADED alone (a kdump kernel takes over) is no panic report.
        dev.write(0, &[2]);
        dev.write(0, &[]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        dev.write(0, &[PANICKED]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
