//! One `kiln host` call, start to answer: the command line parses into a
//! [`Call`], and [`answer`] runs it and gives the JSON document to print.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::wire::{Failure, FailureKind, Reply};
use super::{Host, HostError};
use crate::grant::Grant;
use crate::host_key::HostKey;

/// What a caller can ask a host.
#[derive(Clone, Debug)]
pub enum Call {
    Info,
    /// The grant, as JSON (read from standard input by the command line),
    /// and the file of the SSH host key its VM is to serve (an OpenSSH
    /// private key; a fresh one when None).
    Provision {
        grant: Vec<u8>,
        host_key: Option<PathBuf>,
    },
    Status(String),
    Usage(String),
    Terminate(String),
    Abandon(String),
    List,
}

/// Runs `call` on the host whose state is in `home`: the reply, as one
/// line of JSON, and whether it reports success.
pub fn answer(home: &Path, call: Call) -> (String, bool) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let f = Failure::new(FailureKind::Transient, format!("cannot start: {e}"));
            return (render::<()>(&Reply::Error(f)), false);
        }
    };
    runtime.block_on(async {
        match call {
            Call::Info => reply(Host::open(home).and_then(|h| h.info())),
            Call::Provision { grant, host_key } => {
                let grant = serde_json::from_slice::<Grant>(&grant)
                    .map_err(|e| format!("invalid grant: {e}"));
                let host_key = host_key.as_deref().map(read_host_key).transpose();
                match (grant, host_key) {
                    (Ok(grant), Ok(key)) => reply(
                        open_then(home, |h| async move { h.provision(&grant, key).await }).await,
                    ),
                    (Err(message), _) | (_, Err(message)) => {
                        let f = Failure::new(FailureKind::Usage, message);
                        (render::<()>(&Reply::Error(f)), false)
                    }
                }
            }
            Call::Status(id) => reply(Host::open(home).and_then(|h| h.status(&id))),
            Call::Usage(id) => reply(open_then(home, |h| async move { h.usage(&id).await }).await),
            Call::Terminate(id) => {
                reply(open_then(home, |h| async move { h.terminate(&id).await }).await)
            }
            Call::Abandon(id) => {
                reply(open_then(home, |h| async move { h.abandon(&id).await }).await)
            }
            Call::List => reply(Host::open(home).map(|h| h.list())),
        }
    })
}

/// The host key file a provision was given, or why it cannot be used.
fn read_host_key(path: &Path) -> Result<HostKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the host key {}: {e}", path.display()))?;
    HostKey::from_openssh(&text)
        .map_err(|e| format!("host key {}: {}", path.display(), crate::error_chain(&e)))
}

async fn open_then<T, F, Fut>(home: &Path, f: F) -> Result<T, HostError>
where
    F: FnOnce(Host) -> Fut,
    Fut: std::future::Future<Output = Result<T, HostError>>,
{
    f(Host::open(home)?).await
}

fn reply<T: Serialize>(outcome: Result<T, HostError>) -> (String, bool) {
    match outcome {
        Ok(v) => (render(&Reply::Ok(v)), true),
        Err(e) => (render::<T>(&Reply::Error(e.failure())), false),
    }
}

fn render<T: Serialize>(reply: &Reply<T>) -> String {
    serde_json::to_string(reply).unwrap_or_else(|e| {
        // Only a value that cannot be JSON gets here; say so as JSON.
        let f = Failure::new(FailureKind::Fatal, format!("cannot encode the reply: {e}"));
        serde_json::to_string(&Reply::<()>::Error(f)).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_host_key_is_refused_before_anything_boots() {
        let home = tempfile::tempdir().unwrap();
        let grant = br#"{"id":"g1","image":"x","vcpus":1,"ram_mib":256,"region":"r","tdx":"no","ssh_keys":[],"valid_to":"2030-01-01T00:00:00Z","submitted_at":"2030-01-01T00:00:00Z"}"#;
        let bad = home.path().join("bad-key");
        std::fs::write(&bad, "ssh-ed25519 AAAA not a private key\n").unwrap();
        for (key, says) in [
            (bad, "not an OpenSSH private key"),
            (home.path().join("none"), "cannot read the host key"),
        ] {
            let (reply, ok) = answer(
                home.path(),
                Call::Provision {
                    grant: grant.to_vec(),
                    host_key: Some(key.clone()),
                },
            );
            assert!(!ok, "{reply}");
            let Ok(Reply::<()>::Error(f)) = super::super::wire::parse_reply(reply.as_bytes())
            else {
                panic!("{reply}");
            };
            assert_eq!(f.kind, FailureKind::Usage);
            assert!(
                f.message.contains(says) && f.message.contains(&*key.to_string_lossy()),
                "{}",
                f.message
            );
        }
        // Nothing was claimed or started.
        assert!(!home.path().join("grants").exists());
        assert!(!home.path().join("claims").exists());
    }
}
