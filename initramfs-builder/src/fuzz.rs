//! Fuzz entry points: plain functions over arbitrary bytes that panic only
//! on a broken invariant. `tests/fuzz` drives them coverage-guided (cargo
//! fuzz, nightly); `cargo test` replays the committed corpus through them.

use std::io::Read;

use crate::cpio::{Meta, Writer};
use crate::layers::{self, BoxError, Expected, LayerSet};

/// Paths (one a line) given to the cpio writer as directories, files and
/// symlinks. Whatever it accepts must come out of the archive as a name
/// the kernel reads back unchanged: relative, no `..`, no NUL inside.
pub fn cpio_names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut w = Writer::new(Vec::new());
    let mut accepted = Vec::new();
    for (i, path) in text.split('\n').take(64).enumerate() {
        let meta = Meta::root(0o755);
        let ok = match i % 3 {
            0 => w.dir(path, meta).is_ok(),
            1 => w.file(path, meta, b"x").is_ok(),
            _ => w.symlink(path, "target", meta).is_ok(),
        };
        if ok {
            accepted.push(path.trim_start_matches("./").to_string());
        }
    }
    let Ok(archive) = w.finish() else {
        panic!("finishing an archive in memory failed");
    };
    let names = newc_names(&archive);
    assert_eq!(names.last().map(String::as_str), Some("TRAILER!!!"));
    assert_eq!(&names[..names.len() - 1], &accepted[..]);
    for name in &accepted {
        assert!(!name.is_empty() && !name.starts_with('/'), "{name:?}");
        assert!(!name.split('/').any(|c| c == ".."), "{name:?}");
        assert!(!name.contains('\0'), "{name:?}");
    }
}

/// The names in a newc archive, as the kernel's unpacker reads them (up to
/// the first NUL; `namesize` counts the terminating one).
fn newc_names(archive: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + 110 <= archive.len() {
        let field = |i: usize| {
            let f = &archive[at + 6 + 8 * i..at + 14 + 8 * i];
            usize::from_str_radix(std::str::from_utf8(f).unwrap_or("0"), 16).unwrap_or(0)
        };
        assert_eq!(&archive[at..at + 6], b"070701", "bad magic at {at}");
        let (size, namesize) = (field(6), field(11));
        let name = &archive[at + 110..at + 110 + namesize];
        assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
        let c_name = name.split(|&b| b == 0).next().unwrap_or_default();
        names.push(String::from_utf8_lossy(c_name).into_owned());
        at = (at + 110 + namesize).next_multiple_of(4);
        at = (at + size).next_multiple_of(4);
    }
    names
}

/// Layers in memory, as tar streams.
struct Blobs(Vec<Vec<u8>>);

impl LayerSet for Blobs {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn expect(&self, _: usize) -> Expected {
        Expected {
            blob: None,
            diff_id: None,
            blob_verified: false,
        }
    }
    fn open(&mut self, i: usize) -> Result<Box<dyn Read + Send + '_>, BoxError> {
        Ok(Box::new(&self.0[i][..]))
    }
}

/// Two layers (split where the first byte says) flattened with whiteouts:
/// an error or a tree whose every path stays inside the root.
pub fn layers(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (usize::from(split) * 512).min(rest.len());
    let (lower, upper) = rest.split_at(at);
    let mut blobs = Blobs(vec![lower.to_vec(), upper.to_vec()]);
    let Ok(tree) = layers::flatten_limited(&mut blobs, 1 << 20, 4096, &mut |_, _| {}) else {
        return;
    };
    for (path, _) in tree.iter() {
        assert!(!path.is_empty() && !path.starts_with('/'), "{path:?}");
        assert!(
            !path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".."),
            "{path:?}"
        );
    }
}
