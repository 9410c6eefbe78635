//! Guest physical memory layout of a kiln micro-VM (x86_64).
//!
//! Low memory holds the boot structures; RAM runs from 1 MiB up to the
//! 32-bit MMIO gap and continues above 4 GiB. The gap holds the virtio-mmio
//! devices, the IOAPIC and the local APICs.

/// GDT used while the vCPU enters the kernel.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux boot protocol "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit Linux boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit Linux boot protocol.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives in its first KiB,
/// one of the places the kernel scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of RAM above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (up to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// virtio-mmio device windows, one page each, from the start of the gap.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Legacy IRQ of the serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ given to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs a three-page TSS region inside guest address space but outside RAM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Guest RAM ranges for `mem_bytes` of memory: below the MMIO gap first,
/// the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1], (1 << 32, (4 << 30) - MMIO_GAP_START));
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }
}
