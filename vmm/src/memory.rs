//! Guest RAM: anonymous mappings (optionally 2 MiB huge pages), one per
//! range, and their registration with KVM.

use std::io::Write;
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::layout::ram_ranges;

/// The low guest memory that holds the boot structures, one huge page.
const BOOT_DATA_SIZE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot allocate {mib} MiB of guest memory from huge pages (are 2 MiB pages reserved in /proc/sys/vm/nr_hugepages?)")]
    HugePages {
        mib: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("invalid guest memory layout")]
    Layout,
    #[error("KVM refused a guest memory slot")]
    Register(#[source] kvm_ioctls::Error),
    #[error("cannot open memory file {}", path.display())]
    OpenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {} holds {found} bytes, the snapshot's guest has {expected}", path.display())]
    FileSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("cannot map memory file {}", path.display())]
    MapFile {
        path: PathBuf,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot write memory file {}", path.display())]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn create(mem_bytes: u64, hugepages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_bytes) {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if hugepages {
            flags |= libc::MAP_HUGETLB;
        }
        let mib = size >> 20;
        let region: MmapRegion = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|source| {
                if hugepages {
                    MemoryError::HugePages { mib, source }
                } else {
                    MemoryError::Allocate { mib, source }
                }
            })?;
        if !hugepages {
            // Transparent huge pages where the host allows them: the guest's
            // first touches fault in 2 MiB at a time instead of 4 KiB. Not
            // for the low 2 MiB, where the VMM writes the boot structures
            // before the first KVM_RUN: as a huge page, that first write
            // faulted in and cleared 2 MiB, 0.3 ms usually but up to 40 ms
            // on a PVM host, all of it before the guest could start.
            let skip = if start == 0 {
                BOOT_DATA_SIZE.min(size)
            } else {
                0
            };
            // SAFETY: advice on a mapping we own (`skip` <= its size);
            // failure is harmless.
            unsafe {
                libc::madvise(
                    region.as_ptr().add(skip as usize).cast(),
                    (size - skip) as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Layout)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)
}

/// Writes every region of `mem`, in order, to a new file at `path`. The
/// vCPUs must be paused. Pages of zeros become holes: most of a guest's
/// memory is untouched, and the file stays as small on disk.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<(), MemoryError> {
    let err = |source| MemoryError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("partial");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        let mut total = 0u64;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| std::io::Error::other("guest memory region without a mapping"))?;
            // SAFETY: the region's mapping is live for `mem`'s lifetime and
            // no vCPU writes to it while paused; device threads do not run
            // during a snapshot (the event loop is the caller).
            let bytes = unsafe { std::slice::from_raw_parts(host, region.len() as usize) };
            for page in bytes.chunks(4096) {
                if page.iter().all(|b| *b == 0) {
                    std::io::Seek::seek(&mut file, std::io::SeekFrom::Current(page.len() as i64))?;
                } else {
                    file.write_all(page)?;
                }
            }
            total += region.len();
        }
        file.set_len(total)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Guest memory of `mem_bytes` mapped copy-on-write (`MAP_PRIVATE`) from a
/// file [`save`] wrote: the guest's writes stay in this process, and every
/// VM restored from one file shares its pages in the page cache.
pub fn from_file(path: &Path, mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = crate::jail::held::open_read(path).map_err(|source| MemoryError::OpenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if found != mem_bytes {
        return Err(MemoryError::FileSize {
            path: path.to_path_buf(),
            expected: mem_bytes,
            found,
        });
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in ram_ranges(mem_bytes) {
        let region: MmapRegion = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::MapFile {
                path: path.to_path_buf(),
                source,
            })?;
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Layout)?);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)
}

/// Registers every region of `mem` as a KVM memory slot. Call it first,
/// right after creating the VM: each new slot waits for a grace period of
/// the VM's SRCU, which took ~0.3 ms here when nothing else was happening
/// to the VM, but 4-10 ms (asleep in `synchronize_srcu_expedited`) when it
/// ran on a thread beside the rest of the set-up (mapping the kernel into
/// guest memory, devices, boot data). That wait was most of the time to
/// the first KVM_RUN.
pub fn register(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Layout)?;
        let slot = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the slot is a live mapping owned by the VM's guest memory,
        // which the VM keeps as long as its VM fd.
        unsafe { vm_fd.set_user_memory_region(slot) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Guest memory resident in this process, from `/proc/self/smaps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// The `Rss:` of mappings inside guest memory: anonymous pages, and pages
    /// of the kernel or initramfs mapped from the page cache. Counted in the
    /// process's RSS.
    pub rss_bytes: u64,
    /// Huge pages from hugetlbfs (`--hugepages`), which the kernel counts
    /// apart from RSS.
    pub hugetlb_bytes: u64,
}

impl Resident {
    pub fn total_bytes(&self) -> u64 {
        self.rss_bytes + self.hugetlb_bytes
    }
}

pub fn resident(mem: &GuestMemoryMmap) -> Resident {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|smaps| resident_within(&smaps, &host_ranges(mem)))
        .unwrap_or_default()
}

/// The host address range (start, end) of each guest memory region.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .filter_map(|r| {
            let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as usize;
            Some((start, start + r.len() as usize))
        })
        .collect()
}

/// The address range (start, end) of an smaps entry's header line; `None`
/// for the entry's field lines.
fn smaps_entry_range(line: &str) -> Option<(usize, usize)> {
    let first = line.split_whitespace().next()?;
    let (a, b) = first.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// Sums the resident sizes of the smaps entries that lie inside one of `ranges`.
fn resident_within(smaps: &str, ranges: &[(usize, usize)]) -> Resident {
    let kib = |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0) };
    let mut inside = false;
    let mut r = Resident::default();
    for line in smaps.lines() {
        if let Some((start, end)) = smaps_entry_range(line) {
            inside = ranges.iter().any(|&(s, e)| start >= s && end <= e);
        } else if !inside {
            continue;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            r.rss_bytes += kib(v) * 1024;
        } else if let Some(v) = line
            .strip_prefix("Private_Hugetlb:")
            .or_else(|| line.strip_prefix("Shared_Hugetlb:"))
        {
            r.hugetlb_bytes += kib(v) * 1024;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn saved_memory_maps_back_copy_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = create(8 << 20, false).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0xabu8, GuestAddress((8 << 20) - 1)).unwrap();
        save(&mem, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        let before = std::fs::read(&path).unwrap();

        let back = from_file(&path, 8 << 20).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            back.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(),
            0xab
        );
        back.write_obj(7u32, GuestAddress(0x3000)).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the file is unchanged"
        );

        let e = from_file(&path, 16 << 20).unwrap_err();
        assert!(matches!(e, MemoryError::FileSize { .. }), "{e}");
        let e = from_file(&dir.path().join("missing"), 8 << 20).unwrap_err();
        assert!(matches!(e, MemoryError::OpenFile { .. }), "{e}");
    }

    #[test]
    fn touched_pages_become_resident() {
        let mem = create(64 << 20, false).unwrap();
        let before = resident(&mem).rss_bytes;
        for i in 0..16u64 {
            mem.write_obj(1u64, GuestAddress(i * 4096)).unwrap();
        }
        let after = resident(&mem).rss_bytes;
        assert!(after >= before + 16 * 4096, "{before} -> {after}");
        assert!(after < 64 << 20);
    }

    /// The VmFlags of the smaps entry whose range holds `addr`.
    fn vm_flags_at(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((start, end)) = smaps_entry_range(line) {
                inside = (start..end).contains(&addr);
            } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                return flags.trim().to_string();
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn boot_data_pages_are_not_huge_page_candidates() {
        let mem = create(8 << 20, false).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let low = vm_flags_at(base);
        let rest = vm_flags_at(base + BOOT_DATA_SIZE as usize);
        assert!(!low.split(' ').any(|f| f == "hg"), "low 2 MiB: {low}");
        assert!(rest.split(' ').any(|f| f == "hg"), "above 2 MiB: {rest}");
    }

    #[test]
    fn only_mappings_inside_guest_memory_count() {
        let smaps = "\
1000-3000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac
3000-4000 rw-p 00000000 08:01 42    /var/lib/kiln/kernel/vmlinux
Rss:                   4 kB
9000-a000 rw-p 00000000 00:00 0    [heap]
Rss:                   4 kB
";
        let rss = |ranges: &[(usize, usize)]| resident_within(smaps, ranges).rss_bytes;
        assert_eq!(rss(&[(0x1000, 0x4000)]), 12 * 1024);
        assert_eq!(rss(&[(0x1000, 0x3000)]), 8 * 1024);
        assert_eq!(resident_within(smaps, &[]), Resident::default());
    }

    #[test]
    fn huge_pages_count_as_guest_memory_outside_rss() {
        let smaps = "\
7f0000000000-7f0010000000 rw-p 00000000 00:0f 1234    /anon_hugepage (deleted)
Size:             262144 kB
Rss:                   0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:   20480 kB
7f0010000000-7f0010001000 rw-p 00000000 00:00 0
Rss:                   4 kB
Private_Hugetlb:    2048 kB
";
        let r = resident_within(smaps, &[(0x7f00_0000_0000, 0x7f00_1000_0000)]);
        assert_eq!(
            r,
            Resident {
                rss_bytes: 0,
                hugetlb_bytes: 20480 * 1024
            }
        );
        assert_eq!(r.total_bytes(), 20 << 20);
    }
}
