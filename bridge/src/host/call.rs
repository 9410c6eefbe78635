//! One `kiln host` call, start to answer: the command line parses into a
//! [`Call`], and [`answer`] runs it and gives the JSON document to print.

use std::path::Path;

use serde::Serialize;

use super::wire::{Failure, FailureKind, Reply};
use super::{Host, HostError};
use crate::grant::Grant;

/// What a caller can ask a host.
#[derive(Clone, Debug)]
pub enum Call {
    Info,
    /// The grant, as JSON (read from standard input by the command line).
    Provision(Vec<u8>),
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
            Call::Provision(json) => match serde_json::from_slice::<Grant>(&json) {
                Ok(grant) => {
                    reply(open_then(home, |h| async move { h.provision(&grant).await }).await)
                }
                Err(e) => {
                    let f = Failure::new(FailureKind::Usage, format!("invalid grant: {e}"));
                    (render::<()>(&Reply::Error(f)), false)
                }
            },
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
