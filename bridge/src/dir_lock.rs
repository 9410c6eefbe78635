//! An exclusive lock on a directory, held for a process's life: `flock` on
//! a file in it, taken before the process reads or changes anything there,
//! so that a second kilnd (or a second shim of one grant) cannot act on
//! state another process owns. The holder's pid is written into the file,
//! so a refusal names it; the kernel drops the lock when the holder dies,
//! however it dies, so a stale file never blocks anyone.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{} is held by process {}", .path.display(), holder(.pid))]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock {0}")]
    Lock(PathBuf, #[source] std::io::Error),
}

fn holder(pid: &Option<u32>) -> String {
    pid.map_or_else(|| "(unknown pid)".to_string(), |p| p.to_string())
}

/// Held until dropped (or the process ends). The file is opened
/// close-on-exec, so children never inherit the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir/name`, creating the file if needed, or says who holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<DirLock, LockError> {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| LockError::Open(path.clone(), e))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    path,
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(LockError::Lock(path, e));
        }
        // Only the holder writes, so a reader sees a whole pid or nothing.
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| LockError::Lock(path, e))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "x.lock").unwrap();
        // flock locks belong to the open file, so a second open in this
        // process conflicts just as another process would.
        match DirLock::acquire(dir.path(), "x.lock") {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path(), "x.lock").unwrap();
    }
}
