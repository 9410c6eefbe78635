//! Advisory file locks (flock) between kiln processes sharing a cache.
//! Released when the `Lock` is dropped or the process dies.
//!
//! A lock file may be deleted by its holder (`Lock::remove`), so lock
//! files do not pile up: whoever then gets the lock on the deleted file
//! sees that the path no longer names it and tries again on a fresh file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Lock {
    file: File,
    path: PathBuf,
}

#[derive(Clone, Copy)]
pub enum Mode {
    Shared,
    Exclusive,
}

impl Lock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub fn acquire(path: &Path, mode: Mode) -> io::Result<Lock> {
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?;
            flock(&file, mode)?;
            // Held, but the file may have been removed (and maybe made
            // again) by the previous holder while this one waited.
            let held = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    return Ok(Lock {
                        file,
                        path: path.to_path_buf(),
                    })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the lock file, then releases the lock. Only for locks no
    /// one else needs to find afterwards under the same name; waiters
    /// notice and retry (see `acquire`).
    pub fn remove(self) -> io::Result<()> {
        let r = match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        drop(self.file);
        r
    }
}

fn flock(file: &File, mode: Mode) -> io::Result<()> {
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: flock on a descriptor the caller owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_lock_file_is_not_shared_by_two_holders() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let first = Lock::acquire(&p, Mode::Exclusive).unwrap();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let l = Lock::acquire(&p, Mode::Exclusive).unwrap();
                // The waiter holds the file the path names now.
                let named = std::fs::metadata(&p).unwrap().ino();
                (l.file.metadata().unwrap().ino() == named, l)
            })
        };
        // Give the waiter time to block on the old file; the outcome is the
        // same if it has not yet opened it.
        std::thread::sleep(std::time::Duration::from_millis(50));
        first.remove().unwrap();
        let (same, l) = waiter.join().unwrap();
        assert!(same);
        l.remove().unwrap();
        assert!(!p.exists());
    }
}
