//! The state file: a fixed header, then a JSON payload.
//!
//! ```text
//! magic "KILNSNAP" (8) | format version u32 LE | kiln version length u16 LE
//! | kiln version (UTF-8) | payload length u64 LE | CRC32 of payload u32 LE
//! | payload
//! ```
//! A file of another format or kiln version, a wrong checksum or a short
//! file is refused before anything of it is used.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::crc32::crc32;

const MAGIC: &[u8; 8] = b"KILNSNAP";
/// Bumped whenever the payload's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
/// The kiln version that writes (and alone may read) state files.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A state file is a few hundred KiB; anything far larger is not one.
const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read snapshot state {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write snapshot state {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a kiln snapshot state file", path.display())]
    NotState { path: PathBuf },
    #[error("{} is snapshot format {found}, this kiln-vmm reads format {FORMAT_VERSION}", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("{} was written by kiln {found}, this is kiln {KILN_VERSION}", path.display())]
    KilnVersion { path: PathBuf, found: String },
    #[error("{} is truncated", path.display())]
    Truncated { path: PathBuf },
    #[error("{} is corrupt (checksum mismatch)", path.display())]
    Checksum { path: PathBuf },
    #[error("{} holds an invalid state: {reason}", path.display())]
    Payload { path: PathBuf, reason: String },
}

/// Encodes `payload` with the header.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(KILN_VERSION.len() as u16).to_le_bytes());
    out.extend_from_slice(KILN_VERSION.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header and returns the payload.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], FileError> {
    let path = path.to_path_buf();
    let mut rest = bytes;
    let mut take = |n: usize, path: &PathBuf| -> Result<&'a [u8], FileError> {
        if rest.len() < n {
            return Err(FileError::Truncated { path: path.clone() });
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FileError::NotState { path });
    }
    take(MAGIC.len(), &path)?;
    let format = u32::from_le_bytes(take(4, &path)?.try_into().unwrap_or_default());
    if format != FORMAT_VERSION {
        return Err(FileError::Format {
            path,
            found: format,
        });
    }
    let len = u16::from_le_bytes(take(2, &path)?.try_into().unwrap_or_default());
    let version = String::from_utf8_lossy(take(usize::from(len), &path)?).into_owned();
    if version != KILN_VERSION {
        return Err(FileError::KilnVersion {
            path,
            found: version,
        });
    }
    let payload_len = u64::from_le_bytes(take(8, &path)?.try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(take(4, &path)?.try_into().unwrap_or_default());
    if payload_len > MAX_PAYLOAD || (rest.len() as u64) < payload_len {
        return Err(FileError::Truncated { path });
    }
    let payload = &rest[..payload_len as usize];
    if crc32(payload) != crc {
        return Err(FileError::Checksum { path });
    }
    Ok(payload)
}

/// Writes `payload` to `path` with the header, through a temporary file
/// so that a crash never leaves a half-written state under the name.
pub fn write(path: &Path, payload: &[u8]) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("partial");
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&encode(payload))?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads `path` and returns its checked payload.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, &bytes).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("s.state")
    }

    #[test]
    fn round_trips() {
        let enc = encode(b"{\"a\":1}");
        assert_eq!(decode(p(), &enc).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let enc = encode(b"payload bytes");
        for n in 0..enc.len() {
            let e = decode(p(), &enc[..n]).unwrap_err();
            assert!(
                matches!(e, FileError::Truncated { .. } | FileError::NotState { .. }),
                "{n}: {e}"
            );
        }
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_checksum() {
        let mut enc = encode(b"payload bytes");
        let last = enc.len() - 1;
        enc[last] ^= 1;
        assert!(matches!(
            decode(p(), &enc).unwrap_err(),
            FileError::Checksum { .. }
        ));
    }

    #[test]
    fn other_formats_and_versions_are_named() {
        let mut enc = encode(b"x");
        enc[8] = 9;
        let e = decode(p(), &enc).unwrap_err();
        assert!(matches!(e, FileError::Format { found: 9, .. }), "{e}");
        assert!(e.to_string().contains("format 9"), "{e}");

        let mut enc = encode(b"x");
        // The version string starts after magic, format and its length.
        enc[14] = b'9';
        let e = decode(p(), &enc).unwrap_err();
        assert!(matches!(e, FileError::KilnVersion { .. }), "{e}");

        let e = decode(p(), b"GARBAGE!and more").unwrap_err();
        assert!(matches!(e, FileError::NotState { .. }), "{e}");
    }
}
