//! Image references as `docker pull` reads them: `alpine` means
//! `docker.io/library/alpine:latest`; a first component with a dot, a
//! port or `localhost` is a registry host.

use crate::digest::{Digest, DigestError};
use std::fmt;

pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid repository name {0:?}")]
    Repository(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest")]
    Digest(#[from] DigestError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (and port) as written, `docker.io` by default.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so a registry port is not one.
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        let (registry, mut repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
                    && c != "."
                    && c != ".."
            });
        if !repo_ok {
            return Err(ReferenceError::Repository(repository));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(ReferenceError::Tag(t.clone()));
            }
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to talk to.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the manifests endpoint for: the digest wins over a tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_defaults() {
        assert_eq!(p("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(p("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(
            p("docker.io/library/debian:bookworm"),
            "docker.io/library/debian:bookworm"
        );
        assert_eq!(p("index.docker.io/foo/bar"), "docker.io/foo/bar:latest");
        assert_eq!(
            p("127.0.0.1:5001/test/busybox:1"),
            "127.0.0.1:5001/test/busybox:1"
        );
        assert_eq!(p("localhost/x"), "localhost/x:latest");
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "org/app")
        );
        assert_eq!((r.tag, r.digest), (None, Some(d.clone())));
        assert_eq!(
            Reference::parse("alpine").unwrap().api_host(),
            "registry-1.docker.io"
        );
        let both = Reference::parse(&format!("a:1@{d}")).unwrap();
        assert_eq!(both.manifest_ref(), d.to_string());
    }

    #[test]
    fn refuses_bad_names() {
        assert!(matches!(
            Reference::parse("Alpine"),
            Err(ReferenceError::Repository(_))
        ));
        assert!(matches!(
            Reference::parse("a/../b"),
            Err(ReferenceError::Repository(_))
        ));
        assert!(matches!(
            Reference::parse("a:b c"),
            Err(ReferenceError::Tag(_))
        ));
        assert!(matches!(
            Reference::parse("a@sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(Reference::parse(""), Err(ReferenceError::Empty)));
    }
}
