//! Which root filesystem a build makes: the whole image in the initramfs
//! (unpacked into guest RAM by the kernel), or an erofs image the guest
//! mounts from a virtio-blk device next to an initramfs holding only the
//! agent and kiln's files.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKind {
    #[default]
    Initramfs,
    Block,
}

/// The kernel command line argument that tells the agent its root is the
/// first virtio-blk device (`/dev/vda`).
pub const BLOCK_ROOT_ARG: &str = "kiln.root=vda";

/// `auto` picks the block root from this much unpacked file data up.
/// Measured on a PVM host (scripts/bench-rootfs-crossover.sh, the VM's CPU
/// seconds for `kiln run -- true`): with the demo image's ~2 MiB both
/// roots cost the same (21-22 s); with 4 MiB more, initramfs 24-30 s
/// against block 18-22 s; with 16 MiB more, 33 s against 19 s. The guest
/// kernel's unpacking grows with the image, the block root's reads do not.
pub const AUTO_BLOCK_MIN: u64 = 4 << 20;

impl RootKind {
    /// The choice for an image with `unpacked` bytes of file data.
    pub fn auto(unpacked: u64) -> RootKind {
        if unpacked >= AUTO_BLOCK_MIN {
            RootKind::Block
        } else {
            RootKind::Initramfs
        }
    }

    /// What the kernel command line must carry for this root.
    pub fn kernel_arg(self) -> Option<&'static str> {
        match self {
            RootKind::Initramfs => None,
            RootKind::Block => Some(BLOCK_ROOT_ARG),
        }
    }
}

/// A root kind, or `auto` to pick one by the image's size: what
/// `kiln run --rootfs`, `kiln image build --rootfs` and the local
/// backend's `rootfs` setting take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rootfs {
    /// By the image's unpacked size ([`RootKind::auto`]).
    #[default]
    Auto,
    Initramfs,
    Block,
}

impl Rootfs {
    /// The words it is written as, for messages.
    pub const WORDS: &'static str = "auto, initramfs or block";

    /// The kind it fixes, or None for `auto`.
    pub fn kind(self) -> Option<RootKind> {
        match self {
            Rootfs::Auto => None,
            Rootfs::Initramfs => Some(RootKind::Initramfs),
            Rootfs::Block => Some(RootKind::Block),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rootfs::Auto => "auto",
            Rootfs::Initramfs => "initramfs",
            Rootfs::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<Rootfs> {
        [Rootfs::Auto, Rootfs::Initramfs, Rootfs::Block]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown root filesystem kind {0:?} (initramfs, block)")]
pub struct UnknownRootKind(String);

impl FromStr for RootKind {
    type Err = UnknownRootKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "initramfs" => Ok(RootKind::Initramfs),
            "block" => Ok(RootKind::Block),
            _ => Err(UnknownRootKind(s.to_string())),
        }
    }
}

impl fmt::Display for RootKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RootKind::Initramfs => "initramfs",
            RootKind::Block => "block",
        })
    }
}
