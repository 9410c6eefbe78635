//! Snapshots of a running VM and the recipe that restores one.
//!
//! A snapshot is two files: the guest memory, byte for byte (restored
//! copy-on-write, so clones share it), and a state file (see [`file`]) with
//! everything else: the configuration, every vCPU, the VM-wide KVM state,
//! the serial UART and every virtio-mmio transport with its device. vsock
//! connections are not saved: after a restore the device tells the guest
//! they are gone (TRANSPORT_RESET).

mod crc32;
pub mod file;
pub mod machine;
mod pod;
pub mod restore;
pub mod vcpu_state;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::serial::SavedSerial;
use crate::devices::virtio::mmio::TransportState;
pub use file::FileError;
pub use machine::{MachineState, MachineStateError};
pub use restore::{PreparedRestore, RestoreOptions};
pub use vcpu_state::{Parts, VcpuState, VcpuStateError};

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The configuration the VM was built from (paths as the original had
    /// them; a restore replaces the ones a clone must not share).
    pub config: VmConfig,
    /// The host profile the guest was set up for (CPUID, command line).
    pub host_profile: String,
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    pub serial: SavedSerial,
    /// Every virtio-mmio device, in guest (MMIO address) order.
    pub devices: Vec<DeviceState>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub transport: TransportState,
    pub kind: DeviceKind,
}

/// What a device keeps beyond its transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceKind {
    /// Connections are not kept.
    Vsock {
        guest_cid: u64,
    },
    Rng,
    /// The clone reattaches to its configuration's TAP.
    Net,
    /// The backing file's identity, checked against the clone's drive.
    Block {
        path: PathBuf,
        sectors: u64,
        read_only: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused first")]
    NotPaused,
    #[error("the VM has stopped")]
    Stopped,
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    Machine(#[from] MachineStateError),
    #[error("cannot list the MSRs KVM saves")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot encode the state")]
    Encode(#[source] serde_json::Error),
}
