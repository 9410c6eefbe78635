//! virtio-rng: fills the guest's buffers with bytes from the host's
//! getrandom(2).

use std::io::Write;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{check_queues, ActivateError, Interrupt, Memory, VirtioDevice, TYPE_RNG};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request; the driver asks again for more.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Requests served per notification before the event loop gets a turn
/// (the rest wait: the queue event is re-armed).
pub const BATCH_LIMIT: usize = 4 * QUEUE_SIZE as usize;

struct Active {
    mem: Memory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Rng {
    queue_events: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
    /// Bytes handed to the guest, for metrics and tests.
    pub bytes_served: u64,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            queue_events: [EventFd::new(libc::EFD_NONBLOCK)?],
            acked_features: 0,
            active: None,
            bytes_served: 0,
        })
    }

    /// Serves the pending requests, at most [`BATCH_LIMIT`]; returns how
    /// many were served.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mut served = 0;
        let mut buf = vec![0u8; MAX_REQUEST];
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let written = match chain.writer(&active.mem) {
                Ok(mut writer) => {
                    let want = writer.available_bytes().min(MAX_REQUEST);
                    let n = fill_random(&mut buf[..want]);
                    writer.write_all(&buf[..n]).map(|_| n).unwrap_or(0)
                }
                Err(_) => 0,
            };
            self.bytes_served += written as u64;
            // A broken ring is the guest's problem; stop serving it.
            if active
                .queue
                .add_used(&active.mem, head, written as u32)
                .is_err()
            {
                break;
            }
            served += 1;
            if served >= BATCH_LIMIT {
                let _ = self.queue_events[0].write(1);
                break;
            }
        }
        if served > 0 {
            active.interrupt.signal_used_queue();
        }
        served
    }
}

fn fill_random(buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            break;
        }
        filled += n as usize;
    }
    filled
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
    fn avail_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        mem: Memory,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&mem, &queues, 1)?;
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch its queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue_events[0].read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_write_only_buffers_and_signals() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let flags = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x8_0000, 512, flags, 0,
        ))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), vec![queue], interrupt.clone())
            .unwrap();
        assert_eq!(rng.process_queue(), 1);
        assert_eq!(rng.bytes_served, 512);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x8_0000)).unwrap();
        assert!(got.iter().any(|b| *b != 0), "random bytes written");
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(interrupt.status() & 1, 1);
        assert_eq!(irqfd.read().unwrap(), 1);
        // Nothing more pending.
        assert_eq!(rng.process_queue(), 0);
    }

    #[test]
    fn inactive_device_serves_nothing() {
        let mut rng = Rng::new().unwrap();
        assert_eq!(rng.process_queue(), 0);
    }
}
