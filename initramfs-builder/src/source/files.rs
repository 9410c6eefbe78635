//! Read-only access to named files in a directory or inside an
//! uncompressed tar (an OCI archive or `docker save` output), without
//! unpacking: tar members are read in place by offset.

use super::SourceError;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub trait Files {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>>;

    /// A small member (JSON), read whole.
    fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, SourceError> {
        let io = |e| SourceError::Io(name.to_string(), e);
        let mut r = self.open(name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SourceError::Missing(name.to_string()),
            _ => io(e),
        })?;
        let mut buf = Vec::new();
        (&mut r).take(max + 1).read_to_end(&mut buf).map_err(io)?;
        if buf.len() as u64 > max {
            return Err(SourceError::TooLarge {
                what: name.to_string(),
                max,
            });
        }
        Ok(buf)
    }
}

/// Files under a directory. Names are relative, and come from digests
/// or fixed names, never from image content.
pub struct DirFiles(pub PathBuf);

impl Files for DirFiles {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(File::open(self.0.join(name))?))
    }
}

/// The first directory that has the file (staged blobs, then the store).
pub struct FirstOf(pub Vec<PathBuf>);

impl Files for FirstOf {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>> {
        for d in &self.0 {
            match File::open(d.join(name)) {
                Ok(f) => return Ok(Box::new(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::NotFound.into())
    }
}

enum Member {
    Data { offset: u64, size: u64 },
    Link(String),
}

/// Members of an uncompressed tar, indexed once by header scan.
pub struct TarFiles {
    path: PathBuf,
    members: HashMap<String, Member>,
}

fn clean(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

impl TarFiles {
    pub fn open(path: &Path) -> Result<TarFiles, SourceError> {
        let io = |e| SourceError::Io(path.display().to_string(), e);
        let mut f = File::open(path).map_err(io)?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic).map_err(io)?;
        if magic[..n].starts_with(&[0x1f, 0x8b])
            || magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        {
            return Err(SourceError::CompressedArchive);
        }
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = clean(&String::from_utf8_lossy(&entry.path_bytes()));
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(
                        name,
                        Member::Data {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                // `docker save` links duplicate layers to the first copy.
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    let target = String::from_utf8_lossy(&target).into_owned();
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    members.insert(name.clone(), Member::Link(normalize(dir, &target)));
                }
                tar::EntryType::Link => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    members.insert(name, Member::Link(clean(&String::from_utf8_lossy(&target))));
                }
                _ => {}
            }
        }
        Ok(TarFiles {
            path: path.to_path_buf(),
            members,
        })
    }
}

/// Joins a relative link target to its directory, resolving `..`.
fn normalize(dir: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        dir.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

impl Files for TarFiles {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>> {
        let mut name = clean(name);
        for _ in 0..8 {
            match self.members.get(&name) {
                Some(Member::Data { offset, size }) => {
                    let mut f = File::open(&self.path)?;
                    f.seek(SeekFrom::Start(*offset))?;
                    return Ok(Box::new(BufReader::with_capacity(64 * 1024, f.take(*size))));
                }
                Some(Member::Link(t)) => name = t.clone(),
                None => break,
            }
        }
        Err(io::ErrorKind::NotFound.into())
    }
}

impl<T: Files + ?Sized> Files for Box<T> {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>> {
        (**self).open(name)
    }
}

impl<T: Files + ?Sized> Files for &T {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send + '_>> {
        (**self).open(name)
    }
}
