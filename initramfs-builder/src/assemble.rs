//! From layers to finished initramfs bytes: flatten (pass one), inject
//! kiln's entries, write the cpio (pass two), compress, and measure.

use crate::compress::{Compression, Encoder};
use crate::digest::{to_hex, HashingWriter};
use crate::image::AgentConfig;
use crate::initramfs::{self, InitramfsError};
use crate::layers::{self, LayerError, LayerSet};
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
}

impl AssembleError {
    /// The layer error underneath, if that is what failed.
    pub fn layer_error(&self) -> Option<&LayerError> {
        match self {
            AssembleError::Layer(e) | AssembleError::Initramfs(InitramfsError::Layer(e)) => Some(e),
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
    let agent_err = |e| AssembleError::Agent(recipe.agent.display().to_string(), e);
    let mut agent = File::open(recipe.agent).map_err(agent_err)?;
    let agent_size = agent.metadata().map_err(agent_err)?.len();
    let mut tree =
        layers::flatten_limited(layers, recipe.max_expanded, recipe.max_entries, progress)?;
    let mut config = recipe.config;
    config.image_init = initramfs::make_room(&mut tree);
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
