//! Pass two: writes the merged tree as a newc cpio in a fixed order
//! (directories, then links and devices, then file bytes streamed layer by
//! layer), with kiln's agent as `/init` and the run config in `/kiln`.

use crate::cpio::{self, Meta, Writer};
use crate::image::AgentConfig;
use crate::layers::cap::Capped;
use crate::layers::tree::{Content, Kind, Node, Tree};
use crate::layers::{decompress, readahead, EntryError, LayerError, LayerSet};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

pub const CONFIG_PATH: &str = "kiln/config.json";
pub const IMAGE_INIT_PATH: &str = "kiln/image-init";

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("cannot write the initramfs")]
    Cpio(#[from] cpio::CpioError),
    #[error("cannot read the agent binary")]
    Agent(#[source] io::Error),
}

/// kiln's own entries: moves the image's `/init` aside (it must not be
/// overwritten silently), makes room for `/kiln` and adds `/dev/console`. Returns where the
/// image's init went, for the agent config.
pub fn make_room(tree: &mut Tree) -> Option<String> {
    let init = tree.take("init");
    if !matches!(tree.get("kiln"), Some(n) if n.kind == Kind::Dir) {
        if tree.take("kiln").is_some() {
            tracing::warn!("image has a non-directory /kiln; replaced");
        }
        tree.put(
            "kiln",
            Node {
                kind: Kind::Dir,
                meta: Meta::root(0o755),
                layer: 0,
            },
        );
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted;
    // images ship an empty /dev.
    if !matches!(tree.get("dev"), Some(n) if n.kind == Kind::Dir) {
        tree.take("dev");
        tree.put(
            "dev",
            Node {
                kind: Kind::Dir,
                meta: Meta::root(0o755),
                layer: 0,
            },
        );
    }
    tree.put(
        "dev/console",
        Node {
            kind: Kind::CharDev(5, 1),
            meta: Meta::root(0o600),
            layer: 0,
        },
    );
    for reserved in [CONFIG_PATH, IMAGE_INIT_PATH] {
        if tree.take(reserved).is_some() {
            tracing::warn!(path = reserved, "image path is reserved by kiln; dropped");
        }
    }
    let mut node = init?;
    match &mut node.kind {
        Kind::Dir => {
            tracing::warn!("image has a directory at /init; dropped");
            return None;
        }
        // A relative target was relative to /, it now sits one level down.
        Kind::Symlink(t) if !t.starts_with('/') => *t = format!("../{t}"),
        _ => {}
    }
    tree.put(IMAGE_INIT_PATH, node);
    Some(format!("/{IMAGE_INIT_PATH}"))
}

/// One file's names (hardlinks), owner/mode and size.
struct FileOut<'a> {
    paths: Vec<&'a str>,
    meta: Meta,
    size: u64,
}

/// Writes the whole initramfs. `tree` must have been through `make_room`.
pub fn write<W: Write>(
    tree: &Tree,
    layers: &mut dyn LayerSet,
    limit: u64,
    agent: (&mut dyn Read, u64),
    config: &AgentConfig,
    out: W,
) -> Result<W, InitramfsError> {
    let mut w = Writer::new(out);
    for (path, node) in tree.iter() {
        if node.kind == Kind::Dir {
            w.dir(path, node.meta)?;
        }
    }
    let mut files: BTreeMap<Content, FileOut<'_>> = BTreeMap::new();
    for (path, node) in tree.iter() {
        match &node.kind {
            Kind::Dir => {}
            Kind::Symlink(target) => w.symlink(path, target, node.meta)?,
            Kind::CharDev(ma, mi) => w.char_device(path, node.meta, *ma, *mi)?,
            Kind::BlockDev(ma, mi) => w.block_device(path, node.meta, *ma, *mi)?,
            Kind::Fifo => w.fifo(path, node.meta)?,
            Kind::File { content, size } => {
                // Paths come sorted, so the first name of a hardlink group
                // (the one carrying data) is the same on every build.
                files
                    .entry(*content)
                    .or_insert_with(|| FileOut {
                        paths: Vec::new(),
                        meta: node.meta,
                        size: *size,
                    })
                    .paths
                    .push(path);
            }
        }
    }
    let mut by_layer: BTreeMap<usize, Vec<(u64, &FileOut<'_>)>> = BTreeMap::new();
    for (c, f) in &files {
        by_layer.entry(c.layer).or_default().push((c.entry, f));
    }
    for (layer, wanted) in by_layer {
        copy_layer_files(&mut w, layers, layer, limit, &wanted)?;
    }
    let (agent, agent_size) = agent;
    w.file_from(&["init"], Meta::root(0o755), agent_size, agent)
        .map_err(|e| match e {
            cpio::CpioError::Io(io) => InitramfsError::Agent(io),
            e => InitramfsError::Cpio(e),
        })?;
    let mut json = serde_json::to_vec_pretty(config).unwrap_or_default();
    json.push(b'\n');
    w.file(CONFIG_PATH, Meta::root(0o644), &json)?;
    Ok(w.finish()?)
}

/// Streams the wanted entries (sorted by index) of one layer into the cpio.
fn copy_layer_files<W: Write>(
    w: &mut Writer<W>,
    layers: &mut dyn LayerSet,
    layer: usize,
    limit: u64,
    wanted: &[(u64, &FileOut<'_>)],
) -> Result<(), InitramfsError> {
    let name = layers.expect(layer).name();
    let corrupt = |after: &str, source: io::Error| LayerError::Corrupt {
        layer: name.clone(),
        after: after.to_string(),
        source,
    };
    let blob = layers.open(layer).map_err(|source| LayerError::Open {
        layer: name.clone(),
        source,
    })?;
    let (_, decoder) = decompress::open(blob).map_err(|e| corrupt("", e))?;
    let (copied, _) = readahead::run(decoder, |input| {
        copy_entries(w, Capped::new(input, limit), &name, wanted)
    });
    copied
}

fn copy_entries<W: Write>(
    w: &mut Writer<W>,
    input: impl Read,
    name: &str,
    wanted: &[(u64, &FileOut<'_>)],
) -> Result<(), InitramfsError> {
    let corrupt = |after: &str, source: io::Error| LayerError::Corrupt {
        layer: name.to_string(),
        after: after.to_string(),
        source,
    };
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| corrupt("", e))?;
    let mut next = wanted.iter().peekable();
    for (index, entry) in entries.enumerate() {
        let Some((want, f)) = next.peek() else {
            // Nothing more needed from this layer: stop decompressing.
            break;
        };
        let mut entry = entry.map_err(|e| corrupt("", e))?;
        if index as u64 != *want {
            continue;
        }
        if entry.size() != f.size {
            return Err(LayerError::Entry {
                layer: name.to_string(),
                entry: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                source: EntryError::Changed,
            }
            .into());
        }
        w.file_from(&f.paths, f.meta, f.size, &mut entry)?;
        next.next();
    }
    if let Some((_, f)) = next.peek() {
        return Err(LayerError::Entry {
            layer: name.to_string(),
            entry: f.paths.first().map(|p| p.to_string()).unwrap_or_default(),
            source: EntryError::Changed,
        }
        .into());
    }
    Ok(())
}
