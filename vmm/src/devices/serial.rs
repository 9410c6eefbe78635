//! COM1: a 16550A UART (vm-superio) at port 0x3f8 on IRQ 4. Its output is
//! copied to the configured sink, scanned for the readiness marker and the
//! init-failure marker, and its last bytes kept for the reason a VM stopped.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::timeline::Timeline;

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Console markers the sink looks for (empty: not looked for).
pub struct Markers {
    /// The guest is ready.
    pub ready: String,
    /// The guest's init failed fatally (it powers off right after).
    pub init_failed: String,
}

/// How much of the console [`ConsoleTail`] keeps: a panic line with the
/// stack dump the kernel may print after it.
const TAIL_BYTES: usize = 16 << 10;

/// The last bytes of the guest console.
#[derive(Default)]
pub struct ConsoleTail(Mutex<VecDeque<u8>>);

impl ConsoleTail {
    fn push(&self, buf: &[u8]) {
        let mut tail = super::bus::lock(&self.0);
        let keep = buf.len().min(TAIL_BYTES);
        let overflow = (tail.len() + keep).saturating_sub(TAIL_BYTES);
        tail.drain(..overflow);
        tail.extend(&buf[buf.len() - keep..]);
    }

    /// The kept bytes, as text.
    pub fn text(&self) -> String {
        let tail = super::bus::lock(&self.0);
        let (a, b) = tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }

    /// The guest kernel's last panic line in the kept bytes.
    pub fn panic_line(&self) -> Option<String> {
        kiln_protocol::console::find_panic_line(&self.text()).map(str::to_string)
    }
}

/// Where guest console bytes go; records the first byte and the markers.
pub struct ConsoleSink {
    out: Option<Box<dyn Write + Send>>,
    tail: Arc<ConsoleTail>,
    ready: Vec<u8>,
    init_failed: Vec<u8>,
    /// The last bytes seen, as many as the longest marker.
    window: Vec<u8>,
    timeline: Arc<Timeline>,
}

impl ConsoleSink {
    pub fn new(
        out: Option<Box<dyn Write + Send>>,
        tail: Arc<ConsoleTail>,
        markers: &Markers,
        timeline: Arc<Timeline>,
    ) -> Self {
        let longest = markers.ready.len().max(markers.init_failed.len());
        ConsoleSink {
            out,
            tail,
            ready: markers.ready.as_bytes().to_vec(),
            init_failed: markers.init_failed.as_bytes().to_vec(),
            window: Vec::with_capacity(longest),
            timeline,
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.timeline.mark_serial_output();
        self.tail.push(buf);
        let longest = self.ready.len().max(self.init_failed.len());
        if longest > 0 {
            for b in buf {
                if self.window.len() == longest {
                    self.window.remove(0);
                }
                self.window.push(*b);
                if !self.ready.is_empty() && self.window.ends_with(&self.ready) {
                    self.timeline.mark_ready();
                }
                if !self.init_failed.is_empty() && self.window.ends_with(&self.init_failed) {
                    self.timeline.mark_init_failed();
                }
            }
        }
        if let Some(out) = self.out.as_mut() {
            // A closed or full console must not stop the guest.
            let _ = out.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
        Ok(())
    }
}

pub type Uart = Serial<IrqTrigger, NoEvents, ConsoleSink>;

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSerial {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SavedSerial {
    fn from(s: SerialState) -> Self {
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SavedSerial> for SerialState {
    fn from(s: &SavedSerial) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    pub uart: Uart,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // An IRQ that cannot be raised is the guest's loss, not a VMM error.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_sink_and_the_marker_is_seen() {
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::new(ConsoleTail::default());
        let sink = ConsoleSink::new(
            Some(Box::new(Shared(seen.clone()))),
            tail.clone(),
            &Markers {
                ready: "READY".into(),
                init_failed: "INIT_FAILED".into(),
            },
            timeline.clone(),
        );
        let irq = IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = SerialDevice {
            uart: Serial::new(irq, sink),
        };
        for b in b"boot... REA" {
            dev.write(0, &[*b]);
        }
        assert!(timeline.first_serial_output().is_some());
        assert!(timeline.ready_marker().is_none());
        for b in b"DY\n" {
            dev.write(0, &[*b]);
        }
        assert!(timeline.ready_marker().is_some());
        assert_eq!(&seen.lock().unwrap()[..], b"boot... READY\n");
        assert!(timeline.init_failed().is_none());
        for b in b"oops INIT_FAILED: x\n" {
            dev.write(0, &[*b]);
        }
        assert!(timeline.init_failed().is_some());
        assert_eq!(tail.text(), "boot... READY\noops INIT_FAILED: x\n");
        assert_eq!(tail.panic_line(), None);
        // Line status: transmitter empty, so the guest keeps writing.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x20, 0x20);
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_and_finds_the_panic_line() {
        let tail = ConsoleTail::default();
        tail.push(&vec![b'x'; TAIL_BYTES]);
        tail.push(b"\r\nKernel panic - not syncing: No working init found.\r\n");
        tail.push(b"CPU: 0 PID: 1\r\n");
        let text = tail.text();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with("CPU: 0 PID: 1\r\n"), "{text}");
        assert_eq!(
            tail.panic_line().as_deref(),
            Some("Kernel panic - not syncing: No working init found.")
        );
        tail.push(&vec![b'y'; 2 * TAIL_BYTES]);
        assert_eq!(tail.text(), "y".repeat(TAIL_BYTES));
    }
}
