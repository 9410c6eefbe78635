//! From layers to finished initramfs bytes: flatten (pass one), inject
//! kiln's entries, write the cpio (pass two), compress, and measure.

use crate::compress::{Compression, Encoder};
use crate::digest::{to_hex, HashingWriter};
use crate::erofs::{self, ErofsError};
use crate::image::AgentConfig;
use crate::initramfs::{self, InitramfsError};
use crate::layers::tree::{Kind, Tree};
use crate::layers::{self, LayerError, LayerSet};
use crate::root::BLOCK_ROOT_ARG;
use sha2::{Digest as _, Sha384};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Default limit on the expanded size of all layers together.
pub const DEFAULT_MAX_EXPANDED: u64 = 16 << 30;

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("cannot read the agent binary {0}")]
    Agent(String, #[source] io::Error),
    #[error("cannot write the initramfs")]
    Write(#[source] io::Error),
    #[error("cannot build the root image")]
    Erofs(#[from] ErofsError),
    #[error("cannot write the root image")]
    WriteRoot(#[source] io::Error),
}

impl AssembleError {
    /// The layer error underneath, if that is what failed.
    pub fn layer_error(&self) -> Option<&LayerError> {
        match self {
            AssembleError::Layer(e)
            | AssembleError::Initramfs(InitramfsError::Layer(e))
            | AssembleError::Erofs(ErofsError::Layer(e)) => Some(e),
            _ => None,
        }
    }
}

/// The result: size of the written bytes and their SHA-384, the value a
/// measured boot would check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assembled {
    pub size: u64,
    pub measurement: String,
}

/// What to build besides the layers.
pub struct Recipe<'a> {
    pub agent: &'a Path,
    pub config: AgentConfig,
    pub compression: Compression,
    pub max_expanded: u64,
    /// Most paths the image may have (`layers::DEFAULT_MAX_ENTRIES`).
    pub max_entries: u64,
}

pub fn assemble<W: Write>(
    layers: &mut dyn LayerSet,
    recipe: Recipe<'_>,
    out: W,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(W, Assembled), AssembleError> {
    let tree = flatten(layers, recipe.max_expanded, recipe.max_entries, progress)?;
    assemble_tree(tree, layers, recipe, out)
}

/// Pass one alone, for callers that pick the root kind from the tree.
pub fn flatten(
    layers: &mut dyn LayerSet,
    max_expanded: u64,
    max_entries: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tree, AssembleError> {
    Ok(layers::flatten_limited(
        layers,
        max_expanded,
        max_entries,
        progress,
    )?)
}

/// Bytes of regular-file data in `tree`, each hardlinked file once: what
/// the guest would hold in RAM on the initramfs path.
pub fn unpacked_size(tree: &Tree) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    tree.iter()
        .filter_map(|(_, n)| match n.kind {
            Kind::File { content, size } if seen.insert(content) => Some(size),
            _ => None,
        })
        .sum()
}

/// [`assemble`] from an already flattened tree.
pub fn assemble_tree<W: Write>(
    mut tree: Tree,
    layers: &mut dyn LayerSet,
    recipe: Recipe<'_>,
    out: W,
) -> Result<(W, Assembled), AssembleError> {
    let agent_err = |e| AssembleError::Agent(recipe.agent.display().to_string(), e);
    let mut agent = File::open(recipe.agent).map_err(agent_err)?;
    let agent_size = agent.metadata().map_err(agent_err)?.len();
    let mut config = recipe.config;
    // A block root's boot initramfs has no image `/init`: keep what the
    // caller found in the image.
    if let Some(moved) = initramfs::make_room(&mut tree) {
        config.image_init = Some(moved);
    }
    tracing::debug!(paths = tree.len(), "flattened");
    // The measurement covers the final, compressed bytes.
    let measure: HashingWriter<_, Sha384> =
        HashingWriter::with_hasher(BufWriter::with_capacity(256 * 1024, out));
    let enc = Encoder::new(recipe.compression, measure).map_err(AssembleError::Write)?;
    let enc = initramfs::write(
        &tree,
        layers,
        recipe.max_expanded,
        (&mut agent, agent_size),
        &config,
        enc,
    )?;
    let mut measure = enc.finish().map_err(AssembleError::Write)?;
    measure.flush().map_err(AssembleError::Write)?;
    let (buffered, hasher, size) = measure.into_parts();
    let assembled = Assembled {
        size,
        measurement: format!("sha384:{}", to_hex(&hasher.finalize())),
    };
    let out = buffered
        .into_inner()
        .map_err(|e| AssembleError::Write(e.into_error()))?;
    Ok((out, assembled))
}

/// A block-root build: the erofs root image, the agent-only initramfs,
/// and the measurement that stands for both plus the kernel argument
/// naming the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockAssembled {
    pub root: Assembled,
    pub initrd: Assembled,
    pub measurement: String,
}

/// The measurement of a block-root boot: SHA-384 over a short text that
/// names the SHA-384 of the agent initramfs, of the root image, and the
/// kernel argument that selects the root (what a measured launch would
/// have to check: the initramfs and command line directly, the root
/// image through its digest).
pub fn block_measurement(initrd: &str, root: &str) -> String {
    let text =
        format!("kiln-block-root/1\ninitrd {initrd}\nroot {root}\ncmdline {BLOCK_ROOT_ARG}\n");
    format!("sha384:{}", to_hex(&Sha384::digest(text.as_bytes())))
}

/// Writes a block-root build from a flattened tree: the image (with kiln's
/// entries, as on the initramfs path) as erofs into `root_out`, and an
/// initramfs with only the agent, `/kiln/config.json` and `/dev/console`
/// into `initrd_out`.
pub fn assemble_block<R: Write, I: Write>(
    mut tree: Tree,
    layers: &mut dyn LayerSet,
    recipe: Recipe<'_>,
    root_out: R,
    initrd_out: I,
) -> Result<(R, I, BlockAssembled), AssembleError> {
    let mut config = recipe.config;
    config.image_init = initramfs::make_room(&mut tree);
    let measure: HashingWriter<_, Sha384> =
        HashingWriter::with_hasher(BufWriter::with_capacity(256 * 1024, root_out));
    let (mut measure, _) = erofs::write(&tree, layers, recipe.max_expanded, measure)?;
    measure.flush().map_err(AssembleError::WriteRoot)?;
    let (buffered, hasher, size) = measure.into_parts();
    let root = Assembled {
        size,
        measurement: format!("sha384:{}", to_hex(&hasher.finalize())),
    };
    let root_out = buffered
        .into_inner()
        .map_err(|e| AssembleError::WriteRoot(e.into_error()))?;
    // kiln's own entries alone; no layer is read for them.
    let mut boot = Tree::default();
    initramfs::make_room(&mut boot);
    let boot_recipe = Recipe {
        agent: recipe.agent,
        config,
        compression: recipe.compression,
        max_expanded: recipe.max_expanded,
        max_entries: recipe.max_entries,
    };
    let (initrd_out, initrd) = assemble_tree(boot, layers, boot_recipe, initrd_out)?;
    let measurement = block_measurement(&initrd.measurement, &root.measurement);
    Ok((
        root_out,
        initrd_out,
        BlockAssembled {
            root,
            initrd,
            measurement,
        },
    ))
}
