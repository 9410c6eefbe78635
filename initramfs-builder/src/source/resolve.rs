//! From a top-level manifest document to a linux/amd64 image: walks
//! indexes, checks every fetched document against its digest, and reads
//! the config.

use super::{Resolved, SourceError};
use crate::digest::Digest;
use crate::image::{ConfigFile, Document, ImageError};
use crate::layers::Expected;

/// Indexes may point at indexes; real images nest at most once or twice.
const MAX_DEPTH: usize = 4;

/// What is being fetched: registries serve the two from different paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

pub type Fetch<'a> = dyn FnMut(&Digest, Kind) -> Result<Vec<u8>, SourceError> + 'a;

/// `doc` is the first document (already verified when it was fetched by
/// digest) and its digest; `fetch` returns a blob by digest.
pub fn resolve(
    mut doc: Vec<u8>,
    mut digest: Digest,
    media_type: Option<&str>,
    fetch: &mut Fetch<'_>,
) -> Result<Resolved, SourceError> {
    let mut header = media_type.map(str::to_string);
    for _ in 0..MAX_DEPTH {
        match Document::parse(&doc, header.as_deref())? {
            Document::Index(index) => {
                let d = index.pick_amd64()?.clone();
                doc = fetch_verified(fetch, &d.digest, Kind::Manifest)?;
                digest = d.digest;
                header = d.media_type;
            }
            Document::Manifest(m) => {
                let config_bytes = fetch_verified(fetch, &m.config.digest, Kind::Blob)?;
                let config = ConfigFile::parse(&config_bytes)?;
                if config.rootfs.diff_ids.len() != m.layers.len() {
                    return Err(ImageError::LayerCount {
                        layers: m.layers.len(),
                        diff_ids: config.rootfs.diff_ids.len(),
                    }
                    .into());
                }
                let layers = m
                    .layers
                    .iter()
                    .zip(&config.rootfs.diff_ids)
                    .map(|(l, d)| Expected {
                        blob: Some(l.digest.clone()),
                        diff_id: Some(d.clone()),
                        blob_verified: false,
                    })
                    .collect();
                return Ok(Resolved {
                    layer_sizes: m.layers.iter().map(|l| l.size).collect(),
                    manifest: Some(digest),
                    config_digest: m.config.digest,
                    config,
                    layers,
                });
            }
        }
    }
    Err(ImageError::TooDeep.into())
}

pub fn fetch_verified(
    fetch: &mut Fetch<'_>,
    digest: &Digest,
    kind: Kind,
) -> Result<Vec<u8>, SourceError> {
    let bytes = fetch(digest, kind)?;
    let what = match kind {
        Kind::Manifest => "manifest",
        Kind::Blob => "config",
    };
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(SourceError::DigestMismatch {
            what,
            expected: digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}
