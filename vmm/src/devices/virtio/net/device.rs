//! The virtio-net device: features and config space for the transport,
//! and the two queues served against a [`Tap`].

use std::io;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use super::{MAX_FRAME, MIN_FRAME, QUEUE_SIZE, VNET_HDR_LEN};
use crate::devices::virtio::{
    check_queues, read_config_bytes, ActivateError, Interrupt, Memory, VirtioDevice, TYPE_NET,
};
use crate::rate_limiter::RateLimiter;

pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
/// Frames served per queue before the event loop gets a turn; the rest
/// wait for the next one (the queue event is re-armed).
pub const BATCH_LIMIT: usize = 4 * QUEUE_SIZE as usize;
/// `num_buffers` in the header: where it is, and always 1 (no mergeable
/// receive buffers).
const NUM_BUFFERS_AT: usize = 10;

/// What a network card did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames from the host dropped: too short, or no usable guest buffer.
    pub rx_dropped: u64,
    /// Guest frames dropped: a malformed chain, or the TAP refused it.
    pub tx_dropped: u64,
}

struct Active {
    mem: Memory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

pub struct Net {
    tap: Tap,
    config: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    queue_events: [EventFd; 2],
    active: Option<Active>,
    counters: NetCounters,
    /// One frame read from the TAP that waits for a guest buffer.
    rx_buf: Vec<u8>,
    rx_held: Option<usize>,
    tx_buf: Vec<u8>,
    /// Offloads the driver accepted, for the TAP; applied on the event
    /// loop's thread, the one whose seccomp filter allows it.
    offload_pending: Option<u32>,
    on_activity: Option<Box<dyn Fn() + Send>>,
    /// Per direction, frames and bytes (after the header) to the guest and from it.
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

/// Parses `aa:bb:cc:dd:ee:ff`; None unless six hex pairs of a unicast address.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// The virtio features a TAP accepting `offloads` lets both sides use.
fn features_for(offloads: u32) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut f = 0;
    if offloads & libc::TUN_F_CSUM != 0 {
        f |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        if offloads & libc::TUN_F_TSO4 != 0 {
            f |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if offloads & libc::TUN_F_TSO6 != 0 {
            f |= bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_GUEST_TSO6);
        }
    }
    f
}

/// The TAP offloads for the features the driver accepted: what the
/// guest can take on its receive queue.
fn offloads_for(acked: u64) -> u32 {
    let has = |b: u32| acked & (1u64 << b) != 0;
    let mut t = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        t |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            t |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            t |= libc::TUN_F_TSO6;
        }
    }
    t
}

impl Net {
    /// A card on `tap` with the MAC `mac` (the guest picks one if None).
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> io::Result<Self> {
        let mut avail_features = features_for(tap.supported_offloads());
        let mut config = [0u8; 6];
        if let Some(mac) = mac {
            avail_features |= 1 << VIRTIO_NET_F_MAC;
            config = mac;
        }
        Ok(Net {
            tap,
            config,
            avail_features,
            acked_features: 0,
            queue_events: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            active: None,
            counters: NetCounters::default(),
            rx_buf: vec![0u8; MAX_FRAME],
            rx_held: None,
            tx_buf: vec![0u8; MAX_FRAME],
            offload_pending: None,
            on_activity: None,
            rx_limiter: None,
            tx_limiter: None,
        })
    }

    /// Limits what reaches the guest (`rx`) and what it sends (`tx`).
    /// Set before the device joins the event loop, which watches their timers.
    pub fn set_rate_limiters(&mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    pub(super) fn rx_limiter(&self) -> Option<&RateLimiter> {
        self.rx_limiter.as_ref()
    }

    pub(super) fn tx_limiter(&self) -> Option<&RateLimiter> {
        self.tx_limiter.as_ref()
    }

    /// The receive limiter's timer fired: serve what it held back.
    pub fn rx_timer_fired(&mut self) -> usize {
        if let Some(l) = &mut self.rx_limiter {
            l.timer_fired();
        }
        self.process_rx()
    }

    /// The transmit limiter's timer fired: serve what it held back.
    pub fn tx_timer_fired(&mut self) -> usize {
        if let Some(l) = &mut self.tx_limiter {
            l.timer_fired();
        }
        self.process_tx()
    }

    /// Called after each batch of guest frames (watchdog feed).
    pub fn set_activity_hook(&mut self, hook: Box<dyn Fn() + Send>) {
        self.on_activity = Some(hook);
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub(super) fn queue_event_fds(&self) -> &[EventFd; 2] {
        &self.queue_events
    }

    /// Hands the guest the frames the TAP has, while it has buffers, at
    /// most [`BATCH_LIMIT`]; returns how many buffers were used.
    pub fn process_rx(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        // Frames wait in the TAP until the limiter's timer fires.
        if self.rx_limiter.as_ref().is_some_and(|l| l.is_blocked()) {
            return 0;
        }
        if let Some(flags) = self.offload_pending.take() {
            if let Err(e) = self.tap.set_offload(flags) {
                tracing::warn!("virtio-net: cannot set the TAP's offloads: {e}");
            }
        }
        let mut served = 0;
        let mut reads = 0;
        loop {
            // Runts dropped count too: a flood of them gets a batch.
            if reads >= BATCH_LIMIT {
                let _ = self.queue_events[RX].write(1);
                break;
            }
            let len = match self.rx_held {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    // A closed stand-in; a TAP never reads 0.
                    Ok(0) => break,
                    Ok(len) if len < MIN_FRAME => {
                        reads += 1;
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // WouldBlock: the TAP is drained, and its next frame
                    // is a new edge.
                    Err(_) => break,
                },
            };
            let Some(chain) = active.queues[RX].pop_descriptor_chain(&active.mem) else {
                // Held until the guest posts buffers and notifies.
                self.rx_held = Some(len);
                break;
            };
            if let Some(l) = &mut self.rx_limiter {
                if !l.consume((len - VNET_HDR_LEN) as u64, Instant::now()) {
                    active.queues[RX].go_to_previous_position();
                    self.rx_held = Some(len);
                    break;
                }
            }
            self.rx_held = None;
            let head = chain.head_index();
            self.rx_buf[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&1u16.to_le_bytes());
            let used = match write_frame(&active.mem, chain, &self.rx_buf[..len]) {
                Some(()) => {
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    len as u32
                }
                None => {
                    self.counters.rx_dropped += 1;
                    0
                }
            };
            // A broken used ring is the guest's problem; stop serving it.
            if active.queues[RX].add_used(&active.mem, head, used).is_err() {
                break;
            }
            served += 1;
            reads += 1;
        }
        if served > 0 {
            active.interrupt.signal_used_queue();
        }
        served
    }

    /// Sends every frame the guest queued to the TAP, at most
    /// [`BATCH_LIMIT`], then interrupts the guest once; returns how many
    /// chains were taken.
    pub fn process_tx(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        // Frames wait in the queue until the limiter's timer fires.
        if self.tx_limiter.as_ref().is_some_and(|l| l.is_blocked()) {
            return 0;
        }
        let mut served = 0;
        'batch: loop {
            // The guest need not notify while we are draining the queue.
            let _ = active.queues[TX].disable_notification(&active.mem);
            let before = served;
            while let Some(chain) = active.queues[TX].pop_descriptor_chain(&active.mem) {
                let head = chain.head_index();
                let frame = read_frame(&active.mem, chain, &mut self.tx_buf);
                if let (Some(len), Some(l)) = (frame, &mut self.tx_limiter) {
                    if !l.consume((len - VNET_HDR_LEN) as u64, Instant::now()) {
                        // Taken again, whole, once the timer fires.
                        active.queues[TX].go_to_previous_position();
                        break 'batch;
                    }
                }
                match frame {
                    Some(len) => match self.tap.write_frame(&self.tx_buf[..len]) {
                        Ok(_) => {
                            self.counters.tx_packets += 1;
                            self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                        }
                        // A full TAP queue drops, as a NIC's would.
                        Err(_) => self.counters.tx_dropped += 1,
                    },
                    None => self.counters.tx_dropped += 1,
                }
                if active.queues[TX].add_used(&active.mem, head, 0).is_err() {
                    break 'batch;
                }
                served += 1;
                if served >= BATCH_LIMIT {
                    let _ = self.queue_events[TX].write(1);
                    break 'batch;
                }
            }
            // Frames queued while notifications were off are sent now. An
            // avail index no pop can take (more than a queue ahead) makes
            // no progress: not served again until the guest notifies.
            match active.queues[TX].enable_notification(&active.mem) {
                Ok(true) if served > before => continue,
                _ => break,
            }
        }
        if served > 0 {
            active.interrupt.signal_used_queue();
            if let Some(hook) = &self.on_activity {
                hook();
            }
        }
        served
    }
}

/// Gathers a transmit chain into `buf`; None if it is malformed: a buffer
/// the device would write, outside guest memory, a frame over `buf`'s
/// size or too short to be Ethernet.
fn read_frame(mem: &Memory, chain: DescriptorChain<&Memory>, buf: &mut [u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut cut = false;
    for desc in chain {
        if desc.is_write_only() {
            return None;
        }
        let end = len.checked_add(desc.len() as usize)?;
        let dst = buf.get_mut(len..end)?;
        mem.read_slice(dst, desc.addr()).ok()?;
        len = end;
        // The chain's walk stops at a queue's worth of descriptors or a
        // next index past the table: a frame still asking for more is cut.
        cut = desc.has_next();
    }
    (!cut && len >= MIN_FRAME).then_some(len)
}

/// Scatters `frame` into a receive chain; None if it does not fit or the
/// chain is malformed (a buffer the device may not write, outside guest
/// memory).
fn write_frame(mem: &Memory, chain: DescriptorChain<&Memory>, frame: &[u8]) -> Option<()> {
    let mut left = frame;
    for desc in chain {
        if !desc.is_write_only() {
            return None;
        }
        let n = left.len().min(desc.len() as usize);
        // Checked even when empty: the whole chain must be the guest's.
        mem.get_slice(desc.addr(), desc.len() as usize).ok()?;
        mem.write_slice(&left[..n], desc.addr()).ok()?;
        left = &left[n..];
        if left.is_empty() {
            return Some(());
        }
    }
    None
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
    fn avail_features(&self) -> u64 {
        self.avail_features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&mem, &queues, 2)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Only what was offered: a driver claiming more gets no more.
        self.offload_pending = Some(offloads_for(self.acked_features & self.avail_features));
        // Frames may have waited in the TAP before the driver was ready.
        let _ = self.queue_events[RX].write(1);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.rx_held = None;
        self.offload_pending = Some(0);
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }
}
