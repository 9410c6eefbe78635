//! Builds the configured backends, in order. Each backend kind is one
//! variant of [`BackendSection`] (in `config`) and one arm of `build_one`.

pub mod aws;
pub mod cloud;
pub mod gcp;
pub mod local;
pub mod ssh;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Backend;
use crate::capacity::{CapacityError, CapacityLedger, Resources};
use crate::config::BackendSection;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Backend {0}: unusable GCP settings")]
    Cloud(String, #[source] gcp::GcpError),
    #[error("Backend {0}: rootfs must be {words}, not {1:?}", words = kiln_image::root::Rootfs::WORDS)]
    Rootfs(String, String),
    #[error("Backend {0} has an unusable capacity")]
    Capacity(String, #[source] CapacityError),
    #[error("Backend {backend}, host {host}: identity_file {}: {problem}", .path.display())]
    Identity {
        backend: String,
        host: String,
        path: PathBuf,
        problem: String,
    },
}

/// What every backend may need from the rest of the configuration.
#[derive(Clone)]
pub struct BuildContext {
    /// This host's region label.
    pub region: String,
    /// kilnd's state directory.
    pub state_dir: PathBuf,
    /// Registries reached over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// This bridge's identity: cloud instances are tagged with it, and a
    /// bridge only ever reaps its own.
    pub bridge_id: String,
    /// Which grants the bridge still holds, for backends that find
    /// instances on their own (a cloud's listing by tag) and end those no
    /// grant owns. None: such backends reap nothing.
    pub live_grants: Option<Arc<dyn LiveGrants>>,
}

/// Answers whether a grant is still the bridge's to run (stored, and not
/// ended).
pub trait LiveGrants: Send + Sync {
    /// True when unsure (the store cannot be read): an instance is only
    /// reaped when its grant is known to be over or unknown.
    fn is_live(&self, grant_id: &str) -> bool;
}

/// The ledger of backend `name`: a host with `total` resources, less
/// `reserve`, its CPUs scaled by `overcommit`; an error names the backend.
pub(crate) fn ledger_for(
    name: &str,
    total: Resources,
    reserve: Resources,
    overcommit: Option<f64>,
) -> Result<CapacityLedger, BuildError> {
    CapacityLedger::new(total, reserve, overcommit)
        .map_err(|e| BuildError::Capacity(name.to_string(), e))
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
        // Through the host's own code, as `kiln host` on an owned host.
        BackendSection::Local(s) => Ok(Arc::new(crate::host::Host::of(local::LocalBackend::new(
            s, ctx,
        )?))),
        BackendSection::Ssh(s) => Ok(Arc::new(ssh::SshBackend::new(s, ctx)?)),
        BackendSection::Aws(s) => {
            let api = aws::AwsApi::new(s);
            Ok(cloud::CloudBackend::new(
                s,
                ctx,
                Arc::new(api),
                cloud::user_data_renderer(s, crate::config::Cloud::Aws, &ctx.insecure_registries),
            ))
        }
        BackendSection::Gcp(s) => {
            let api = gcp::LazyGcpApi::new(
                s.project.clone().unwrap_or_default(),
                s.endpoint_url.clone(),
                s.credentials_file.clone(),
            )
            .map_err(|e| BuildError::Cloud(s.name.clone(), e))?;
            Ok(cloud::CloudBackend::new(
                s,
                ctx,
                Arc::new(api),
                cloud::user_data_renderer(s, crate::config::Cloud::Gcp, &ctx.insecure_registries),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LocalSection;

    fn ctx() -> BuildContext {
        BuildContext {
            region: "home".into(),
            state_dir: "/nonexistent".into(),
            insecure_registries: Vec::new(),
            bridge_id: "test".into(),
            live_grants: None,
        }
    }

    #[test]
    fn local_offers_its_configured_share_of_this_host() {
        let section = BackendSection::Local(LocalSection {
            name: Some("here".into()),
            vcpus: Some(3),
            ram_mib: Some(2048),
            reserve_vcpus: Some(1),
            reserve_ram_mib: Some(512),
            kiln_home: Some("/nonexistent".into()),
            ..LocalSection::default()
        });
        let built = build(&[section], &ctx()).unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].name(), "here");
        let caps = built[0].capabilities();
        assert_eq!(caps.regions.into_iter().collect::<Vec<_>>(), ["home"]);
        assert_eq!(caps.capacity.usable, Resources::new(2, 1536));
        assert_eq!(caps.capacity.used, Resources::default());
        assert!(build(&[], &ctx()).unwrap().is_empty());
    }

    #[test]
    fn the_ledger_applies_reserve_and_overcommit() {
        let reserve = Resources::new(1, 1024);
        let l = ledger_for("x", Resources::new(4, 4096), reserve, Some(2.0)).unwrap();
        assert_eq!(l.snapshot().usable, Resources::new(6, 3072));
        let e = ledger_for("x", Resources::new(1, 4096), reserve, Some(2.0)).unwrap_err();
        // Plain words, not Rust debug output.
        assert_eq!(
            crate::error_chain(&e),
            "Backend x has an unusable capacity: Reserve of 1 vCPUs and 1024 MiB \
             leaves nothing of 1 vCPUs and 4096 MiB"
        );
    }

    #[test]
    fn a_local_section_s_reserve_and_overcommit_reach_its_ledger() {
        let section = BackendSection::Local(LocalSection {
            vcpus: Some(4),
            ram_mib: Some(4096),
            reserve_vcpus: Some(1),
            reserve_ram_mib: Some(1024),
            overcommit: Some(2.0),
            kiln_home: Some("/nonexistent".into()),
            ..LocalSection::default()
        });
        let built = build(&[section], &ctx()).unwrap();
        assert_eq!(
            built[0].capabilities().capacity.usable,
            Resources::new(6, 3072)
        );
        let too_much = BackendSection::Local(LocalSection {
            vcpus: Some(1),
            reserve_vcpus: Some(1),
            kiln_home: Some("/nonexistent".into()),
            ..LocalSection::default()
        });
        let Err(e) = build(&[too_much], &ctx()) else {
            panic!("a reserve of every vCPU was accepted");
        };
        assert!(
            matches!(e, BuildError::Capacity(ref name, _) if name == "local"),
            "{e:?}"
        );
    }
}
