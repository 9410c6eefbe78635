//! The three sources against real tools: an umoci-made OCI layout, the
//! same image as a skopeo docker-archive, and pushed with skopeo to a real
//! docker-registry on 127.0.0.1. All must give the same rootfs.

mod common;

use common::tools::{sh, umoci_image, Registry};
use common::*;
use kiln_image::build::{build, BuildError, Built, Input, Options};
use kiln_image::cache::Cache;
use kiln_image::compress::Compression;
use kiln_image::cpio;
use kiln_image::image::AgentConfig;
use kiln_image::source::SourceError;
use std::path::Path;

fn options(input: Input, agent: &Path) -> Options {
    Options {
        input,
        agent: agent.to_path_buf(),
        compression: Compression::None,
        max_expanded: 1 << 30,
        insecure: Vec::new(),
        docker_config: Some("/nonexistent/config.json".into()),
        refresh: false,
        output: None,
        root: Some(kiln_image::root::RootKind::Initramfs),
    }
}

struct Env {
    dir: tempfile::TempDir,
    agent: std::path::PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, AGENT).unwrap();
        Env { dir, agent }
    }
    fn cache(&self, name: &str) -> Cache {
        Cache::open(&self.dir.path().join(name)).unwrap()
    }
    fn build(&self, cache: &Cache, input: Input) -> Result<Built, BuildError> {
        build(cache, &options(input, &self.agent), &mut |_| {})
    }
}

fn entries(b: &Built) -> Vec<cpio::Entry> {
    cpio::parse(&std::fs::read(&b.path).unwrap()).unwrap()
}

/// Every file in the cache, for before/after comparisons.
fn cache_files(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for sub in ["blobs", "builds", "refs"] {
        let mut stack = vec![root.join(sub)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    v.push(e.path().strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
    }
    v.sort();
    v
}

fn check_rootfs(e: &[cpio::Entry]) {
    let out = by_path(e);
    assert_eq!(out["init"].data, AGENT);
    assert_eq!(out["bin/sh"].data, b"busybox");
    assert_eq!(out["bin/sh"].mode, 0o120777);
    assert_eq!(out["etc/hostname"].ino, out["etc/hostname.hard"].ino);
    assert_eq!(out["etc/hostname"].nlink, 2);
    let f = &out["home/user/file"];
    assert_eq!((f.mode, f.uid, f.gid), (0o100640, 1000, 1000));
    assert_eq!(f.data, b"secret\n");
    assert!(out.contains_key("etc/keep") && out.contains_key("etc/new"));
    for gone in ["gone", "gone/sub/x", "etc/drop"] {
        assert!(!out.contains_key(gone), "whiteout of {gone} not applied");
    }
    let cfg: AgentConfig = serde_json::from_slice(&out["kiln/config.json"].data).unwrap();
    assert_eq!(cfg.cmd, ["sh", "-c", "ls /"]);
    assert!(cfg.env.contains(&"A=b".to_string()));
    assert_eq!(
        (cfg.working_dir.as_str(), cfg.user.as_str()),
        ("/srv", "1000:1000")
    );
}

#[test]
fn layout_archive_and_registry_give_the_same_rootfs() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let archive = env.dir.path().join("docker.tar");
    let oci_archive = env.dir.path().join("oci.tar");
    sh(&format!(
        "skopeo copy -q oci:{l}:t docker-archive:{a}:test/img:t && skopeo copy -q oci:{l}:t oci-archive:{o}:t",
        l = layout.display(),
        a = archive.display(),
        o = oci_archive.display()
    ));
    let registry = Registry::start();
    // zstd layers in the registry, gzip in the layout, plain in the archive.
    registry.push(&layout, "t", "test/img", "--dest-compress-format zstd");

    let from_layout = env
        .build(
            &env.cache("a"),
            Input::OciLayout(format!("{}:t", layout.display())),
        )
        .unwrap();
    let from_oci_archive = env
        .build(
            &env.cache("b"),
            Input::OciLayout(oci_archive.display().to_string()),
        )
        .unwrap();
    let from_archive = env
        .build(&env.cache("c"), Input::DockerArchive(archive))
        .unwrap();
    let reference = format!("{}/test/img:t", registry.addr);
    let from_registry = env
        .build(&env.cache("d"), Input::Registry(reference))
        .unwrap();

    let l = entries(&from_layout);
    check_rootfs(&l);
    for other in [&from_oci_archive, &from_archive, &from_registry] {
        assert_eq!(listing(&l), listing(&entries(other)));
        assert_eq!(other.digest, from_layout.digest, "same image identity");
        assert!(!other.cached);
    }
    // Same image, agent and options: the same bytes whatever the source.
    assert_eq!(from_registry.measurement, from_layout.measurement);
    assert_eq!(from_archive.measurement, from_layout.measurement);
}

#[test]
fn registry_index_picks_amd64_and_warm_rebuild_needs_no_network() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    add_arm64_sibling(&layout);
    let mut registry = Registry::start();
    registry.push(&layout, "multi", "test/multi", "--all");
    let cache = env.cache("home");
    let reference = format!("{}/test/multi:multi", registry.addr);
    let cold = env
        .build(&cache, Input::Registry(reference.clone()))
        .unwrap();
    assert!(!cold.cached);
    check_rootfs(&entries(&cold));
    let before = cache_files(cache.root());

    // No registry any more: the warm build must not need it.
    registry.stop();
    let warm = env
        .build(&cache, Input::Registry(reference.clone()))
        .unwrap();
    assert!(warm.cached);
    assert_eq!(
        (warm.measurement, warm.path),
        (cold.measurement.clone(), cold.path)
    );
    assert_eq!(cache_files(cache.root()), before);
    // Other options rebuild from stored blobs, still offline.
    let mut opts = options(Input::Registry(reference), &env.agent);
    opts.compression = Compression::Zstd;
    let zstd = build(&cache, &opts, &mut |_| {}).unwrap();
    assert!(!zstd.cached);
    assert_ne!(zstd.measurement, cold.measurement);
}

/// Turns tag `t` into an index tagged `multi` holding the amd64 image and
/// an arm64 one listed first (same layers, its own config).
fn add_arm64_sibling(layout: &Path) {
    use kiln_image::digest::Digest;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let amd = index["manifests"][0].clone();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        std::fs::write(layout.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        d
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(amd["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    config["architecture"] = "arm64".into();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config_bytes);
    let mut arm = manifest.clone();
    arm["config"]["digest"] = config_digest.to_string().into();
    arm["config"]["size"] = config_bytes.len().into();
    let arm_bytes = serde_json::to_vec(&arm).unwrap();
    let arm_digest = put(&arm_bytes);
    let entry = |d: &Digest, size: usize, arch: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d.to_string(), "size": size,
            "platform": {"os": "linux", "architecture": arch}})
    };
    let amd_digest = Digest::parse(amd["digest"].as_str().unwrap()).unwrap();
    let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&arm_digest, arm_bytes.len(), "arm64"),
                      entry(&amd_digest, amd["size"].as_u64().unwrap() as usize, "amd64")]});
    let idx_bytes = serde_json::to_vec(&idx).unwrap();
    let idx_digest = put(&idx_bytes);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [amd,
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idx_digest.to_string(),
         "size": idx_bytes.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

#[test]
fn layout_index_with_several_platforms_resolves_to_amd64() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    add_arm64_sibling(&layout);
    let b = env
        .build(
            &env.cache("c"),
            Input::OciLayout(format!("{}:multi", layout.display())),
        )
        .unwrap();
    check_rootfs(&entries(&b));
    // Two images in the layout: a tag is required.
    let err = env
        .build(
            &env.cache("c"),
            Input::OciLayout(layout.display().to_string()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Source(SourceError::Ambiguous { count: 2, .. })
        ),
        "{err:?}"
    );
    let err = env
        .build(
            &env.cache("c"),
            Input::OciLayout(format!("{}:nope", layout.display())),
        )
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Source(SourceError::NoTag { .. })),
        "{err:?}"
    );
}

#[test]
fn registry_digest_mismatch_is_refused_and_the_cache_is_untouched() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let registry = Registry::start();
    registry.push(&layout, "t", "test/bad", "");
    // Corrupt the biggest blob (the busybox layer) in the registry's storage.
    sh(&format!(
        "f=$(find {} -path '*/blobs/sha256/*/data' -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2); \
         printf 'XXXX' | dd of=$f bs=1 seek=100 conv=notrunc status=none",
        registry.storage.display()
    ));
    let cache = env.cache("home");
    let before = cache_files(cache.root());
    let err = env
        .build(
            &cache,
            Input::Registry(format!("{}/test/bad:t", registry.addr)),
        )
        .unwrap_err();
    let text = format!("{:?}", err);
    assert!(
        matches!(
            err,
            BuildError::Source(SourceError::Registry(
                kiln_image::registry::client::RegistryError::DigestMismatch { what: "blob", .. }
            ))
        ),
        "{text}"
    );
    assert_eq!(
        cache_files(cache.root()),
        before,
        "a failed build changed the cache"
    );
    assert!(std::fs::read_dir(cache.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn registry_manifest_digest_mismatch_is_refused() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let registry = Registry::start();
    registry.push(&layout, "t", "test/man", "");
    let link = registry
        .storage
        .join("docker/registry/v2/repositories/test/man/_manifests/tags/t/current/link");
    let digest = std::fs::read_to_string(link).unwrap();
    let hex = digest.trim().trim_start_matches("sha256:");
    let data = registry.storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    // Same length, different bytes: the registry serves it unchanged.
    let mut manifest = std::fs::read(&data).unwrap();
    let pos = manifest.iter().position(|&b| b == b'{').unwrap();
    manifest.insert(pos + 1, b' ');
    manifest.pop();
    std::fs::write(&data, manifest).unwrap();
    let err = env
        .build(
            &env.cache("home"),
            Input::Registry(format!("{}/test/man@{}", registry.addr, digest.trim())),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Source(SourceError::Registry(
                kiln_image::registry::client::RegistryError::DigestMismatch {
                    what: "manifest",
                    ..
                }
            ))
        ),
        "{err:?}"
    );
}

#[test]
fn registry_layers_declared_over_the_limit_are_not_downloaded() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let registry = Registry::start();
    registry.push(&layout, "t", "test/big", "");
    let cache = env.cache("home");
    let before = cache_files(cache.root());
    let mut opts = options(
        Input::Registry(format!("{}/test/big:t", registry.addr)),
        &env.agent,
    );
    opts.max_expanded = 100_000;
    let err = build(&cache, &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Source(SourceError::TooLarge { max: 100_000, .. })
        ),
        "{err:?}"
    );
    assert_eq!(cache_files(cache.root()), before);
}

#[test]
fn compressed_docker_archives_are_refused_and_extra_tags_are_fine() {
    let env = Env::new();
    umoci_image(env.dir.path());
    let d = env.dir.path().display();
    sh(&format!(
        "cd {d}; skopeo copy -q oci:oci:t docker-archive:one.tar:a/b:t; gzip -k one.tar; \
         skopeo copy -q --additional-tag a/c:u oci:oci:t docker-archive:multi.tar:a/b:t"
    ));
    let cache = env.cache("home");
    let err = env
        .build(
            &cache,
            Input::DockerArchive(env.dir.path().join("one.tar.gz")),
        )
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Source(SourceError::CompressedArchive)),
        "{err:?}"
    );
    // One image under two tags is still one image.
    env.build(
        &cache,
        Input::DockerArchive(env.dir.path().join("multi.tar")),
    )
    .unwrap();
    let err = env
        .build(
            &cache,
            Input::DockerArchive(env.dir.path().join("missing.tar")),
        )
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Source(SourceError::Io(..))),
        "{err:?}"
    );
}

#[test]
fn missing_agent_is_a_clear_error() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let mut opts = options(
        Input::OciLayout(format!("{}:t", layout.display())),
        &env.agent,
    );
    opts.agent = env.dir.path().join("no-agent");
    let err = build(&env.cache("x"), &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, BuildError::AgentMissing(_)), "{err:?}");
}

#[test]
fn builds_in_different_dirs_at_different_times_are_byte_identical() {
    let env = Env::new();
    let layout = umoci_image(env.dir.path());
    let copy = env.dir.path().join("copy");
    sh(&format!("cp -r {} {}", layout.display(), copy.display()));
    for c in [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Lz4,
    ] {
        let mut a = options(
            Input::OciLayout(format!("{}:t", layout.display())),
            &env.agent,
        );
        a.compression = c;
        let first = build(&env.cache(&format!("one-{c}")), &a, &mut |_| {}).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mut b = options(
            Input::OciLayout(format!("{}:t", copy.display())),
            &env.agent,
        );
        b.compression = c;
        let second = build(&env.cache(&format!("two-{c}")), &b, &mut |_| {}).unwrap();
        assert_ne!(first.path, second.path);
        assert_eq!(
            std::fs::read(&first.path).unwrap(),
            std::fs::read(&second.path).unwrap(),
            "{c} output differs"
        );
        assert_eq!(first.measurement, second.measurement);
    }
}

/// Writes an OCI layout holding one image made of `layers` (blobs as
/// given, diff_ids from `tars`).
fn hand_made_layout(dir: &Path, blobs: &[Vec<u8>], tars: &[Vec<u8>]) {
    use kiln_image::digest::Digest;
    let b = dir.join("blobs/sha256");
    std::fs::create_dir_all(&b).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        std::fs::write(b.join(d.hex()), bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let diff_ids: Vec<String> = tars.iter().map(|t| Digest::of(t).to_string()).collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let layers: Vec<_> = blobs
        .iter()
        .map(|l| {
            let (d, s) = put(l);
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
        })
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layers});
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn a_hostile_layer_fails_the_build_and_leaves_the_cache_as_it_was() {
    let env = Env::new();
    let cache = env.cache("home");
    // A good build first, so the cache is not empty.
    let good = Layer::default().dir("etc").file("etc/ok", b"ok");
    let good_dir = env.dir.path().join("good");
    hand_made_layout(&good_dir, &[good.gzip()], &[good.tar()]);
    env.build(&cache, Input::OciLayout(good_dir.display().to_string()))
        .unwrap();
    let before = cache_files(cache.root());

    let evil = Layer::default()
        .dir("etc")
        .symlink("etc/x", "../../..")
        .file("etc/x/root/.ssh/authorized_keys", b"k");
    let evil_dir = env.dir.path().join("evil");
    hand_made_layout(
        &evil_dir,
        &[good.gzip(), evil.zstd()],
        &[good.tar(), evil.tar()],
    );
    let err = env
        .build(&cache, Input::OciLayout(evil_dir.display().to_string()))
        .unwrap_err();
    match err {
        BuildError::Assemble(a) => match a.layer_error() {
            Some(kiln_image::layers::LayerError::Entry {
                layer,
                entry,
                source,
            }) => {
                assert_eq!(
                    *layer,
                    kiln_image::digest::Digest::of(&evil.zstd()).to_string()
                );
                assert_eq!(entry, "etc/x/root/.ssh/authorized_keys");
                assert!(matches!(
                    source,
                    kiln_image::layers::EntryError::Tree(
                        kiln_image::layers::tree::TreeError::SymlinkEscape(_)
                    )
                ));
            }
            other => panic!("unexpected {other:?}"),
        },
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(cache_files(cache.root()), before);
    assert!(std::fs::read_dir(cache.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
}
