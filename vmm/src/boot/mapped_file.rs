//! Loads files into guest memory by mapping their pages copy-on-write from
//! the page cache instead of copying them. The kernel and the initramfs then
//! cost nothing before the first KVM_RUN (copying them meant faulting in and
//! filling tens of MiB of fresh guest memory), and the host only ever backs
//! the pages the guest touches. A guest write to such a page gets its own
//! copy (MAP_PRIVATE); the file is never changed.
//!
//! The files must not be truncated while the VM runs (kiln replaces kernels
//! and built images by rename, which is safe).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE: u64 = 4096;

/// A file reader for loaders (linux-loader, the initramfs copy) that maps
/// whole, page-aligned pages into guest memory and copies only the rest.
pub struct MappedFile {
    file: File,
    len: u64,
    /// Host address ranges of guest memory: the only places it maps over.
    guest: Vec<(usize, usize)>,
}

impl MappedFile {
    pub fn new(file: File, mem: &GuestMemoryMmap) -> std::io::Result<MappedFile> {
        let len = file.metadata()?.len();
        let guest = crate::memory::host_ranges(mem);
        Ok(MappedFile { file, len, guest })
    }

    fn in_guest_memory(&self, start: usize, len: usize) -> bool {
        self.guest
            .iter()
            .any(|&(s, e)| start >= s && start.checked_add(len).is_some_and(|end| end <= e))
    }

    /// Maps as many whole pages as fit at `dst` from the current position;
    /// returns how many bytes it mapped (0: copy instead).
    fn map_pages(&mut self, dst: *mut u8, want: usize) -> std::io::Result<usize> {
        let Ok(pos) = self.file.stream_position() else {
            // Not seekable (a pipe): nothing to map.
            return Ok(0);
        };
        let pages = (want as u64).min(self.len.saturating_sub(pos)) / PAGE * PAGE;
        let dst_addr = dst as usize;
        if pages == 0
            || !pos.is_multiple_of(PAGE)
            || !(dst_addr as u64).is_multiple_of(PAGE)
            || !self.in_guest_memory(dst_addr, pages as usize)
        {
            return Ok(0);
        }
        // SAFETY: `dst..dst+pages` lies inside guest memory that this VMM
        // mapped read-write (checked above) and that stays mapped as long as
        // the VM; replacing those pages with a private mapping of the same
        // size changes their contents, never the address space around them.
        let p = unsafe {
            libc::mmap(
                dst.cast(),
                pages as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                pos as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            // Not mappable here (a special file, or guest memory from huge
            // pages that cannot be split there): copy instead, provided the
            // guest memory the failed call may have unmapped is still there.
            let err = std::io::Error::last_os_error();
            return if still_mapped(dst, pages as usize) {
                Ok(0)
            } else {
                Err(err)
            };
        }
        self.file.seek(SeekFrom::Current(pages as i64))?;
        Ok(pages as usize)
    }
}

/// Whether every page of `addr..addr+len` is mapped (msync fails with
/// ENOMEM on a hole).
fn still_mapped(addr: *mut u8, len: usize) -> bool {
    // SAFETY: msync only inspects the mappings of the range; MS_ASYNC on
    // private anonymous memory writes nothing.
    unsafe { libc::msync(addr.cast(), len, libc::MS_ASYNC) == 0 }
}

impl Read for MappedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for MappedFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for MappedFile {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let dst = buf.ptr_guard_mut().as_ptr();
        let mapped = self
            .map_pages(dst, buf.len())
            .map_err(VolatileMemoryError::IOError)?;
        if mapped == 0 {
            return self.file.read_volatile(buf);
        }
        buf.bitmap().mark_dirty(0, mapped);
        if mapped == buf.len() {
            return Ok(mapped);
        }
        // The partial page at the end is copied in this same call: callers
        // such as vm-memory's read_volatile_from take a short read from a
        // regular file as its end.
        let mut rest = buf.offset(mapped)?;
        Ok(mapped + self.file.read_volatile(&mut rest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn whole_pages_are_mapped_and_the_tail_copied() {
        let mem = crate::memory::create(16 << 20, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..3 * PAGE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let mut f = MappedFile::new(File::open(&path).unwrap(), &mem).unwrap();
        let at = GuestAddress(0x10_0000);
        mem.read_exact_volatile_from(at, &mut f, data.len())
            .unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains(path.to_str().unwrap()), "not mapped:\n{maps}");
        let mut back = vec![0u8; data.len() + 8];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        // Past the loaded bytes the page is zero, as before the load.
        assert_eq!(&back[data.len()..], &[0u8; 8]);
        // The guest's writes stay in the guest: the file is unchanged.
        mem.write_obj(0xffu8, at).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // Unaligned offsets fall back to copying.
        let mut f = MappedFile::new(File::open(&path).unwrap(), &mem).unwrap();
        f.seek(SeekFrom::Start(7)).unwrap();
        let at = GuestAddress(0x20_0000);
        mem.read_exact_volatile_from(at, &mut f, 2 * PAGE as usize)
            .unwrap();
        let mut back = vec![0u8; 2 * PAGE as usize];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(&back[..], &data[7..7 + 2 * PAGE as usize]);
    }

    #[test]
    fn a_file_that_cannot_be_mapped_is_copied() {
        let mem = crate::memory::create(16 << 20, false).unwrap();
        // A pipe has no pages to map.
        let (rx, mut tx) = std::io::pipe().unwrap();
        let data = vec![0x5au8; 2 * PAGE as usize];
        std::io::Write::write_all(&mut tx, &data).unwrap();
        drop(tx);
        let mut f = MappedFile::new(File::from(std::os::fd::OwnedFd::from(rx)), &mem).unwrap();
        let at = GuestAddress(0x30_0000);
        mem.read_exact_volatile_from(at, &mut f, data.len())
            .unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_failed_mapping_leaves_guest_memory_in_place() {
        let mem = crate::memory::create(16 << 20, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![1u8; 2 * PAGE as usize]).unwrap();
        // Write-only: mmap refuses it (EACCES), and so does read.
        let file = File::options().write(true).open(&path).unwrap();
        let mut f = MappedFile::new(file, &mem).unwrap();
        let at = GuestAddress(0x40_0000);
        mem.write_obj(7u64, at).unwrap();
        assert!(mem
            .read_exact_volatile_from(at, &mut f, 2 * PAGE as usize)
            .is_err());
        assert_eq!(mem.read_obj::<u64>(at).unwrap(), 7);
        mem.write_obj(8u64, GuestAddress(at.0 + PAGE)).unwrap();
    }

    #[test]
    fn nothing_outside_guest_memory_is_mapped_over() {
        let mem = crate::memory::create(16 << 20, false).unwrap();
        let f = MappedFile::new(tempfile::tempfile().unwrap(), &mem).unwrap();
        let (start, end) = f.guest[0];
        assert!(f.in_guest_memory(start, end - start));
        assert!(!f.in_guest_memory(start, end - start + 1));
        assert!(!f.in_guest_memory(start - PAGE as usize, PAGE as usize));
        assert!(!f.in_guest_memory(usize::MAX - 10, 100));
    }
}
