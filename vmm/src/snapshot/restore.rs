//! The restore recipe: the builder's steps, with guest memory mapped from
//! the snapshot's memory file and the saved state put back in between.

use std::path::PathBuf;
use std::time::Instant;

use crate::builder;
use crate::config::{DriveConfig, SerialOutput, VmConfig, VsockConfig};
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::TransportRestoreError;
use crate::memory;
use crate::vm::{Vm, VmError};

use super::{file, DeviceKind, FileError, VmState};

/// What a clone takes from the command line instead of the snapshot.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub state: PathBuf,
    pub mem: PathBuf,
    /// The clone's own vsock socket; required when the snapshot has vsock.
    pub vsock_uds: Option<PathBuf>,
    /// The clone's own TAP; required when the snapshot has a network card
    /// (the guest keeps its MAC).
    pub net_tap: Option<String>,
    /// The clone's drives, in guest order; each must match the saved one's
    /// size and read-only flag. Empty: the saved paths.
    pub drives: Vec<DriveConfig>,
    pub serial: SerialOutput,
    /// `None`: the saved watchdog period.
    pub watchdog_secs: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the snapshot was taken on a {saved} host, this host is {actual}")]
    HostProfile { saved: String, actual: String },
    #[error("the snapshot has a vsock device: pass the clone's socket (--vsock-uds)")]
    VsockPathMissing,
    #[error("the snapshot has a network card: pass the clone's TAP (--net-tap)")]
    NetTapMissing,
    #[error("the snapshot has {saved} drives, {given} given")]
    DriveCount { saved: usize, given: usize },
    #[error("drive {index} ({}) differs from the snapshot's: {what}", path.display())]
    DriveMismatch {
        index: usize,
        path: PathBuf,
        what: &'static str,
    },
    #[error("the snapshot's devices do not match its configuration")]
    DeviceList,
    #[error("device {index}: {source}")]
    Transport {
        index: usize,
        source: TransportRestoreError,
    },
    #[error("the snapshot has {saved} vCPU states for {configured} vCPUs")]
    VcpuCount { saved: usize, configured: u8 },
}

impl From<RestoreError> for VmError {
    fn from(e: RestoreError) -> Self {
        VmError::Restore(Box::new(e))
    }
}

/// A snapshot read and checked against the clone's options, before any
/// KVM object exists: what the jail needs to know (the clone's
/// configuration) and what the restore then puts back.
pub struct PreparedRestore {
    saved: VmState,
    /// The clone's configuration: the snapshot's, with the clone's own
    /// socket, drives, console and watchdog.
    pub config: VmConfig,
    /// The memory file.
    pub mem: PathBuf,
}

impl PreparedRestore {
    pub fn load(opts: &RestoreOptions) -> Result<PreparedRestore, VmError> {
        let payload = file::read(&opts.state)?;
        let saved: VmState = serde_json::from_slice(&payload).map_err(|e| FileError::Payload {
            path: opts.state.clone(),
            reason: e.to_string(),
        })?;
        let mut config = saved.config.clone();
        config.serial = opts.serial.clone();
        if let Some(w) = opts.watchdog_secs {
            config.watchdog_secs = w;
        }
        if let Some(v) = &mut config.vsock {
            let uds = opts
                .vsock_uds
                .clone()
                .ok_or(RestoreError::VsockPathMissing)?;
            *v = VsockConfig {
                guest_cid: v.guest_cid,
                uds_path: uds,
            };
        }
        if let Some(n) = &mut config.net {
            // Another VM's TAP, or the original's while it runs, is not
            // the clone's: it must name its own.
            n.tap = opts.net_tap.clone().ok_or(RestoreError::NetTapMissing)?;
            n.validate()?;
        }
        if !opts.drives.is_empty() {
            if opts.drives.len() != config.drives.len() {
                return Err(RestoreError::DriveCount {
                    saved: config.drives.len(),
                    given: opts.drives.len(),
                }
                .into());
            }
            for (mine, given) in config.drives.iter_mut().zip(&opts.drives) {
                mine.path = given.path.clone();
                mine.read_only = given.read_only;
            }
        }
        if saved.vcpus.len() != usize::from(config.vcpus) {
            return Err(RestoreError::VcpuCount {
                saved: saved.vcpus.len(),
                configured: config.vcpus,
            }
            .into());
        }
        Ok(PreparedRestore {
            saved,
            config,
            mem: opts.mem.clone(),
        })
    }
}

impl Vm {
    /// Restores a VM from a snapshot, paused at the point it was taken;
    /// [`Vm::run`] resumes it. A failure leaves nothing behind (sockets
    /// and logs this created are removed).
    pub fn restore(opts: &RestoreOptions, started: Instant) -> Result<Vm, VmError> {
        Vm::restore_prepared(PreparedRestore::load(opts)?, started)
    }

    /// [`Vm::restore`] from a snapshot already loaded (in a jail: the
    /// state file was read before it, the memory file is held open).
    pub fn restore_prepared(prepared: PreparedRestore, started: Instant) -> Result<Vm, VmError> {
        let PreparedRestore {
            saved,
            config,
            mem: mem_path,
        } = prepared;
        config.validate()?;

        let kvm = builder::open_kvm(&config)?;
        let profile = builder::detect_profile();
        if profile.name() != saved.host_profile {
            return Err(RestoreError::HostProfile {
                saved: saved.host_profile.clone(),
                actual: profile.name().to_string(),
            }
            .into());
        }
        let mem = memory::from_file(&mem_path, config.mem_mib << 20)?;
        let vm_fd = builder::create_vm(&kvm, &mem)?;
        let mut core = builder::create_core(started)?;
        let mut legacy =
            builder::attach_legacy_devices(&vm_fd, &config, &core, Some(&saved.serial))?;
        let virtio = builder::attach_virtio_devices(&vm_fd, &config, &mem, &mut core)?;
        // The Vsock device owns its socket and removes it if dropped, so an
        // error from here on leaves no socket behind either.
        if virtio.transports.len() != saved.devices.len() {
            return Err(RestoreError::DeviceList.into());
        }
        for (index, ((transport, kind), saved_dev)) in
            virtio.transports.iter().zip(&saved.devices).enumerate()
        {
            check_device(index, kind, &saved_dev.kind)?;
            lock(transport)
                .restore(&saved_dev.transport)
                .map_err(|source| RestoreError::Transport { index, source })?;
        }

        let vcpus = builder::create_vcpus(&vm_fd, config.vcpus)?;
        for (index, (fd, state)) in vcpus.iter().zip(&saved.vcpus).enumerate() {
            state
                .restore(fd, index as u8)
                .map_err(super::SnapshotError::from)
                .map_err(VmError::from)?;
        }
        saved
            .machine
            .restore(&vm_fd)
            .map_err(super::SnapshotError::from)
            .map_err(VmError::from)?;

        // The guest's connections died with the old VMM: say so. Then let
        // every device look at its queues for work queued before the save.
        if let Some(vsock) = &virtio.vsock {
            if !lock(vsock).send_transport_reset() {
                tracing::debug!("vsock: no transport reset sent (device not running)");
            }
        }
        for device in &virtio.devices {
            for evt in lock(device).queue_events() {
                let _ = evt.write(1);
            }
        }
        legacy.created_log.0 = None;
        Ok(Vm::assemble(
            config, profile, kvm, mem, vm_fd, vcpus, core, legacy, virtio,
        ))
    }
}

/// The clone's device `index` must be what the snapshot's was.
fn check_device(index: usize, actual: &DeviceKind, saved: &DeviceKind) -> Result<(), RestoreError> {
    match (actual, saved) {
        (
            DeviceKind::Block {
                path,
                sectors,
                read_only,
            },
            DeviceKind::Block {
                sectors: saved_sectors,
                read_only: saved_ro,
                ..
            },
        ) => {
            let what = if sectors != saved_sectors {
                "size"
            } else if read_only != saved_ro {
                "read-only flag"
            } else {
                return Ok(());
            };
            Err(RestoreError::DriveMismatch {
                index,
                path: path.clone(),
                what,
            })
        }
        (a, s) if std::mem::discriminant(a) == std::mem::discriminant(s) => Ok(()),
        _ => Err(RestoreError::DeviceList),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(sectors: u64, read_only: bool) -> DeviceKind {
        DeviceKind::Block {
            path: "/clone.img".into(),
            sectors,
            read_only,
        }
    }

    #[test]
    fn a_clone_drive_must_match_the_saved_one() {
        assert!(check_device(0, &blk(8, true), &blk(8, true)).is_ok());
        let e = check_device(1, &blk(16, true), &blk(8, true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "drive 1 (/clone.img) differs from the snapshot's: size"
        );
        let e = check_device(1, &blk(8, false), &blk(8, true)).unwrap_err();
        assert!(e.to_string().ends_with("read-only flag"), "{e}");
        let e = check_device(0, &DeviceKind::Rng, &blk(8, true)).unwrap_err();
        assert!(matches!(e, RestoreError::DeviceList));
        assert!(check_device(0, &DeviceKind::Rng, &DeviceKind::Rng).is_ok());
    }
}
