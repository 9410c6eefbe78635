//! virtio-net: the guest's Ethernet card, backed by a host TAP device.
//!
//! [`tap`] owns the host side (attach to a TAP with a virtio-net header on
//! every frame, the offloads it accepts), [`device`] serves the receive
//! queue (0) and the transmit queue (1) against it, and [`event_handler`]
//! connects the queue events and the TAP to the event loop. A chain the
//! guest malformed drops its frame, never panics, and costs at most one
//! queue's worth of descriptors; one notification serves at most a batch.

mod device;
mod event_handler;
pub mod tap;

pub use device::{parse_mac, Net, NetCounters, BATCH_LIMIT};
pub use tap::{Tap, TapError};

/// Descriptors in each queue, and so the most one frame may use.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): before every frame on
/// both queues and on the TAP.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header: a 64 KiB TSO segment with its Ethernet
/// and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Shortest frame after the header: an Ethernet header.
pub const MIN_FRAME: usize = VNET_HDR_LEN + 14;

#[cfg(test)]
mod tests;
