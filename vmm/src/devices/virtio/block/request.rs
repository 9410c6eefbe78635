//! A virtio-blk request as the guest described it, checked before any of
//! it is trusted: the chain's shape (readable header, then data, then a
//! writable status byte), its length, and every address in it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::super::Memory;
use super::QUEUE_SIZE;

/// Most descriptors one request may use: the whole queue. Longer chains
/// (possible only through an indirect table) are malformed.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// The request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;

/// One buffer of a chain, as the guest gave it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (guest reads it back).
    pub write: bool,
}

/// How a chain is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// More descriptors than the queue holds, a loop, or a `next` that
    /// leads outside the table.
    Unterminated,
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable,
    /// Fewer readable bytes than the 16-byte header.
    ShortHeader,
    /// The header is not in guest memory.
    HeaderAddress,
}

/// What the guest asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Other(u32),
}

impl Kind {
    fn from_raw(t: u32) -> Kind {
        use virtio_bindings::bindings::virtio_blk::*;
        match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            other => Kind::Other(other),
        }
    }
}

/// A well-formed request; its data buffers' addresses are not yet checked.
#[derive(Debug)]
pub struct Request<'a> {
    pub kind: Kind,
    pub sector: u64,
    /// Device-readable data after the header.
    pub readable: &'a [Segment],
    /// Device-writable data before the status byte.
    pub writable: &'a [Segment],
}

impl Request<'_> {
    pub fn readable_len(&self) -> u64 {
        total(self.readable)
    }
    pub fn writable_len(&self) -> u64 {
        total(self.writable)
    }
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// A chain, parsed.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// No writable status byte in guest memory: nothing to answer to.
    NoStatus,
    /// Answer with an error at `status`.
    Malformed {
        status: GuestAddress,
        why: Malformed,
    },
    Request {
        status: GuestAddress,
        request: Request<'a>,
    },
}

/// Parses the descriptors of one chain into `buf` (the device's scratch
/// space, so the hot path allocates nothing).
pub fn parse<'a>(
    mem: &Memory,
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    buf: &'a mut [Segment; MAX_DESCRIPTORS],
) -> Parsed<'a> {
    let mut n = 0;
    let mut unterminated = false;
    for d in chain {
        if n == MAX_DESCRIPTORS {
            unterminated = true;
            break;
        }
        buf[n] = Segment {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        };
        // The chain iterator stops at its time-to-live or at an unreadable
        // descriptor; either way the last one it gave still says NEXT.
        unterminated = d.has_next();
        n += 1;
    }
    let Some(last) = n.checked_sub(1).map(|i| buf[i]) else {
        return Parsed::NoStatus;
    };
    if !last.write || last.len == 0 {
        return Parsed::NoStatus;
    }
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Parsed::NoStatus;
    };
    let status = GuestAddress(status);
    if !mem.address_in_range(status) {
        return Parsed::NoStatus;
    }
    let malformed = |why| Parsed::Malformed { status, why };
    if unterminated {
        return malformed(Malformed::Unterminated);
    }
    // The status byte is the last one; anything before it in the same
    // buffer is data.
    buf[n - 1].len -= 1;
    let segments = &mut buf[..n];
    let first_writable = segments.iter().position(|s| s.write).unwrap_or(n);
    if segments[first_writable..].iter().any(|s| !s.write) {
        return malformed(Malformed::ReadableAfterWritable);
    }

    // The header may span buffers; what follows it in its last one is data.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut i = 0;
    while got < HEADER_LEN && i < first_writable {
        let seg = &mut segments[i];
        let take = (HEADER_LEN - got).min(seg.len as usize);
        if mem
            .read_slice(&mut header[got..got + take], GuestAddress(seg.addr))
            .is_err()
        {
            return malformed(Malformed::HeaderAddress);
        }
        got += take;
        // In memory, so adding a length that fits in it cannot overflow.
        seg.addr = seg.addr.wrapping_add(take as u64);
        seg.len -= take as u32;
        if seg.len == 0 {
            i += 1;
        }
    }
    if got < HEADER_LEN {
        return malformed(Malformed::ShortHeader);
    }
    let kind = Kind::from_raw(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let (readable, writable) = segments.split_at(first_writable);
    Parsed::Request {
        status,
        request: Request {
            kind,
            sector: u64::from_le_bytes(sector),
            readable: &readable[i.min(first_writable)..],
            writable,
        },
    }
}
