//! A small blocking client for kilnd's API, for the `kiln` CLI and tests.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::api::ErrorBody;
use crate::api::GrantList;
use crate::fleet::ProviderCard;
use crate::grant::GrantRequest;
use crate::view::{GrantView, UsageView};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kilnd answered {status}: {}", body.error)]
    Api { status: u16, body: ErrorBody },
    #[error("Cannot reach kilnd")]
    Transport(#[source] Box<ureq::Transport>),
    #[error("Unreadable answer from kilnd")]
    Read(#[source] std::io::Error),
    #[error("Unexpected answer from kilnd")]
    Decode(#[source] serde_json::Error),
    /// An error status without kilnd's JSON body: not kilnd answering (a
    /// proxy, another server on that port), or a kilnd that crashed.
    #[error("Not kilnd's answer (HTTP {status}: {text})")]
    Foreign { status: u16, text: String },
    #[error("Cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// The CA given for kilnd's certificate is not a PEM certificate, or
    /// the TLS library refused it.
    #[error("Unusable CA certificate")]
    Ca(#[source] native_tls::Error),
}

impl ClientError {
    /// The field kilnd blamed, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => body.field.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, for errors kilnd answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Talks to one kilnd.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// `base_url` like `http://127.0.0.1:7878`; an `https://` one is
    /// checked against the system's CAs.
    pub fn new(base_url: &str, token: &str) -> Self {
        Client::with_agent(base_url, token, agent_builder())
    }

    /// As [`Client::new`], trusting only `ca_pem` (a PEM certificate) for
    /// an `https://` kilnd: a private CA, or kilnd's self-signed
    /// certificate.
    pub fn with_ca(base_url: &str, token: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let ca = native_tls::Certificate::from_pem(ca_pem).map_err(ClientError::Ca)?;
        let tls = native_tls::TlsConnector::builder()
            .add_root_certificate(ca)
            .disable_built_in_roots(true)
            .build()
            .map_err(ClientError::Ca)?;
        Ok(Client::with_agent(
            base_url,
            token,
            agent_builder().tls_connector(std::sync::Arc::new(tls)),
        ))
    }

    fn with_agent(base_url: &str, token: &str, agent: ureq::AgentBuilder) -> Self {
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent: agent.build(),
        }
    }

    pub fn submit(&self, request: &GrantRequest) -> Result<GrantView, ClientError> {
        let body = serde_json::to_string(request).map_err(ClientError::Encode)?;
        self.submit_json(&body)
    }

    /// Submits a request body as is (e.g. read from a file).
    pub fn submit_json(&self, body: &str) -> Result<GrantView, ClientError> {
        let req = self
            .request("POST", "/v1/grants")
            .set("Content-Type", "application/json");
        decode(req.send_string(body))
    }

    pub fn list(&self) -> Result<Vec<GrantView>, ClientError> {
        let list: GrantList = decode(self.request("GET", "/v1/grants").call())?;
        Ok(list.grants)
    }

    pub fn show(&self, id: &str) -> Result<GrantView, ClientError> {
        decode(
            self.request("GET", &format!("/v1/grants/{}", encode_segment(id)))
                .call(),
        )
    }

    pub fn usage(&self, id: &str) -> Result<UsageView, ClientError> {
        decode(
            self.request("GET", &format!("/v1/grants/{}/usage", encode_segment(id)))
                .call(),
        )
    }

    /// Stops a grant; harmless if it has already ended.
    pub fn terminate(&self, id: &str) -> Result<GrantView, ClientError> {
        decode(
            self.request("DELETE", &format!("/v1/grants/{}", encode_segment(id)))
                .call(),
        )
    }

    pub fn capabilities(&self) -> Result<ProviderCard, ClientError> {
        decode(self.request("GET", "/v1/capabilities").call())
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }
}

fn agent_builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        // Terminating waits for the instance to stop.
        .timeout_read(Duration::from_secs(120))
}

fn decode<T: DeserializeOwned>(
    result: Result<ureq::Response, ureq::Error>,
) -> Result<T, ClientError> {
    match result {
        Ok(response) => {
            let text = response.into_string().map_err(ClientError::Read)?;
            serde_json::from_str(&text).map_err(ClientError::Decode)
        }
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().map_err(ClientError::Read)?;
            match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => Err(ClientError::Api { status, body }),
                // Its first line, briefly, so the error stays one line.
                Err(_) => Err(ClientError::Foreign {
                    status,
                    text: text
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty())
                        .unwrap_or("empty body")
                        .chars()
                        .take(120)
                        .collect(),
                }),
            }
        }
        Err(ureq::Error::Transport(t)) => Err(ClientError::Transport(Box::new(t))),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so an
/// id typed by a user cannot change the path.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        let e = super::Client::with_ca("https://127.0.0.1:1", "t", b"not a certificate")
            .err()
            .unwrap();
        assert!(matches!(e, super::ClientError::Ca(_)), "{e:?}");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(encode_segment("g-1.a_b~"), "g-1.a_b~");
        assert_eq!(encode_segment("../x y"), "..%2Fx%20y");
    }
}
