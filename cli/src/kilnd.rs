//! Reaching kilnd from the command line: where it is, the token, and its
//! errors as one line and an exit code.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_bridge::client::{Client, ClientError};

/// Exit code when kilnd cannot be reached or answers something unreadable.
pub const UNREACHABLE: i32 = 3;

const DEFAULT_TOKEN_FILE: &str = "/etc/kiln/kilnd.token";

/// Where kilnd listens and how to authenticate; given after any subcommand.
#[derive(Args, Clone, Debug)]
pub struct KilndArgs {
    /// kilnd's API address.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "KILN_BRIDGE_URL",
        default_value = "http://127.0.0.1:7878"
    )]
    pub bridge: String,
    /// File holding the bearer token [default: $KILN_BRIDGE_TOKEN (the
    /// token itself), else /etc/kiln/kilnd.token].
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate of the CA that signed kilnd's TLS certificate (or
    /// that certificate itself), trusted instead of the system's CAs for
    /// an https:// URL.
    #[arg(long, global = true, value_name = "FILE", env = "KILN_BRIDGE_CA")]
    pub ca: Option<PathBuf>,
}

impl KilndArgs {
    pub fn client(&self) -> Result<Kilnd> {
        let token = self.token()?;
        let client = match &self.ca {
            None => Client::new(&self.bridge, &token),
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read the CA file {}", path.display()))?;
                Client::with_ca(&self.bridge, &token, &pem)
                    .with_context(|| format!("the CA file {}", path.display()))?
            }
        };
        Ok(Kilnd {
            client,
            url: self.bridge.clone(),
        })
    }

    fn token(&self) -> Result<String> {
        let path = match (&self.token_file, std::env::var("KILN_BRIDGE_TOKEN")) {
            (Some(path), _) => path.clone(),
            (None, Ok(token)) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
            (None, _) => PathBuf::from(DEFAULT_TOKEN_FILE),
        };
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(
            !token.is_empty(),
            "the token file {} is empty",
            path.display()
        );
        Ok(token.to_string())
    }
}

/// A client that remembers its address, for messages.
pub struct Kilnd {
    pub client: Client,
    url: String,
}

impl Kilnd {
    /// A client error as the one line kiln prints.
    pub fn error(&self, error: ClientError) -> KilndError {
        KilndError {
            error,
            url: self.url.clone(),
            flag: None,
        }
    }
}

/// A failed call to kilnd, printed whole (no source chain: the message
/// already says everything).
#[derive(Debug)]
pub struct KilndError {
    error: ClientError,
    url: String,
    /// The flag behind the field kilnd blamed, when known.
    flag: Option<String>,
}

impl KilndError {
    /// Names the flag behind the field kilnd blamed, if `flag_of` knows it.
    pub fn blaming(mut self, flag_of: impl FnOnce(&str) -> Option<String>) -> Self {
        self.flag = self.error.field().and_then(flag_of);
        self
    }

    /// 1 when kilnd refused, [`UNREACHABLE`] when it could not be asked.
    pub fn exit_code(&self) -> i32 {
        match self.error {
            ClientError::Api { .. } | ClientError::Encode(_) => 1,
            _ => UNREACHABLE,
        }
    }
}

impl fmt::Display for KilndError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            ClientError::Api { status, body } => {
                write!(f, "kilnd: {}", body.error)?;
                match (&self.flag, &body.field, status) {
                    (Some(flag), _, _) => write!(f, " (check {flag})"),
                    (None, Some(field), _) => write!(f, " (field {field})"),
                    (None, None, 401) => write!(f, " (check --token-file or KILN_BRIDGE_TOKEN)"),
                    (None, None, 500..) => write!(f, " (HTTP {status}; see kilnd's log)"),
                    _ => Ok(()),
                }
            }
            ClientError::Transport(t) => {
                write!(f, "cannot reach kilnd at {}: {}", self.url, t.kind())?;
                if let Some(m) = t.message() {
                    write!(f, ": {m}")?;
                }
                write_sources(f, t.as_ref())?;
                write!(f, " (is kilnd running? check --bridge or KILN_BRIDGE_URL)")
            }
            other => {
                write!(f, "{other} at {}", self.url)?;
                write_sources(f, other)
            }
        }
    }
}

fn write_sources(f: &mut fmt::Formatter<'_>, e: &dyn std::error::Error) -> fmt::Result {
    let mut source = e.source();
    while let Some(s) = source {
        write!(f, ": {s}")?;
        source = s.source();
    }
    Ok(())
}

impl std::error::Error for KilndError {}

/// The exit code for an error of a kilnd command.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<KilndError>())
        .map_or(1, KilndError::exit_code)
}
