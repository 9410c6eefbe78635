//! Registry credentials from Docker's `config.json` (`auths` entries).
//! Credential helpers are not run: kiln never executes foreign programs
//! to get secrets; such entries are logged and skipped.

use base64::Engine as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` (as written in references, `docker.io` for
/// Docker Hub) from the config file at `path`, if any.
pub fn lookup(path: &Path, registry: &str) -> Option<Credentials> {
    let bytes = std::fs::read(path).ok()?;
    let config: DockerConfig = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable docker config");
            return None;
        }
    };
    let mut keys = vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ];
    if registry == crate::reference::DOCKER_HUB {
        keys.push("https://index.docker.io/v1/".to_string());
        keys.push("index.docker.io".to_string());
    }
    let entry = keys.iter().find_map(|k| config.auths.get(k));
    let Some(entry) = entry else {
        if config.creds_store.is_some() {
            tracing::info!("docker credential helpers are not supported; pulling anonymously");
        }
        return None;
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        });
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.as_deref()?.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auth_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "user:pa:ss" — a password may contain ':'.
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
                "127.0.0.1:5000":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let hub = lookup(&path, "docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(lookup(&path, "127.0.0.1:5000").unwrap().username, "u");
        assert_eq!(lookup(&path, "ghcr.io"), None);
        assert_eq!(lookup(&dir.path().join("missing"), "docker.io"), None);
    }
}
