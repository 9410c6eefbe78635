//! Fuzz entry points for the guest-facing devices: plain functions over
//! arbitrary bytes that panic only on a broken invariant. The bytes are
//! guest memory as a hostile driver left it (descriptor tables, avail
//! rings, buffers), and the device serves its queues from it as it would
//! after a notification. `tests/fuzz` drives them coverage-guided (cargo
//! fuzz, nightly); `cargo test -p kiln-tests --test fuzz_corpus` replays
//! the committed corpus through them on stable.
//!
//! Input layout: byte 0 picks the queue size (a power of two, 1 to 256,
//! from its low bits) and three flags (bit 4: VIRTIO_F_EVENT_IDX
//! negotiated; bit 5: the block device's drive is writable; bit 6: the
//! network card's rate limits are tight); bytes 1-2 are the avail
//! index the device expects next (le16, as if it had served that many);
//! the rest is guest memory from address 0. Queue `i` has its descriptor
//! table at `i * 0x3000`, its avail ring a page above and its used ring
//! two pages above, each with room for 256 entries.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::{self, Block, Disk, SECTOR_SIZE};
use crate::devices::virtio::net::{self, Net, Tap};
use crate::devices::virtio::rng::{self, Rng};
use crate::devices::virtio::vsock::{muxer, Vsock};
use crate::devices::virtio::{Interrupt, Memory, VirtioDevice};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};

/// Guest memory the driver's bytes are laid into.
const MEM_SIZE: usize = 64 * 1024;
/// Distance between one queue's rings and the next queue's.
const RING_STRIDE: u64 = 0x3000;
const MAX_QUEUE_SIZE: u16 = 256;
/// Sectors on the block device's drive.
const DISK_SECTORS: u64 = 16;
/// Guest ports the vsock rig has host ends for: a listener for guest
/// connections, and a host process that asked for a guest port.
const HOST_LISTEN_PORT: u32 = 1024;
const GUEST_PORT_ASKED: u32 = 52;

/// Guest memory and queue settings decoded from a fuzz input.
struct Driver {
    mem: Memory,
    size: u16,
    event_idx: bool,
    writable_disk: bool,
    tight_limits: bool,
    next_avail: u16,
}

impl Driver {
    fn decode(data: &[u8]) -> Option<Driver> {
        let (&flags, rest) = data.split_first()?;
        let (next, memory) = rest.split_at_checked(2)?;
        let mem = Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
        let n = memory.len().min(MEM_SIZE);
        mem.write_slice(&memory[..n], GuestAddress(0)).ok()?;
        Some(Driver {
            mem,
            size: 1 << ((flags & 0x0f) % 9),
            event_idx: flags & 0x10 != 0,
            writable_disk: flags & 0x20 != 0,
            tight_limits: flags & 0x40 != 0,
            next_avail: u16::from_le_bytes([next[0], next[1]]),
        })
    }

    /// Queue `index` as the transport hands it to the device at DRIVER_OK.
    fn queue(&self, index: u64) -> Option<Queue> {
        let mut q = Queue::new(MAX_QUEUE_SIZE).ok()?;
        let base = u32::try_from(index * RING_STRIDE).ok()?;
        q.set_size(self.size);
        q.set_desc_table_address(Some(base), Some(0));
        q.set_avail_ring_address(Some(base + 0x1000), Some(0));
        q.set_used_ring_address(Some(base + 0x2000), Some(0));
        q.set_event_idx(self.event_idx);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_avail);
        q.set_ready(true);
        q.is_valid(&self.mem).then_some(q)
    }

    fn queues(&self, count: u64) -> Option<Vec<Queue>> {
        (0..count).map(|i| self.queue(i)).collect()
    }
}

fn interrupt() -> Option<Arc<Interrupt>> {
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    Some(Arc::new(Interrupt::new(irqfd)))
}

/// virtio-rng: one notification serves at most a batch, and never more
/// bytes than the requests could hold.
pub fn rng(data: &[u8]) {
    let Some(driver) = Driver::decode(data) else {
        return;
    };
    let (Some(queues), Some(interrupt), Ok(mut dev)) = (driver.queues(1), interrupt(), Rng::new())
    else {
        return;
    };
    if dev.activate(driver.mem.clone(), queues, interrupt).is_err() {
        return;
    }
    let served = dev.process_queue();
    assert!(served <= rng::BATCH_LIMIT, "{served} requests in one batch");
    assert!(
        dev.bytes_served <= (served * rng::MAX_REQUEST) as u64,
        "{} bytes for {served} requests",
        dev.bytes_served
    );
}

/// A drive in memory (a memfd reached by its /proc path, as a jailed VMM
/// reaches held files), filled with a pattern.
struct MemDrive {
    file: File,
    path: PathBuf,
}

impl MemDrive {
    fn new() -> Option<MemDrive> {
        // SAFETY: a NUL-terminated name and no flags; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"kiln-fuzz-drive".as_ptr(), 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&drive_pattern()).ok()?;
        Some(MemDrive {
            file,
            path: PathBuf::from(format!("/proc/self/fd/{fd}")),
        })
    }

    fn contents(&mut self) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        self.file.seek(SeekFrom::Start(0)).ok()?;
        self.file.read_to_end(&mut got).ok()?;
        Some(got)
    }
}

fn drive_pattern() -> Vec<u8> {
    (0..DISK_SECTORS * SECTOR_SIZE).map(|i| i as u8).collect()
}

/// virtio-blk: at most a batch per notification, every request counted,
/// and a read-only drive unchanged whatever the guest asked.
pub fn block(data: &[u8]) {
    let Some(driver) = Driver::decode(data) else {
        return;
    };
    let Some(mut drive) = MemDrive::new() else {
        return;
    };
    let read_only = !driver.writable_disk;
    let (Some(queues), Some(interrupt), Ok(disk)) = (
        driver.queues(1),
        interrupt(),
        Disk::open(&drive.path, read_only),
    ) else {
        return;
    };
    let Ok(mut dev) = Block::new(disk, "kiln-fuzz") else {
        return;
    };
    if dev.activate(driver.mem.clone(), queues, interrupt).is_err() {
        return;
    }
    let served = dev.process_queue();
    let counters = dev.counters();
    assert!(
        served <= block::BATCH_LIMIT,
        "{served} requests in one batch"
    );
    // A request whose used entry could not be written is counted, not served.
    assert!(
        counters.requests == served as u64 || counters.requests == served as u64 + 1,
        "{} requests counted, {served} served",
        counters.requests
    );
    assert!(counters.errors <= counters.requests);
    if read_only {
        assert_eq!(counters.bytes_written, 0);
        assert!(
            drive.contents().is_some_and(|c| c == drive_pattern()),
            "a read-only drive changed"
        );
    }
}

/// Frames the host side has waiting for the guest, header first: an
/// Ethernet minimum, a full one, a runt the device must drop, and one a
/// TSO offload could hand over.
const HOST_FRAMES: [usize; 4] = [
    net::MIN_FRAME + 46,
    net::VNET_HDR_LEN + 1514,
    5,
    net::MAX_FRAME,
];

/// A connected pair of non-blocking `SOCK_SEQPACKET` sockets: one frame
/// per message, as a TAP.
fn frame_pair() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors; the result is checked.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: both were just created and are owned by nothing else.
    unsafe { Some((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// virtio-net: the guest's frames (tx queue 1) to a stand-in TAP, and the
/// host's waiting frames into the guest's buffers (rx queue 0). Each queue
/// serves at most a batch per notification, every chain taken is counted,
/// only whole frames reach the host, and no more reach the guest than the
/// host sent.
pub fn net(data: &[u8]) {
    let Some(driver) = Driver::decode(data) else {
        return;
    };
    let (Some(queues), Some(interrupt), Some((ours, theirs))) =
        (driver.queues(2), interrupt(), frame_pair())
    else {
        return;
    };
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let Ok(mut dev) = Net::new(Tap::from_fd(ours, offloads), Some([2, 0, 0, 0, 0, 1])) else {
        return;
    };
    if driver.tight_limits {
        // A few small frames per direction, then the limiter holds the rest
        // (an hour's refill: none within a run).
        let tight = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 2000,
                one_time_burst: 100,
                refill_time: 3_600_000,
            }),
            ops: Some(TokenBucketConfig {
                size: 3,
                one_time_burst: 0,
                refill_time: 3_600_000,
            }),
        };
        let (Ok(rx), Ok(tx)) = (RateLimiter::new(&tight), RateLimiter::new(&tight)) else {
            return;
        };
        dev.set_rate_limiters(Some(rx), Some(tx));
    }
    let host = Tap::from_fd(theirs, 0);
    let mut sent = 0u64;
    for (i, &len) in HOST_FRAMES.iter().enumerate() {
        if host.write_frame(&vec![i as u8; len]).is_ok() {
            sent += 1;
        }
    }
    dev.set_acked_features(dev.avail_features());
    if dev.activate(driver.mem.clone(), queues, interrupt).is_err() {
        return;
    }
    let tx = dev.process_tx();
    let rx = dev.process_rx();
    let c = dev.counters();
    assert!(tx <= net::BATCH_LIMIT, "{tx} tx chains in one batch");
    assert!(rx <= net::BATCH_LIMIT, "{rx} rx buffers in one batch");
    // A chain whose used entry could not be written is counted, not served.
    let taken = c.tx_packets + c.tx_dropped;
    assert!(
        taken == tx as u64 || taken == tx as u64 + 1,
        "{taken} tx chains counted, {tx} served"
    );
    assert!(c.rx_packets + c.rx_dropped <= sent, "more frames than sent");
    let mut buf = vec![0u8; net::MAX_FRAME + 1];
    let mut frames = 0;
    while let Ok(n) = host.read_frame(&mut buf) {
        assert!(
            (net::MIN_FRAME..=net::MAX_FRAME).contains(&n),
            "a {n}-byte frame reached the host"
        );
        frames += 1;
    }
    assert_eq!(frames, c.tx_packets, "frames the host got");
    if driver.tight_limits {
        assert!(
            c.tx_packets <= 3 && c.rx_packets <= 3,
            "past the limits: {c:?}"
        );
    }
}

/// A directory of its own for each input's vsock sockets.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Option<SocketDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(SocketDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// virtio-vsock: the guest's packets (tx queue 1) against a host with a
/// listener on port 1024 that never reads, and a host process waiting for
/// guest port 52; replies go to the guest's rx buffers (queue 0). However
/// the guest behaves, the replies held for it, the guest bytes held for
/// the host and the number of streams stay bounded.
pub fn vsock(data: &[u8]) {
    let Some(driver) = Driver::decode(data) else {
        return;
    };
    let Some(dir) = SocketDir::new() else {
        return;
    };
    let uds = dir.path().join("v.sock");
    let (Some(queues), Some(interrupt), Ok(mut dev)) =
        (driver.queues(3), interrupt(), Vsock::new(3, &uds))
    else {
        return;
    };
    // Accepting would only let the test read; the backlog keeps connects
    // succeeding, and nothing is read, so guest bytes pile up host-side.
    let Ok(_listener) = UnixListener::bind(format!("{}_{HOST_LISTEN_PORT}", uds.display())) else {
        return;
    };
    if dev.activate(driver.mem.clone(), queues, interrupt).is_err() {
        return;
    }
    let Ok(tx_event) = dev.queue_events()[1].try_clone() else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let Ok(mut events) = EventManager::<Arc<Mutex<Vsock>>>::new() else {
        return;
    };
    events.add_subscriber(dev.clone());
    let Ok(mut host) = UnixStream::connect(&uds) else {
        return;
    };
    if host
        .write_all(format!("CONNECT {GUEST_PORT_ASKED}\n").as_bytes())
        .is_err()
    {
        return;
    }
    // The host's CONNECT first (accept, then its line: a REQUEST for the
    // guest), so that the guest's packets can answer it; then the guest's.
    let mut turn = |n| {
        for _ in 0..n {
            if events.run_with_timeout(0).is_err() {
                break;
            }
        }
    };
    turn(2);
    let _ = tx_event.write(1);
    turn(3);
    let Ok(dev) = dev.lock() else {
        return;
    };
    let mux = dev.muxer();
    assert!(mux.control_len() <= muxer::MAX_CONTROL);
    assert!(mux.connection_count() <= muxer::MAX_CONNECTIONS);
    assert!(
        mux.bytes_held_for_host() <= mux.connection_count() * muxer::CONN_BUF_ALLOC as usize,
        "{} guest bytes held for {} streams",
        mux.bytes_held_for_host(),
        mux.connection_count()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rigs are sound: an empty driver, and a driver whose bytes say
    /// nothing valid, pass; a well-formed rng request is served.
    #[test]
    fn rigs_accept_empty_and_garbage_inputs() {
        for input in [&[][..], &[0u8; 3], &[0xff; 4096]] {
            rng(input);
            block(input);
            vsock(input);
            net(input);
        }
    }

    #[test]
    fn a_well_formed_rng_request_is_served() {
        // Queue size 1; one descriptor at 0x8000, 64 bytes, device-writable.
        let mut input = vec![0u8, 0, 0];
        let mut mem = vec![0u8; 0x3000];
        mem[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
        mem[8..12].copy_from_slice(&64u32.to_le_bytes());
        mem[12..14].copy_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
        mem[0x1002..0x1004].copy_from_slice(&1u16.to_le_bytes()); // avail idx
        input.extend_from_slice(&mem);
        let driver = Driver::decode(&input).unwrap();
        let mut dev = Rng::new().unwrap();
        dev.activate(
            driver.mem.clone(),
            driver.queues(1).unwrap(),
            interrupt().unwrap(),
        )
        .unwrap();
        assert_eq!(dev.process_queue(), 1);
        assert_eq!(dev.bytes_served, 64);
        rng(&input);
    }

    #[test]
    fn a_well_formed_net_input_moves_frames_both_ways() {
        // Queue size 1: an rx buffer of 2 KiB at 0x8000; a 112-byte tx
        // frame at 0x6000.
        let mut input = vec![0u8, 0, 0];
        let mut mem = vec![0u8; 0x6000 + 112];
        mem[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
        mem[8..12].copy_from_slice(&0x800u32.to_le_bytes());
        mem[12..14].copy_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
        mem[0x1002..0x1004].copy_from_slice(&1u16.to_le_bytes());
        mem[0x3000..0x3008].copy_from_slice(&0x6000u64.to_le_bytes());
        mem[0x3008..0x300c].copy_from_slice(&112u32.to_le_bytes());
        mem[0x4002..0x4004].copy_from_slice(&1u16.to_le_bytes());
        input.extend_from_slice(&mem);
        let driver = Driver::decode(&input).unwrap();
        let (ours, theirs) = frame_pair().unwrap();
        let host = Tap::from_fd(theirs, 0);
        host.write_frame(&[7u8; HOST_FRAMES[0]]).unwrap();
        let mut dev = Net::new(Tap::from_fd(ours, 0), None).unwrap();
        dev.activate(
            driver.mem.clone(),
            driver.queues(2).unwrap(),
            interrupt().unwrap(),
        )
        .unwrap();
        assert_eq!((dev.process_tx(), dev.process_rx()), (1, 1));
        let c = dev.counters();
        assert_eq!((c.tx_packets, c.rx_packets), (1, 1));
        net(&input);
    }
}
