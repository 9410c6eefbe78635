//! Read-only files the jail opens for the VMM while it is still root.
//!
//! The VMM runs as a per-VM uid that owns nothing on the host, so a
//! kernel, initramfs or root image the operator keeps private (a build's
//! `0600` output in a `0700` directory) would be out of its reach. As
//! Firecracker's jailer hands files over, the jail opens each one inside
//! its new root just before it drops root, and the VMM takes the open
//! file instead of opening the path itself. Files it writes are chowned to
//! the jail uid instead (see `mounts::prepare_host_side`).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static HELD: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

/// Opens `path` read-only and keeps it for [`take`].
pub(super) fn hold(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO given by mistake must not block the jail; the VMM's own
        // checks refuse it later.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if let Ok(mut held) = HELD.lock() {
        held.push((path.to_path_buf(), file));
    }
    Ok(())
}

/// The file the jail opened at `path`, once; `None` when it holds none
/// (unjailed, or the path is not one the VM only reads).
pub fn take(path: &Path) -> Option<File> {
    let mut held = HELD.lock().ok()?;
    let i = held.iter().position(|(p, _)| p == path)?;
    Some(held.swap_remove(i).1)
}

/// [`take`], or else a plain read-only open of `path`.
pub fn open_read(path: &Path) -> std::io::Result<File> {
    match take(path) {
        Some(f) => Ok(f),
        None => File::open(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_file_is_taken_once_then_the_path_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, b"held").unwrap();
        hold(&path).unwrap();
        // Replaced after the hold: the held file is still the old inode.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"new").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_read(&path).unwrap(), &mut text).unwrap();
        assert_eq!(text, "held");
        assert!(take(&path).is_none());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_read(&path).unwrap(), &mut text).unwrap();
        assert_eq!(text, "new");
    }
}
