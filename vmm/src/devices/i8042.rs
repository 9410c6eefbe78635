//! The part of an i8042 keyboard controller a guest uses to reset the
//! machine (`reboot=k`): command 0xFE on port 0x64 ends the VM.

use super::BusDevice;

/// Port 0x60 (data) is offset 0, port 0x64 (command/status) offset 4.
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Calls `on_reset` when the guest asks for a CPU reset.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for a command).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_fires_once_other_writes_do_not() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let mut dev = I8042::new(Box::new(move || h.store(true, Ordering::SeqCst)));
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 2, 0, "input buffer must read empty");
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert!(!hit.load(Ordering::SeqCst));
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(hit.load(Ordering::SeqCst));
    }
}
