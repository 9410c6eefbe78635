//! virtio devices on the MMIO transport. Every device has the same shape:
//! it implements [`VirtioDevice`] for the transport and
//! `event_manager::MutEventSubscriber` for its queue events, and keeps its
//! queue logic in plain methods that tests drive without KVM.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// Guest memory as devices see it.
pub type Memory = GuestMemoryMmap;

/// VIRTIO_F_VERSION_1: the modern interface, required by virtio-mmio v2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("driver set up {got} queues, device has {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
}

/// A device as the transport sees it.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, written when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device once the driver set DRIVER_OK.
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state.
    fn reset(&mut self);
    /// The queues the running device owns (none before activation), for
    /// snapshots.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
}

/// A device's interrupt line: the status register plus an irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // A full eventfd counter still raises the IRQ; nothing to do on error.
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a saved status, without raising the IRQ.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Copies `bytes` of a little-endian config space into `data` at `offset`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = offset as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(start + i).copied().unwrap_or(0);
    }
}

/// Checks the queue count and each queue's validity before activation.
pub fn check_queues(mem: &Memory, queues: &[Queue], want: usize) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    if queues.len() != want {
        return Err(ActivateError::QueueCount {
            got: queues.len(),
            want,
        });
    }
    for (i, q) in queues.iter().enumerate() {
        if !q.is_valid(mem) {
            return Err(ActivateError::InvalidQueue(i));
        }
    }
    Ok(())
}
