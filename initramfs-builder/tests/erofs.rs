//! The erofs root image, checked by an independent reader: Debian's
//! erofs-utils (`fsck.erofs` walks and extracts every inode, `dump.erofs`
//! shows what was written), plus determinism and the agent-only initramfs
//! of a block-root build.

mod common;

use common::*;
use kiln_image::assemble::{self, BlockAssembled, Recipe};
use kiln_image::compress::Compression;
use kiln_image::cpio;
use kiln_image::digest::Digest;
use kiln_image::image::AgentConfig;
use kiln_image::layers::DEFAULT_MAX_ENTRIES;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use tar::EntryType;

/// A block-root build of `blobs`: (root image, initramfs, measurements).
fn build_block(blobs: Vec<Vec<u8>>) -> (Vec<u8>, Vec<u8>, BlockAssembled) {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    let mut layers = MemLayers::new(blobs);
    let tree =
        assemble::flatten(&mut layers, 1 << 30, DEFAULT_MAX_ENTRIES, &mut |_, _| {}).unwrap();
    let recipe = Recipe {
        agent: &agent,
        config: AgentConfig::new(Digest::of(b"config"), &run_config()),
        compression: Compression::None,
        max_expanded: 1 << 30,
        max_entries: DEFAULT_MAX_ENTRIES,
    };
    assemble::assemble_block(tree, &mut layers, recipe, Vec::new(), Vec::new()).unwrap()
}

fn tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .expect("erofs-utils installed (scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn big(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn layers() -> Vec<Vec<u8>> {
    let mut base = Layer::default()
        .dir("bin")
        .file("bin/empty", b"")
        .file("bin/small", b"hello\n")
        .file("bin/page", &big(4096))
        .file("bin/large", &big(3 * 4096 + 123))
        .symlink("bin/sh", "small")
        .symlink("bin/long", &"x/".repeat(45))
        .hardlink("bin/small.hard", "bin/small")
        .owned("bin/owned", 0o4750, 100_000, 70_000, b"owned")
        .raw(EntryType::Fifo, b"bin/fifo", b"", 0o600, (0, 0), b"")
        .dir("many")
        .dir("gone")
        .file("gone/x", b"x")
        .file("init", b"#!/bin/sh\n");
    for i in 0..300 {
        base = base.file(&format!("many/file-{i:05}"), b"");
    }
    let top = Layer::default()
        .file(".wh.gone", b"")
        .file("bin/new", b"new");
    vec![base.tar(), top.tar()]
}

#[test]
fn fsck_erofs_reads_back_every_inode_as_written() {
    let (root, _, assembled) = build_block(layers());
    assert_eq!(root.len() as u64, assembled.root.size);
    assert_eq!(root.len() % 4096, 0);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.erofs");
    std::fs::write(&img, &root).unwrap();
    tool(Command::new("fsck.erofs").arg(&img));
    let out = dir.path().join("x");
    tool(
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", out.display()))
            .arg("--preserve")
            .arg(&img),
    );
    let read = |p: &str| std::fs::read(out.join(p)).unwrap();
    assert_eq!(read("bin/small"), b"hello\n");
    assert_eq!(read("bin/empty"), b"");
    assert_eq!(read("bin/page"), big(4096));
    assert_eq!(read("bin/large"), big(3 * 4096 + 123));
    assert_eq!(read("bin/new"), b"new");
    assert_eq!(read("kiln/image-init"), b"#!/bin/sh\n");
    let link = |p: &str| std::fs::read_link(out.join(p)).unwrap();
    assert_eq!(link("bin/sh"), Path::new("small"));
    assert_eq!(link("bin/long"), Path::new(&"x/".repeat(45)));
    assert!(!out.join("gone").exists(), "whiteout ignored");
    assert!(!out.join("init").exists(), "image /init not moved aside");
    assert_eq!(std::fs::read_dir(out.join("many")).unwrap().count(), 300);
    // (fsck.erofs chowns after chmod, which drops set-uid: modes are
    // checked with dump.erofs below.)
    let owned = std::fs::symlink_metadata(out.join("bin/owned")).unwrap();
    if nix_root() {
        assert_eq!((owned.uid(), owned.gid()), (100_000, 70_000));
    }

    // dump.erofs: what the inodes say, read without extracting.
    let dump = |path: &str| {
        tool(
            Command::new("dump.erofs")
                .arg(format!("--path=/{path}"))
                .arg(&img),
        )
    };
    let small = dump("bin/small");
    assert!(small.contains("Links: 2"), "{small}");
    let owned = dump("bin/owned");
    assert!(
        owned.contains("Uid: 100000") && owned.contains("Gid: 70000"),
        "{owned}"
    );
    // dump.erofs prints the permission bits only: the set-uid bit is read
    // from the inode it names (i_mode sits 4 bytes in, nids count 32).
    let nid: usize = owned
        .split("NID: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let mode = u16::from_le_bytes([root[nid * 32 + 4], root[nid * 32 + 5]]);
    assert_eq!(mode, 0o104750);
    let console = dump("dev/console");
    assert!(console.contains("char dev"), "{console}");
    let fifo = dump("bin/fifo");
    assert!(fifo.contains("fifo") && fifo.contains("0600"), "{fifo}");
    let many = dump("many");
    assert!(many.contains("directory"), "{many}");
    let sb = tool(Command::new("dump.erofs").arg("-s").arg(&img));
    assert!(sb.contains("Filesystem blocks"), "{sb}");
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn same_layers_same_bytes() {
    let (a_root, a_initrd, a) = build_block(layers());
    let (b_root, b_initrd, b) = build_block(layers());
    assert!(a_root == b_root, "root images differ");
    assert!(a_initrd == b_initrd, "initramfs files differ");
    assert_eq!(a, b);
    assert_eq!(
        a.measurement,
        assemble::block_measurement(&a.initrd.measurement, &a.root.measurement)
    );
    assert_ne!(a.measurement, a.root.measurement);
}

#[test]
fn the_block_root_initramfs_holds_only_kiln_files() {
    let (_, initrd, _) = build_block(layers());
    let entries = cpio::parse(&initrd).unwrap();
    let mut paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["dev", "dev/console", "init", "kiln", "kiln/config.json"]
    );
    let config = entries
        .iter()
        .find(|e| e.path == "kiln/config.json")
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&config.data).unwrap();
    assert_eq!(json["image_init"], "/kiln/image-init");
}
