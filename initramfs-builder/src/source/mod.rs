//! Where images come from: an OCI layout (directory or archive), a
//! `docker save` archive, or a registry. Each resolves to the same
//! `Resolved` image (identified by its config digest) and a `LayerSet`.

pub mod archive;
pub mod files;
pub mod layout;
pub mod resolve;

use crate::digest::{Digest, DigestError};
use crate::image::{ConfigFile, ImageError};
use crate::layers::{BoxError, Expected, LayerSet};
use files::Files;
use std::io::{self, Read};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {0}")]
    Io(String, #[source] io::Error),
    #[error("invalid image")]
    Image(#[from] ImageError),
    #[error("invalid digest")]
    BadDigest(#[from] DigestError),
    #[error("{what} {expected} has content digest {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} is larger than {max} bytes")]
    TooLarge { what: String, max: u64 },
    #[error("no image tagged {tag:?} (available: {have})")]
    NoTag { tag: String, have: String },
    #[error("{count} images here; pick one by tag (available: {have})")]
    Ambiguous { count: usize, have: String },
    #[error("{0:?} is missing from the archive")]
    Missing(String),
    #[error("archive is compressed; decompress it first")]
    CompressedArchive,
    #[error(transparent)]
    Registry(#[from] crate::registry::client::RegistryError),
    #[error("malformed {what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// An image resolved to linux/amd64: enough to key the cache and, with
/// its layers, to build.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Digest of the platform manifest, when the source has one.
    pub manifest: Option<Digest>,
    /// The image's identity: same config, same layers, same rootfs.
    pub config_digest: Digest,
    pub config: ConfigFile,
    pub layers: Vec<Expected>,
    /// Stored size of each layer blob as the manifest declares it (0 when
    /// the source does not say): downloads may not exceed it.
    pub layer_sizes: Vec<u64>,
}

/// Layers as named members of a `Files` store.
pub struct FileLayers<F: Files> {
    pub files: F,
    pub paths: Vec<String>,
    pub expect: Vec<Expected>,
}

impl<F: Files> LayerSet for FileLayers<F> {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn expect(&self, i: usize) -> Expected {
        self.expect[i].clone()
    }
    fn open(&mut self, i: usize) -> Result<Box<dyn Read + Send + '_>, BoxError> {
        Ok(self.files.open(&self.paths[i])?)
    }
}

/// The path of a blob inside an OCI layout.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}
