//! Layer flattening: each layer's tar is streamed once to build the merged
//! tree (whiteouts applied, hostile names refused, digests and size limit
//! checked), then streamed again by `crate::initramfs` to copy file bytes.

pub mod apply;
pub mod cap;
pub mod decompress;
pub mod path;
pub mod readahead;
pub mod tree;
pub mod whiteout;

use crate::digest::Digest;
use std::io::{self, Read};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The ordered layers of one image, however they are stored.
pub trait LayerSet {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What to check layer `i` against.
    fn expect(&self, i: usize) -> Expected;
    /// The layer blob exactly as stored (still compressed).
    fn open(&mut self, i: usize) -> Result<Box<dyn Read + Send + '_>, BoxError>;
}

/// Digests one layer must match; the first present one names it in errors.
#[derive(Clone, Debug)]
pub struct Expected {
    /// Digest of the stored (compressed) blob, when the source gives one.
    pub blob: Option<Digest>,
    /// Digest of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: Option<Digest>,
    /// The stored blob was checked against `blob` when it was stored (the
    /// cache's own blobs): hashing it again is wasted work.
    pub blob_verified: bool,
}

impl Expected {
    pub fn name(&self) -> String {
        match (&self.blob, &self.diff_id) {
            (Some(d), _) | (None, Some(d)) => d.to_string(),
            (None, None) => "(unnamed layer)".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("unsafe name")]
    Path(#[from] path::PathError),
    #[error("unsafe whiteout")]
    Whiteout(#[from] whiteout::EscapingWhiteout),
    #[error("unsafe entry")]
    Tree(#[from] tree::TreeError),
    #[error("expanded image content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("unreadable tar header")]
    Header(#[source] io::Error),
    #[error("symlink target is not UTF-8")]
    LinkNotUtf8,
    #[error("uid or gid does not fit 32 bits")]
    Owner,
    #[error("layer bytes changed between the two passes")]
    Changed,
    #[error("symlink target is {0} bytes long, over the limit of {max}", max = path::PATH_MAX - 1)]
    LinkTooLong(usize),
    #[error("the image has more than {limit} paths (raise the limit with --max-entries)")]
    TooManyEntries { limit: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer}, entry {entry:?}")]
    Entry {
        layer: String,
        entry: String,
        #[source]
        source: EntryError,
    },
    #[error("layer {layer}: corrupt or truncated archive (after entry {after:?})")]
    Corrupt {
        layer: String,
        after: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: content digest is {actual}")]
    DigestMismatch { layer: String, actual: Digest },
    #[error("layer {layer}: uncompressed digest is {actual}, the config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: cannot open")]
    Open {
        layer: String,
        #[source]
        source: BoxError,
    },
}

impl LayerError {
    /// The entry-level cause, for callers (and tests) that branch on it.
    pub fn entry_error(&self) -> Option<&EntryError> {
        match self {
            LayerError::Entry { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Default limit on the paths in one image: far above real images (a
/// full Debian with python3 has ~8,000), low enough to bound the tree's
/// memory (~200 bytes a path).
pub const DEFAULT_MAX_ENTRIES: u64 = 2_000_000;

/// Builds the merged tree of all layers (pass one), with the default
/// limit on paths.
pub fn flatten(
    layers: &mut dyn LayerSet,
    limit: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<tree::Tree, LayerError> {
    flatten_limited(layers, limit, DEFAULT_MAX_ENTRIES, progress)
}

/// Builds the merged tree of all layers (pass one): at most `limit`
/// expanded bytes and `max_entries` paths.
pub fn flatten_limited(
    layers: &mut dyn LayerSet,
    limit: u64,
    max_entries: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<tree::Tree, LayerError> {
    let mut t = tree::Tree::default();
    let mut used = 0u64;
    let n = layers.len();
    for i in 0..n {
        progress(i, n);
        let expect = layers.expect(i);
        let blob = layers.open(i).map_err(|source| LayerError::Open {
            layer: expect.name(),
            source,
        })?;
        let budget = (limit.saturating_sub(used), limit);
        used += apply::apply(&mut t, i, &expect, blob, budget, max_entries)?;
    }
    Ok(t)
}
