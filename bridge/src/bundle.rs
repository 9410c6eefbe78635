//! What a host needs of kiln to run grants, in one place: the files
//! `kiln fleet add-host` installs on an owned host ([`LAYOUT`]), and the
//! same files as one tarball, the bundle a cloud instance fetches at boot
//! (`kiln fleet bundle`, [`write`]).
//!
//! Invariants:
//! - Both installs lay the files out the same way: the binaries side by
//!   side in a prefix (kiln finds `kiln-vmm` and `kiln-shim` beside
//!   itself), the guest agent and kernel under `KILN_HOME`.
//! - The same files give the same bundle, byte for byte: entries in a
//!   fixed order, fixed times, owners and modes, and a gzip header with
//!   no time or name. Its SHA-256 is what a bridge pins in its
//!   configuration.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The bundle's directory for what goes in the prefix.
pub const PREFIX_DIR: &str = "prefix";
/// The bundle's directory for what goes in `KILN_HOME`.
pub const HOME_DIR: &str = "home";
/// Every entry's modification time: fixed, so the bundle's hash depends
/// on the files' contents only.
const MTIME: u64 = 0;

/// One of the files a host needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Kiln,
    KilnVmm,
    KilnShim,
    Agent,
    Kernel,
}

/// Where a file goes on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// kiln's own directory of binaries (`--prefix`).
    Prefix,
    /// The host's `KILN_HOME`.
    Home,
}

/// A file of the install: what it is and where it goes.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub piece: Piece,
    /// What it is, for messages: `kiln`, `guest kernel`.
    pub what: &'static str,
    pub place: Place,
    /// Its directory under the place (empty: the place itself).
    pub dir: &'static str,
    pub file_name: &'static str,
    pub mode: u32,
}

impl Entry {
    /// Its path under the place: `kiln`, `kernel/vmlinux`.
    pub fn relative(&self) -> String {
        if self.dir.is_empty() {
            self.file_name.to_string()
        } else {
            format!("{}/{}", self.dir, self.file_name)
        }
    }

    /// Its path inside the bundle: `prefix/kiln`, `home/kernel/vmlinux`.
    pub fn in_bundle(&self) -> String {
        let top = match self.place {
            Place::Prefix => PREFIX_DIR,
            Place::Home => HOME_DIR,
        };
        format!("{top}/{}", self.relative())
    }
}

/// Every file a host needs, in the order they are installed (and stored
/// in the bundle).
pub const LAYOUT: [Entry; 5] = [
    Entry {
        piece: Piece::Kiln,
        what: "kiln",
        place: Place::Prefix,
        dir: "",
        file_name: "kiln",
        mode: 0o755,
    },
    Entry {
        piece: Piece::KilnVmm,
        what: "kiln-vmm",
        place: Place::Prefix,
        dir: "",
        file_name: "kiln-vmm",
        mode: 0o755,
    },
    Entry {
        piece: Piece::KilnShim,
        what: "kiln-shim",
        place: Place::Prefix,
        dir: "",
        file_name: "kiln-shim",
        mode: 0o755,
    },
    Entry {
        piece: Piece::Agent,
        what: "guest agent",
        place: Place::Home,
        dir: "bin",
        file_name: "kiln-agent",
        mode: 0o755,
    },
    Entry {
        piece: Piece::Kernel,
        what: "guest kernel",
        place: Place::Home,
        dir: "kernel",
        file_name: "vmlinux",
        mode: 0o644,
    },
];

/// This machine's copies of what a host needs.
#[derive(Clone, Debug)]
pub struct Sources {
    pub kiln: PathBuf,
    pub kiln_vmm: PathBuf,
    pub kiln_shim: PathBuf,
    pub agent: PathBuf,
    pub kernel: PathBuf,
}

impl Sources {
    /// The running kiln, the `kiln-vmm` and `kiln-shim` it would run, and
    /// the agent and kernel of `home` (this machine's `KILN_HOME`). For the
    /// `kiln` executable: what it installs is itself.
    pub fn of_this_kiln(home: &Path) -> std::io::Result<Sources> {
        use crate::machine::binary_beside_me;
        Ok(Sources {
            kiln: std::env::current_exe()?,
            kiln_vmm: binary_beside_me("KILN_VMM", "kiln-vmm"),
            kiln_shim: binary_beside_me("KILN_SHIM", "kiln-shim"),
            agent: home.join("bin/kiln-agent"),
            kernel: home.join("kernel/vmlinux"),
        })
    }

    /// This machine's copy of `piece`.
    pub fn path(&self, piece: Piece) -> &Path {
        match piece {
            Piece::Kiln => &self.kiln,
            Piece::KilnVmm => &self.kiln_vmm,
            Piece::KilnShim => &self.kiln_shim,
            Piece::Agent => &self.agent,
            Piece::Kernel => &self.kernel,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read this machine's {what} {}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the bundle {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
}

/// A bundle as written.
#[derive(Clone, Debug, Serialize)]
pub struct Bundle {
    pub path: PathBuf,
    pub file_name: String,
    /// kiln's version, as `kiln host info` answers on the instance.
    pub version: String,
    /// Of the `.tar.gz` file: what a bridge's configuration pins.
    pub sha256: String,
    pub bytes: u64,
    pub files: Vec<BundleFile>,
}

/// One file in a bundle.
#[derive(Clone, Debug, Serialize)]
pub struct BundleFile {
    /// Inside the bundle: `prefix/kiln`, `home/kernel/vmlinux`.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The bundle's file name for this kiln.
pub fn file_name() -> String {
    format!("kiln-bundle-{}.tar.gz", crate::host::wire::VERSION)
}

/// Writes `kiln-bundle-<version>.tar.gz` of `sources` into `out_dir`
/// (under a temporary name, renamed once complete).
pub fn write(sources: &Sources, out_dir: &Path) -> Result<Bundle, BundleError> {
    let name = file_name();
    let path = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_to(sources, &tmp);
    let (sha256, bytes, files) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BundleError::Write(path.clone(), e)
    })?;
    Ok(Bundle {
        path,
        file_name: name,
        version: crate::host::wire::VERSION.to_string(),
        sha256,
        bytes,
        files,
    })
}

type Written = (String, u64, Vec<BundleFile>);

fn write_to(sources: &Sources, tmp: &Path) -> Result<Written, BundleError> {
    let failed = |e| BundleError::Write(tmp.to_path_buf(), e);
    let file = std::fs::File::create(tmp).map_err(failed)?;
    let gz = GzBuilder::new()
        .mtime(0)
        .write(Hashing::new(file), Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut files = Vec::new();
    for entry in LAYOUT {
        let source = sources.path(entry.piece);
        let unreadable = |source_error| BundleError::Read {
            what: entry.what,
            path: source.to_path_buf(),
            source: source_error,
        };
        let file = std::fs::File::open(source).map_err(unreadable)?;
        let size = file.metadata().map_err(unreadable)?.len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(entry.mode);
        header.set_mtime(MTIME);
        header.set_uid(0);
        header.set_gid(0);
        let inside = entry.in_bundle();
        // A file that changes size while it is read must not make a
        // bundle whose header lies: read exactly what the header says.
        let mut reader = Hashing::new(file.take(size));
        tar.append_data(&mut header, &inside, &mut reader)
            .map_err(|e| {
                if reader.read_failed {
                    unreadable(e)
                } else {
                    failed(e)
                }
            })?;
        let (sha256, bytes) = reader.finish();
        if bytes != size {
            return Err(unreadable(std::io::ErrorKind::UnexpectedEof.into()));
        }
        files.push(BundleFile {
            path: inside,
            sha256,
            bytes,
        });
    }
    let gz = tar.into_inner().map_err(failed)?;
    let mut out = gz.finish().map_err(failed)?;
    out.flush().map_err(failed)?;
    out.inner.sync_all().map_err(failed)?;
    let (sha256, bytes) = out.finish();
    Ok((sha256, bytes, files))
}

/// A reader or writer that hashes (SHA-256) and counts what passes.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
    /// A read failed: the source's fault, not the bundle's.
    read_failed: bool,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            read_failed: false,
        }
    }

    /// SHA-256 (hex) and size of what passed.
    fn finish(self) -> (String, u64) {
        (hex(&self.hasher.finalize()), self.bytes)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .inspect_err(|_| self.read_failed = true)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &Path) -> Sources {
        let file = |name: &str, body: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        Sources {
            kiln: file("kiln", b"kiln binary"),
            kiln_vmm: file("vmm", b"vmm binary"),
            kiln_shim: file("shim", b"shim binary"),
            agent: file("agent", b"agent binary"),
            kernel: file("kernel", &vec![7u8; 300_000]),
        }
    }

    #[test]
    fn the_same_files_make_the_same_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources(dir.path());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let first = write(&src, &a).unwrap();
        // Other times and modes on the sources change nothing.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&src.kiln, b"kiln binary").unwrap();
        let second = write(&src, &b).unwrap();
        assert_eq!(first.sha256, second.sha256);
        assert_eq!(
            std::fs::read(&first.path).unwrap(),
            std::fs::read(&second.path).unwrap()
        );
        let bytes = std::fs::read(&first.path).unwrap();
        assert_eq!(first.sha256, hex(&Sha256::digest(&bytes)));
        assert_eq!(first.bytes, bytes.len() as u64);
        assert_eq!(first.file_name, file_name());
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&a).unwrap().count(), 1);

        std::fs::write(&src.agent, b"another agent").unwrap();
        let third = write(&src, &a).unwrap();
        assert_ne!(third.sha256, first.sha256);
    }

    #[test]
    fn the_bundle_holds_the_layout_with_fixed_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources(dir.path());
        let bundle = write(&src, dir.path()).unwrap();
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(&bundle.path).unwrap());
        let mut archive = tar::Archive::new(gz);
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.push((
                path,
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
            ));
            let entry = LAYOUT
                .iter()
                .find(|l| l.in_bundle() == seen[seen.len() - 1].0);
            let entry = entry.unwrap();
            assert_eq!(body, std::fs::read(src.path(entry.piece)).unwrap());
        }
        let want: Vec<_> = LAYOUT
            .iter()
            .map(|e| (e.in_bundle(), e.mode, MTIME, 0))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(
            bundle
                .files
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>(),
            [
                "prefix/kiln",
                "prefix/kiln-vmm",
                "prefix/kiln-shim",
                "home/bin/kiln-agent",
                "home/kernel/vmlinux"
            ]
        );
        assert_eq!(bundle.files[4].bytes, 300_000);
    }

    #[test]
    fn a_missing_file_is_named_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = sources(dir.path());
        src.kernel = dir.path().join("no-kernel");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let e = write(&src, &out).unwrap_err();
        assert!(
            e.to_string().contains("guest kernel") && e.to_string().contains("no-kernel"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
