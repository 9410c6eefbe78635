//! The OCI / Docker JSON documents kiln reads (manifests, indexes, image
//! configs), linux/amd64 selection, and the run config handed to the agent.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest type kiln understands, for `Accept` headers.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Larger manifests or configs than this are refused unread.
pub const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("malformed {what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("no linux/amd64 image in the index (it has: {0})")]
    NoPlatform(String),
    #[error("image is {os}/{arch}, kiln needs linux/amd64")]
    WrongPlatform { os: String, arch: String },
    #[error("unsupported manifest type {0:?}")]
    MediaType(String),
    #[error("image has {layers} layers but its config lists {diff_ids} diff_ids")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("indexes nested too deeply")]
    TooDeep,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: Digest,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A manifest document is either one image or an index of them.
pub enum Document {
    Manifest(Manifest),
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    schema_version: Option<u32>,
}

impl Document {
    /// Parses by the document's own media type (the header may be absent,
    /// as in OCI layouts), falling back on its shape.
    pub fn parse(bytes: &[u8], header_type: Option<&str>) -> Result<Document, ImageError> {
        let json = |source| ImageError::Json {
            what: "manifest",
            source,
        };
        let probe: Probe = serde_json::from_slice(bytes).map_err(json)?;
        let ty = probe.media_type.as_deref().or(header_type).unwrap_or("");
        match ty {
            OCI_INDEX | DOCKER_LIST => Ok(Document::Index(
                serde_json::from_slice(bytes).map_err(json)?,
            )),
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(Document::Manifest(
                serde_json::from_slice(bytes).map_err(json)?,
            )),
            "" if probe.manifests.is_some() => Ok(Document::Index(
                serde_json::from_slice(bytes).map_err(json)?,
            )),
            "" if probe.schema_version == Some(2) => Ok(Document::Manifest(
                serde_json::from_slice(bytes).map_err(json)?,
            )),
            other => Err(ImageError::MediaType(other.to_string())),
        }
    }
}

impl Index {
    /// The linux/amd64 entry; one without a variant (or `v1`) is preferred
    /// because it runs on every amd64 CPU.
    pub fn pick_amd64(&self) -> Result<&Descriptor, ImageError> {
        let amd64 = |d: &&Descriptor| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        };
        let mut candidates: Vec<&Descriptor> = self.manifests.iter().filter(amd64).collect();
        candidates.sort_by_key(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.clone());
            match v.as_deref() {
                None | Some("v1") => 0,
                _ => 1,
            }
        });
        candidates.first().copied().ok_or_else(|| {
            let have: Vec<String> = self
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            ImageError::NoPlatform(have.join(", "))
        })
    }
}

/// The parts of an image config kiln uses.
#[derive(Clone, Debug, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl ConfigFile {
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile, ImageError> {
        let c: ConfigFile = serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "image config",
            source,
        })?;
        if c.os != "linux" || c.architecture != "amd64" {
            return Err(ImageError::WrongPlatform {
                os: c.os,
                arch: c.architecture,
            });
        }
        Ok(c)
    }
}

/// What the agent reads from `/kiln/config.json`. Field order is fixed
/// by the struct, so the bytes are deterministic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentConfig {
    /// The image's config digest (its identity).
    pub image: Digest,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// Where the image's own `/init` was moved, if it had one.
    pub image_init: Option<String>,
}

impl AgentConfig {
    pub fn new(image: Digest, run: &RunConfig) -> AgentConfig {
        AgentConfig {
            image,
            entrypoint: run.entrypoint.clone().unwrap_or_default(),
            cmd: run.cmd.clone().unwrap_or_default(),
            env: run.env.clone().unwrap_or_default(),
            working_dir: run.working_dir.clone().unwrap_or_default(),
            user: run.user.clone().unwrap_or_default(),
            image_init: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_amd64_from_an_index() {
        let d = |arch: &str, variant: Option<&str>, n: u8| {
            serde_json::json!({"mediaType": OCI_MANIFEST, "size": 1,
                "digest": Digest::of(&[n]).to_string(),
                "platform": {"os": "linux", "architecture": arch, "variant": variant}})
        };
        let idx = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [d("arm64", Some("v8"), 1), d("amd64", Some("v3"), 2), d("amd64", None, 3)]});
        let Ok(Document::Index(i)) = Document::parse(idx.to_string().as_bytes(), None) else {
            panic!("not an index");
        };
        assert_eq!(i.pick_amd64().unwrap().digest, Digest::of(&[3]));
        let arm = Index {
            media_type: None,
            manifests: vec![serde_json::from_value(d("arm64", None, 1)).unwrap()],
        };
        assert!(matches!(arm.pick_amd64(), Err(ImageError::NoPlatform(p)) if p == "linux/arm64"));
    }

    #[test]
    fn refuses_other_platform_configs() {
        let c =
            br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(matches!(
            ConfigFile::parse(c),
            Err(ImageError::WrongPlatform { .. })
        ));
    }
}
