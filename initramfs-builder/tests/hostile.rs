//! Hostile layers: every refusal names the layer digest and the entry,
//! with the specific reason.

mod common;

use common::*;
use kiln_image::assemble::AssembleError;
use kiln_image::compress::Compression;
use kiln_image::digest::Digest;
use kiln_image::layers::path::PathError;
use kiln_image::layers::tree::TreeError;
use kiln_image::layers::{EntryError, LayerError};
use tar::EntryType;

/// The layer error behind a failed build.
fn layer_err(r: Result<impl std::fmt::Debug, AssembleError>) -> LayerError {
    let e = r.expect_err("hostile layer accepted");
    match e {
        AssembleError::Layer(l) => l,
        AssembleError::Initramfs(kiln_image::initramfs::InitramfsError::Layer(l)) => l,
        other => panic!("unexpected error {other:?}"),
    }
}

/// Asserts an entry error, naming `blob`'s digest and `entry`.
fn entry_err(blobs: Vec<Vec<u8>>, entry: &str) -> EntryError {
    let names: Vec<String> = blobs.iter().map(|b| Digest::of(b).to_string()).collect();
    match layer_err(build(blobs)) {
        LayerError::Entry {
            layer,
            entry: e,
            source,
        } => {
            assert!(names.contains(&layer), "error names {layer}");
            assert_eq!(e, entry);
            source
        }
        other => panic!("expected an entry error, got {other:?}"),
    }
}

/// The entry error of a build whose layer `blobs[layer]` is named, at `entry`.
fn entry_err_in(blobs: Vec<Vec<u8>>, layer: usize, entry: &str) -> EntryError {
    let name = Digest::of(&blobs[layer]).to_string();
    match layer_err(build(blobs)) {
        LayerError::Entry {
            layer,
            entry: e,
            source,
        } => {
            assert_eq!((layer, e.as_str()), (name, entry));
            source
        }
        other => panic!("expected an entry error, got {other:?}"),
    }
}

#[test]
fn escapes_are_refused_however_the_name_is_spelled() {
    // Cleaned, `/../x` still climbs above the root.
    let l = Layer::default().file("/../etc/shadow", b"x");
    let e = entry_err_in(vec![l.tar()], 0, "/../etc/shadow");
    assert!(matches!(e, EntryError::Path(PathError::Traversal)));
    let l = Layer::default().file("./a/../../x", b"x");
    let e = entry_err_in(vec![l.tar()], 0, "./a/../../x");
    assert!(matches!(e, EntryError::Path(PathError::Traversal)));
    // A directory symlink planted in an earlier layer, written through
    // with absolute and `./` names: refused, naming the later layer.
    let planted = Layer::default()
        .symlink("/up", "../../..")
        .symlink("./root", "/..");
    for (name, l) in [
        (
            "/up/etc/cron.d/x",
            Layer::default().file("/up/etc/cron.d/x", b"x"),
        ),
        ("./root/x/", Layer::default().dir("./root/x/")),
        ("/root/.wh.x", Layer::default().file("/root/.wh.x", b"")),
    ] {
        let e = entry_err_in(vec![planted.tar(), l.tar()], 1, name);
        assert!(
            matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))),
            "{name}: {e:?}"
        );
    }
    // Hardlinks to outside: by name, and through a planted symlink.
    let l = Layer::default()
        .file("f", b"")
        .hardlink("/g", "/../etc/shadow");
    let e = entry_err_in(vec![l.tar()], 0, "/g");
    assert!(matches!(e, EntryError::Path(PathError::Traversal)));
    let l = Layer::default().hardlink("./g", "/root/etc/shadow");
    let e = entry_err_in(vec![planted.tar(), l.tar()], 1, "./g");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))));
}

#[test]
fn symlink_resolution_is_bounded() {
    // A target Linux itself would refuse (PATH_MAX).
    let long = "./".repeat(2500) + "x";
    let l = Layer::default().long_symlink("l", &long);
    let e = entry_err_in(vec![l.tar()], 0, "l");
    assert!(matches!(e, EntryError::LinkTooLong(5001)), "{e:?}");
    // 40 links in a chain resolve, as in Linux; 41 do not.
    let chain = |n: usize| {
        let mut l = Layer::default().dir("d");
        for i in 0..n {
            let next = if i + 1 == n {
                "d".to_string()
            } else {
                format!("l{}", i + 1)
            };
            // Long `./././` targets just under the cap: cleaned once each.
            l = l.long_symlink(&format!("l{i}"), &("./".repeat(2000) + &next));
        }
        for f in 0..200 {
            l = l.file(&format!("l0/f{f}"), b"");
        }
        l
    };
    let out = by_path(&build(vec![chain(40).gzip()]).unwrap());
    assert!(out.contains_key("d/f0") && out.contains_key("d/f199"));
    let e = entry_err_in(vec![chain(41).tar()], 0, "l0/f0");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkLoop(_))));
    // Links followed inside other links' targets count towards the 40.
    let mut nested = Layer::default().dir("d");
    for i in 0..41 {
        nested = nested.symlink(&format!("n{i}"), &format!("n{}/.", i + 1));
    }
    let nested = nested.symlink("n41", "d").file("n0/x", b"");
    let e = entry_err_in(vec![nested.tar()], 0, "n0/x");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkLoop(_))));
}

#[test]
fn images_with_too_many_paths_are_refused() {
    let mut l = Layer::default().dir("d");
    for i in 0..150 {
        l = l.file(&format!("d/f{i}"), b"");
    }
    let blob = l.gzip();
    let name = Digest::of(&blob).to_string();
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    let recipe = kiln_image::assemble::Recipe {
        agent: &agent,
        config: kiln_image::image::AgentConfig::new(Digest::of(b"c"), &run_config()),
        compression: Compression::None,
        max_expanded: 1 << 30,
        max_entries: 100,
    };
    let r = kiln_image::assemble::assemble(
        &mut MemLayers::new(vec![blob]),
        recipe,
        Vec::new(),
        &mut |_, _| {},
    );
    let e = layer_err(r);
    // `d` and 99 files fit; the 100th file is one path too many.
    assert!(
        matches!(&e, LayerError::Entry { layer, entry, source: EntryError::TooManyEntries { limit: 100 } }
            if *layer == name && entry == "d/f99"),
        "{e:?}"
    );
    let text = std::error::Error::source(&e).unwrap().to_string();
    assert!(
        text.contains("100") && text.contains("--max-entries"),
        "{text}"
    );
}

#[test]
fn dot_dot_traversal_is_refused() {
    let l = Layer::default().dir("a").file("a/../../etc/shadow", b"x");
    let e = entry_err(vec![l.tar()], "a/../../etc/shadow");
    assert!(matches!(e, EntryError::Path(PathError::Traversal)));
    let link = Layer::default()
        .file("f", b"")
        .hardlink("g", "../../etc/shadow");
    let e = entry_err(vec![link.tar()], "g");
    assert!(matches!(e, EntryError::Path(PathError::Traversal)));
}

#[test]
fn writes_through_symlinks_that_leave_the_root_are_refused() {
    let l1 = Layer::default()
        .symlink("up", "../../..")
        .symlink("root", "/..");
    let l2 = Layer::default().file("up/etc/cron.d/x", b"x");
    let e = entry_err(vec![l1.tar(), l2.tar()], "up/etc/cron.d/x");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))));
    let l3 = Layer::default().file("root/x", b"x");
    let e = entry_err(vec![l1.tar(), l3.tar()], "root/x");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))));
    // Within one layer too, and through a chain of links.
    let chain = Layer::default()
        .symlink("a", "b")
        .symlink("b", "c/..")
        .dir("c")
        .symlink("c/d", "../..")
        .file("a/c/d/x", b"x");
    let e = entry_err(vec![chain.tar()], "a/c/d/x");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))));
    let looped = Layer::default().symlink("l", "l").file("l/x", b"");
    let e = entry_err(vec![looped.tar()], "l/x");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkLoop(_))));
}

#[test]
fn escaping_whiteouts_are_refused() {
    let l1 = Layer::default().dir("a").file("a/f", b"");
    let l2 = Layer::default().file("a/.wh..", b"");
    let e = entry_err(vec![l1.tar(), l2.tar()], "a/.wh..");
    assert!(matches!(e, EntryError::Whiteout(_)));
    let via_link = Layer::default().symlink("out", "../x");
    let l3 = Layer::default().file("out/.wh.passwd", b"");
    let e = entry_err(vec![via_link.tar(), l3.tar()], "out/.wh.passwd");
    assert!(matches!(e, EntryError::Tree(TreeError::SymlinkEscape(_))));
}

#[test]
fn hardlinks_to_missing_paths_or_directories_are_refused() {
    let l = Layer::default().dir("d").hardlink("x", "d");
    let e = entry_err(vec![l.tar()], "x");
    assert!(matches!(e, EntryError::Tree(TreeError::HardlinkTarget(_))));
    let l = Layer::default().hardlink("x", "nowhere");
    let e = entry_err(vec![l.tar()], "x");
    assert!(matches!(e, EntryError::Tree(TreeError::HardlinkTarget(_))));
}

#[test]
fn decompression_bombs_over_the_limit_are_refused() {
    // 16 MiB of zeros gzip to ~16 KiB; the limit is 1 MiB.
    let bomb = Layer::default().file("zeros", &vec![0u8; 16 << 20]);
    let blob = bomb.gzip();
    assert!(blob.len() < 1 << 20);
    let name = Digest::of(&blob).to_string();
    let r = build_with(&mut MemLayers::new(vec![blob]), Compression::None, 1 << 20);
    match layer_err(r) {
        LayerError::Entry {
            layer,
            entry,
            source: EntryError::TooLarge { limit },
        } => {
            assert_eq!((layer, entry.as_str(), limit), (name, "zeros", 1 << 20));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The limit is on the whole image: two layers each under it, together over.
    let half = Layer::default().file("h", &vec![1u8; 600 << 10]);
    let r = build_with(
        &mut MemLayers::new(vec![half.gzip(), half.zstd()]),
        Compression::None,
        1 << 20,
    );
    assert!(matches!(
        layer_err(r).entry_error(),
        Some(EntryError::TooLarge { .. })
    ));
    // Zeros after the tar's end are counted too.
    let mut padded = Layer::default().file("a", b"a").tar();
    padded.extend(vec![0u8; 2 << 20]);
    let r = build_with(
        &mut MemLayers::new(vec![padded]),
        Compression::None,
        1 << 20,
    );
    assert!(matches!(
        layer_err(r).entry_error(),
        Some(EntryError::TooLarge { .. })
    ));
}

#[test]
fn truncated_and_corrupt_archives_are_refused() {
    let l = Layer::default()
        .file("a", &[1u8; 10_000])
        .file("b", &[2u8; 10_000]);
    let gz = l.gzip();
    let cut = gz[..gz.len() / 2].to_vec();
    let name = Digest::of(&cut).to_string();
    match layer_err(build(vec![cut])) {
        LayerError::Corrupt { layer, .. } => assert_eq!(layer, name),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let tar = l.tar();
    let cut = tar[..700].to_vec();
    assert!(matches!(
        layer_err(build(vec![cut])),
        LayerError::Corrupt { .. }
    ));
    let mut garbage = l.zstd();
    let mid = garbage.len() / 2;
    garbage[mid] ^= 0xff;
    garbage[mid + 1] ^= 0xff;
    assert!(matches!(
        layer_err(build(vec![garbage])),
        LayerError::Corrupt { .. }
    ));
    // A tar header with a bad checksum.
    let mut bad = l.tar();
    bad[148] = b'9';
    assert!(matches!(
        layer_err(build(vec![bad])),
        LayerError::Corrupt { .. }
    ));
}

#[test]
fn digest_mismatches_are_refused() {
    let l = Layer::default().file("a", b"a");
    let mut layers = MemLayers::new(vec![l.gzip()]);
    let claimed = Digest::of(b"something else");
    layers.expect[0].blob = Some(claimed.clone());
    match layer_err(build_with(&mut layers, Compression::None, 1 << 30)) {
        LayerError::DigestMismatch { layer, actual } => {
            assert_eq!(layer, claimed.to_string());
            assert_eq!(actual, Digest::of(&l.gzip()));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    let mut layers = MemLayers::new(vec![l.gzip()]);
    layers.expect[0].diff_id = Some(claimed);
    assert!(matches!(
        layer_err(build_with(&mut layers, Compression::None, 1 << 30)),
        LayerError::DiffIdMismatch { actual, .. } if actual == Digest::of(&l.tar())
    ));
}

#[test]
fn non_utf8_names_are_refused_not_mangled() {
    let l = Layer::default().raw(EntryType::Regular, b"caf\xe9", b"", 0o644, (0, 0), b"");
    let e = entry_err(vec![l.tar()], "caf\u{fffd}");
    assert!(matches!(e, EntryError::Path(PathError::NotUtf8)));
}
