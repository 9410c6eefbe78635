//! Pass two's bulk: regular files' bytes streamed from the layers into
//! their planned blocks, layer by layer in entry order (the order their
//! block addresses were given out), each padded to a whole block.

use super::superblock::BLOCK;
use crate::layers::cap::Capped;
use crate::layers::tree::Content;
use crate::layers::{decompress, readahead, EntryError, LayerError, LayerSet};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// One file to copy: its size and a name for errors.
pub struct Wanted<'a> {
    pub size: u64,
    pub path: &'a str,
}

const ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// Copies every wanted entry, in `Content` order, to `out`.
pub fn copy_all<W: Write>(
    out: &mut W,
    layers: &mut dyn LayerSet,
    limit: u64,
    files: &BTreeMap<Content, Wanted<'_>>,
) -> Result<(), super::ErofsError> {
    let mut by_layer: BTreeMap<usize, Vec<(u64, &Wanted<'_>)>> = BTreeMap::new();
    for (c, w) in files {
        by_layer.entry(c.layer).or_default().push((c.entry, w));
    }
    for (layer, wanted) in by_layer {
        let name = layers.expect(layer).name();
        let blob = layers.open(layer).map_err(|source| LayerError::Open {
            layer: name.clone(),
            source,
        })?;
        let (_, decoder) = decompress::open(blob).map_err(|e| corrupt(&name, "", e))?;
        let (copied, _) = readahead::run(decoder, |input| {
            copy_entries(out, Capped::new(input, limit), &name, &wanted)
        });
        copied?;
    }
    Ok(())
}

fn corrupt(layer: &str, after: &str, source: io::Error) -> LayerError {
    LayerError::Corrupt {
        layer: layer.to_string(),
        after: after.to_string(),
        source,
    }
}

fn changed(layer: &str, entry: &str) -> LayerError {
    LayerError::Entry {
        layer: layer.to_string(),
        entry: entry.to_string(),
        source: EntryError::Changed,
    }
}

fn copy_entries<W: Write>(
    out: &mut W,
    input: impl Read,
    name: &str,
    wanted: &[(u64, &Wanted<'_>)],
) -> Result<(), super::ErofsError> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| corrupt(name, "", e))?;
    let mut next = wanted.iter().peekable();
    for (index, entry) in entries.enumerate() {
        let Some((want, w)) = next.peek() else {
            // Nothing more needed from this layer: stop decompressing.
            break;
        };
        let mut entry = entry.map_err(|e| corrupt(name, "", e))?;
        if index as u64 != *want {
            continue;
        }
        if entry.size() != w.size {
            return Err(changed(name, w.path).into());
        }
        copy_exact(&mut entry, out, w.size).map_err(|e| match e {
            Copy::Read(e) => super::ErofsError::Layer(corrupt(name, w.path, e)),
            Copy::Short => changed(name, w.path).into(),
            Copy::Write(e) => super::ErofsError::Io(e),
        })?;
        let pad = (BLOCK - w.size % BLOCK) % BLOCK;
        out.write_all(&ZEROS[..pad as usize])?;
        next.next();
    }
    if let Some((_, w)) = next.peek() {
        return Err(changed(name, w.path).into());
    }
    Ok(())
}

enum Copy {
    Read(io::Error),
    Short,
    Write(io::Error),
}

/// Copies exactly `size` bytes, telling a bad layer from a bad output.
fn copy_exact(input: &mut dyn Read, out: &mut dyn Write, size: u64) -> Result<(), Copy> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match input.read(&mut buf[..want]) {
            Ok(0) => return Err(Copy::Short),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Copy::Read(e)),
        };
        out.write_all(&buf[..n]).map_err(Copy::Write)?;
        left -= n as u64;
    }
    Ok(())
}
