//! Pulling from an OCI distribution registry into the cache's staging
//! area: documents by digest come from the store when present, so a
//! known image needs no network; layers are downloaded once, verified.

pub mod challenge;
pub mod client;
pub mod credentials;

use crate::digest::Digest;
use crate::image::MAX_JSON;
use crate::reference::Reference;
use crate::source::resolve::{self, Kind};
use crate::source::{Resolved, SourceError};
use client::{Client, RegistryError};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub struct RegistrySource {
    pub reference: Reference,
    insecure: Vec<String>,
    docker_config: Option<PathBuf>,
    client: Option<Client>,
}

/// Progress of one layer download: index, count, digest, bytes so far, total.
pub type FetchProgress<'a> = dyn FnMut(usize, usize, &Digest, u64, u64) + 'a;

impl RegistrySource {
    pub fn new(
        reference: Reference,
        insecure: Vec<String>,
        docker_config: Option<PathBuf>,
    ) -> Self {
        RegistrySource {
            reference,
            insecure,
            docker_config,
            client: None,
        }
    }

    /// The client, made on first use: nothing touches the network before.
    fn client(&mut self) -> Result<&mut Client, RegistryError> {
        if let Some(c) = self.client.take() {
            return Ok(self.client.insert(c));
        }
        {
            let creds = self
                .docker_config
                .clone()
                .or_else(credentials::default_path)
                .and_then(|p| credentials::lookup(&p, &self.reference.registry));
            tracing::debug!(registry = %self.reference.registry, auth = creds.is_some(), "connecting");
            let c = Client::new(&self.reference, &self.insecure, creds)?;
            Ok(self.client.insert(c))
        }
    }

    /// Resolves to linux/amd64. `known` is a platform manifest digest from
    /// an earlier resolution of the same reference (skips the tag lookup).
    pub fn resolve(
        &mut self,
        known: Option<&Digest>,
        store: &Path,
        staged: &Path,
    ) -> Result<Resolved, SourceError> {
        let start = known.or(self.reference.digest.as_ref()).cloned();
        let (doc, digest, media_type) = match start {
            Some(d) => (self.document(&d, Kind::Manifest, store, staged)?, d, None),
            None => {
                let tag = self.reference.manifest_ref();
                let (doc, media_type, digest) = self.client()?.manifest(&tag)?;
                save(staged, &digest, &doc)?;
                (doc, digest, media_type)
            }
        };
        let mut fetch = |d: &Digest, kind: Kind| self.document(d, kind, store, staged);
        resolve::resolve(doc, digest, media_type.as_deref(), &mut fetch)
    }

    /// A small document by digest: from the store, staging, or the network
    /// (then staged). Callers check the digest.
    fn document(
        &mut self,
        d: &Digest,
        kind: Kind,
        store: &Path,
        staged: &Path,
    ) -> Result<Vec<u8>, SourceError> {
        for dir in [store, staged] {
            let p = dir.join(d.hex());
            if let Ok(f) = fs::File::open(&p) {
                let mut buf = Vec::new();
                f.take(MAX_JSON + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| SourceError::Io(p.display().to_string(), e))?;
                return Ok(buf);
            }
        }
        let bytes = match kind {
            Kind::Manifest => self.client()?.manifest(&d.to_string())?.0,
            Kind::Blob => {
                let mut buf = Vec::new();
                let mut limited = LimitedWriter {
                    inner: &mut buf,
                    left: MAX_JSON,
                };
                self.client()?
                    .blob(d, Some(MAX_JSON), &mut limited, &mut |_| {})?;
                buf
            }
        };
        save(staged, d, &bytes)?;
        Ok(bytes)
    }

    /// Downloads every layer not already in the store into `staged`.
    /// Layers that claim more than `limit` bytes together are refused
    /// before any download (compression never makes a tar larger).
    pub fn fetch_layers(
        &mut self,
        r: &Resolved,
        store: &Path,
        staged: &Path,
        limit: u64,
        progress: &mut FetchProgress<'_>,
    ) -> Result<(), SourceError> {
        let declared: u64 = r.layer_sizes.iter().fold(0, |a, b| a.saturating_add(*b));
        if declared > limit {
            return Err(SourceError::TooLarge {
                what: "the image's layers".to_string(),
                max: limit,
            });
        }
        let n = r.layers.len();
        for (i, layer) in r.layers.iter().enumerate() {
            let Some(d) = &layer.blob else { continue };
            if store.join(d.hex()).exists() || staged.join(d.hex()).exists() {
                continue;
            }
            let dest = staged.join(d.hex());
            let partial = staged.join(format!("{}.partial", d.hex()));
            let io = |e| SourceError::Io(partial.display().to_string(), e);
            let mut f = io::BufWriter::new(fs::File::create(&partial).map_err(io)?);
            let max = r.layer_sizes.get(i).copied().filter(|s| *s > 0);
            self.client()?
                .blob(d, max, &mut f, &mut |done| progress(i, n, d, done, 0))?;
            let f = f.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            fs::rename(&partial, &dest).map_err(io)?;
        }
        Ok(())
    }
}

/// The digest of the manifest `reference` names now: one manifest
/// request, nothing stored. A reference by digest is answered without the
/// network. (So a caller can pin a tag once and build exactly that.)
pub fn resolve_tag(
    reference: &Reference,
    insecure: &[String],
    docker_config: Option<PathBuf>,
) -> Result<Digest, RegistryError> {
    if let Some(d) = &reference.digest {
        return Ok(d.clone());
    }
    let creds = docker_config
        .or_else(credentials::default_path)
        .and_then(|p| credentials::lookup(&p, &reference.registry));
    let mut client = Client::new(reference, insecure, creds)?;
    Ok(client.manifest(&reference.manifest_ref())?.2)
}

fn save(dir: &Path, d: &Digest, bytes: &[u8]) -> Result<(), SourceError> {
    let p = dir.join(d.hex());
    fs::write(&p, bytes).map_err(|e| SourceError::Io(p.display().to_string(), e))
}

/// Refuses to hold more than `left` bytes (configs are small; a huge one
/// is an attack).
struct LimitedWriter<'a> {
    inner: &'a mut Vec<u8>,
    left: u64,
}

impl io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::other("document larger than 4 MiB"));
        }
        self.left -= buf.len() as u64;
        self.inner.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
