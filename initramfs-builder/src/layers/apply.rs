//! Pass one over a layer: read every tar header, apply it to the tree,
//! refuse hostile entries, and check the blob and diff_id digests.

use super::cap::{self, Capped};
use super::tree::{Content, Kind, Node, Tree};
use super::whiteout::{self, Whiteout};
use super::{decompress, path, readahead, EntryError, Expected, LayerError};
use crate::cpio::Meta;
use crate::digest::HashingReader;
use std::io::{self, Read};
use tar::EntryType;

/// Applies one layer to `tree`; returns its expanded size. `remaining` is
/// what is left of the whole image's `limit`; the tree may hold at most
/// `max_entries` paths.
pub fn apply(
    tree: &mut Tree,
    layer: usize,
    expect: &Expected,
    blob: impl Read + Send,
    (remaining, limit): (u64, u64),
    max_entries: u64,
) -> Result<u64, LayerError> {
    tree.forget_resolutions();
    let name = expect.name();
    let corrupt = |after: &str, source: io::Error| {
        if cap::is_cap(&source) {
            LayerError::Entry {
                layer: name.clone(),
                entry: after.to_string(),
                source: EntryError::TooLarge { limit },
            }
        } else {
            LayerError::Corrupt {
                layer: name.clone(),
                after: after.to_string(),
                source,
            }
        }
    };
    let check_blob = expect.blob.is_some() && !expect.blob_verified;
    let mut blob_hash = HashingReader::new(blob);
    blob_hash.set_enabled(check_blob);
    let (_, decoder) = decompress::open(&mut blob_hash).map_err(|e| corrupt("", e))?;
    let mut last = String::new();
    // Inflate on a helper thread while this one parses and hashes.
    let (scanned, decoder) = readahead::run(decoder, |input| {
        let mut diff = HashingReader::new(Capped::new(input, remaining));
        {
            let mut archive = tar::Archive::new(&mut diff);
            let entries = archive.entries().map_err(|e| corrupt("", e))?;
            for (index, entry) in entries.enumerate() {
                let mut entry = entry.map_err(|e| corrupt(&last, e))?;
                last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                let at = |source: EntryError| LayerError::Entry {
                    layer: name.clone(),
                    entry: last.clone(),
                    source,
                };
                // Name the entry that crosses the limit before its bytes are read.
                let end = entry.raw_file_position().saturating_add(entry.size());
                if end > remaining {
                    return Err(at(EntryError::TooLarge { limit }));
                }
                apply_entry(tree, layer, index as u64, &mut entry).map_err(at)?;
                // Checked as the tree grows: its memory is what the limit bounds.
                if tree.len() as u64 > max_entries {
                    return Err(at(EntryError::TooManyEntries { limit: max_entries }));
                }
            }
        }
        diff.finish().map_err(|e| corrupt(&last, e))
    });
    drop(decoder);
    let (diff_id, size) = scanned?;
    let (blob_digest, _) = blob_hash.finish().map_err(|e| corrupt(&last, e))?;
    if let (true, Some(expected)) = (check_blob, &expect.blob) {
        if *expected != blob_digest {
            return Err(LayerError::DigestMismatch {
                layer: name,
                actual: blob_digest,
            });
        }
    }
    if let Some(expected) = &expect.diff_id {
        if *expected != diff_id {
            return Err(LayerError::DiffIdMismatch {
                layer: name,
                expected: expected.clone(),
                actual: diff_id,
            });
        }
    }
    Ok(size)
}

fn apply_entry<R: Read>(
    tree: &mut Tree,
    layer: usize,
    index: u64,
    entry: &mut tar::Entry<'_, R>,
) -> Result<(), EntryError> {
    let raw = entry.path_bytes().into_owned();
    let comps = path::components(&raw)?;
    let Some((name, dir)) = comps.split_last() else {
        // The root itself (`/`, `./`): its owner and mode, like containerd.
        if entry.header().entry_type() == EntryType::Directory {
            tree.set_root_meta(meta(entry)?);
        } else {
            tracing::info!(entry = %String::from_utf8_lossy(&raw), "skipping a non-directory entry for the root");
        }
        return Ok(());
    };
    match whiteout::parse(name)? {
        Some(Whiteout::Remove(target)) => {
            if let Some(d) = tree.resolve_dir(dir, None)? {
                tree.whiteout(&d, target, layer);
            }
            return Ok(());
        }
        Some(Whiteout::Opaque) => {
            if let Some(d) = tree.resolve_dir(dir, None)? {
                tree.opaque(&d, layer);
            }
            return Ok(());
        }
        Some(Whiteout::Meta) => {
            tracing::debug!(entry = %comps.join("/"), "skipping aufs metadata entry");
            return Ok(());
        }
        None => {}
    }
    let meta = meta(entry)?;
    let header = entry.header();
    let kind = match header.entry_type() {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File {
            content: Content {
                layer,
                entry: index,
            },
            size: entry.size(),
        },
        EntryType::Directory => Kind::Dir,
        EntryType::Symlink => {
            let target = entry.link_name_bytes().unwrap_or_default();
            let target = std::str::from_utf8(&target).map_err(|_| EntryError::LinkNotUtf8)?;
            // Linux refuses such a link too; the cap bounds resolution work.
            if target.len() >= path::PATH_MAX {
                return Err(EntryError::LinkTooLong(target.len()));
            }
            Kind::Symlink(target.to_string())
        }
        EntryType::Link => {
            let target = entry.link_name_bytes().unwrap_or_default();
            let target = path::components(&target)?;
            let (kind, meta) = tree.hardlink_source(&target)?;
            let dir = tree.resolve_dir(dir, Some(layer))?.unwrap_or_default();
            tree.insert(&dir, name, Node { kind, meta, layer });
            return Ok(());
        }
        EntryType::Char => {
            Kind::CharDev(device(header.device_major()), device(header.device_minor()))
        }
        EntryType::Block => {
            Kind::BlockDev(device(header.device_major()), device(header.device_minor()))
        }
        EntryType::Fifo => Kind::Fifo,
        other => {
            tracing::info!(entry = %comps.join("/"), ?other, "skipping unsupported tar entry type");
            return Ok(());
        }
    };
    let dir = tree.resolve_dir(dir, Some(layer))?.unwrap_or_default();
    tree.insert(&dir, name, Node { kind, meta, layer });
    Ok(())
}

fn device(n: io::Result<Option<u32>>) -> u32 {
    n.ok().flatten().unwrap_or(0)
}

/// Mode and owner, with PAX `uid`/`gid` overriding the header (large ids).
fn meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryError> {
    let h = entry.header();
    let mode = h.mode().map_err(EntryError::Header)? & 0o7777;
    let mut uid = h.uid().map_err(EntryError::Header)?;
    let mut gid = h.gid().map_err(EntryError::Header)?;
    // PAX records override the header (ids too large for its octal field).
    if let Some(ext) = entry.pax_extensions().ok().flatten() {
        for e in ext.flatten() {
            let (Ok(k), Ok(v)) = (e.key(), e.value()) else {
                continue;
            };
            match k {
                "uid" => uid = v.parse().map_err(|_| EntryError::Owner)?,
                "gid" => gid = v.parse().map_err(|_| EntryError::Owner)?,
                k if k.starts_with("SCHILY.xattr.") => {
                    tracing::debug!(xattr = k, "newc cpio cannot carry xattrs; skipped");
                }
                _ => {}
            }
        }
    }
    Ok(Meta {
        mode,
        uid: u32::try_from(uid).map_err(|_| EntryError::Owner)?,
        gid: u32::try_from(gid).map_err(|_| EntryError::Owner)?,
    })
}
