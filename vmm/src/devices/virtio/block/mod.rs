//! virtio-blk: a guest disk backed by a host file or block device.
//!
//! [`disk`] owns the host side (open, size, vectored I/O at an offset),
//! [`request`] turns a descriptor chain into a checked request without
//! trusting any of it, [`device`] serves the queue, and [`event_handler`]
//! connects the queue's eventfd to the event loop. A request the guest
//! malformed ends with an error status, never a panic, and costs at most
//! one queue's worth of descriptors.

mod device;
pub mod disk;
mod event_handler;
pub mod request;

pub use device::{Block, BlockCounters, BATCH_LIMIT};
pub use disk::{Disk, DiskError};

/// Bytes in a virtio-blk sector, whatever the host's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Longest device id (`VIRTIO_BLK_T_GET_ID`); a 20-byte id has no NUL.
pub const ID_BYTES: usize = 20;
/// Descriptors in the queue, and so the most one request may use.
pub const QUEUE_SIZE: u16 = 256;

#[cfg(test)]
mod tests;
