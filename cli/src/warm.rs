//! Where `kiln run` keeps the snapshot of an image's ready VM, so that a
//! later run restores it instead of booting.
//!
//! The snapshot is keyed by everything a restored VM takes from it: the
//! build's measurement (root image, agent initramfs, the command line that
//! names the root), the guest kernel and kiln-vmm binaries (by file
//! identity: a rebuilt one gets a new key), the VM's vCPUs, memory and
//! extra kernel words. A snapshot that no longer restores (another kiln-vmm
//! version, a damaged file) is dropped and made again by the next boot.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_bridge::machine::Spec;
use kiln_image::build::Built;
use kiln_image::digest::Digest;

/// Where snapshots live under `$KILN_HOME`.
const SNAPSHOTS: &str = "snapshots";

/// The directory of the snapshot a run of `built` with `spec` restores.
pub fn snapshot_dir(home: &Path, built: &Built, spec: &Spec) -> PathBuf {
    let key = serde_json::json!({
        "measurement": built.measurement,
        "kernel": file_identity(&spec.kernel),
        "vmm": file_identity(&spec.vmm),
        "vcpus": spec.vcpus,
        "mem_mib": spec.mem_mib,
        "kernel_args": spec.kernel_args,
    });
    home.join(SNAPSHOTS)
        .join(Digest::of(key.to_string().as_bytes()).hex())
}

/// Removes every saved snapshot; returns the bytes they held on disk.
pub fn remove_all(home: &Path) -> std::io::Result<u64> {
    let dir = home.join(SNAPSHOTS);
    let mut freed = 0;
    let entries = match std::fs::read_dir(&dir) {
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
    fn removing_all_snapshots_counts_what_they_held() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(remove_all(home.path()).unwrap(), 0);
        let snap = home.path().join(SNAPSHOTS).join("abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("state"), vec![1u8; 8192]).unwrap();
        assert!(remove_all(home.path()).unwrap() >= 8192);
        assert!(!snap.exists());
    }
}
