//! Test fixtures: layer tars written byte by byte (so hostile names are
//! possible), an in-memory layer set, and a readable view of the output.
#![allow(dead_code, unused_imports)]

pub mod tools;

use kiln_image::assemble::{assemble, AssembleError, Assembled, Recipe};
use kiln_image::compress::Compression;
use kiln_image::cpio;
use kiln_image::digest::Digest;
use kiln_image::image::{AgentConfig, RunConfig};
use kiln_image::layers::{BoxError, Expected, LayerSet};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use tar::EntryType;

pub const AGENT: &[u8] = b"\x7fELF pretend agent\n";

#[derive(Default)]
pub struct Layer {
    b: Vec<u8>,
}

impl Layer {
    pub fn raw(
        mut self,
        ty: EntryType,
        name: &[u8],
        link: &[u8],
        mode: u32,
        owner: (u64, u64),
        data: &[u8],
    ) -> Self {
        let mut h = tar::Header::new_ustar();
        {
            let bytes = h.as_mut_bytes();
            bytes[..100].fill(0);
            bytes[..name.len()].copy_from_slice(name);
            bytes[157..257].fill(0);
            bytes[157..157 + link.len()].copy_from_slice(link);
        }
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.b.extend_from_slice(h.as_bytes());
        self.b.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.b.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn dir(self, name: &str) -> Self {
        self.raw(
            EntryType::Directory,
            name.as_bytes(),
            b"",
            0o755,
            (0, 0),
            b"",
        )
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(
            EntryType::Regular,
            name.as_bytes(),
            b"",
            0o644,
            (0, 0),
            data,
        )
    }

    pub fn owned(self, name: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        self.raw(
            EntryType::Regular,
            name.as_bytes(),
            b"",
            mode,
            (uid, gid),
            data,
        )
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            0o777,
            (0, 0),
            b"",
        )
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(
            EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            0o644,
            (0, 0),
            b"",
        )
    }

    /// A PAX extended header for the next entry (`path`, `linkpath`, …):
    /// names longer than the ustar fields.
    pub fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut body = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where len counts itself.
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.raw(EntryType::XHeader, b"pax", b"", 0o644, (0, 0), &body)
    }

    /// A symlink whose target may be longer than the ustar field.
    pub fn long_symlink(self, name: &str, target: &str) -> Self {
        self.pax(&[("linkpath", target.as_bytes())])
            .symlink(name, "")
    }

    /// The finished, uncompressed tar (two zero blocks end it).
    pub fn tar(&self) -> Vec<u8> {
        let mut t = self.b.clone();
        t.extend(std::iter::repeat_n(0u8, 1024));
        t
    }

    pub fn gzip(&self) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.tar()).unwrap();
        e.finish().unwrap()
    }

    pub fn zstd(&self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).unwrap()
    }
}

/// Layers held in memory, with the digests a registry would give.
pub struct MemLayers {
    pub blobs: Vec<Vec<u8>>,
    pub expect: Vec<Expected>,
}

impl MemLayers {
    /// Each blob expected to match its own digest; diff_ids from `tars`.
    pub fn new(blobs: Vec<Vec<u8>>) -> Self {
        let expect = blobs
            .iter()
            .map(|b| Expected {
                blob: Some(Digest::of(b)),
                diff_id: None,
                blob_verified: false,
            })
            .collect();
        MemLayers { blobs, expect }
    }
}

impl LayerSet for MemLayers {
    fn len(&self) -> usize {
        self.blobs.len()
    }
    fn expect(&self, i: usize) -> Expected {
        self.expect[i].clone()
    }
    fn open(&mut self, i: usize) -> Result<Box<dyn Read + Send + '_>, BoxError> {
        Ok(Box::new(&self.blobs[i][..]))
    }
}

pub fn run_config() -> RunConfig {
    RunConfig {
        entrypoint: Some(vec!["/bin/sh".into()]),
        cmd: Some(vec!["-c".into(), "echo hi".into()]),
        env: Some(vec!["PATH=/bin".into()]),
        working_dir: Some("/srv".into()),
        user: Some("1000:1000".into()),
    }
}

pub fn build_with(
    layers: &mut dyn LayerSet,
    compression: Compression,
    max_expanded: u64,
) -> Result<(Vec<u8>, Assembled), AssembleError> {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    let recipe = Recipe {
        agent: &agent,
        config: AgentConfig::new(Digest::of(b"config"), &run_config()),
        compression,
        max_expanded,
        max_entries: kiln_image::layers::DEFAULT_MAX_ENTRIES,
    };
    assemble(layers, recipe, Vec::new(), &mut |_, _| {})
}

pub fn build(blobs: Vec<Vec<u8>>) -> Result<Vec<cpio::Entry>, AssembleError> {
    let (bytes, _) = build_with(&mut MemLayers::new(blobs), Compression::None, 1 << 30)?;
    Ok(cpio::parse(&bytes).unwrap())
}

/// path -> entry, for lookups.
pub fn by_path(entries: &[cpio::Entry]) -> BTreeMap<String, cpio::Entry> {
    entries
        .iter()
        .map(|e| (e.path.clone(), e.clone()))
        .collect()
}

/// One line per entry: type+mode, owner, and content or link target, the
/// way `ls -l` would show a tree.
pub fn listing(entries: &[cpio::Entry]) -> Vec<String> {
    let mut v: Vec<String> = entries
        .iter()
        .map(|e| {
            let body = match e.mode & 0o170000 {
                0o100000 | 0o120000 => String::from_utf8_lossy(&e.data).into_owned(),
                _ => String::new(),
            };
            format!("{:o} {}:{} {} {}", e.mode, e.uid, e.gid, e.path, body)
        })
        .collect();
    v.sort();
    v
}
