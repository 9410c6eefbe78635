//! Content digests (`sha256:<hex>`) and readers that check them while
//! streaming, so a blob is never trusted before its last byte is seen.

use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, PoisonError};

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("unsupported digest algorithm in {0:?} (only sha256)")]
    Algorithm(String),
    #[error("malformed digest {0:?}")]
    Malformed(String),
}

/// A sha256 content digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.to_string()));
        };
        if alg != "sha256" {
            return Err(DigestError::Algorithm(s.to_string()));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: to_hex(&h.finalize()),
        }
    }

    /// The hex part, safe as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    enabled: bool,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            enabled: true,
        }
    }

    /// Turns hashing off (counting and draining stay): for bytes already
    /// verified. The digest returned by `finish` is then meaningless.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Reads whatever is left (so the digest covers the whole stream) and
    /// returns the digest and byte count.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_hasher(self.hasher), self.count))
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.enabled {
            self.hasher.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes (SHA-256 unless another hasher is chosen) and counts everything
/// written through it.
pub struct HashingWriter<W, H = Sha256> {
    inner: W,
    hasher: H,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_hasher(inner)
    }

    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.count)
    }
}

impl<W: Write, H: sha2::Digest> HashingWriter<W, H> {
    pub fn with_hasher(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: H::new(),
            count: 0,
        }
    }

    /// The sink, the hasher and the number of bytes written.
    pub fn into_parts(self) -> (W, H, u64) {
        (self.inner, self.hasher, self.count)
    }
}

impl<W: Write, H: sha2::Digest> Write for HashingWriter<W, H> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a file, streamed.
pub fn of_file(path: &std::path::Path) -> io::Result<Digest> {
    let (d, _) = HashingReader::new(std::fs::File::open(path)?).finish()?;
    Ok(d)
}

/// What identifies a file's content without reading it, as `make` trusts:
/// device, inode, size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileIdentity {
    fn of(file: &std::fs::File) -> io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// [`of_file`], remembered for this process while the file's identity is
/// unchanged. A long-running caller (kilnd builds for every grant) would
/// otherwise hash the same multi-megabyte agent binary on every call.
pub fn of_file_remembered(path: &std::path::Path) -> io::Result<Digest> {
    static SEEN: LazyLock<Mutex<HashMap<PathBuf, (FileIdentity, Digest)>>> =
        LazyLock::new(Default::default);
    let seen = || SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let file = std::fs::File::open(path)?;
    let id = FileIdentity::of(&file)?;
    if let Some((_, d)) = seen().get(path).filter(|(known, _)| *known == id) {
        return Ok(d.clone());
    }
    let (d, _) = HashingReader::new(file).finish()?;
    seen().insert(path.to_path_buf(), (id, d.clone()));
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_file_digest_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent");
        std::fs::write(&path, b"first").unwrap();
        assert_eq!(of_file_remembered(&path).unwrap(), Digest::of(b"first"));
        assert_eq!(of_file_remembered(&path).unwrap(), Digest::of(b"first"));
        // Same size, new content and modification time: hashed again.
        std::fs::write(&path, b"other").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .unwrap();
        assert_eq!(of_file_remembered(&path).unwrap(), Digest::of(b"other"));
        // Replaced by a new file (a new inode), as installs do.
        let new = dir.path().join("agent.new");
        std::fs::write(&new, b"third").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert_eq!(of_file_remembered(&path).unwrap(), Digest::of(b"third"));
        std::fs::remove_file(&path).unwrap();
        assert!(of_file_remembered(&path).is_err());
    }

    #[test]
    fn parses_and_rejects() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(matches!(
            Digest::parse("sha512:00"),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            Digest::parse("sha256:../../etc/passwd"),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            Digest::parse("abc"),
            Err(DigestError::Malformed(_))
        ));
    }

    #[test]
    fn hashing_reader_covers_the_rest() {
        let mut r = HashingReader::new(&b"hello world"[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
