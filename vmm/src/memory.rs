//! Guest RAM: anonymous mappings (optionally 2 MiB huge pages), one per range.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::layout::ram_ranges;

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
            // Transparent huge pages where the host allows them: loading the
            // kernel then faults in a few 2 MiB pages instead of thousands.
            // SAFETY: advice on a mapping we own; failure is harmless.
            unsafe { libc::madvise(region.as_ptr().cast(), size as usize, libc::MADV_HUGEPAGE) };
        }
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Layout)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)
}

/// Bytes of guest memory the host has actually backed (mincore).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(ptr) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `ptr..ptr+len` is this region's live mapping and `vec` has
        // one byte per page of it.
        let rc = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn touched_pages_become_resident() {
        let mem = create(64 << 20, false).unwrap();
        let before = resident_bytes(&mem);
        for i in 0..16u64 {
            mem.write_obj(1u64, GuestAddress(i * 4096)).unwrap();
        }
        let after = resident_bytes(&mem);
        assert!(after >= before + 16 * 4096, "{before} -> {after}");
        assert!(after < 64 << 20);
    }
}
