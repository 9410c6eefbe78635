//! `kiln image build|ls|rm|prune`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_image::build::{self, Built, Event, Input, Options};
use kiln_image::cache::Cache;
use kiln_image::compress::Compression;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::human;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Turn an OCI/Docker image into a cached, deterministic initramfs.
    Build(BuildArgs),
    /// List built initramfs files.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove builds by reference, or by a unique prefix of a build key
    /// or image digest (as `kiln image ls` shows them).
    Rm {
        #[arg(required = true)]
        what: Vec<String>,
    },
    /// Delete blobs no build needs, leftover temporary files and the saved
    /// VM snapshots (`kiln run` makes them again).
    Prune,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Registry reference (alpine:3.20, 127.0.0.1:5000/x:1, …@sha256:…).
    #[arg(required_unless_present_any = ["docker_archive", "oci_layout"])]
    reference: Option<String>,
    /// Build from a `docker save` tarball instead.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["reference", "oci_layout"])]
    docker_archive: Option<PathBuf>,
    /// Build from an OCI layout directory or OCI archive (PATH[:TAG]).
    #[arg(long, value_name = "PATH[:TAG]", conflicts_with = "reference")]
    oci_layout: Option<String>,
    /// The agent binary to install as /init [default: $KILN_HOME/bin/kiln-agent].
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// none | gzip | zstd | lz4 (none boots fastest on kiln hosts).
    #[arg(long, default_value = "none")]
    compression: Compression,
    /// Also write the initramfs to FILE (a block root's image to FILE.erofs).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Root filesystem: the whole image in the initramfs, an erofs image
    /// for a virtio-blk root next to an agent-only initramfs, or by size
    /// (what `kiln run` picks, so a build here warms its cache).
    #[arg(long, value_name = "auto|initramfs|block", value_parser = parse_rootfs, default_value = "auto")]
    rootfs: Rootfs,
    /// Refuse images whose layers expand to more than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = kiln_image::assemble::DEFAULT_MAX_EXPANDED)]
    max_size: u64,
    /// Refuse images with more than this many paths (files, directories, links).
    #[arg(long, value_name = "N", default_value_t = kiln_image::layers::DEFAULT_MAX_ENTRIES)]
    max_entries: u64,
    /// A registry (host[:port]) to reach over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
    /// Look the tag up again even if the cache knows it.
    #[arg(long)]
    refresh: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cache: &Cache, home: &Path, cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build(args) => image_build(cache, home, args),
        ImageCommand::Ls { json } => image_ls(cache, json),
        ImageCommand::Rm { what } => {
            for w in what {
                for r in cache.remove(&w)? {
                    println!("removed {} ({})", r.key, r.source);
                }
            }
            Ok(())
        }
        ImageCommand::Prune => {
            // Saved VM snapshots are a cache too: the next run makes its own.
            let snapshots = kiln_bridge::machine::warm::remove_all(
                &home.join(kiln_bridge::machine::warm::SNAPSHOTS_DIR),
            )
            .with_context(|| format!("cannot remove the snapshots in {}", home.display()))?;
            let freed = cache.prune()? + snapshots;
            println!("freed {}", human(freed));
            Ok(())
        }
    }
}

fn image_build(cache: &Cache, home: &Path, a: BuildArgs) -> Result<()> {
    let opts = Options {
        input: input(a.reference, a.docker_archive, a.oci_layout)?,
        agent: a.agent.unwrap_or_else(|| home.join("bin/kiln-agent")),
        compression: a.compression,
        max_expanded: a.max_size,
        insecure: a.insecure,
        docker_config: None,
        refresh: a.refresh,
        output: a.output,
        root: a.rootfs.kind(),
    };
    let built = build_limited_with_progress(cache, &opts, a.max_entries)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "digest": built.digest,
                "size": built.size,
                "measurement": built.measurement,
                "path": built.path,
                "cached": built.cached,
                "compression": built.compression,
                "rootfs": built.root,
                "root_image": built.root_image,
            })
        );
    } else {
        println!(
            "{} {} ({}, image {}{})",
            built.measurement,
            built.path.display(),
            human(built.size),
            built.digest,
            if built.cached { ", cached" } else { "" }
        );
        if let Some(img) = &built.root_image {
            println!("root image {}", img.display());
        }
    }
    Ok(())
}

/// `--rootfs`: a root kind, or `auto` to pick by the image's size.
pub use kiln_image::root::Rootfs;

/// `--rootfs`'s value.
pub fn parse_rootfs(s: &str) -> Result<Rootfs, String> {
    Rootfs::parse(s).ok_or_else(|| format!("must be {}", Rootfs::WORDS))
}

/// The image source the user named: an archive, a layout, or a reference.
pub fn input(
    reference: Option<String>,
    docker_archive: Option<PathBuf>,
    oci_layout: Option<String>,
) -> Result<Input> {
    Ok(match (reference, docker_archive, oci_layout) {
        (_, Some(f), _) => Input::DockerArchive(f),
        (_, _, Some(l)) => Input::OciLayout(l),
        (Some(r), _, _) => Input::Registry(r),
        (None, None, None) => bail!("give an image reference, --docker-archive or --oci-layout"),
    })
}

/// Builds (or finds) the initramfs, showing progress on a terminal.
pub fn build_with_progress(cache: &Cache, opts: &Options) -> Result<Built> {
    build_limited_with_progress(cache, opts, kiln_image::layers::DEFAULT_MAX_ENTRIES)
}

/// `build_with_progress` for an image of at most `max_entries` paths.
fn build_limited_with_progress(cache: &Cache, opts: &Options, max_entries: u64) -> Result<Built> {
    let tty = std::io::stderr().is_terminal();
    let mut progress = |e: Event<'_>| {
        if !tty {
            return;
        }
        let mut err = std::io::stderr();
        let _ = match e {
            Event::Download {
                layer,
                of,
                digest,
                bytes,
            } => write!(
                err,
                "\r\x1b[Kpull  layer {}/{of} {:.19} {}",
                layer + 1,
                digest.to_string(),
                human(bytes)
            ),
            Event::Flatten { layer, of } => write!(err, "\r\x1b[Kflatten layer {}/{of}", layer + 1),
            Event::Write => write!(err, "\r\x1b[K"),
        };
    };
    Ok(build::build_limited(
        cache,
        opts,
        max_entries,
        &mut progress,
    )?)
}

fn image_ls(cache: &Cache, json: bool) -> Result<()> {
    let builds = cache.list()?;
    let refs = cache.refs()?;
    if json {
        let v: Vec<_> = builds
            .iter()
            .map(|b| {
                let names: Vec<&str> = refs
                    .iter()
                    .filter(|r| r.image == b.image)
                    .map(|r| r.reference.as_str())
                    .collect();
                serde_json::json!({
                    "key": b.key, "digest": b.image, "source": b.source, "references": names,
                    "compression": b.compression, "size": b.size,
                    "measurement": b.measurement, "path": cache.build_path(b),
                    "rootfs": b.root, "root_image": cache.root_image_path(b),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    for b in builds {
        println!(
            "{:.12}  {:<6} {:>10}  {:.19}  {}",
            b.key,
            b.compression.to_string(),
            human(b.size),
            b.image.to_string(),
            b.source
        );
    }
    Ok(())
}
