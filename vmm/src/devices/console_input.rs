//! The VMM's standard input fed to the guest console (`--serial-stdio`).

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::bus::lock;
use super::serial::SerialDevice;

pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        ConsoleInput { serial }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Fails for files and /dev/null, which then simply give no input.
        let _ = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN));
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let _ = ops.remove(events);
            return;
        }
        let _ = lock(&self.serial)
            .uart
            .enqueue_raw_bytes(&buf[..n as usize]);
    }
}
