//! The erofs superblock (`struct erofs_super_block` in the kernel's
//! `fs/erofs/erofs_fs.h`): 128 bytes at byte 1024 of block 0.

/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Where the superblock sits in block 0.
pub const OFFSET: usize = 1024;
/// Its size without extension slots.
pub const SIZE: usize = 128;
/// 4 KiB blocks: the guest's page size, so the kernel maps them directly.
pub const BLOCK_BITS: u8 = 12;
pub const BLOCK: u64 = 1 << BLOCK_BITS;

/// What varies between images; everything else is fixed (no features,
/// no xattrs, no compression, build time 0, so equal trees give equal
/// bytes).
pub struct Super {
    pub root_nid: u16,
    pub inodes: u64,
    pub blocks: u32,
    /// Derived from the content, never random.
    pub uuid: [u8; 16],
}

impl Super {
    pub fn encode(&self) -> [u8; SIZE] {
        let mut b = [0u8; SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        // checksum (4..8) and feature_compat (8..12) stay 0: no
        // superblock checksum, no per-inode mtime feature bits needed.
        b[12] = BLOCK_BITS;
        // sb_extslots (13) = 0.
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inodes.to_le_bytes());
        // build_time (24..32) and build_time_nsec (32..36) = 0.
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        // meta_blkaddr (40..44) = 0: inodes are addressed from block 0.
        // xattr_blkaddr (44..48) = 0.
        b[48..64].copy_from_slice(&self.uuid);
        // volume_name (64..80), feature_incompat (80..84) and the rest = 0.
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_where_the_kernel_reads_them() {
        let s = Super {
            root_nid: 36,
            inodes: 7,
            blocks: 9,
            uuid: [0xab; 16],
        };
        let b = s.encode();
        assert_eq!(&b[0..4], &[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!(b[12], 12);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 36);
        assert_eq!(b[16], 7);
        assert_eq!(b[36], 9);
        assert_eq!(b[48], 0xab);
        assert!(b[80..].iter().all(|&x| x == 0));
    }
}
