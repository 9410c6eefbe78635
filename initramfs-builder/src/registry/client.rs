//! A minimal OCI distribution v2 client: manifests and blobs of one
//! repository, with anonymous, basic and bearer-token auth. Plain HTTP is
//! used only for loopback hosts and registries the user lists as insecure.

use super::challenge;
use super::credentials::Credentials;
use crate::digest::{Digest, HashingReader};
use crate::reference::Reference;
use base64::Engine as _;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach {url}")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} refused the credentials (HTTP {status})")]
    Unauthorized { url: String, status: u16 },
    #[error("unsupported authentication challenge {0:?}")]
    Challenge(String),
    #[error("token endpoint {0} must be HTTPS")]
    InsecureRealm(String),
    #[error("token response from {0} has no token")]
    Token(String),
    #[error("cannot set up TLS")]
    Tls(#[source] native_tls::Error),
    #[error("reading {url}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: response larger than {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error("{what} {expected} arrived with digest {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
}

/// Hosts always spoken to over plain HTTP (nothing leaves the machine).
/// Whether `host` (or the registry as written) is in `insecure`: as
/// `host:port`, or as a bare host, which covers all its ports.
fn is_listed(insecure: &[String], host: &str, registry: &str) -> bool {
    let bare = |h: &str| -> String {
        match h.rsplit_once(':') {
            // A port, not the tail of a bracketed IPv6 address.
            Some((name, port))
                if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name.to_string()
            }
            _ => h.to_string(),
        }
    };
    insecure
        .iter()
        .any(|h| h == host || h == registry || *h == bare(host))
}

fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    repository: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
    plain_http: bool,
}

impl Client {
    pub fn new(
        reference: &Reference,
        insecure: &[String],
        credentials: Option<Credentials>,
    ) -> Result<Client, RegistryError> {
        let host = reference.api_host();
        let plain_http = is_loopback(host) || is_listed(insecure, host, &reference.registry);
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .redirects(5);
        // Loading the system's CA store is skipped when nothing needs it.
        if !plain_http {
            let tls = native_tls::TlsConnector::new().map_err(RegistryError::Tls)?;
            builder = builder.tls_connector(Arc::new(tls));
        }
        let agent = builder.build();
        let scheme = if plain_http { "http" } else { "https" };
        Ok(Client {
            agent,
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            repository: reference.repository.clone(),
            credentials,
            authorization: None,
            plain_http,
        })
    }

    /// GET with the current authorization; on 401, answers the challenge
    /// once and retries.
    fn get(&mut self, path: &str, accept: Option<&str>) -> Result<ureq::Response, RegistryError> {
        let url = format!("{}/{path}", self.base);
        for attempt in 0..2 {
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if let Some(auth) = &self.authorization {
                req = req.set("Authorization", auth);
            }
            match req.call() {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let header = resp.header("www-authenticate").unwrap_or("").to_string();
                    self.authenticate(&header)?;
                }
                Err(ureq::Error::Status(status @ (401 | 403), _)) => {
                    return Err(RegistryError::Unauthorized { url, status })
                }
                Err(ureq::Error::Status(status, _)) => {
                    return Err(RegistryError::Status { url, status })
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(RegistryError::Transport {
                        url,
                        source: Box::new(t),
                    })
                }
            }
        }
        Err(RegistryError::Unauthorized { url, status: 401 })
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    fn authenticate(&mut self, header: &str) -> Result<(), RegistryError> {
        let c =
            challenge::parse(header).ok_or_else(|| RegistryError::Challenge(header.to_string()))?;
        match c.scheme.as_str() {
            "basic" => {
                self.authorization = self.basic();
                if self.authorization.is_none() {
                    return Err(RegistryError::Challenge(header.to_string()));
                }
                Ok(())
            }
            "bearer" => {
                let realm = c
                    .params
                    .get("realm")
                    .ok_or_else(|| RegistryError::Challenge(header.to_string()))?;
                if realm.starts_with("http://") && !self.plain_http {
                    return Err(RegistryError::InsecureRealm(realm.clone()));
                }
                let scope = c
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                let mut req = self.agent.get(realm).query("scope", &scope);
                if let Some(service) = c.params.get("service") {
                    req = req.query("service", service);
                }
                if let Some(basic) = self.basic() {
                    req = req.set("Authorization", &basic);
                }
                let resp = match req.call() {
                    Ok(r) => r,
                    Err(ureq::Error::Status(status, _)) => {
                        return Err(RegistryError::Unauthorized {
                            url: realm.clone(),
                            status,
                        })
                    }
                    Err(ureq::Error::Transport(t)) => {
                        return Err(RegistryError::Transport {
                            url: realm.clone(),
                            source: Box::new(t),
                        })
                    }
                };
                let body = read_limited(resp, realm, 1 << 20)?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|_| RegistryError::Token(realm.clone()))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| RegistryError::Token(realm.clone()))?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(RegistryError::Challenge(header.to_string())),
        }
    }

    /// A manifest by tag or digest: its bytes, media type and digest. When
    /// asked by digest, the bytes must hash to it.
    pub fn manifest(
        &mut self,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>, Digest), RegistryError> {
        let resp = self.get(
            &format!("manifests/{reference}"),
            Some(crate::image::ACCEPT),
        )?;
        let media_type = resp
            .header("content-type")
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_string());
        let url = resp.get_url().to_string();
        let body = read_limited(resp, &url, crate::image::MAX_JSON)?;
        let actual = Digest::of(&body);
        if let Ok(expected) = Digest::parse(reference) {
            if expected != actual {
                return Err(RegistryError::DigestMismatch {
                    what: "manifest",
                    expected,
                    actual,
                });
            }
        }
        Ok((body, media_type, actual))
    }

    /// Streams a blob into `out`, checking its digest on the way;
    /// `progress` gets the running byte count.
    /// A hostile registry cannot stream more than `max` bytes (when the
    /// manifest declared a size) before being cut off.
    pub fn blob(
        &mut self,
        digest: &Digest,
        max: Option<u64>,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, RegistryError> {
        let resp = self.get(&format!("blobs/{digest}"), None)?;
        let url = resp.get_url().to_string();
        let read = |source| RegistryError::Read {
            url: url.clone(),
            source,
        };
        let mut r = HashingReader::new(resp.into_reader());
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).map_err(read)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(read)?;
            if let Some(max) = max.filter(|m| r.count() > *m) {
                return Err(RegistryError::TooLarge { url, max });
            }
            progress(r.count());
        }
        let (actual, n) = r.finish().map_err(read)?;
        if actual != *digest {
            return Err(RegistryError::DigestMismatch {
                what: "blob",
                expected: digest.clone(),
                actual,
            });
        }
        Ok(n)
    }
}

fn read_limited(resp: ureq::Response, url: &str, max: u64) -> Result<Vec<u8>, RegistryError> {
    let mut body = Vec::new();
    resp.into_reader()
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|source| RegistryError::Read {
            url: url.to_string(),
            source,
        })?;
    if body.len() as u64 > max {
        return Err(RegistryError::TooLarge {
            url: url.to_string(),
            max,
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(is_listed(
            &["10.0.0.5".into()],
            "10.0.0.5:5000",
            "10.0.0.5:5000"
        ));
        assert!(is_listed(
            &["10.0.0.5:5000".into()],
            "10.0.0.5:5000",
            "10.0.0.5:5000"
        ));
        assert!(!is_listed(
            &["10.0.0.5:5001".into()],
            "10.0.0.5:5000",
            "10.0.0.5:5000"
        ));
        assert!(!is_listed(
            &["10.0.0.50".into()],
            "10.0.0.5:5000",
            "10.0.0.5:5000"
        ));
        assert!(is_listed(
            &["[fd00::5]".into()],
            "[fd00::5]:5000",
            "[fd00::5]:5000"
        ));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("127.0.0.1.example.com"));
        assert!(!is_loopback("registry.example"));
    }
}
