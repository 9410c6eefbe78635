//! `kiln image build`: resolve the image, reuse a cached build when the
//! same image, agent and options were built before, else fetch, assemble
//! and commit into the cache atomically.

use crate::assemble::{self, AssembleError, Recipe};
use crate::cache::{build_key_for, BuildRecord, Cache, CacheError, RefRecord, RootImage};
use crate::compress::Compression;
use crate::digest::{self, Digest};
use crate::image::AgentConfig;
use crate::layers::{Expected, LayerSet, DEFAULT_MAX_ENTRIES};
use crate::lock::Mode;
use crate::reference::{Reference, ReferenceError};
use crate::registry::RegistrySource;
use crate::root::RootKind;
use crate::source::archive::DockerArchive;
use crate::source::files::FirstOf;
use crate::source::layout::Layout;
use crate::source::{FileLayers, Resolved, SourceError};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub enum Input {
    /// A registry reference (`alpine:3.20`, `127.0.0.1:5000/x@sha256:…`).
    Registry(String),
    /// A `docker save` tarball.
    DockerArchive(PathBuf),
    /// `PATH[:TAG]` of an OCI layout directory or OCI archive.
    OciLayout(String),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub input: Input,
    pub agent: PathBuf,
    pub compression: Compression,
    pub max_expanded: u64,
    /// Registries (host[:port]) reached over plain HTTP besides loopback.
    pub insecure: Vec<String>,
    /// Docker `config.json` for credentials (default: Docker's location).
    pub docker_config: Option<PathBuf>,
    /// Re-resolve a registry tag even if the cache knows it.
    pub refresh: bool,
    /// Also write the initramfs here (and a block root's image to the
    /// same name plus `.erofs`).
    pub output: Option<PathBuf>,
    /// The root filesystem kind; `None` picks by the image's size
    /// ([`RootKind::auto`]).
    pub root: Option<RootKind>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("agent binary {0} not found (build it, or pass --agent)")]
    AgentMissing(String),
    #[error("cannot read the agent binary {0}")]
    Agent(String, #[source] io::Error),
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    #[error("cannot get the image")]
    Source(#[from] SourceError),
    #[error("cannot build the initramfs")]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot write {0}")]
    Output(String, #[source] io::Error),
}

/// What a build produced (or found).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Built {
    /// The image identity (config digest).
    pub digest: Digest,
    pub manifest: Option<Digest>,
    pub size: u64,
    pub measurement: String,
    pub path: PathBuf,
    pub cached: bool,
    pub compression: Compression,
    pub root: RootKind,
    /// A block root's erofs image (`path` is then its agent initramfs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_image: Option<PathBuf>,
}

impl Built {
    /// What the guest kernel's command line must carry for this build.
    pub fn kernel_arg(&self) -> Option<&'static str> {
        self.root.kernel_arg()
    }
}

/// Progress reports for a UI.
#[derive(Debug)]
pub enum Event<'a> {
    Download {
        layer: usize,
        of: usize,
        digest: &'a Digest,
        bytes: u64,
    },
    Flatten {
        layer: usize,
        of: usize,
    },
    Write,
}

pub fn build(
    cache: &Cache,
    opts: &Options,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Built, BuildError> {
    build_limited(cache, opts, DEFAULT_MAX_ENTRIES, progress)
}

/// `build` with a limit on the paths in the image other than the default.
pub fn build_limited(
    cache: &Cache,
    opts: &Options,
    max_entries: u64,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Built, BuildError> {
    let agent = agent_digest(&opts.agent)?;
    let _shared = cache.lock(Mode::Shared)?;
    let mut source = Source::open(&opts.input, opts)?;

    // Fast path: the reference was resolved before (no network at all).
    if let Source::Registry(reg) = &source {
        if let Some(r) = (!opts.refresh)
            .then(|| cache.lookup_ref(&reg.reference.to_string()))
            .flatten()
        {
            if let Some(rec) = cached(cache, &r.image, &agent, opts) {
                return finish(cache, &rec, true, opts);
            }
        }
    }
    let staging = cache.staging()?;
    let resolved = source.resolve(cache, &staging.blobs(), opts.refresh)?;
    let refs = source.ref_record(&resolved);
    if let Some(rec) = cached(cache, &resolved.config_digest, &agent, opts) {
        cache.commit(staging, None, &refs)?;
        return finish(cache, &rec, true, opts);
    }
    let key_of = |root| build_key_for(&resolved.config_digest, &agent, opts.compression, root);
    // A chosen kind is locked before the download, so a concurrent build
    // of the same key waits instead of fetching too; `auto` knows its key
    // only after pass one.
    let mut key_lock = match opts.root {
        Some(root) => {
            let key = key_of(root);
            let lock = cache.key_lock(&key)?;
            // Another process may have built it while we waited.
            if let Some(rec) = cache.build(&key) {
                cache.commit(staging, None, &refs)?;
                return finish(cache, &rec, true, opts);
            }
            Some(lock)
        }
        None => None,
    };
    tracing::info!(image = %resolved.config_digest, source = %source.describe(), "building");
    let staged = staging.blobs();
    let config = AgentConfig::new(
        resolved.config_digest.clone(),
        &resolved.config.config.clone().unwrap_or_default(),
    );
    let recipe = Recipe {
        agent: &opts.agent,
        config,
        compression: opts.compression,
        max_expanded: opts.max_expanded,
        max_entries,
    };
    let out_path = staging.output();
    let out = std::fs::File::create(&out_path)
        .map_err(|e| BuildError::Output(out_path.display().to_string(), e))?;
    let (root, key, unpacked, assembled, root_image) = {
        let mut layers = source.layers(
            &resolved,
            cache,
            &staged,
            opts.max_expanded,
            &mut |layer, of, digest, bytes, _| {
                progress(Event::Download {
                    layer,
                    of,
                    digest,
                    bytes,
                })
            },
        )?;
        let mut flatten_progress = |layer, of| progress(Event::Flatten { layer, of });
        let tree = assemble::flatten(
            &mut *layers,
            opts.max_expanded,
            max_entries,
            &mut flatten_progress,
        )?;
        let unpacked = assemble::unpacked_size(&tree);
        let root = opts.root.unwrap_or(RootKind::auto(unpacked));
        let key = key_of(root);
        if key_lock.is_none() {
            key_lock = Some(cache.key_lock(&key)?);
            if let Some(rec) = cache.build(&key) {
                drop(layers);
                cache.commit(staging, None, &refs)?;
                return finish(cache, &rec, true, opts);
            }
        }
        match root {
            RootKind::Initramfs => {
                let (_, a) = assemble::assemble_tree(tree, &mut *layers, recipe, out)?;
                (root, key, unpacked, a, None)
            }
            RootKind::Block => {
                let img_path = staging.root_output();
                let img = std::fs::File::create(&img_path)
                    .map_err(|e| BuildError::Output(img_path.display().to_string(), e))?;
                let (_, _, b) = assemble::assemble_block(tree, &mut *layers, recipe, img, out)?;
                let image = RootImage {
                    file: format!("{key}.erofs"),
                    size: b.root.size,
                    measurement: b.root.measurement,
                };
                let a = assemble::Assembled {
                    size: b.initrd.size,
                    measurement: b.measurement,
                };
                (root, key, unpacked, a, Some(image))
            }
        }
    };
    progress(Event::Write);
    let record = BuildRecord {
        key: key.clone(),
        image: resolved.config_digest.clone(),
        manifest: resolved.manifest.clone(),
        source: source.describe(),
        agent,
        compression: opts.compression,
        size: assembled.size,
        measurement: assembled.measurement,
        file: format!("{key}.{}", opts.compression.extension()),
        blobs: resolved
            .layers
            .iter()
            .filter_map(|l| l.blob.clone())
            .collect(),
        root,
        root_image,
        unpacked,
    };
    // Only blobs the cache keeps are registry ones; layouts and archives
    // stay where they are.
    cache.commit(staging, Some(&record), &refs)?;
    drop(key_lock);
    finish(cache, &record, false, opts)
}

/// A cached build that fits `opts`: of the chosen kind, or for `auto` one
/// whose recorded size makes it the kind `auto` would choose.
fn cached(cache: &Cache, image: &Digest, agent: &Digest, opts: &Options) -> Option<BuildRecord> {
    let key = |root| build_key_for(image, agent, opts.compression, root);
    if let Some(root) = opts.root {
        return cache.build(&key(root));
    }
    [RootKind::Initramfs, RootKind::Block]
        .into_iter()
        .filter_map(|root| cache.build(&key(root)))
        .find_map(|rec| {
            let wanted = RootKind::auto(rec.unpacked);
            if wanted == rec.root {
                Some(rec)
            } else {
                cache.build(&key(wanted))
            }
        })
}

fn agent_digest(path: &Path) -> Result<Digest, BuildError> {
    digest::of_file_remembered(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BuildError::AgentMissing(path.display().to_string()),
        _ => BuildError::Agent(path.display().to_string(), e),
    })
}

fn finish(
    cache: &Cache,
    rec: &BuildRecord,
    cached: bool,
    opts: &Options,
) -> Result<Built, BuildError> {
    let stored = cache.build_path(rec);
    let mut root_image = cache.root_image_path(rec);
    let path = match &opts.output {
        Some(dest) => {
            copy_atomic(&stored, dest)
                .map_err(|e| BuildError::Output(dest.display().to_string(), e))?;
            if let Some(img) = &root_image {
                let mut name = dest.clone().into_os_string();
                name.push(".erofs");
                let img_dest = PathBuf::from(name);
                copy_atomic(img, &img_dest)
                    .map_err(|e| BuildError::Output(img_dest.display().to_string(), e))?;
                root_image = Some(img_dest);
            }
            dest.clone()
        }
        None => stored,
    };
    Ok(Built {
        digest: rec.image.clone(),
        manifest: rec.manifest.clone(),
        size: rec.size,
        measurement: rec.measurement.clone(),
        path,
        cached,
        compression: rec.compression,
        root: rec.root,
        root_image,
    })
}

/// Copies via a temp file next to `dest` and a rename: readers never see
/// a half-written initramfs.
fn copy_atomic(src: &Path, dest: &Path) -> io::Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    io::copy(&mut std::fs::File::open(src)?, tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

enum Source {
    Registry(Box<RegistrySource>),
    Archive(DockerArchive),
    Layout(Layout),
}

type DownloadProgress<'a> = dyn FnMut(usize, usize, &Digest, u64, u64) + 'a;

impl Source {
    fn open(input: &Input, opts: &Options) -> Result<Source, BuildError> {
        Ok(match input {
            Input::Registry(r) => Source::Registry(Box::new(RegistrySource::new(
                Reference::parse(r)?,
                opts.insecure.clone(),
                opts.docker_config.clone(),
            ))),
            Input::DockerArchive(p) => Source::Archive(DockerArchive::open(p)?),
            Input::OciLayout(spec) => Source::Layout(Layout::open(spec)?),
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Registry(r) => r.reference.to_string(),
            Source::Archive(a) => a.describe(),
            Source::Layout(l) => l.describe(),
        }
    }

    fn resolve(
        &mut self,
        cache: &Cache,
        staged: &Path,
        refresh: bool,
    ) -> Result<Resolved, SourceError> {
        match self {
            Source::Registry(r) => {
                let known = (!refresh)
                    .then(|| cache.lookup_ref(&r.reference.to_string()))
                    .flatten()
                    .map(|rec| rec.manifest);
                r.resolve(known.as_ref(), &cache.blobs_dir(), staged)
            }
            Source::Archive(a) => a.resolve(),
            Source::Layout(l) => l.resolve(),
        }
    }

    /// Registry refs are remembered so the next build skips the network.
    fn ref_record(&self, r: &Resolved) -> Vec<RefRecord> {
        match (self, &r.manifest) {
            (Source::Registry(reg), Some(m)) => vec![RefRecord {
                reference: reg.reference.to_string(),
                manifest: m.clone(),
                image: r.config_digest.clone(),
            }],
            _ => Vec::new(),
        }
    }

    fn layers<'s>(
        &'s mut self,
        r: &Resolved,
        cache: &Cache,
        staged: &Path,
        limit: u64,
        progress: &mut DownloadProgress<'_>,
    ) -> Result<Box<dyn LayerSet + 's>, SourceError> {
        Ok(match self {
            Source::Registry(reg) => {
                reg.fetch_layers(r, &cache.blobs_dir(), staged, limit, progress)?;
                Box::new(FileLayers {
                    files: FirstOf(vec![staged.to_path_buf(), cache.blobs_dir()]),
                    paths: r
                        .layers
                        .iter()
                        .filter_map(|l| l.blob.as_ref().map(|d| d.hex().to_string()))
                        .collect(),
                    // Downloads are checked as they arrive and the store
                    // only holds checked blobs.
                    expect: r
                        .layers
                        .iter()
                        .map(|l| Expected {
                            blob_verified: true,
                            ..l.clone()
                        })
                        .collect(),
                })
            }
            Source::Archive(a) => Box::new(a.layers(r)),
            Source::Layout(l) => Box::new(l.layers(r)),
        })
    }
}
