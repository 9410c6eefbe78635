//! OCI image layouts, as a directory or as an OCI archive (a tar of one):
//! `index.json` picks the image (by `org.opencontainers.image.ref.name`,
//! or the only one), blobs live under `blobs/sha256/`.

use super::files::{DirFiles, Files, TarFiles};
use super::{blob_path, resolve, FileLayers, Resolved, SourceError};
use crate::image::{Index, MAX_JSON};
use std::path::{Path, PathBuf};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub struct Layout {
    files: Box<dyn Files>,
    tag: Option<String>,
    origin: PathBuf,
}

impl Layout {
    /// `PATH[:TAG]`; a path that exists as written is taken whole, so
    /// paths containing ':' still work.
    pub fn open(spec: &str) -> Result<Layout, SourceError> {
        let (path, tag) = if Path::new(spec).exists() {
            (PathBuf::from(spec), None)
        } else {
            match spec.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') => (PathBuf::from(p), Some(t.to_string())),
                _ => (PathBuf::from(spec), None),
            }
        };
        let files: Box<dyn Files> = if path.is_dir() {
            Box::new(DirFiles(path.clone()))
        } else if path.is_file() {
            Box::new(TarFiles::open(&path)?)
        } else {
            return Err(SourceError::Io(
                path.display().to_string(),
                std::io::ErrorKind::NotFound.into(),
            ));
        };
        // The layout marker: anything else is not an OCI layout.
        files.read_small("oci-layout", 4096)?;
        Ok(Layout {
            files,
            tag,
            origin: path,
        })
    }

    pub fn describe(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.origin.display()),
            None => format!("oci:{}", self.origin.display()),
        }
    }

    pub fn resolve(&mut self) -> Result<Resolved, SourceError> {
        let index_bytes = self.files.read_small("index.json", MAX_JSON)?;
        let index: Index =
            serde_json::from_slice(&index_bytes).map_err(|source| SourceError::Json {
                what: "index.json",
                source,
            })?;
        let tags = || {
            let v: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            v.join(", ")
        };
        let top = match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME) == Some(tag))
                .ok_or_else(|| SourceError::NoTag {
                    tag: tag.clone(),
                    have: tags(),
                })?,
            None if index.manifests.len() == 1 => &index.manifests[0],
            None => {
                return Err(SourceError::Ambiguous {
                    count: index.manifests.len(),
                    have: tags(),
                })
            }
        };
        let files = &self.files;
        let mut fetch =
            |d: &crate::digest::Digest, _: resolve::Kind| files.read_small(&blob_path(d), MAX_JSON);
        let doc = resolve::fetch_verified(&mut fetch, &top.digest, resolve::Kind::Manifest)?;
        resolve::resolve(
            doc,
            top.digest.clone(),
            top.media_type.as_deref(),
            &mut fetch,
        )
    }

    pub fn layers(&self, r: &Resolved) -> FileLayers<&dyn Files> {
        FileLayers {
            files: &*self.files,
            paths: r
                .layers
                .iter()
                .filter_map(|e| e.blob.as_ref().map(blob_path))
                .collect(),
            expect: r.layers.clone(),
        }
    }
}
