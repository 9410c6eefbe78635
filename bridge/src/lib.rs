//! kiln-bridge: turns grants (run this image, with these resources, for
//! these SSH keys, until then) into running instances on a fleet of
//! backends, and keeps track of them across restarts.
//!
//! It holds the grant model, the `Backend` trait, the capacity ledger, the
//! fleet router, the grant manager with its SQLite state, kilnd's HTTP API
//! and configuration, a blocking client, and `machine`, which launches
//! `kiln-vmm` processes and talks to their agents (`kiln run` and the local
//! backend both use it). It must not talk to KVM directly.

pub mod api;
pub mod backend;
pub mod backends;
pub mod bridge_id;
pub mod bundle;
pub mod capacity;
pub mod client;
pub mod config;
pub mod dir_lock;
pub mod fleet;
pub mod grant;
pub mod host;
pub mod host_key;
pub mod machine;
pub mod manager;
pub mod state;
pub mod store;
pub mod tags;
pub mod view;

/// An error and its sources on one line, `outer: inner: ...`. A source
/// whose message the line already holds is left out: some libraries'
/// errors repeat their source in their own message.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
