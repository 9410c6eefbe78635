//! The content-addressed image store under `$KILN_HOME/images`:
//!
//! - `blobs/sha256/<hex>`: manifests, configs and layers, by digest;
//! - `builds/<key>.<ext>` and `builds/<key>.json`: built initramfs files
//!   keyed by image + agent + options, and their records;
//! - `refs/<hash>.json`: which image a registry reference resolved to, so
//!   a warm rebuild needs no network;
//! - `tmp/`: staging; nothing is visible in the store until renamed in.
//!
//! Builds hold `lock` shared and `locks/<key>` exclusive (deleted when the
//! build ends); `rm` and `prune` hold `lock` exclusive.

use crate::compress::Compression;
use crate::digest::Digest;
use crate::lock::{Lock, Mode};
use crate::root::RootKind;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Bumped when the initramfs layout changes, so old builds are not reused
/// (2: large files' data on page boundaries).
const FORMAT: &str = "kiln-initramfs/2";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image cache {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("corrupt cache record {0}")]
    Record(String),
    #[error("image cache {path}: permission denied (run as root, or set KILN_HOME to a directory you own)")]
    Denied { path: String },
    #[error("no build matches {0:?}")]
    NotFound(String),
    #[error("{what:?} matches {count} builds; give more of the key or digest")]
    Ambiguous { what: String, count: usize },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> CacheError + '_ {
    move |source| {
        let path = path.display().to_string();
        // The usual cause is a cache made by root used by another user.
        if source.kind() == io::ErrorKind::PermissionDenied {
            CacheError::Denied { path }
        } else {
            CacheError::Io { path, source }
        }
    }
}

/// What a built initramfs is and how it was made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    pub key: String,
    /// Image identity: the config digest.
    pub image: Digest,
    pub manifest: Option<Digest>,
    /// Where it was built from (first build).
    pub source: String,
    pub agent: Digest,
    pub compression: Compression,
    pub size: u64,
    pub measurement: String,
    pub file: String,
    /// Blobs this build was made from (kept by `prune`).
    pub blobs: Vec<Digest>,
    /// The root kind; `file` is then the (agent-only) initramfs of a block
    /// root and `root_image` its erofs image.
    #[serde(default)]
    pub root: RootKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_image: Option<RootImage>,
    /// Bytes of file data in the image, which `auto` decides by.
    #[serde(default)]
    pub unpacked: u64,
}

/// The erofs root image of a block-root build.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootImage {
    pub file: String,
    pub size: u64,
    pub measurement: String,
}

/// A registry reference and what it resolved to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefRecord {
    pub reference: String,
    pub manifest: Digest,
    pub image: Digest,
}

pub struct Cache {
    root: PathBuf,
}

/// A build's private scratch space; dropped (and deleted) unless committed.
pub struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    pub fn blobs(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }
    pub fn output(&self) -> PathBuf {
        self.dir.path().join("initramfs")
    }
    /// Where a block-root build writes its root image.
    pub fn root_output(&self) -> PathBuf {
        self.dir.path().join("root.erofs")
    }
}

/// The cache key of a build: everything that decides its bytes.
pub fn build_key(image: &Digest, agent: &Digest, compression: Compression) -> String {
    let text = format!("{FORMAT}\nimage {image}\nagent {agent}\ncompression {compression}\n");
    Digest::of(text.as_bytes()).hex().to_string()
}

/// [`build_key`] for a root kind: the initramfs kind keeps the keys it
/// always had, so existing cached builds stay valid.
pub fn build_key_for(
    image: &Digest,
    agent: &Digest,
    compression: Compression,
    root: RootKind,
) -> String {
    match root {
        RootKind::Initramfs => build_key(image, agent, compression),
        RootKind::Block => {
            let text = format!(
                "{FORMAT}\nimage {image}\nagent {agent}\ncompression {compression}\nroot block\n"
            );
            Digest::of(text.as_bytes()).hex().to_string()
        }
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same directory,
/// fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        for sub in ["blobs/sha256", "builds", "refs", "tmp", "locks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock(&self, mode: Mode) -> Result<Lock, CacheError> {
        let p = self.root.join("lock");
        Lock::acquire(&p, mode).map_err(io_err(&p))
    }

    /// The lock of one build key; its file is deleted when it is dropped.
    pub fn key_lock(&self, key: &str) -> Result<KeyLock, CacheError> {
        let p = self.root.join("locks").join(key);
        let lock = Lock::acquire(&p, Mode::Exclusive).map_err(io_err(&p))?;
        Ok(KeyLock(Some(lock)))
    }

    pub fn staging(&self) -> Result<Staging, CacheError> {
        let tmp = self.root.join("tmp");
        let dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp))?;
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).map_err(io_err(&blobs))?;
        Ok(Staging { dir })
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", Digest::of(reference.as_bytes()).hex()))
    }

    pub fn lookup_ref(&self, reference: &str) -> Option<RefRecord> {
        let bytes = fs::read(self.ref_path(reference)).ok()?;
        let r: RefRecord = serde_json::from_slice(&bytes).ok()?;
        (r.reference == reference).then_some(r)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("builds").join(format!("{key}.json"))
    }

    pub fn build_path(&self, record: &BuildRecord) -> PathBuf {
        self.root.join("builds").join(&record.file)
    }

    /// The root image of a block-root build.
    pub fn root_image_path(&self, record: &BuildRecord) -> Option<PathBuf> {
        let r = record.root_image.as_ref()?;
        Some(self.root.join("builds").join(&r.file))
    }

    /// A finished build, if present and whole.
    pub fn build(&self, key: &str) -> Option<BuildRecord> {
        self.read_build(key).ok().flatten()
    }

    /// A finished build, if present and whole; an unreadable one is an
    /// error, not an absence.
    fn read_build(&self, key: &str) -> Result<Option<BuildRecord>, CacheError> {
        let rp = self.record_path(key);
        let bytes = match fs::read(&rp) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&rp)(e)),
        };
        let Ok(r) = serde_json::from_slice::<BuildRecord>(&bytes) else {
            return Ok(None);
        };
        if !has_size(&self.build_path(&r), r.size)? {
            return Ok(None);
        }
        if let (Some(path), Some(img)) = (self.root_image_path(&r), &r.root_image) {
            if !has_size(&path, img.size)? {
                return Ok(None);
            }
        }
        Ok(Some(r))
    }

    /// Moves a successful build into the store: staged blobs first, then
    /// the initramfs, then its record (the commit point), then refs.
    pub fn commit(
        &self,
        staging: Staging,
        record: Option<&BuildRecord>,
        refs: &[RefRecord],
    ) -> Result<(), CacheError> {
        let staged = staging.blobs();
        for e in fs::read_dir(&staged).map_err(io_err(&staged))? {
            let e = e.map_err(io_err(&staged))?;
            let dest = self.blobs_dir().join(e.file_name());
            if !dest.exists() {
                fs::rename(e.path(), &dest).map_err(io_err(&dest))?;
            }
        }
        if let Some(r) = record {
            if let Some(dest) = self.root_image_path(r) {
                let img = staging.root_output();
                out_sync(&img).map_err(io_err(&img))?;
                fs::rename(&img, &dest).map_err(io_err(&dest))?;
            }
            let out = staging.output();
            out_sync(&out).map_err(io_err(&out))?;
            let dest = self.build_path(r);
            fs::rename(&out, &dest).map_err(io_err(&dest))?;
            let json = serde_json::to_vec_pretty(r).unwrap_or_default();
            let rp = self.record_path(&r.key);
            write_atomic(&rp, &json).map_err(io_err(&rp))?;
        }
        for r in refs {
            let p = self.ref_path(&r.reference);
            let json = serde_json::to_vec_pretty(r).unwrap_or_default();
            write_atomic(&p, &json).map_err(io_err(&p))?;
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<BuildRecord>, CacheError> {
        let dir = self.root.join("builds");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json") {
                if let Some(r) = self.read_build(key)? {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub fn refs(&self) -> Result<Vec<RefRecord>, CacheError> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let bytes = match fs::read(e.path()) {
                Ok(b) => b,
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(io_err(&e.path())(err))
                }
                Err(_) => continue,
            };
            if let Ok(r) = serde_json::from_slice::<RefRecord>(&bytes) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The builds `what` names, as `kiln image rm` takes it: a reference
    /// that was built (all its builds), or a prefix of a build key or of
    /// an image digest (`sha256:` optional; all builds of that image), as
    /// `kiln image ls` shows them. A prefix naming more than one build
    /// key or image is refused, as `docker rmi` does.
    pub fn find(&self, what: &str) -> Result<Vec<BuildRecord>, CacheError> {
        let builds = self.list()?;
        let canonical = crate::reference::Reference::parse(what)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let named: Vec<Digest> = self
            .refs()?
            .into_iter()
            .filter(|r| r.reference == what || r.reference == canonical)
            .map(|r| r.image)
            .collect();
        let by_ref: Vec<BuildRecord> = builds
            .iter()
            .filter(|b| named.contains(&b.image))
            .cloned()
            .collect();
        if !by_ref.is_empty() {
            return Ok(by_ref);
        }
        let (digest_only, hex) = match what.strip_prefix("sha256:") {
            Some(h) => (true, h),
            None => (false, what),
        };
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CacheError::NotFound(what.to_string()));
        }
        let hex = hex.to_ascii_lowercase();
        // What the prefix names: whole images, and single builds of
        // images it does not name as a whole.
        let images: std::collections::BTreeSet<&Digest> = builds
            .iter()
            .filter(|b| b.image.hex().starts_with(&hex))
            .map(|b| &b.image)
            .collect();
        let keys: Vec<&BuildRecord> = builds
            .iter()
            .filter(|b| !digest_only && b.key.starts_with(&hex) && !images.contains(&b.image))
            .collect();
        match images.len() + keys.len() {
            0 => Err(CacheError::NotFound(what.to_string())),
            1 => Ok(builds
                .iter()
                .filter(|b| images.contains(&b.image) || keys.iter().any(|k| k.key == b.key))
                .cloned()
                .collect()),
            count => Err(CacheError::Ambiguous {
                what: what.to_string(),
                count,
            }),
        }
    }

    /// Removes the builds `what` names (see `find`) and the references
    /// that led to them. Returns what went.
    pub fn remove(&self, what: &str) -> Result<Vec<BuildRecord>, CacheError> {
        let _g = self.lock(Mode::Exclusive)?;
        let removed = self.find(what)?;
        for b in &removed {
            remove_if_exists(&self.record_path(&b.key))?;
            remove_if_exists(&self.build_path(b))?;
            if let Some(img) = self.root_image_path(b) {
                remove_if_exists(&img)?;
            }
        }
        // A reference goes when no build of its image is left.
        let left = self.list()?;
        for r in self.refs()? {
            let gone = removed.iter().any(|b| b.image == r.image);
            if gone && !left.iter().any(|b| b.image == r.image) {
                remove_if_exists(&self.ref_path(&r.reference))?;
            }
        }
        Ok(removed)
    }

    /// Deletes blobs no build needs, refs to images with no build and no
    /// blobs, and leftover staging. Returns bytes freed.
    pub fn prune(&self) -> Result<u64, CacheError> {
        let _g = self.lock(Mode::Exclusive)?;
        let keep: std::collections::BTreeSet<String> = self
            .list()?
            .into_iter()
            .flat_map(|b| {
                let mut v: Vec<String> = b.blobs.iter().map(|d| d.hex().to_string()).collect();
                v.push(b.image.hex().to_string());
                v.extend(b.manifest.map(|m| m.hex().to_string()));
                v
            })
            .collect();
        let mut freed = 0;
        let blobs = self.blobs_dir();
        for e in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let e = e.map_err(io_err(&blobs))?;
            if !keep.contains(&*e.file_name().to_string_lossy()) {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                remove_if_exists(&e.path())?;
            }
        }
        for r in self.refs()? {
            if !keep.contains(r.manifest.hex()) {
                remove_if_exists(&self.ref_path(&r.reference))?;
            }
        }
        // No build runs while the exclusive lock is held: staging and
        // key locks (left by killed builds or older kiln) are stale.
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
        }
        let locks = self.root.join("locks");
        for e in fs::read_dir(&locks).map_err(io_err(&locks))? {
            let e = e.map_err(io_err(&locks))?;
            remove_if_exists(&e.path())?;
        }
        Ok(freed)
    }
}

/// The lock of one build key (`Cache::key_lock`).
pub struct KeyLock(Option<Lock>);

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Failed builds too: nothing else would ever delete the file.
        if let Some(lock) = self.0.take() {
            if let Err(e) = lock.remove() {
                tracing::debug!(error = %e, "cannot delete a build's lock file");
            }
        }
    }
}

fn out_sync(p: &Path) -> io::Result<()> {
    fs::File::open(p)?.sync_all()
}

/// Whether `p` exists with `size` bytes (a build cut short has fewer);
/// an unreadable file is an error, not an absence.
fn has_size(p: &Path, size: u64) -> Result<bool, CacheError> {
    match fs::metadata(p) {
        Ok(meta) => Ok(meta.len() == size),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(p)(e)),
    }
}

fn remove_if_exists(p: &Path) -> Result<(), CacheError> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(p)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build record (and a file of its size) with a chosen key and image.
    fn record(cache: &Cache, key: &str, image: &str) {
        let r = BuildRecord {
            key: key.to_string(),
            image: Digest::parse(&format!("sha256:{image}")).unwrap(),
            manifest: None,
            source: "test".into(),
            agent: Digest::of(b"agent"),
            compression: Compression::None,
            size: 1,
            measurement: String::new(),
            file: format!("{key}.cpio"),
            blobs: Vec::new(),
            root: RootKind::Initramfs,
            root_image: None,
            unpacked: 0,
        };
        fs::write(cache.build_path(&r), b"x").unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        fs::write(cache.record_path(key), json).unwrap();
    }

    #[test]
    fn find_takes_unique_prefixes_of_keys_and_digests() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let hex = |c: char| c.to_string().repeat(64);
        // Two builds of image aaaa…, one of image abab…; keys 1…, 12…, 2….
        let (a, ab) = (hex('a'), format!("ab{}", "0".repeat(62)));
        record(&cache, &hex('1'), &a);
        record(&cache, &format!("12{}", "0".repeat(62)), &a);
        record(&cache, &hex('2'), &ab);
        let keys = |what: &str| -> Vec<String> {
            cache
                .find(what)
                .unwrap()
                .into_iter()
                .map(|b| b.key[..2].to_string())
                .collect()
        };
        // A digest prefix names every build of that image.
        assert_eq!(keys("sha256:aa"), ["11", "12"]);
        assert_eq!(keys("AA"), ["11", "12"]);
        assert_eq!(keys("ab"), ["22"]);
        assert_eq!(keys("111"), ["11"]);
        assert_eq!(keys(&hex('2')), ["22"]);
        // "a" is the prefix of two images, "1" of two keys.
        for what in ["a", "sha256:a", "1"] {
            assert!(
                matches!(
                    cache.find(what),
                    Err(CacheError::Ambiguous { count: 2, .. })
                ),
                "{what}"
            );
        }
        for what in ["3", "sha256:", "", "zz", "sha256:11"] {
            assert!(
                matches!(cache.find(what), Err(CacheError::NotFound(_))),
                "{what}"
            );
        }
    }
}
