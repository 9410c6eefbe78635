//! Segment descriptors and the identity page tables a vCPU starts with.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from flags (G/DB/L/AVL and access byte), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register matching GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0x0000_ffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

/// GDT for the 64-bit Linux boot protocol: null, code64, data, TSS.
pub const GDT_LONG_MODE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for PVH entry (32-bit protected mode, flat): null, code32, data, TSS.
pub const GDT_PVH: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let s = segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!((s.selector, s.l, s.db, s.g, s.present), (8, 1, 0, 1, 1));
        assert_eq!((s.base, s.limit, s.type_), (0, 0xffff_ffff, 0xb));
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let cs = segment_from_gdt(GDT_PVH[1], 1);
        assert_eq!((cs.db, cs.l, cs.limit), (1, 0, 0xffff_ffff));
        let tss = segment_from_gdt(GDT_PVH[3], 3);
        assert_eq!((tss.limit, tss.type_, tss.g), (0x67, 0xb, 0));
        let null = segment_from_gdt(GDT_PVH[0], 0);
        assert_eq!(null.unusable, 1);
    }
}
