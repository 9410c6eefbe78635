//! Advisory file locks (flock) between kiln processes sharing a cache.
//! Released when the `Lock` is dropped or the process dies.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

pub struct Lock {
    _file: File,
}

#[derive(Clone, Copy)]
pub enum Mode {
    Shared,
    Exclusive,
}

impl Lock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub fn acquire(path: &Path, mode: Mode) -> io::Result<Lock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let op = match mode {
            Mode::Shared => libc::LOCK_SH,
            Mode::Exclusive => libc::LOCK_EX,
        };
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Lock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}
