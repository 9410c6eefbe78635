//! The host side of a virtio-blk device: a regular file or a block device,
//! its size in sectors, and vectored reads and writes at an offset straight
//! between it and guest memory.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::SECTOR_SIZE;

/// Why a drive cannot back a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open drive {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drive {0} is neither a regular file nor a block device")]
    Kind(PathBuf),
    #[error("cannot find the size of drive {path}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drive {path} is {size} bytes, not a multiple of 512")]
    Unaligned { path: PathBuf, size: u64 },
}

/// An open drive.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl Disk {
    /// Opens `path` (read-only or read-write) and checks its kind and size.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        // The jail may have opened it (see `jail::held`).
        let mut file = match crate::jail::held::duplicate(path) {
            Some(f) => f,
            None => OpenOptions::new()
                .read(true)
                .write(!read_only)
                // A FIFO given by mistake must fail the kind check, not block the open.
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|source| DiskError::Open {
                    path: path.to_path_buf(),
                    source,
                })?,
        };
        let size_err = |source| DiskError::Size {
            path: path.to_path_buf(),
            source,
        };
        let kind = file.metadata().map_err(size_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::Kind(path.to_path_buf()));
        }
        // Seeking to the end sizes block devices too, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Unaligned {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            sectors: size / SECTOR_SIZE,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fills every buffer in `iov` from the disk at `offset`.
    ///
    /// # Safety
    /// Each iovec must describe writable memory that stays mapped for the call.
    pub unsafe fn read_at(&self, iov: &mut [libc::iovec], offset: u64) -> std::io::Result<()> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { self.transfer(iov, offset, false) }
    }

    /// Writes every buffer in `iov` to the disk at `offset`.
    ///
    /// # Safety
    /// Each iovec must describe readable memory that stays mapped for the call.
    pub unsafe fn write_at(&self, iov: &mut [libc::iovec], offset: u64) -> std::io::Result<()> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { self.transfer(iov, offset, true) }
    }

    /// Makes written data durable (the guest's flush).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// One preadv/pwritev for the whole request, more only after a short transfer.
    unsafe fn transfer(
        &self,
        mut iov: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        while !iov.is_empty() {
            let count = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the iovecs describe live memory (the caller's promise),
            // and `count` does not exceed their number.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), count, off)
                } else {
                    libc::preadv(fd, iov.as_ptr(), count, off)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // The file shrank under us, or a writable disk is full.
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            offset += n as u64;
            iov = advance(iov, n as usize);
        }
        Ok(())
    }
}

/// Drops the first `n` bytes from `iov`.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    while skip < iov.len() && n >= iov[skip].iov_len {
        n -= iov[skip].iov_len;
        skip += 1;
    }
    let rest = &mut iov[skip..];
    if let Some(first) = rest.first_mut() {
        // SAFETY: n < iov_len here, so the pointer stays inside the buffer.
        first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
        first.iov_len -= n;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_kinds_and_alignment_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.img");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let disk = Disk::open(&good, true).unwrap();
        assert_eq!(disk.sectors(), 8);
        assert!(disk.read_only());

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let err = Disk::open(&odd, false).unwrap_err();
        assert!(
            matches!(err, DiskError::Unaligned { size: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not a multiple of 512"), "{err}");

        let err = Disk::open(dir.path(), true).unwrap_err();
        assert!(matches!(err, DiskError::Kind(_)), "{err}");
        let err = Disk::open(&dir.path().join("missing"), true).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }), "{err}");
    }

    #[test]
    fn short_transfers_resume_where_they_stopped() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let rest = advance(&mut iov, 4);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 4);
        assert_eq!(rest[0].iov_base, b[1..].as_mut_ptr().cast());
        assert!(advance(rest, 4).is_empty());
    }
}
