//! The block-device root: the flattened tree written as an uncompressed
//! erofs image (4 KiB blocks, flat data, no xattrs), for the guest to mount
//! read-only from virtio-blk under an overlay.
//!
//! Layout, all of it planned from the tree before a byte is written, so
//! the image streams out in one sequential pass:
//!
//! 1. block 0: the superblock at byte 1024, then inodes from byte 1152
//!    (root first), each followed by its inline tail (a directory's or
//!    symlink's last partial block) where that fits the same block;
//! 2. whole blocks of directories and symlinks that did not fit inline;
//! 3. regular files' bytes, block-aligned, in (layer, entry) order, so
//!    each layer is read once, front to back.
//!
//! Same tree and layers, same bytes: no times (build time 0), inode
//! numbers in path order, the UUID derived from the metadata.

mod data;
pub mod dir;
pub mod inode;
pub mod superblock;

use crate::cpio::{Meta, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};
use crate::layers::tree::{Content, Kind, Tree};
use crate::layers::{LayerError, LayerSet};
use dir::{Dir, Entry};
use inode::{Inode, Layout};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use superblock::{Super, BLOCK};

/// Where the first inode goes: just past the superblock, 32-byte aligned.
const FIRST_INODE: u64 = (superblock::OFFSET + superblock::SIZE) as u64;
/// nids count 32-byte slots.
const SLOT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{0:?} has no parent directory in the tree")]
    Orphan(String),
    #[error("the root image would exceed erofs's 2^32 blocks")]
    TooLarge,
    #[error("cannot write the root image")]
    Io(#[from] io::Error),
}

enum Data {
    Dir(Dir),
    File,
    Symlink(String),
    Device(u32),
    None,
}

struct Node<'t> {
    path: &'t str,
    data: Data,
    mode: u32,
    meta: Meta,
    nlink: u32,
    size: u64,
    /// Byte offset of the inode in the image.
    pos: u64,
    layout: Layout,
    blkaddr: u32,
}

impl Node<'_> {
    fn nid(&self) -> u64 {
        self.pos / SLOT
    }

    fn inode(&self, ino: usize) -> Inode {
        Inode {
            mode: self.mode,
            uid: self.meta.uid,
            gid: self.meta.gid,
            nlink: self.nlink,
            size: self.size,
            layout: self.layout,
            i_u: match self.data {
                Data::Device(rdev) => rdev,
                _ => self.blkaddr,
            },
            ino: ino as u32 + 1,
        }
    }

    /// Bytes of directory or symlink content (files stream separately).
    fn content(&self, nodes: &[Node<'_>]) -> Vec<u8> {
        match &self.data {
            Data::Dir(d) => d.encode(|i| nodes[i].nid()),
            Data::Symlink(t) => t.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// Whole blocks stored apart from the inode.
    fn outside_blocks(&self) -> u64 {
        match self.layout {
            Layout::Inline => self.size / BLOCK,
            Layout::Plain => self.size.div_ceil(BLOCK),
        }
    }
}

fn file_type(kind: &Kind) -> (u32, u8) {
    match kind {
        Kind::Dir => (S_IFDIR, dir::FT_DIR),
        Kind::File { .. } => (S_IFREG, dir::FT_REG),
        Kind::Symlink(_) => (S_IFLNK, dir::FT_SYMLINK),
        Kind::CharDev(..) => (S_IFCHR, dir::FT_CHR),
        Kind::BlockDev(..) => (S_IFBLK, dir::FT_BLK),
        Kind::Fifo => (S_IFIFO, dir::FT_FIFO),
    }
}

/// Everything about the image but the file bytes.
struct Plan<'t> {
    nodes: Vec<Node<'t>>,
    /// Bytes of block 0 onwards up to the end of the inodes, block-aligned.
    meta_len: u64,
    blocks: u32,
    /// Regular files by where their bytes are, in write order.
    files: BTreeMap<Content, usize>,
}

fn plan(tree: &Tree) -> Result<Plan<'_>, ErofsError> {
    let mut nodes = vec![Node {
        path: "",
        data: Data::None,
        mode: S_IFDIR | 0o755,
        meta: Meta::root(0o755),
        nlink: 2,
        size: 0,
        pos: 0,
        layout: Layout::Plain,
        blkaddr: 0,
    }];
    let mut children: Vec<Vec<Entry>> = vec![Vec::new()];
    // Directory path -> node index; `children` is indexed by node too.
    let mut dirs: HashMap<&str, usize> = HashMap::from([("", 0)]);
    let mut files: BTreeMap<Content, usize> = BTreeMap::new();
    for (path, n) in tree.iter() {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let &p = dirs
            .get(parent)
            .ok_or_else(|| ErofsError::Orphan(path.to_string()))?;
        let (ftype, dtype) = file_type(&n.kind);
        let index = match &n.kind {
            // Paths come sorted, so the first name of a hardlink group
            // owns the inode on every build.
            Kind::File { content, .. } if files.contains_key(content) => {
                let i = files[content];
                nodes[i].nlink += 1;
                i
            }
            kind => {
                let (data, size) = match kind {
                    Kind::Dir => (Data::None, 0),
                    Kind::File { size, .. } => (Data::File, *size),
                    Kind::Symlink(t) => (Data::Symlink(t.clone()), t.len() as u64),
                    Kind::CharDev(ma, mi) | Kind::BlockDev(ma, mi) => {
                        (Data::Device(inode::encode_dev(*ma, *mi)), 0)
                    }
                    Kind::Fifo => (Data::None, 0),
                };
                let i = nodes.len();
                nodes.push(Node {
                    path,
                    data,
                    mode: ftype | (n.meta.mode & 0o7777),
                    meta: n.meta,
                    nlink: if *kind == Kind::Dir { 2 } else { 1 },
                    size,
                    pos: 0,
                    layout: Layout::Plain,
                    blkaddr: 0,
                });
                children.push(Vec::new());
                match kind {
                    Kind::Dir => {
                        dirs.insert(path, i);
                        nodes[p].nlink += 1;
                    }
                    Kind::File { content, .. } => {
                        files.insert(*content, i);
                    }
                    _ => {}
                }
                i
            }
        };
        children[p].push(Entry {
            name: name.to_string(),
            inode: index,
            file_type: dtype,
        });
    }
    for (path, &i) in &dirs {
        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
        let up = if path.is_empty() { 0 } else { dirs[parent] };
        let mut entries = std::mem::take(&mut children[i]);
        for (name, inode) in [(".", i), ("..", up)] {
            entries.push(Entry {
                name: name.into(),
                inode,
                file_type: dir::FT_DIR,
            });
        }
        let d = Dir::new(entries);
        nodes[i].size = d.size();
        nodes[i].data = Data::Dir(d);
    }
    // Inodes (and inline tails) from just past the superblock.
    let mut pos = FIRST_INODE;
    for n in &mut nodes {
        let isize = n.inode(0).disk_len() as u64;
        let tail = n.size % BLOCK;
        let inline =
            matches!(n.data, Data::Dir(_) | Data::Symlink(_)) && tail != 0 && isize + tail <= BLOCK;
        let len = isize + if inline { tail } else { 0 };
        n.layout = if inline {
            Layout::Inline
        } else {
            Layout::Plain
        };
        // Neither an inode nor its tail may cross a block boundary.
        if pos % BLOCK + len > BLOCK {
            pos = pos.next_multiple_of(BLOCK);
        }
        n.pos = pos;
        pos = (pos + len).next_multiple_of(SLOT);
    }
    if nodes[0].nid() > u16::MAX as u64 {
        return Err(ErofsError::TooLarge);
    }
    let meta_len = pos.next_multiple_of(BLOCK);
    let mut block = meta_len / BLOCK;
    let mut give = |count: u64| -> Result<u32, ErofsError> {
        let at = u32::try_from(block).map_err(|_| ErofsError::TooLarge)?;
        block += count;
        Ok(at)
    };
    for n in &mut nodes {
        if matches!(n.data, Data::Dir(_) | Data::Symlink(_)) {
            let count = n.outside_blocks();
            n.blkaddr = if count > 0 { give(count)? } else { 0 };
        }
    }
    for &i in files.values() {
        let count = nodes[i].outside_blocks();
        nodes[i].blkaddr = if count > 0 { give(count)? } else { 0 };
    }
    let blocks = u32::try_from(block).map_err(|_| ErofsError::TooLarge)?;
    Ok(Plan {
        nodes,
        meta_len,
        blocks,
        files,
    })
}

/// Writes the erofs image of `tree`, streaming file bytes from `layers`.
/// Returns `out` and the image's size in bytes.
pub fn write<W: Write>(
    tree: &Tree,
    layers: &mut dyn LayerSet,
    limit: u64,
    mut out: W,
) -> Result<(W, u64), ErofsError> {
    let plan = plan(tree)?;
    let nodes = &plan.nodes;
    let mut meta = vec![0u8; plan.meta_len as usize];
    let mut outside: Vec<Vec<u8>> = Vec::new();
    for (ino, n) in nodes.iter().enumerate() {
        let at = n.pos as usize;
        let raw = n.inode(ino).encode();
        meta[at..at + raw.len()].copy_from_slice(&raw);
        let content = n.content(nodes);
        let whole = (n.outside_blocks() * BLOCK) as usize;
        if n.layout == Layout::Inline {
            let tail = &content[whole..];
            let t = at + raw.len();
            meta[t..t + tail.len()].copy_from_slice(tail);
            outside.push(content[..whole].to_vec());
        } else if !content.is_empty() {
            let mut c = content;
            c.resize(whole, 0);
            outside.push(c);
        }
    }
    // A content-derived UUID: equal images, equal UUIDs, none random.
    let uuid: [u8; 16] = Sha256::digest(&meta[FIRST_INODE as usize..])[..16]
        .try_into()
        .unwrap_or_default();
    let sb = Super {
        root_nid: nodes[0].nid() as u16,
        inodes: nodes.len() as u64,
        blocks: plan.blocks,
        uuid,
    };
    meta[superblock::OFFSET..superblock::OFFSET + superblock::SIZE].copy_from_slice(&sb.encode());
    out.write_all(&meta)?;
    for block in &outside {
        out.write_all(block)?;
    }
    let wanted: BTreeMap<Content, data::Wanted<'_>> = plan
        .files
        .iter()
        .map(|(c, &i)| {
            (
                *c,
                data::Wanted {
                    size: nodes[i].size,
                    path: nodes[i].path,
                },
            )
        })
        .collect();
    data::copy_all(&mut out, layers, limit, &wanted)?;
    Ok((out, plan.blocks as u64 * BLOCK))
}
