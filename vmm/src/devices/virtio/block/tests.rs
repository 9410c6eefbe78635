//! The queue logic against guest memory and a real file, without KVM:
//! each request kind, and each way a hostile driver can shape a chain.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{Interrupt, Memory, VirtioDevice};

const MEM_SIZE: u64 = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Sectors on the test disks.
const SECTORS: u64 = 16;

/// A descriptor the test driver offers: address, length, device-writable.
type Buf = (u64, u32, bool);

fn r(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}
fn w(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

/// Recognisable disk contents: each byte says where it is.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 512) as u8)
        .collect()
}

struct Rig<'a> {
    mem: &'a Memory,
    vq: MockSplitQueue<'a, Memory>,
    next_desc: u16,
    dev: Block,
    irqfd: EventFd,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a Memory, read_only: bool, id: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, pattern((SECTORS * SECTOR_SIZE) as usize)).unwrap();
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let mut dev = Block::new(Disk::open(&path, read_only).unwrap(), id).unwrap();
        dev.activate(mem.clone(), vec![vq.create_queue().unwrap()], interrupt)
            .unwrap();
        Rig {
            mem,
            vq,
            next_desc: 0,
            dev,
            irqfd,
            path,
            _dir: dir,
        }
    }

    /// Offers one chain of `bufs` (linked by NEXT) to the device.
    fn offer(&mut self, bufs: &[Buf]) {
        let start = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let last = i + 1 == bufs.len();
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { start + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.offer_raw(&descs);
    }

    /// Offers descriptors exactly as given, the first as the chain's head.
    fn offer_raw(&mut self, descs: &[RawDescriptor]) {
        self.vq.add_desc_chains(descs, self.next_desc).unwrap();
        self.next_desc += descs.len() as u16;
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Runs the device; returns the status byte at `STATUS` and the used
    /// length of the last request served.
    fn run(&mut self) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert!(self.dev.process_queue() > 0);
        let used = self.vq.used().idx().load();
        let elem = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(used - 1))
            .unwrap()
            .load();
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), elem.len())
    }

    fn disk_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_scatter_into_guest_memory_with_one_interrupt_per_batch() {
    let mem = memory();
    let mut rig = Rig::new(&mem, true, "kiln-vda");
    let disk = rig.disk_bytes();
    // Sector 3, 1.5 KiB: split over two buffers, the header with the first.
    rig.header(HDR, VIRTIO_BLK_T_IN, 3);
    rig.offer(&[
        r(HDR, 16),
        w(DATA, 1024),
        w(DATA + 0x1000, 512),
        w(STATUS, 1),
    ]);
    // A second request in the same batch, status elsewhere.
    rig.header(HDR + 16, VIRTIO_BLK_T_IN, 0);
    rig.offer(&[r(HDR + 16, 16), w(DATA + 0x2000, 512), w(STATUS + 1, 1)]);
    assert_eq!(rig.dev.process_queue(), 2);
    assert_eq!(rig.vq.used().idx().load(), 2);
    assert_eq!(rig.irqfd.read().unwrap(), 1, "one interrupt for the batch");

    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk[3 * 512..3 * 512 + 1024]);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, disk[5 * 512..6 * 512]);
    mem.read_slice(&mut got, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, disk[..512]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), OK);
    let first = rig.vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(first.len(), 1536 + 1, "data plus the status byte");
    assert_eq!(rig.dev.counters().bytes_read, 2048);
    assert_eq!(rig.dev.counters().errors, 0);
    // Nothing more pending, no further interrupt.
    assert_eq!(rig.dev.process_queue(), 0);
    assert!(rig.irqfd.read().is_err());
}

#[test]
fn a_header_and_status_may_share_buffers_with_data() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    // Header split 10 + 6, then 512 bytes of data in the same buffer; the
    // status byte the last of a 513-byte writable buffer.
    rig.header(HDR, VIRTIO_BLK_T_OUT, 2);
    mem.write_slice(&[0xab; 512], GuestAddress(HDR + 16))
        .unwrap();
    rig.offer(&[r(HDR, 10), r(HDR + 10, 6 + 512), w(STATUS - 512, 513)]);
    let (status, _) = rig.run();
    assert_eq!(status, IOERR, "an OUT with writable data is refused");

    rig.offer(&[r(HDR, 10), r(HDR + 10, 6 + 512), w(STATUS, 1)]);
    let (status, used) = rig.run();
    assert_eq!((status, used), (OK, 1));
    assert_eq!(rig.disk_bytes()[2 * 512..3 * 512], [0xab; 512]);
}

#[test]
fn writes_land_in_the_file_and_flush_is_served() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vdb");
    let features = rig.dev.avail_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    let before = rig.disk_bytes();
    rig.header(HDR, VIRTIO_BLK_T_OUT, SECTORS - 2);
    mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    rig.offer(&[r(HDR, 16), r(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)]);
    assert_eq!(rig.run(), (OK, 1));
    let after = rig.disk_bytes();
    assert_eq!(after.len(), before.len(), "the file does not grow");
    assert_eq!(
        after[..((SECTORS - 2) * 512) as usize],
        before[..((SECTORS - 2) * 512) as usize]
    );
    assert!(after[((SECTORS - 2) * 512) as usize..]
        .iter()
        .all(|b| *b == 0x5a));

    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.offer(&[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!(rig.run(), (OK, 1));
    let c = rig.dev.counters();
    assert_eq!((c.bytes_written, c.flushes, c.errors), (1024, 1, 0));
}

#[test]
fn a_read_only_drive_refuses_writes_and_flushes() {
    let mem = memory();
    let mut rig = Rig::new(&mem, true, "kiln-vda");
    let features = rig.dev.avail_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let before = rig.disk_bytes();
    rig.header(HDR, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    rig.offer(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!(rig.run().0, IOERR);
    assert_eq!(rig.disk_bytes(), before);

    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.offer(&[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!(rig.run().0, UNSUPP);
    assert_eq!(rig.dev.counters().errors, 2);
}

#[test]
fn get_id_returns_the_nul_padded_id_and_capacity_is_in_sectors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, true, "kiln-vda");
    let mut cap = [0u8; 8];
    rig.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut seg_max = [0u8; 4];
    rig.dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);

    mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    rig.offer(&[r(HDR, 16), w(DATA, VIRTIO_BLK_ID_BYTES), w(STATUS, 1)]);
    assert_eq!(rig.run(), (OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..8], b"kiln-vda");
    assert!(id[8..].iter().all(|b| *b == 0));

    // A full 20-byte id has no NUL; a short buffer gets what fits.
    let mut rig = Rig::new(&mem, true, "abcdefghijklmnopqrst");
    rig.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    rig.offer(&[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]);
    assert_eq!(rig.run(), (OK, 5));
    mem.read_slice(&mut id[..4], GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..4], b"abcd");
}

#[test]
fn out_of_range_and_partial_sectors_are_io_errors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    let before = rig.disk_bytes();
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 0),
        (VIRTIO_BLK_T_IN, 0, 100),
        (VIRTIO_BLK_T_OUT, SECTORS, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX - 1, 1024),
        (VIRTIO_BLK_T_OUT, 0, 513),
    ] {
        rig.header(HDR, kind, sector);
        let data = if kind == VIRTIO_BLK_T_IN {
            w(DATA, len)
        } else {
            r(DATA, len)
        };
        rig.offer(&[r(HDR, 16), data, w(STATUS, 1)]);
        assert_eq!(rig.run().0, IOERR, "type {kind} sector {sector} len {len}");
    }
    assert_eq!(rig.disk_bytes(), before);
    assert_eq!(rig.dev.counters().errors, 8);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 0xdead] {
        rig.header(HDR, kind, 0);
        rig.offer(&[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(rig.run().0, UNSUPP, "type {kind}");
    }
}

#[test]
fn malformed_chains_end_with_an_error_status() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    let before = rig.disk_bytes();
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    let beyond = MEM_SIZE + 0x1000;
    let cases: &[(&str, Vec<Buf>)] = &[
        ("header too short", vec![r(HDR, 8), w(STATUS, 1)]),
        ("header device-writable", vec![w(HDR, 16), w(STATUS, 1)]),
        ("status only", vec![w(STATUS, 1)]),
        (
            "readable after writable",
            vec![r(HDR, 16), w(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)],
        ),
        (
            "IN with device-readable data",
            vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
        ),
        ("header outside memory", vec![r(beyond, 16), w(STATUS, 1)]),
        (
            "data outside memory",
            vec![r(HDR, 16), w(beyond, 512), w(STATUS, 1)],
        ),
        (
            "data running past the end of memory",
            vec![r(HDR, 16), w(MEM_SIZE - 512, 1024), w(STATUS, 1)],
        ),
        (
            "oversized length",
            vec![r(HDR, 16), w(DATA, 0xffff_fe00), w(STATUS, 1)],
        ),
        (
            "address wrapping around",
            vec![r(HDR, 16), w(u64::MAX - 511, 512), w(STATUS, 1)],
        ),
    ];
    for (what, bufs) in cases {
        rig.offer(bufs);
        assert_eq!(rig.run(), (IOERR, 1), "{what}");
    }
    // OUT with data outside memory writes nothing.
    rig.header(HDR, VIRTIO_BLK_T_OUT, 0);
    rig.offer(&[r(HDR, 16), r(DATA, 512), r(beyond, 512), w(STATUS, 1)]);
    assert_eq!(rig.run().0, IOERR);
    assert_eq!(rig.disk_bytes(), before, "no partial write");
}

#[test]
fn chains_that_never_end_are_cut_at_the_queue_size() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;

    // A loop: header -> status -> header -> ...
    let base = rig.next_desc;
    rig.offer_raw(&[
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, base + 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, write | next, base)),
    ]);
    assert_eq!(rig.run(), (IOERR, 1), "loop");

    // A `next` outside the descriptor table.
    rig.offer_raw(&[
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, rig.next_desc + 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, write | next, 999)),
    ]);
    assert_eq!(rig.run(), (IOERR, 1), "next out of range");

    // An indirect table longer than the queue, every entry chained.
    let table = 0x28_0000u64;
    let len: u16 = QUEUE_SIZE + 44;
    for i in 0..len {
        let last = i + 1 == len;
        let d = if i == 0 {
            SplitDescriptor::new(HDR, 16, next, 1)
        } else {
            let flags = write | if last { 0 } else { next };
            SplitDescriptor::new(STATUS, 1, flags, i + 1)
        };
        mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(table + 16 * u64::from(i)),
        )
        .unwrap();
    }
    rig.offer_raw(&[RawDescriptor::from(SplitDescriptor::new(
        table,
        u32::from(len) * 16,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))]);
    assert_eq!(
        rig.run(),
        (IOERR, 1),
        "indirect chain longer than the queue"
    );
}

#[test]
fn chains_without_a_writable_status_byte_are_returned_unanswered() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    for bufs in [
        vec![r(HDR, 16)],
        vec![r(HDR, 16), r(STATUS, 1)],
        vec![r(HDR, 16), w(STATUS, 0)],
        vec![r(HDR, 16), w(MEM_SIZE, 1)],
        vec![r(HDR, 16), w(u64::MAX, 2)],
    ] {
        rig.offer(&bufs);
        assert_eq!(rig.run(), (0xff, 0), "{bufs:?}");
    }
    // The queue still works.
    rig.offer(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(rig.run(), (OK, 513));
    assert_eq!(rig.dev.counters().errors, 5);
    assert_eq!(rig.dev.counters().requests, 6);
}

/// An avail index more than a queue's worth ahead of the device claims
/// entries that no pop can take; the device must return (and serve the
/// queue again once the guest repairs the index), not spin on it.
#[test]
fn an_avail_index_too_far_ahead_is_not_spun_on() {
    let mem = memory();
    let mut rig = Rig::new(&mem, false, "kiln-vda");
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    rig.offer(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    rig.vq.avail().idx().store(QUEUE_SIZE + 1);
    assert_eq!(rig.dev.process_queue(), 0);
    assert_eq!(rig.vq.used().idx().load(), 0);
    rig.vq.avail().idx().store(1);
    assert_eq!(rig.run(), (OK, 513));
}
