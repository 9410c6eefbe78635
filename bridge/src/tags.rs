//! Pins a grant's image at submit: a tag is resolved to the digest it names
//! now (one manifest request to its registry), and the grant runs exactly
//! that digest, however often the tag moves later. Answers are kept for a
//! short time, so a burst of grants for one tag asks the registry once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_image::reference::Reference;
use kiln_image::registry::client::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("cannot resolve the tag of {0}")]
    Registry(String, #[source] RegistryError),
    #[error("the tag lookup task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Recent answers, by reference as the requester wrote it.
pub struct TagResolver {
    ttl: Duration,
    /// Registries spoken to over plain HTTP.
    insecure: Vec<String>,
    recent: Mutex<HashMap<String, (Instant, String)>>,
}

impl TagResolver {
    /// Answers are reused for `ttl` (zero: never).
    pub fn new(ttl: Duration, insecure: Vec<String>) -> TagResolver {
        TagResolver {
            ttl,
            insecure,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// The manifest digest (`sha256:...`) `reference` names now; None
    /// when it already names one (nothing to pin).
    pub async fn resolve(&self, reference: &Reference) -> Result<Option<String>, TagError> {
        if reference.digest.is_some() {
            return Ok(None);
        }
        let key = reference.to_string();
        if let Some(digest) = self.cached(&key) {
            return Ok(Some(digest));
        }
        let r = reference.clone();
        let insecure = self.insecure.clone();
        // The registry client blocks; it must not hold up the runtime.
        let digest = tokio::task::spawn_blocking(move || {
            kiln_image::registry::resolve_tag(&r, &insecure, None)
        })
        .await
        .map_err(TagError::Task)?
        .map_err(|e| TagError::Registry(key.clone(), e))?
        .to_string();
        self.lock().insert(key, (Instant::now(), digest.clone()));
        Ok(Some(digest))
    }

    fn cached(&self, key: &str) -> Option<String> {
        let mut recent = self.lock();
        recent.retain(|_, (at, _)| at.elapsed() < self.ttl);
        recent.get(key).map(|(_, d)| d.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, String)>> {
        // Each update is one insert or retain; a poisoned map is whole.
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `image` pinned to `digest`: `registry/repo:tag@digest`, which builds
/// the digest (the tag stays for people reading it).
pub fn pinned(image: &str, digest: &str) -> String {
    match Reference::parse(image) {
        Ok(r) if r.digest.is_none() => format!("{r}@{digest}"),
        _ => image.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_pinned_and_a_digest_left_alone() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            pinned("127.0.0.1:5000/kiln/busybox:1", &d),
            format!("127.0.0.1:5000/kiln/busybox:1@{d}")
        );
        assert_eq!(
            pinned("alpine", &d),
            format!("docker.io/library/alpine:latest@{d}")
        );
        let by_digest = format!("127.0.0.1:5000/x@{d}");
        assert_eq!(pinned(&by_digest, &d), by_digest);
        let pinned = Reference::parse(&pinned("127.0.0.1:5000/x:1", &d)).unwrap();
        assert_eq!(pinned.manifest_ref(), d);
    }

    #[tokio::test]
    async fn a_digest_needs_no_registry() {
        let r = Reference::parse(&format!("127.0.0.1:1/x@sha256:{}", "b".repeat(64))).unwrap();
        assert_eq!(
            TagResolver::new(Duration::ZERO, Vec::new())
                .resolve(&r)
                .await
                .unwrap(),
            None
        );
    }
}
