//! Guest RAM: anonymous mappings (optionally 2 MiB huge pages), one per
//! range, and their registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
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
