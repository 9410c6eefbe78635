//! On-disk inodes (`erofs_inode_compact` / `erofs_inode_extended`): the
//! 32-byte form where owner, link count and size fit it, else the 64-byte
//! one. Every inode's time is the superblock's build time (0).

/// How an inode's data is laid out (`EROFS_INODE_FLAT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// All data in consecutive blocks from `raw_blkaddr`.
    Plain,
    /// Whole blocks from `raw_blkaddr`, the partial last block right after
    /// the inode.
    Inline,
}

impl Layout {
    /// The layout's bits of `i_format` (`EROFS_INODE_FLAT_*` shifted by
    /// `EROFS_I_DATALAYOUT_BIT`; bit 0 is the inode version).
    fn bits(self) -> u16 {
        match self {
            Layout::Plain => 0 << 1,
            Layout::Inline => 2 << 1,
        }
    }
}

/// One inode's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub layout: Layout,
    /// Block address of the data, or the encoded device number.
    pub i_u: u32,
    /// The 32-bit inode number `stat` shows.
    pub ino: u32,
}

pub const COMPACT: usize = 32;
pub const EXTENDED: usize = 64;

/// Linux's `new_encode_dev`, the form erofs stores device numbers in.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl Inode {
    fn compact_fits(&self) -> bool {
        self.uid <= u16::MAX as u32
            && self.gid <= u16::MAX as u32
            && self.nlink <= u16::MAX as u32
            && self.size <= u32::MAX as u64
    }

    /// Bytes this inode takes on disk (before any inline data).
    pub fn disk_len(&self) -> usize {
        if self.compact_fits() {
            COMPACT
        } else {
            EXTENDED
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // The mode's type bits are the top of 16; permissions below.
        let mode = (self.mode & 0xffff) as u16;
        let i_u = self.i_u.to_le_bytes();
        let ino = self.ino.to_le_bytes();
        if self.compact_fits() {
            let mut b = vec![0u8; COMPACT];
            b[0..2].copy_from_slice(&(self.layout.bits()).to_le_bytes());
            b[4..6].copy_from_slice(&mode.to_le_bytes());
            b[6..8].copy_from_slice(&(self.nlink as u16).to_le_bytes());
            b[8..12].copy_from_slice(&(self.size as u32).to_le_bytes());
            b[16..20].copy_from_slice(&i_u);
            b[20..24].copy_from_slice(&ino);
            b[24..26].copy_from_slice(&(self.uid as u16).to_le_bytes());
            b[26..28].copy_from_slice(&(self.gid as u16).to_le_bytes());
            b
        } else {
            let mut b = vec![0u8; EXTENDED];
            b[0..2].copy_from_slice(&(1 | self.layout.bits()).to_le_bytes());
            b[4..6].copy_from_slice(&mode.to_le_bytes());
            b[8..16].copy_from_slice(&self.size.to_le_bytes());
            b[16..20].copy_from_slice(&i_u);
            b[20..24].copy_from_slice(&ino);
            b[24..28].copy_from_slice(&self.uid.to_le_bytes());
            b[28..32].copy_from_slice(&self.gid.to_le_bytes());
            // mtime (32..44) = 0, like the build time compact inodes use.
            b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(uid: u32) -> Inode {
        Inode {
            mode: 0o100644,
            uid,
            gid: 7,
            nlink: 2,
            size: 5,
            layout: Layout::Plain,
            i_u: 9,
            ino: 3,
        }
    }

    #[test]
    fn compact_unless_the_owner_needs_32_bits() {
        let c = inode(1000).encode();
        assert_eq!(c.len(), COMPACT);
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0);
        assert_eq!(u16::from_le_bytes([c[24], c[25]]), 1000);
        let mut inline = inode(1);
        inline.layout = Layout::Inline;
        assert_eq!(u16::from_le_bytes([inline.encode()[0], 0]), 4);
        let e = inode(100_000).encode();
        assert_eq!(e.len(), EXTENDED);
        assert_eq!(e[0] & 1, 1);
        assert_eq!(u32::from_le_bytes([e[24], e[25], e[26], e[27]]), 100_000);
        assert_eq!(e[44], 2);
    }

    #[test]
    fn device_numbers_as_linux_encodes_them() {
        assert_eq!(encode_dev(5, 1), 0x501);
        assert_eq!(encode_dev(1, 0x1234), 0x0120_0134);
    }
}
