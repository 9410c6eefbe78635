//! The merged root filesystem as metadata only: every path, its type,
//! owner and mode, and for regular files *where* their bytes live (layer
//! and entry index), so file data is streamed later, never held here.

use super::path::PATH_MAX;
use crate::cpio::Meta;
use std::collections::{BTreeMap, HashMap};

/// Where a regular file's bytes are: entry `entry` of layer `layer`.
/// Paths sharing one `Content` are hardlinks of each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Content {
    pub layer: usize,
    pub entry: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { content: Content, size: u64 },
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub meta: Meta,
    /// The last layer that created or touched this path (or a descendant):
    /// whiteouts only remove what lower layers made.
    pub layer: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("symlink {0:?} leads outside the image root")]
    SymlinkEscape(String),
    #[error("too many levels of symlinks at {0:?} (the limit is {max}, as in Linux)", max = MAX_FOLLOW)]
    SymlinkLoop(String),
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    #[error("hardlink target {0:?} is missing or a directory")]
    HardlinkTarget(String),
    #[error("{0:?} resolves to a path of {max} bytes or more", max = PATH_MAX)]
    NameTooLong(String),
}

/// Linux's limit on symlinks followed while resolving one path.
pub const MAX_FOLLOW: u32 = 40;

#[derive(Default, Debug)]
pub struct Tree {
    /// Root-relative paths without a leading slash; the root is implicit.
    nodes: BTreeMap<Box<str>, Node>,
    /// What the image's own entry for the root directory (`/` or `./`)
    /// said, if it had one.
    root: Option<Meta>,
    /// Symlink path -> the directory it resolves to and the links followed
    /// on the way: each link's target is walked once, not once per entry
    /// written through it. Cleared whenever a node is replaced or removed
    /// (a new node at a missing path cannot change a resolution made
    /// before, since resolutions only pass through nodes that exist).
    links: HashMap<Box<str>, (Box<str>, u32)>,
}

/// Why a walk stopped; turned into a `TreeError` naming the whole path.
enum Stop {
    Escape,
    Loop,
    NotADirectory(String),
    TooLong,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

impl Tree {
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Every path but the root, in byte order of the path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Owner and mode the image gave its root directory, if it had an
    /// entry for it (writers that store a root inode apply them).
    pub fn root_meta(&self) -> Option<Meta> {
        self.root
    }

    pub fn set_root_meta(&mut self, meta: Meta) {
        self.root = Some(meta);
    }

    /// Forgets the symlink resolutions (bounded memory across layers).
    pub fn forget_resolutions(&mut self) {
        self.links = HashMap::new();
    }

    /// Resolves a directory given as clean components, following symlinks
    /// the way the kernel would inside a chroot, except that leaving the
    /// root is an error rather than silently clamped. With `create`,
    /// missing directories are made (root-owned, 0755, in `layer`);
    /// without it a missing directory gives `None`.
    ///
    /// Cost: one map lookup per component, plus one walk of each symlink's
    /// target the first time it is met; at most `MAX_FOLLOW` links in all.
    pub fn resolve_dir(
        &mut self,
        comps: &[&str],
        create: Option<usize>,
    ) -> Result<Option<String>, TreeError> {
        let mut follows = 0;
        self.walk(String::new(), comps.iter().copied(), create, &mut follows)
            .map_err(|stop| {
                let whole = comps.join("/");
                match stop {
                    Stop::Escape => TreeError::SymlinkEscape(whole),
                    Stop::Loop => TreeError::SymlinkLoop(whole),
                    Stop::NotADirectory(p) => TreeError::NotADirectory(p),
                    Stop::TooLong => TreeError::NameTooLong(whole),
                }
            })
    }

    fn walk<'c>(
        &mut self,
        mut cur: String,
        comps: impl Iterator<Item = &'c str>,
        create: Option<usize>,
        follows: &mut u32,
    ) -> Result<Option<String>, Stop> {
        for c in comps {
            match c {
                "" | "." => continue,
                ".." => {
                    if cur.is_empty() {
                        return Err(Stop::Escape);
                    }
                    let up = parent(&cur).len();
                    cur.truncate(up);
                    continue;
                }
                _ => {}
            }
            let next = join(&cur, c);
            if next.len() >= PATH_MAX {
                return Err(Stop::TooLong);
            }
            match self.nodes.get(next.as_str()).map(|n| &n.kind) {
                Some(Kind::Dir) => cur = next,
                Some(Kind::Symlink(_)) => match self.follow(&next, create, follows)? {
                    Some(dir) => cur = dir,
                    None => return Ok(None),
                },
                Some(_) => return Err(Stop::NotADirectory(next)),
                None => match create {
                    Some(layer) => {
                        self.nodes.insert(
                            next.as_str().into(),
                            Node {
                                kind: Kind::Dir,
                                meta: Meta::root(0o755),
                                layer,
                            },
                        );
                        cur = next;
                    }
                    None => return Ok(None),
                },
            }
        }
        Ok(Some(cur))
    }

    /// The directory the symlink at `link` leads to.
    fn follow(
        &mut self,
        link: &str,
        create: Option<usize>,
        follows: &mut u32,
    ) -> Result<Option<String>, Stop> {
        *follows += 1;
        if *follows > MAX_FOLLOW {
            return Err(Stop::Loop);
        }
        if let Some((dir, used)) = self.links.get(link) {
            *follows += used;
            if *follows > MAX_FOLLOW {
                return Err(Stop::Loop);
            }
            return Ok(Some(dir.to_string()));
        }
        let Some(Kind::Symlink(target)) = self.nodes.get(link).map(|n| &n.kind) else {
            return Ok(None);
        };
        // Targets are capped at PATH_MAX when read, so this copy is small.
        let target = target.clone();
        let start = if target.starts_with('/') {
            String::new()
        } else {
            parent(link).to_string()
        };
        let before = *follows;
        let dir = self.walk(start, target.split('/'), create, follows)?;
        if let Some(d) = &dir {
            self.links
                .insert(link.into(), (d.as_str().into(), *follows - before));
        }
        Ok(dir)
    }

    /// Marks `dir` and its ancestors as touched by `layer`, so an opaque
    /// marker or whiteout in the same layer cannot remove what this layer
    /// adds beneath them.
    fn touch_ancestors(&mut self, dir: &str, layer: usize) {
        let mut d = dir;
        while !d.is_empty() {
            if let Some(n) = self.nodes.get_mut(d) {
                n.layer = n.layer.max(layer);
            }
            d = parent(d);
        }
    }

    /// Puts `node` at `dir/name`. A directory over a directory keeps its
    /// children (tar extraction semantics); anything else replaces the old
    /// path and all beneath it.
    pub fn insert(&mut self, dir: &str, name: &str, node: Node) {
        let path = join(dir, name);
        self.touch_ancestors(dir, node.layer);
        let old = self.nodes.get(path.as_str()).map(|n| n.kind == Kind::Dir);
        let keep_children = node.kind == Kind::Dir && old == Some(true);
        if old.is_some() && !keep_children {
            self.links.clear();
        }
        if !keep_children {
            self.remove_below(&path, usize::MAX);
        }
        self.nodes.insert(path.into(), node);
    }

    /// Looks up a hardlink target (a root-relative path, resolved through
    /// directory symlinks but not a final one). Regular files share their
    /// content (a link group); links to symlinks or devices, which Linux
    /// allows, become copies.
    pub fn hardlink_source(&mut self, comps: &[&str]) -> Result<(Kind, Meta), TreeError> {
        let target = || comps.join("/");
        let Some((name, dir)) = comps.split_last() else {
            return Err(TreeError::HardlinkTarget(target()));
        };
        let Some(dir) = self.resolve_dir(dir, None)? else {
            return Err(TreeError::HardlinkTarget(target()));
        };
        match self.nodes.get(join(&dir, name).as_str()) {
            Some(n) if n.kind != Kind::Dir => Ok((n.kind.clone(), n.meta)),
            _ => Err(TreeError::HardlinkTarget(target())),
        }
    }

    /// Whiteout: removes `dir/name` and everything beneath it, if a lower
    /// layer than `layer` made it.
    pub fn whiteout(&mut self, dir: &str, name: &str, layer: usize) {
        let path = join(dir, name);
        if matches!(self.nodes.get(path.as_str()), Some(n) if n.layer < layer) {
            self.remove_below(&path, usize::MAX);
            self.nodes.remove(path.as_str());
            self.links.clear();
        }
    }

    /// Opaque directory: removes everything below `dir` made by lower
    /// layers than `layer`.
    pub fn opaque(&mut self, dir: &str, layer: usize) {
        if dir.is_empty() {
            let before = self.nodes.len();
            self.nodes.retain(|_, n| n.layer >= layer);
            if self.nodes.len() != before {
                self.links.clear();
            }
        } else {
            self.touch_ancestors(dir, layer);
            self.remove_below(dir, layer);
        }
    }

    /// Removes descendants of `path` (not `path` itself) older than `layer`.
    fn remove_below(&mut self, path: &str, layer: usize) {
        let lo = format!("{path}/");
        // '0' is the byte after '/', so this range is exactly "path/...".
        let hi = format!("{path}0");
        let doomed: Vec<Box<str>> = self
            .nodes
            .range::<str, _>((
                std::ops::Bound::Included(lo.as_str()),
                std::ops::Bound::Excluded(hi.as_str()),
            ))
            .filter(|(_, n)| n.layer < layer)
            .map(|(k, _)| k.clone())
            .collect();
        if !doomed.is_empty() {
            self.links.clear();
        }
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// Removes one path (and what is below it) and returns its node.
    pub fn take(&mut self, path: &str) -> Option<Node> {
        let n = self.nodes.remove(path)?;
        self.links.clear();
        self.remove_below(path, usize::MAX);
        Some(n)
    }

    /// Removes a path and everything below it; returns them in path order
    /// (the path itself first).
    pub fn take_subtree(&mut self, path: &str) -> Vec<(String, Node)> {
        let Some(top) = self.nodes.remove(path) else {
            return Vec::new();
        };
        self.links.clear();
        let lo = format!("{path}/");
        let hi = format!("{path}0");
        let below: Vec<Box<str>> = self
            .nodes
            .range::<str, _>((
                std::ops::Bound::Included(lo.as_str()),
                std::ops::Bound::Excluded(hi.as_str()),
            ))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = vec![(path.to_string(), top)];
        for k in below {
            if let Some(n) = self.nodes.remove(&k) {
                out.push((k.into_string(), n));
            }
        }
        out
    }

    /// Adds a node at an exact path whose parent exists (used for the
    /// entries kiln itself injects).
    pub fn put(&mut self, path: &str, node: Node) {
        self.remove_below(path, usize::MAX);
        if self.nodes.insert(path.into(), node).is_some() {
            self.links.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(layer: usize) -> Node {
        Node {
            kind: Kind::Dir,
            meta: Meta::root(0o755),
            layer,
        }
    }

    fn link(target: &str, layer: usize) -> Node {
        Node {
            kind: Kind::Symlink(target.into()),
            meta: Meta::root(0o777),
            layer,
        }
    }

    #[test]
    fn resolves_symlinks_inside_and_refuses_escape() {
        let mut t = Tree::default();
        t.insert("", "usr", dir(0));
        t.insert("usr", "lib", dir(0));
        t.insert("", "lib", link("usr/lib", 0));
        t.insert("", "abs", link("/usr", 0));
        t.insert("", "out", link("../../etc", 0));
        t.insert("", "loop", link("loop", 0));
        assert_eq!(t.resolve_dir(&["lib"], None).unwrap().unwrap(), "usr/lib");
        assert_eq!(
            t.resolve_dir(&["abs", "lib"], None).unwrap().unwrap(),
            "usr/lib"
        );
        assert_eq!(
            t.resolve_dir(&["out"], Some(1)),
            Err(TreeError::SymlinkEscape("out".into()))
        );
        assert!(matches!(
            t.resolve_dir(&["loop"], None),
            Err(TreeError::SymlinkLoop(_))
        ));
        assert_eq!(t.resolve_dir(&["nope"], None).unwrap(), None);
        assert_eq!(t.resolve_dir(&["a", "b"], Some(1)).unwrap().unwrap(), "a/b");
        assert!(t.get("a").is_some());
    }

    #[test]
    fn opaque_keeps_same_layer_entries() {
        let mut t = Tree::default();
        t.insert("", "d", dir(0));
        t.insert("d", "old", dir(0));
        t.insert("d/old", "x", dir(0));
        t.insert("d", "new", dir(1));
        t.opaque("d", 1);
        assert!(t.get("d/new").is_some());
        assert!(t.get("d/old").is_none());
        assert!(t.get("d/old/x").is_none());
        assert!(t.get("d").is_some());
    }
}
