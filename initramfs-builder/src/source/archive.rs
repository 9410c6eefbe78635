//! `docker save` archives: `manifest.json` names the config and the layer
//! tars (uncompressed, checked against the config's diff_ids), all read in
//! place from the archive.

use super::files::{Files, TarFiles};
use super::{FileLayers, Resolved, SourceError};
use crate::digest::Digest;
use crate::image::{ConfigFile, ImageError, MAX_JSON};
use crate::layers::Expected;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub struct DockerArchive {
    files: TarFiles,
    origin: PathBuf,
    paths: Vec<String>,
}

impl DockerArchive {
    pub fn open(path: &Path) -> Result<DockerArchive, SourceError> {
        Ok(DockerArchive {
            files: TarFiles::open(path)?,
            origin: path.to_path_buf(),
            paths: Vec::new(),
        })
    }

    pub fn describe(&self) -> String {
        format!("docker-archive:{}", self.origin.display())
    }

    pub fn resolve(&mut self) -> Result<Resolved, SourceError> {
        let manifest = self.files.read_small("manifest.json", MAX_JSON)?;
        let entries: Vec<Entry> =
            serde_json::from_slice(&manifest).map_err(|source| SourceError::Json {
                what: "manifest.json",
                source,
            })?;
        let entry = match entries.as_slice() {
            [one] => one,
            many => {
                let tags: Vec<String> = many
                    .iter()
                    .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                    .collect();
                return Err(SourceError::Ambiguous {
                    count: many.len(),
                    have: tags.join(", "),
                });
            }
        };
        let config_bytes = self.files.read_small(&entry.config, MAX_JSON)?;
        let config = ConfigFile::parse(&config_bytes)?;
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(ImageError::LayerCount {
                layers: entry.layers.len(),
                diff_ids: config.rootfs.diff_ids.len(),
            }
            .into());
        }
        self.paths = entry.layers.clone();
        let layers = config
            .rootfs
            .diff_ids
            .iter()
            .map(|d| Expected {
                blob: None,
                diff_id: Some(d.clone()),
                blob_verified: false,
            })
            .collect();
        Ok(Resolved {
            layer_sizes: vec![0; entry.layers.len()],
            manifest: None,
            config_digest: Digest::of(&config_bytes),
            config,
            layers,
        })
    }

    pub fn layers(&self, r: &Resolved) -> FileLayers<&dyn Files> {
        FileLayers {
            files: &self.files,
            paths: self.paths.clone(),
            expect: r.layers.clone(),
        }
    }
}
