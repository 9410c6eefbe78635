//! Pass two: writes the merged tree as a newc cpio in a fixed order
//! (directories, then links and devices, then file bytes streamed layer by
//! layer), with kiln's agent as `/init` and the run config in `/kiln`.

use crate::cpio::{self, Meta, Writer};
use crate::image::AgentConfig;
use crate::layers::cap::Capped;
use crate::layers::tree::{Content, Kind, Node, Tree};
use crate::layers::{decompress, readahead, EntryError, LayerError, LayerSet};
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

/// kiln's own entries: moves the image's `/init` (a file, link or whole
/// directory) aside to `/kiln/image-init` (it must not be overwritten
/// silently), makes room for `/kiln` and adds `/dev/console`. Returns where
/// the image's init went, for the agent config.
pub fn make_room(tree: &mut Tree) -> Option<String> {
    let init = tree.take_subtree("init");
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
    if init.is_empty() {
        return None;
    }
    if init.len() > 1 || init[0].1.kind == Kind::Dir {
        tracing::warn!(
            "image has a directory at /init; moved to /{IMAGE_INIT_PATH} (kiln's agent is /init)"
        );
    }
    for (path, mut node) in init {
        let rest = &path["init".len()..];
        if let Kind::Symlink(t) = &mut node.kind {
            if let Some(fixed) = moved_link(&path, t) {
                *t = fixed;
            }
        }
        tree.put(&format!("{IMAGE_INIT_PATH}{rest}"), node);
    }
    Some(format!("/{IMAGE_INIT_PATH}"))
}

/// The new target of a relative symlink at `path` (under `/init`) once the
/// subtree sits one level deeper, at `/kiln/image-init`: a target that
/// stays inside the subtree is still right; one that climbs out of it is
/// made absolute (the same place, found lexically: the tree's symlinks
/// inside `/init` are not followed, as the kernel would, a simplification
/// for a rare layout). `None`: leave it.
fn moved_link(path: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    if path == "init" {
        // The link itself moves one level down.
        return Some(format!("../{target}"));
    }
    let mut at: Vec<&str> = path.split('/').collect();
    at.pop();
    let mut left = false;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                // An escape from the root was refused at write time; keep it.
                at.pop()?;
                left |= at.is_empty();
            }
            c => at.push(c),
        }
    }
    if at.first() == Some(&"init") {
        // Back into the moved subtree.
        at[0] = IMAGE_INIT_PATH;
    }
    left.then(|| format!("/{}", at.join("/")))
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
    // One compact row per regular file (no allocation per file): sorted
    // by where the bytes are, a hardlink group's names end up together,
    // in path order, so the name carrying the data is the same on every
    // build. Paths are unique, so an unstable sort (no buffer) is enough.
    let mut files: Vec<(Content, &str, &Node)> = Vec::with_capacity(tree.len());
    for (path, node) in tree.iter() {
        match &node.kind {
            Kind::Dir => {}
            Kind::Symlink(target) => w.symlink(path, target, node.meta)?,
            Kind::CharDev(ma, mi) => w.char_device(path, node.meta, *ma, *mi)?,
            Kind::BlockDev(ma, mi) => w.block_device(path, node.meta, *ma, *mi)?,
            Kind::Fifo => w.fifo(path, node.meta)?,
            Kind::File { content, .. } => files.push((*content, path, node)),
        }
    }
    files.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut rest = &files[..];
    while let Some(first) = rest.first() {
        let layer = first.0.layer;
        let n = rest.iter().take_while(|f| f.0.layer == layer).count();
        let (wanted, after) = rest.split_at(n);
        copy_layer_files(&mut w, layers, layer, limit, wanted)?;
        rest = after;
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

/// One layer's files to copy: (where the bytes are, name, node), sorted
/// by entry index; rows sharing an index are one hardlink group.
type Wanted<'a> = [(Content, &'a str, &'a Node)];

/// Streams the wanted entries (sorted by index) of one layer into the cpio.
fn copy_layer_files<W: Write>(
    w: &mut Writer<W>,
    layers: &mut dyn LayerSet,
    layer: usize,
    limit: u64,
    wanted: &Wanted<'_>,
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
    mut wanted: &Wanted<'_>,
) -> Result<(), InitramfsError> {
    let corrupt = |after: &str, source: io::Error| LayerError::Corrupt {
        layer: name.to_string(),
        after: after.to_string(),
        source,
    };
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| corrupt("", e))?;
    for (index, entry) in entries.enumerate() {
        let Some((want, _, node)) = wanted.first() else {
            // Nothing more needed from this layer: stop decompressing.
            break;
        };
        let mut entry = entry.map_err(|e| corrupt("", e))?;
        if index as u64 != want.entry {
            continue;
        }
        let n = wanted.iter().take_while(|f| f.0 == *want).count();
        let (group, after) = wanted.split_at(n);
        let size = match node.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        };
        if entry.size() != size {
            return Err(LayerError::Entry {
                layer: name.to_string(),
                entry: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                source: EntryError::Changed,
            }
            .into());
        }
        let paths: Vec<&str> = group.iter().map(|f| f.1).collect();
        w.file_from(&paths, node.meta, size, &mut entry)?;
        wanted = after;
    }
    if let Some((_, path, _)) = wanted.first() {
        return Err(LayerError::Entry {
            layer: name.to_string(),
            entry: path.to_string(),
            source: EntryError::Changed,
        }
        .into());
    }
    Ok(())
}
