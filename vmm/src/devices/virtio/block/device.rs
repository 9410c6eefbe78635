//! The virtio-blk device: feature and config space for the transport, and
//! the queue served against a [`Disk`].

use std::sync::Arc;

use serde::Serialize;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{self, Kind, Parsed, Request, Segment, MAX_DESCRIPTORS};
use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::devices::virtio::{
    check_queues, read_config_bytes, ActivateError, Interrupt, Memory, VirtioDevice, TYPE_BLOCK,
};

/// Requests served before the event loop gets a turn; the rest wait for
/// the next one (the queue event is re-armed).
pub const BATCH_LIMIT: usize = 4 * QUEUE_SIZE as usize;
/// Most data buffers per request the driver may use: the queue less the
/// header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `struct virtio_blk_config` up to `blk_size`: capacity, size_max, seg_max.
const CONFIG_LEN: usize = 16;

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// What a drive did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockCounters {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    /// Requests answered with an error status, or dropped as unanswerable.
    pub errors: u64,
}

struct Active {
    mem: Memory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Block {
    disk: Disk,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    queue_events: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
    counters: BlockCounters,
    on_activity: Option<Box<dyn Fn() + Send>>,
    /// Scratch space for one request's descriptors.
    segments: [Segment; MAX_DESCRIPTORS],
}

impl Block {
    /// A device for `disk` that names itself `id` (at most 20 bytes; longer
    /// is cut, as the guest could not read more).
    pub fn new(disk: Disk, id: &str) -> std::io::Result<Self> {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            disk,
            id: id_bytes,
            config,
            queue_events: [EventFd::new(libc::EFD_NONBLOCK)?],
            acked_features: 0,
            active: None,
            counters: BlockCounters::default(),
            on_activity: None,
            segments: [Segment::default(); MAX_DESCRIPTORS],
        })
    }

    /// Called after each batch of requests (watchdog feed).
    pub fn set_activity_hook(&mut self, hook: Box<dyn Fn() + Send>) {
        self.on_activity = Some(hook);
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    pub(super) fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// Serves every pending request, then interrupts the guest once;
    /// returns how many were served.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mut served = 0;
        // Passes in a row that took nothing.
        let mut idle_passes = 0;
        'batch: loop {
            // The guest need not notify while we are draining the queue.
            let _ = active.queue.disable_notification(&active.mem);
            let before = served;
            while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
                let head = chain.head_index();
                let used = serve(
                    &self.disk,
                    &self.id,
                    &active.mem,
                    chain,
                    &mut self.segments,
                    &mut self.counters,
                );
                // A broken used ring is the guest's problem; stop serving it.
                if active.queue.add_used(&active.mem, head, used).is_err() {
                    break 'batch;
                }
                served += 1;
                if served >= BATCH_LIMIT {
                    let _ = self.queue_events[0].write(1);
                    break 'batch;
                }
            }
            idle_passes = if served > before { 0 } else { idle_passes + 1 };
            // Requests that arrived while notifications were off are served
            // now (one pass may find nothing: the guest's entry landed just
            // after the pop looked). A second pass in a row that takes
            // nothing while the index still says there is more means an
            // index no pop can take (more than the queue holds ahead): not
            // served again until the guest notifies.
            match active.queue.enable_notification(&active.mem) {
                Ok(true) if idle_passes < 2 => continue,
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

/// Serves one chain; returns the bytes written to the guest (the used length).
fn serve(
    disk: &Disk,
    id: &[u8; ID_BYTES],
    mem: &Memory,
    chain: virtio_queue::DescriptorChain<&Memory>,
    segments: &mut [Segment; MAX_DESCRIPTORS],
    counters: &mut BlockCounters,
) -> u32 {
    counters.requests += 1;
    let (status, (code, written)) = match request::parse(mem, chain, segments) {
        Parsed::NoStatus => {
            counters.errors += 1;
            return 0;
        }
        Parsed::Malformed { status, .. } => (status, (VIRTIO_BLK_S_IOERR, 0)),
        Parsed::Request { status, request } => (status, execute(disk, id, mem, &request, counters)),
    };
    if code != VIRTIO_BLK_S_OK {
        counters.errors += 1;
    }
    // The parser checked that the status byte is in guest memory.
    if mem.write_obj(code as u8, status).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// Carries out a well-formed request; returns its status and the data
/// bytes written to the guest.
fn execute(
    disk: &Disk,
    id: &[u8; ID_BYTES],
    mem: &Memory,
    request: &Request,
    counters: &mut BlockCounters,
) -> (u32, u32) {
    let ioerr = (VIRTIO_BLK_S_IOERR, 0);
    match request.kind {
        Kind::In => {
            if request.readable_len() != 0 {
                return ioerr;
            }
            let len = request.writable_len();
            let Some(offset) = checked_range(disk, request.sector, len) else {
                return ioerr;
            };
            let mut iov = [EMPTY_IOVEC; MAX_DESCRIPTORS];
            let Some(count) = iovecs(mem, request.writable, &mut iov) else {
                return ioerr;
            };
            // SAFETY: every iovec is a guest memory slice that `mem` keeps mapped.
            match unsafe { disk.read_at(&mut iov[..count], offset) } {
                Ok(()) => {
                    counters.bytes_read += len;
                    // Within u32: a chain's buffers total less than 4 GiB.
                    (VIRTIO_BLK_S_OK, u32::try_from(len).unwrap_or(u32::MAX))
                }
                Err(_) => ioerr,
            }
        }
        Kind::Out => {
            if disk.read_only() || request.writable_len() != 0 {
                return ioerr;
            }
            let len = request.readable_len();
            let Some(offset) = checked_range(disk, request.sector, len) else {
                return ioerr;
            };
            let mut iov = [EMPTY_IOVEC; MAX_DESCRIPTORS];
            let Some(count) = iovecs(mem, request.readable, &mut iov) else {
                return ioerr;
            };
            // SAFETY: every iovec is a guest memory slice that `mem` keeps mapped.
            match unsafe { disk.write_at(&mut iov[..count], offset) } {
                Ok(()) => {
                    counters.bytes_written += len;
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(_) => ioerr,
            }
        }
        // Not offered on a read-only drive, so not served there either.
        Kind::Flush if disk.read_only() => (VIRTIO_BLK_S_UNSUPP, 0),
        Kind::Flush => {
            counters.flushes += 1;
            match disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => ioerr,
            }
        }
        Kind::GetId => {
            let mut left: &[u8] = id;
            let mut written = 0u32;
            for seg in request.writable {
                let n = left.len().min(seg.len as usize);
                if n == 0 {
                    continue;
                }
                if mem.write_slice(&left[..n], GuestAddress(seg.addr)).is_err() {
                    return ioerr;
                }
                left = &left[n..];
                written += n as u32;
            }
            (VIRTIO_BLK_S_OK, written)
        }
        Kind::Other(_) => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie on the disk and
/// are whole sectors.
fn checked_range(disk: &Disk, sector: u64, len: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    if end > disk.sectors() {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

/// Maps each buffer to host memory; None if any lies outside guest memory.
fn iovecs(
    mem: &Memory,
    segments: &[Segment],
    iov: &mut [libc::iovec; MAX_DESCRIPTORS],
) -> Option<usize> {
    let mut count = 0;
    for seg in segments.iter().filter(|s| s.len > 0) {
        let slice = mem
            .get_slice(GuestAddress(seg.addr), seg.len as usize)
            .ok()?;
        // The pointer outlives the guard: guest memory is one plain mapping
        // per region, alive as long as `mem`.
        iov[count] = libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        };
        count += 1;
    }
    Some(count)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
    fn avail_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        f
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
