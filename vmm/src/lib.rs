//! kiln-vmm: one KVM micro-VM per process.
//!
//! Guest memory, vCPUs, CPUID normalised per host profile, PVH/bzImage
//! boot, a serial console, an i8042 reset line, the guest kernel's panic
//! report port and virtio-mmio devices (vsock, rng, blk), driven by an
//! event-manager loop. It knows nothing of grants, images or clouds.

pub mod api;
pub mod boot;
pub(crate) mod builder;
pub mod capabilities;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod fuzz;
pub mod host;
pub mod jail;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod rate_limiter;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod timeline;
pub mod vcpu;
pub mod vm;

pub use config::{DriveConfig, NetConfig, SerialOutput, VmConfig, VsockConfig};
pub use exit::ExitReason;
pub use vm::{Payload, Vm, VmError, VmOutcome};
