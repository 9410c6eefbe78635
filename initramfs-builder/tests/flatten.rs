//! Layer flattening against tar fixtures: OCI whiteout semantics,
//! hardlinks, symlinks, ownership, compression, and kiln's own entries.

mod common;

use common::*;
use kiln_image::compress::Compression;
use kiln_image::image::AgentConfig;

#[test]
fn whiteouts_and_opaque_dirs_follow_the_oci_spec() {
    let base = Layer::default()
        .dir("etc")
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .dir("d")
        .file("d/x", b"x")
        .dir("d/sub")
        .file("d/sub/y", b"y")
        .dir("e")
        .file("e/old", b"o");
    // Opaque marker after a sibling from the same layer: the sibling stays.
    let top = Layer::default()
        .file("etc/.wh.a", b"")
        .dir("d")
        .file("d/.wh..wh..opq", b"")
        .file("d/new", b"n")
        .file("e/new", b"n")
        .file("e/.wh..wh..opq", b"")
        .file(".wh.nothing-here", b"");
    let out = by_path(&build(vec![base.tar(), top.tar()]).unwrap());
    assert!(out.contains_key("etc/b"));
    assert!(!out.contains_key("etc/a"));
    assert!(!out.contains_key("etc/.wh.a"));
    assert!(out.contains_key("d/new"));
    for gone in ["d/x", "d/sub", "d/sub/y", "e/old"] {
        assert!(!out.contains_key(gone), "{gone} survived");
    }
    assert!(
        out.contains_key("e/new"),
        "same-layer entry removed by opaque"
    );
    assert!(out.keys().all(|k| !k.contains(".wh.")));
}

#[test]
fn whiteout_of_a_directory_removes_its_subtree_and_later_layers_readd() {
    let l1 = Layer::default().dir("a").dir("a/b").file("a/b/c", b"c");
    let l2 = Layer::default().file(".wh.a", b"");
    let l3 = Layer::default().dir("a").file("a/z", b"z");
    let out = by_path(&build(vec![l1.tar(), l2.tar(), l3.tar()]).unwrap());
    assert!(out.contains_key("a/z"));
    assert!(!out.contains_key("a/b"));
    assert!(!out.contains_key("a/b/c"));
}

#[test]
fn hardlinks_symlinks_modes_and_owners_are_preserved() {
    let l1 = Layer::default()
        .dir("bin")
        .owned("bin/busybox", 0o4755, 0, 0, b"BB")
        .hardlink("bin/ls", "bin/busybox")
        .symlink("bin/sh", "busybox")
        .dir("home")
        .raw(
            tar::EntryType::Directory,
            b"home/u",
            b"",
            0o700,
            (1000, 1000),
            b"",
        )
        .owned("home/u/f", 0o640, 1000, 100, b"secret")
        .raw(tar::EntryType::Char, b"null", b"", 0o666, (0, 0), b"")
        .hardlink("bin/sh2", "bin/sh");
    // A hardlink in a later layer to a file from a lower one.
    let l2 = Layer::default().hardlink("bin/cat", "bin/busybox");
    let entries = build(vec![l1.tar(), l2.tar()]).unwrap();
    let out = by_path(&entries);
    let bb = &out["bin/busybox"];
    assert_eq!(bb.mode, 0o104755);
    assert_eq!(bb.nlink, 3);
    for name in ["bin/cat", "bin/ls"] {
        assert_eq!(out[name].ino, bb.ino, "{name} not linked");
        assert_eq!(out[name].nlink, 3);
        assert!(out[name].data.is_empty(), "data only on the first name");
    }
    // The name carrying data comes first in the archive.
    let first = entries.iter().position(|e| e.ino == bb.ino).unwrap();
    assert_eq!(entries[first].data, b"BB");
    assert_eq!(out["bin/sh"].mode, 0o120777);
    assert_eq!(out["bin/sh"].data, b"busybox");
    assert_eq!((out["home/u"].mode, out["home/u"].uid), (0o40700, 1000));
    let f = &out["home/u/f"];
    assert_eq!(
        (f.mode, f.uid, f.gid, &f.data[..]),
        (0o100640, 1000, 100, &b"secret"[..])
    );
    assert_eq!(out["null"].mode, 0o20666);
    // A hardlink to a symlink is a second symlink.
    assert_eq!(
        (out["bin/sh2"].mode, &out["bin/sh2"].data[..]),
        (0o120777, &b"busybox"[..])
    );
}

#[test]
fn writes_through_a_symlink_inside_the_root_land_in_its_target() {
    let l1 = Layer::default()
        .dir("usr")
        .dir("usr/lib")
        .symlink("lib", "usr/lib")
        .symlink("abs", "/usr");
    let l2 = Layer::default()
        .file("lib/libc.so", b"c")
        .file("abs/x", b"x");
    let out = by_path(&build(vec![l1.tar(), l2.tar()]).unwrap());
    assert_eq!(out["usr/lib/libc.so"].data, b"c");
    assert_eq!(out["usr/x"].data, b"x");
    assert_eq!(out["lib"].mode, 0o120777, "the symlink itself stays");
}

#[test]
fn agent_is_init_and_the_images_init_and_config_are_kept() {
    let l1 = Layer::default()
        .dir("bin")
        .file("bin/busybox", b"BB")
        .symlink("init", "bin/busybox");
    let out = by_path(&build(vec![l1.tar()]).unwrap());
    assert_eq!(out["init"].data, AGENT);
    assert_eq!(out["init"].mode, 0o100755);
    assert_eq!(out["kiln/image-init"].data, b"../bin/busybox");
    assert_eq!(
        (out["dev/console"].mode, out["dev/console"].rdev),
        (0o20600, (5, 1))
    );
    let cfg: AgentConfig = serde_json::from_slice(&out["kiln/config.json"].data).unwrap();
    assert_eq!(cfg.entrypoint, ["/bin/sh"]);
    assert_eq!(cfg.cmd, ["-c", "echo hi"]);
    assert_eq!(cfg.env, ["PATH=/bin"]);
    assert_eq!(cfg.working_dir, "/srv");
    assert_eq!(cfg.user, "1000:1000");
    assert_eq!(cfg.image_init.as_deref(), Some("/kiln/image-init"));
}

#[test]
fn gzip_zstd_and_plain_layers_give_the_same_tree() {
    let l = Layer::default()
        .dir("etc")
        .file("etc/os-release", b"ID=test\n");
    let top = Layer::default()
        .file("etc/.wh.os-release", b"")
        .file("etc/x", b"x");
    let plain = build(vec![l.tar(), top.tar()]).unwrap();
    assert_eq!(plain, build(vec![l.gzip(), top.zstd()]).unwrap());
    assert_eq!(plain, build(vec![l.zstd(), top.gzip()]).unwrap());
}

#[test]
fn output_is_deterministic_and_every_compression_unpacks_to_the_same_cpio() {
    let l = Layer::default()
        .dir("etc")
        .file("etc/a", &vec![7u8; 100_000])
        .hardlink("etc/b", "etc/a");
    let (plain, m) = build_with(
        &mut MemLayers::new(vec![l.gzip()]),
        Compression::None,
        1 << 30,
    )
    .unwrap();
    let (again, m2) = build_with(
        &mut MemLayers::new(vec![l.gzip()]),
        Compression::None,
        1 << 30,
    )
    .unwrap();
    assert_eq!(plain, again);
    assert_eq!(m, m2);
    assert!(m.measurement.starts_with("sha384:") && m.measurement.len() == 7 + 96);
    assert_eq!(m.size, plain.len() as u64);
    for (c, tool) in [
        (Compression::Gzip, "gzip"),
        (Compression::Zstd, "zstd"),
        (Compression::Lz4, "lz4"),
    ] {
        let (packed, pm) = build_with(&mut MemLayers::new(vec![l.tar()]), c, 1 << 30).unwrap();
        let (packed2, _) = build_with(&mut MemLayers::new(vec![l.tar()]), c, 1 << 30).unwrap();
        assert_eq!(packed, packed2, "{c} not deterministic");
        assert_ne!(pm.measurement, m.measurement);
        // The reference decompressors (lz4 must read the legacy framing,
        // the only one the kernel takes).
        let mut child = std::process::Command::new(tool)
            .args(["-d", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&packed).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "{tool} -d failed");
        assert_eq!(out.stdout, plain, "{c} unpacks to different bytes");
    }
}

#[test]
fn absolute_and_dot_names_resolve_inside_the_root_like_containerd() {
    // What umoci, buildah and `docker export` pipelines write.
    let l1 = Layer::default()
        .dir("./")
        .raw(tar::EntryType::Directory, b"/", b"", 0o700, (5, 6), b"")
        .dir("/etc")
        .file("/etc/passwd", b"root")
        .file("./etc/group", b"wheel")
        .file("etc/../etc/hosts", b"localhost")
        .dir("/usr//lib/")
        .symlink("/lib", "usr/lib");
    // Absolute names in a later layer, written through a symlink, and a
    // whiteout and hardlink with absolute names.
    let l2 = Layer::default()
        .file("/lib/libc.so", b"c")
        .file("/etc/.wh.group", b"")
        .hardlink("/etc/passwd2", "/etc/passwd");
    let out = by_path(&build(vec![l1.tar(), l2.tar()]).unwrap());
    assert_eq!(out["etc/passwd"].data, b"root");
    assert_eq!(out["etc/hosts"].data, b"localhost");
    assert_eq!(out["usr/lib/libc.so"].data, b"c");
    assert_eq!(out["etc/passwd2"].ino, out["etc/passwd"].ino);
    assert!(!out.contains_key("etc/group"));
    assert!(out.keys().all(|k| !k.is_empty() && !k.starts_with('/')));
    // The root entry's owner and mode are kept for writers with a root inode.
    let mut layers = MemLayers::new(vec![l1.tar()]);
    let tree = kiln_image::layers::flatten(&mut layers, 1 << 30, &mut |_, _| {}).unwrap();
    assert_eq!(
        tree.root_meta(),
        Some(kiln_image::cpio::Meta {
            mode: 0o700,
            uid: 5,
            gid: 6
        })
    );
}

#[test]
fn a_directory_at_init_moves_aside_whole() {
    let l1 = Layer::default()
        .dir("bin")
        .file("bin/sh", b"SH")
        .dir("init")
        .file("init/run", b"R")
        .dir("init/d")
        .symlink("init/d/sh", "../../bin/sh")
        .symlink("init/d/run", "../run")
        .symlink("init/d/abs", "/bin/sh");
    let out = by_path(&build(vec![l1.tar()]).unwrap());
    assert_eq!(out["init"].data, AGENT);
    assert_eq!(out["kiln/image-init"].mode, 0o40755);
    assert_eq!(out["kiln/image-init/run"].data, b"R");
    // A link out of the moved directory still reaches the same file; links
    // inside it and absolute ones are unchanged.
    assert_eq!(out["kiln/image-init/d/sh"].data, b"/bin/sh");
    assert_eq!(out["kiln/image-init/d/run"].data, b"../run");
    assert_eq!(out["kiln/image-init/d/abs"].data, b"/bin/sh");
    let cfg: AgentConfig = serde_json::from_slice(&out["kiln/config.json"].data).unwrap();
    assert_eq!(cfg.image_init.as_deref(), Some("/kiln/image-init"));
    // A plain file at /init moves the same way.
    let l2 = Layer::default().file("init", b"I");
    let out = by_path(&build(vec![l2.tar()]).unwrap());
    assert_eq!(out["kiln/image-init"].data, b"I");
    assert_eq!(out["init"].data, AGENT);
}
