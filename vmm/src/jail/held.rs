//! Read-only files the jail opens for the VMM while it is still root.
//!
//! The VMM runs as a per-VM uid that owns nothing on the host, so a
//! kernel, initramfs or root image the operator keeps private (a build's
//! `0600` output in a `0700` directory) would be out of its reach. As
//! Firecracker's jailer hands files over, the jail opens each one inside
//! its new root just before it drops root, and the VMM takes the open
//! file instead of opening the path itself. Files it writes are chowned to
//! the jail uid instead (see `mounts::prepare_host_side`), but for a file
//! reached through another process's `/proc/PID/fd` (an unlinked scratch
//! disk): its mount is the host's, which a bind mount made in the jail's
//! new mount namespace refuses, so the jail holds it open too, from before
//! it leaves the host's namespace. A virtio-net card's TAP is attached
//! the same way, before the jail's empty network namespace hides it.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::devices::virtio::net::{Tap, TapError};

static HELD: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());
static HELD_TAP: Mutex<Option<Tap>> = Mutex::new(None);

/// Attaches to the TAP `name` and keeps it for [`take_tap`].
pub(super) fn hold_tap(name: &str) -> Result<(), TapError> {
    let tap = Tap::open(name)?;
    if let Ok(mut held) = HELD_TAP.lock() {
        *held = Some(tap);
    }
    Ok(())
}

/// The TAP the jail attached to as `name`, once; `None` when it holds none
/// (unjailed).
pub fn take_tap(name: &str) -> Option<Tap> {
    let mut held = HELD_TAP.lock().ok()?;
    if held.as_ref().is_some_and(|t| t.name() == name) {
        held.take()
    } else {
        None
    }
}

/// Opens `open_at` (read-write when `writable`) and keeps it for
/// [`take`] and [`duplicate`] under `key`, the path the VMM asks for.
pub(super) fn hold(open_at: &Path, key: &Path, writable: bool) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        // A FIFO given by mistake must not block the jail; the VMM's own
        // checks refuse it later.
        .custom_flags(libc::O_NONBLOCK)
        .open(open_at)?;
    if let Ok(mut held) = HELD.lock() {
        held.push((key.to_path_buf(), file));
    }
    Ok(())
}

/// The descriptors held, which the jail keeps when it closes the rest.
pub(super) fn fds() -> Vec<i32> {
    let mut fds: Vec<i32> = HELD
        .lock()
        .map(|h| h.iter().map(|(_, f)| f.as_raw_fd()).collect())
        .unwrap_or_default();
    if let Ok(tap) = HELD_TAP.lock() {
        fds.extend(tap.as_ref().map(|t| t.as_raw_fd()));
    }
    fds
}

/// The file the jail opened at `path`, once; `None` when it holds none
/// (unjailed, or the path is not one the VM only reads).
pub fn take(path: &Path) -> Option<File> {
    let mut held = HELD.lock().ok()?;
    let i = held.iter().position(|(p, _)| p == path)?;
    Some(held.swap_remove(i).1)
}

/// A second descriptor of the file the jail opened at `path`, which stays
/// held: for a disk, opened once to check it and once to serve it, with
/// positional I/O only (the two share a file offset).
pub fn duplicate(path: &Path) -> Option<File> {
    let held = HELD.lock().ok()?;
    let (_, file) = held.iter().find(|(p, _)| p == path)?;
    file.try_clone().ok()
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
        hold(&path, &path, false).unwrap();
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

    #[test]
    fn a_duplicated_file_stays_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"disk").unwrap();
        hold(&path, &path, false).unwrap();
        assert!(duplicate(&path).is_some());
        assert!(duplicate(&path).is_some());
        assert!(take(&path).is_some());
        assert!(duplicate(&path).is_none());
    }
}
