//! Directory contents: blocks of `erofs_dirent` records (12 bytes each)
//! followed by their names, every block sorted and the blocks in order, so
//! the kernel can binary-search a name. A name ends where the next one
//! starts, or at the block's (or directory's) end or first NUL.

use super::superblock::BLOCK;

const DIRENT: usize = 12;

/// `file_type` values (the kernel's `FT_*`).
pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHR: u8 = 3;
pub const FT_BLK: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SYMLINK: u8 = 7;

/// One name in a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Index of the inode it names, resolved to a nid when encoding.
    pub inode: usize,
    pub file_type: u8,
}

/// The entries of one directory, sorted by name bytes (`.` and `..`
/// included, where bytes order puts them), split into blocks.
#[derive(Clone, Debug, Default)]
pub struct Dir {
    pub entries: Vec<Entry>,
    /// How many entries each block holds.
    blocks: Vec<usize>,
    size: u64,
}

impl Dir {
    pub fn new(mut entries: Vec<Entry>) -> Dir {
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        let mut blocks = Vec::new();
        let (mut count, mut used) = (0usize, 0usize);
        for e in &entries {
            let need = DIRENT + e.name.len();
            if used + need > BLOCK as usize {
                blocks.push(count);
                count = 0;
                used = 0;
            }
            count += 1;
            used += need;
        }
        blocks.push(count);
        let size = (blocks.len() as u64 - 1) * BLOCK + used as u64;
        Dir {
            entries,
            blocks,
            size,
        }
    }

    /// The directory's `i_size`: whole blocks, then the last one's used part.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The directory's data, `size()` bytes, with `nid` giving each
    /// entry's node number.
    pub fn encode(&self, nid: impl Fn(usize) -> u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut rest = &self.entries[..];
        for &count in &self.blocks {
            let (here, next) = rest.split_at(count);
            rest = next;
            let start = out.len();
            let mut nameoff = DIRENT * here.len();
            for e in here {
                out.extend_from_slice(&nid(e.inode).to_le_bytes());
                out.extend_from_slice(&(nameoff as u16).to_le_bytes());
                out.push(e.file_type);
                out.push(0);
                nameoff += e.name.len();
            }
            for e in here {
                out.extend_from_slice(e.name.as_bytes());
            }
            if !rest.is_empty() {
                // Zero padding ends the block's last name.
                out.resize(start + BLOCK as usize, 0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, inode: usize) -> Entry {
        Entry {
            name: name.into(),
            inode,
            file_type: FT_REG,
        }
    }

    #[test]
    fn sorted_by_bytes_with_dot_entries_among_them() {
        let d = Dir::new(vec![
            entry("b", 3),
            entry("..", 0),
            entry(".", 1),
            entry("-x", 2),
        ]);
        let names: Vec<_> = d.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["-x", ".", "..", "b"]);
        let bytes = d.encode(|i| i as u64 * 10);
        assert_eq!(bytes.len() as u64, d.size());
        assert_eq!(d.size(), 4 * 12 + 2 + 1 + 2 + 1);
        // First dirent: nid 20, names start after the 4 records.
        assert_eq!(bytes[0], 20);
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 48);
        assert_eq!(&bytes[48..], b"-x...b");
    }

    #[test]
    fn entries_spill_into_whole_blocks() {
        let names: Vec<String> = (0..300).map(|i| format!("file-{i:05}")).collect();
        let d = Dir::new(names.iter().map(|n| entry(n, 1)).collect());
        // 22 bytes each: 186 fit a block.
        assert_eq!(d.blocks, [186, 114]);
        assert_eq!(d.size(), BLOCK + 114 * 22);
        let bytes = d.encode(|_| 1);
        assert_eq!(bytes.len() as u64, d.size());
        let second = &bytes[BLOCK as usize..];
        assert_eq!(u16::from_le_bytes([second[8], second[9]]), 114 * 12);
    }
}
