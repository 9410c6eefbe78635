//! Devices and the buses that route vCPU port and MMIO exits to them.

pub mod bus;
pub mod console_input;
pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
