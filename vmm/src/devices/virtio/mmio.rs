//! The virtio-mmio transport (version 2): the register window a driver
//! uses to negotiate features, set up queues and start the device.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{Interrupt, Memory, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::lock;
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// A saved queue: the driver's layout and the device's ring positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A transport's registers and queues, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<SavedQueue>,
}

/// Why a saved transport cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("saved device type {saved} where the VM has type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("saved queue {0} is invalid")]
    Queue(usize),
    #[error("the device did not start again: {0}")]
    Activate(#[from] super::ActivateError),
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Memory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: Memory,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = fresh_queues(&*lock(&device));
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The registers and queues; the queues of a running device come from
    /// the device, which owns them.
    pub fn state(&self) -> TransportState {
        let device = lock(&self.device);
        let queues = if self.activated {
            device.queue_states()
        } else {
            self.queues.iter().map(Queue::state).collect()
        };
        TransportState {
            device_type: device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(SavedQueue::from).collect(),
        }
    }

    /// Puts a saved state back into a fresh transport; a device that was
    /// running is started again on its saved queues.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportRestoreError> {
        let mut device = lock(&self.device);
        let actual = device.device_type();
        if state.device_type != actual {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != device.queue_max_sizes().len() {
            return Err(TransportRestoreError::Queue(state.queues.len()));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (q, max)) in state
            .queues
            .iter()
            .zip(device.queue_max_sizes())
            .enumerate()
        {
            if q.max_size != *max {
                return Err(TransportRestoreError::Queue(i));
            }
            queues.push(
                Queue::try_from(QueueState::from(*q))
                    .map_err(|_| TransportRestoreError::Queue(i))?,
            );
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        if state.activated {
            device.set_acked_features(self.acked_features);
            for (mine, theirs) in self.queues.iter_mut().zip(&queues) {
                mine.set_ready(theirs.ready());
            }
            device.activate(self.mem.clone(), queues, self.interrupt.clone())?;
            self.activated = true;
        } else {
            self.queues = queues;
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.queues = fresh_queues(&*lock(&self.device));
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.status = value;
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if !self.activated && value & ready == ready && value & STATUS_FAILED == 0 {
            let mut device = lock(&self.device);
            device.set_acked_features(self.acked_features);
            // The device owns the queues from here on; the transport keeps
            // fresh ones only to answer register reads until a reset.
            let queues = std::mem::replace(&mut self.queues, fresh_queues(&*device));
            for (mine, theirs) in self.queues.iter_mut().zip(&queues) {
                mine.set_ready(theirs.ready());
            }
            match device.activate(self.mem.clone(), queues, self.interrupt.clone()) {
                Ok(()) => self.activated = true,
                Err(e) => {
                    tracing::warn!(
                        "virtio device {} failed to start: {e}",
                        device.device_type()
                    );
                    self.status |= STATUS_FAILED;
                }
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = device.avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => {
                drop(device);
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            0x44 => {
                drop(device);
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        // Queue layout may only change before the device runs.
        let configurable = !self.activated;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16)
                }
            }
            0x44 if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1)
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                // Reached only when KVM did not take the write as an ioeventfd.
                if let Some(evt) = lock(&self.device).queue_events().get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configurable => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(low, high),
                        0x90 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }
}

/// Unconfigured queues of the sizes the device offers.
fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Queue::new fails only for sizes that are not a power of two.
        .filter_map(|size| Queue::new(*size).ok())
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    fn read32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn write32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn driver_handshake_activates_the_device() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(rng.clone(), mem, irq);
        assert_eq!(read32(&mut t, 0), MAGIC);
        assert_eq!(read32(&mut t, 4), 2);
        assert_eq!(read32(&mut t, 8), super::super::TYPE_RNG);
        write32(&mut t, 0x14, 1);
        assert_eq!(read32(&mut t, 0x10), 1, "VERSION_1 offered");
        write32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(&mut t, 0x24, 1);
        write32(&mut t, 0x20, 1);
        write32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        write32(&mut t, 0x30, 0);
        assert_eq!(read32(&mut t, 0x34), 256);
        write32(&mut t, 0x38, 16);
        write32(&mut t, 0x80, 0x1000);
        write32(&mut t, 0x90, 0x2000);
        write32(&mut t, 0xa0, 0x3000);
        write32(&mut t, 0x44, 1);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        write32(&mut t, 0x70, all);
        assert_eq!(read32(&mut t, 0x70), all, "no FAILED bit");
        assert!(t.activated);
        // Writing 0 resets.
        write32(&mut t, 0x70, 0);
        assert!(!t.activated);
        assert_eq!(read32(&mut t, 0x44), 0);
    }

    #[test]
    fn a_running_transport_is_saved_and_restored_with_its_queue() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = || Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(
            Arc::new(Mutex::new(Rng::new().unwrap())),
            mem.clone(),
            irq(),
        );
        write32(&mut t, 0x24, 1);
        write32(&mut t, 0x20, 1);
        write32(&mut t, 0x38, 16);
        write32(&mut t, 0x80, 0x1000);
        write32(&mut t, 0x90, 0x2000);
        write32(&mut t, 0xa0, 0x3000);
        write32(&mut t, 0x44, 1);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        write32(&mut t, 0x70, all);
        t.interrupt.signal_used_queue();
        let saved = t.state();
        assert!(saved.activated);
        assert_eq!(saved.queues[0].size, 16);
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        assert_eq!(saved.interrupt_status, super::super::INT_USED_RING);

        let mut back = MmioTransport::new(
            Arc::new(Mutex::new(Rng::new().unwrap())),
            mem.clone(),
            irq(),
        );
        back.restore(&saved).unwrap();
        assert_eq!(back.state(), saved);
        assert_eq!(read32(&mut back, 0x70), all);
        assert_eq!(read32(&mut back, 0x60), super::super::INT_USED_RING);

        let mut wrong = saved.clone();
        wrong.device_type = super::super::TYPE_BLOCK;
        let mut other = MmioTransport::new(Arc::new(Mutex::new(Rng::new().unwrap())), mem, irq());
        assert!(matches!(
            other.restore(&wrong),
            Err(TransportRestoreError::DeviceType { .. })
        ));
    }

    #[test]
    fn activation_with_unconfigured_queue_fails_cleanly() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(rng, mem, irq);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        write32(&mut t, 0x70, all);
        assert!(!t.activated);
        assert_eq!(read32(&mut t, 0x70) & STATUS_FAILED, STATUS_FAILED);
    }
}
