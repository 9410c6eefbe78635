//! Builds the configured backends, in order. Each backend kind is one
//! variant of [`BackendSection`] and one arm of `build_one`.

pub mod local;
pub mod ssh;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::backend::Backend;
use crate::capacity::{CapacityError, CapacityLedger, Resources};
use crate::config::CapacityConfig;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Backend kind {0} is not available in this build")]
    NotInThisBuild(&'static str),
    #[error("Backend {0}: rootfs must be {words}, not {1:?}", words = kiln_image::root::Rootfs::WORDS)]
    Rootfs(String, String),
    #[error("Backend {0} has an unusable capacity")]
    Capacity(String, #[source] CapacityError),
}

/// One `[[backend]]` table; `kind` picks the variant.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendSection {
    /// This host, booting micro-VMs with kiln-vmm.
    Local(LocalSection),
}

impl BackendSection {
    /// The backend's name (unique in the fleet).
    pub fn name(&self) -> &str {
        match self {
            BackendSection::Local(s) => s.name.as_deref().unwrap_or("local"),
        }
    }

    /// Its own region label, when it sets one.
    pub fn region(&self) -> Option<&str> {
        match self {
            BackendSection::Local(s) => s.region.as_deref(),
        }
    }
}

/// `kind = "local"`. The local backend's author extends this as it needs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    /// Defaults to `local`.
    #[serde(default)]
    pub name: Option<String>,
    /// The region label its grants run in; defaults to kilnd's `region`
    /// (two local backends can split one host between two labels).
    #[serde(default)]
    pub region: Option<String>,
    /// vCPUs to offer; defaults to the host's CPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory to offer; defaults to the host's memory.
    #[serde(default)]
    pub ram_mib: Option<u64>,
    /// `$KILN_HOME` (images, VM directories); defaults to `/var/lib/kiln`.
    #[serde(default)]
    pub kiln_home: Option<PathBuf>,
    /// Days an ended grant's directory (state, output, logs) is kept;
    /// defaults to 7.
    #[serde(default)]
    pub keep_ended_days: Option<u32>,
    /// The root filesystem of its grants' images: `auto` (by the image's
    /// size, the default), `initramfs` or `block`. A string checked by
    /// the config, since serde's own error for a bad word here would name
    /// the `[[backend]]` table but not the key.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// The most bytes of a grant's `output.log`, in KiB (default 65536,
    /// 64 MiB; at least 4); the log then ends with a marker and later
    /// output is dropped.
    #[serde(default)]
    pub output_cap_kib: Option<u64>,
    /// Restore grants' VMs from a snapshot of their image's ready VM,
    /// saved by the first grant of that image (and VM shape) that boots;
    /// default true. Off: every grant boots.
    #[serde(default)]
    pub warm_start: Option<bool>,
}

/// What every backend may need from the rest of the configuration.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// This host's region label.
    pub region: String,
    pub capacity: CapacityConfig,
    /// kilnd's state directory.
    pub state_dir: PathBuf,
}

impl BuildContext {
    /// A ledger for a host with `total` resources, less the configured
    /// reserve, with the configured overcommit.
    pub fn ledger_for(&self, name: &str, total: Resources) -> Result<CapacityLedger, BuildError> {
        CapacityLedger::new(
            total,
            Resources::new(self.capacity.reserve_vcpus, self.capacity.reserve_ram_mib),
            self.capacity.overcommit,
        )
        .map_err(|e| BuildError::Capacity(name.to_string(), e))
    }
}

/// The configured backends, in configured order.
pub fn build(
    sections: &[BackendSection],
    ctx: &BuildContext,
) -> Result<Vec<Arc<dyn Backend>>, BuildError> {
    sections.iter().map(|s| build_one(s, ctx)).collect()
}

fn build_one(section: &BackendSection, ctx: &BuildContext) -> Result<Arc<dyn Backend>, BuildError> {
    match section {
        BackendSection::Local(s) => Ok(Arc::new(local::LocalBackend::new(s, ctx)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_offers_its_configured_share_of_this_host() {
        let ctx = BuildContext {
            region: "home".into(),
            capacity: CapacityConfig {
                reserve_vcpus: 1,
                reserve_ram_mib: 512,
                overcommit: None,
            },
            state_dir: "/nonexistent".into(),
        };
        let section = BackendSection::Local(LocalSection {
            name: Some("here".into()),
            region: None,
            vcpus: Some(3),
            ram_mib: Some(2048),
            kiln_home: Some("/nonexistent".into()),
            keep_ended_days: None,
            rootfs: None,
            output_cap_kib: None,
            warm_start: None,
        });
        let built = build(&[section], &ctx).unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].name(), "here");
        let caps = built[0].capabilities();
        assert_eq!(caps.regions.into_iter().collect::<Vec<_>>(), ["home"]);
        assert_eq!(caps.capacity.usable, Resources::new(2, 1536));
        assert_eq!(caps.capacity.used, Resources::default());
        assert!(build(&[], &ctx).unwrap().is_empty());
    }

    #[test]
    fn the_ledger_applies_reserve_and_overcommit() {
        let ctx = BuildContext {
            region: "home".into(),
            capacity: CapacityConfig {
                reserve_vcpus: 1,
                reserve_ram_mib: 1024,
                overcommit: Some(2.0),
            },
            state_dir: "/nonexistent".into(),
        };
        let l = ctx.ledger_for("x", Resources::new(4, 4096)).unwrap();
        assert_eq!(l.snapshot().usable, Resources::new(6, 3072));
        let e = ctx.ledger_for("x", Resources::new(1, 4096)).unwrap_err();
        // Plain words, not Rust debug output.
        assert_eq!(
            crate::error_chain(&e),
            "Backend x has an unusable capacity: Reserve of 1 vCPUs and 1024 MiB \
             leaves nothing of 1 vCPUs and 4096 MiB"
        );
    }
}
