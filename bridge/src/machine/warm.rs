//! Warm starts: restore the saved snapshot of an image's ready VM instead
//! of booting, and save one when there is none. `kiln run` and the local
//! backend's shim start VMs through this.
//!
//! A snapshot is keyed by everything a restored VM takes from it: the
//! image build's measurement (root image, agent initramfs, the command
//! line that names the root), the guest kernel and kiln-vmm binaries (by
//! file identity: a rebuilt one gets a new key), the VM's vCPUs, memory
//! and extra kernel words. A snapshot that no longer restores (another
//! kiln-vmm version, a damaged file) is dropped, and the boot that
//! replaces it saves a new one.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Machine, MachineError, SnapshotFiles, Spec};

/// Where snapshots are kept under `$KILN_HOME`, by `kiln run` and the
/// local backend alike (one image's snapshot serves both).
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Snapshots kept: the most recently used. Each save removes the rest,
/// which are other images' and the keys a rebuilt kernel or kiln-vmm left
/// behind (they never restore again); `kiln image prune` removes all.
pub const KEEP_SNAPSHOTS: usize = 8;

/// How a VM started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Booted.
    Cold,
    /// Restored from a saved snapshot.
    Warm,
}

impl Start {
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Warm => "warm",
        }
    }
}

/// A VM whose agent is ready, and what happened on the way.
pub struct Launched {
    pub machine: Machine,
    pub start: Start,
    /// Why the saved snapshot did not restore (it was dropped, and the VM
    /// booted instead).
    pub restore_failed: Option<String>,
    /// Why no snapshot could be saved after the boot.
    pub save_failed: Option<String>,
}

/// The directory under `snapshots` of the snapshot a VM of the build
/// measured `measurement` restores, started with `spec`.
pub fn snapshot_dir(snapshots: &Path, measurement: &str, spec: &Spec) -> PathBuf {
    let key = serde_json::json!({
        "measurement": measurement,
        "kernel": file_identity(&spec.kernel),
        "vmm": file_identity(&spec.vmm),
        "vcpus": spec.vcpus,
        "mem_mib": spec.mem_mib,
        "kernel_args": spec.kernel_args,
    });
    snapshots.join(kiln_image::digest::Digest::of(key.to_string().as_bytes()).hex())
}

/// Restores the snapshot in `snapshot_dir` if there is one, else boots
/// `spec` and saves one there; without a directory, just boots.
pub fn launch(
    spec: &Spec,
    snapshot_dir: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Launched, MachineError> {
    let Some(dir) = snapshot_dir else {
        return Ok(Launched {
            machine: Machine::launch_cancellable(spec, cancelled)?,
            start: Start::Cold,
            restore_failed: None,
            save_failed: None,
        });
    };
    let mut restore_failed = None;
    let files = SnapshotFiles::in_dir(dir);
    if files.exist() {
        let warm = Spec {
            restore: Some(files),
            ..spec.clone()
        };
        match Machine::launch_cancellable(&warm, cancelled) {
            Ok(machine) => {
                mark_used(dir);
                return Ok(Launched {
                    machine,
                    start: Start::Warm,
                    restore_failed: None,
                    save_failed: None,
                });
            }
            Err(MachineError::Cancelled) => return Err(MachineError::Cancelled),
            Err(e) => {
                restore_failed = Some(e.to_string());
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let cold = Spec {
        control_socket: true,
        ..spec.clone()
    };
    let machine = Machine::launch_cancellable(&cold, cancelled)?;
    let save_failed = machine.snapshot(dir).err().map(|e| e.to_string());
    if save_failed.is_none() {
        if let Some(snapshots) = dir.parent() {
            if let Err(e) = keep_recent(snapshots, KEEP_SNAPSHOTS) {
                tracing::warn!("cannot remove old snapshots: {e}");
            }
        }
    }
    Ok(Launched {
        machine,
        start: Start::Cold,
        restore_failed,
        save_failed,
    })
}

/// Removes every snapshot under `snapshots`; returns the bytes they held
/// on disk.
pub fn remove_all(snapshots: &Path) -> std::io::Result<u64> {
    let mut freed = 0;
    let entries = match std::fs::read_dir(snapshots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if let Ok(files) = std::fs::read_dir(&path) {
            // Blocks on disk: memory files are sparse.
            freed += files
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum::<u64>();
        }
        std::fs::remove_dir_all(&path)?;
    }
    Ok(freed)
}

/// Marks a snapshot as just used (its directory's mtime), for
/// [`keep_recent`].
fn mark_used(dir: &Path) {
    let now = std::time::SystemTime::now();
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.set_modified(now)) {
        tracing::debug!("cannot mark snapshot {} used: {e}", dir.display());
    }
}

/// Removes all but the `keep` most recently used snapshots under
/// `snapshots`; returns how many were removed. A VM restored from one
/// that is removed keeps running: its memory file stays mapped.
pub fn keep_recent(snapshots: &Path, keep: usize) -> std::io::Result<usize> {
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(snapshots)?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_dir())?;
            Some((m.modified().ok()?, e.path()))
        })
        .collect();
    if dirs.len() <= keep {
        return Ok(0);
    }
    // Newest first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut removed = 0;
    for (_, dir) in dirs.into_iter().skip(keep) {
        std::fs::remove_dir_all(&dir)?;
        removed += 1;
    }
    Ok(removed)
}

/// A file's place and version: canonical path, inode, size, mtime.
fn file_identity(path: &Path) -> String {
    let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    match std::fs::metadata(&real) {
        Ok(m) => format!(
            "{} {} {} {}.{}",
            real.display(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => real.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_gets_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"one").unwrap();
        let first = file_identity(&k);
        assert_eq!(first, file_identity(&k));
        std::fs::write(&k, b"three").unwrap();
        assert_ne!(first, file_identity(&k));
    }

    #[test]
    fn only_the_most_recently_used_snapshots_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for i in 0..5u64 {
            let snap = dir.path().join(format!("s{i}"));
            std::fs::create_dir(&snap).unwrap();
            std::fs::write(snap.join("state"), b"x").unwrap();
            let at = base + std::time::Duration::from_secs(60 * i);
            std::fs::File::open(&snap)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        // The oldest, restored just now, counts as the newest.
        mark_used(&dir.path().join("s0"));
        assert_eq!(keep_recent(dir.path(), 2).unwrap(), 3);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["s0", "s4"]);
        assert_eq!(keep_recent(dir.path(), 2).unwrap(), 0);
    }

    #[test]
    fn removing_all_snapshots_counts_what_they_held() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("snapshots");
        assert_eq!(remove_all(&snapshots).unwrap(), 0);
        let snap = snapshots.join("abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("state"), vec![1u8; 8192]).unwrap();
        assert!(remove_all(&snapshots).unwrap() >= 8192);
        assert!(!snap.exists());
    }
}
