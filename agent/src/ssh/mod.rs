//! The SSH server: listens on vsock port [`SSH_PORT`] in the guest (the
//! host forwards a TCP port to it) and serves sessions to holders of the
//! grant's keys. It runs on its own thread with a small async runtime; if
//! it cannot start, the agent logs why and goes on without it.

mod channel_io;
mod handler;
pub mod keys;
pub mod process;
pub mod pty;
pub mod sftp;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::SSH_PORT;
use russh::keys::PublicKey;
use russh::server::Config;
use russh::{MethodKind, MethodSet};

use crate::system::console;
use crate::vsock;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("no usable authorized keys")]
    NoKeys,
    #[error(transparent)]
    HostKey(#[from] keys::KeyError),
    #[error("cannot listen on vsock port {SSH_PORT}")]
    Listen(#[source] std::io::Error),
    #[error("cannot start the SSH runtime")]
    Runtime(#[source] std::io::Error),
}

/// Starts serving SSH for `authorized_keys` (OpenSSH public key lines) and
/// returns once the server is listening.
pub fn start(authorized_keys: &[String]) -> Result<(), SshError> {
    let (allowed, bad) = keys::parse_authorized(authorized_keys);
    for line in bad {
        console(&format!("ssh: ignoring unusable authorized key {line:?}"));
    }
    if allowed.is_empty() {
        return Err(SshError::NoKeys);
    }
    let config = Arc::new(config(keys::host_key()?));
    let listener = vsock::listen(SSH_PORT).map_err(SshError::Listen)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SshError::Runtime)?;
    let allowed = Arc::new(allowed);
    std::thread::Builder::new()
        .name("ssh".into())
        .spawn(move || serve(rt, listener, config, allowed))
        .map_err(SshError::Runtime)?;
    Ok(())
}

fn config(host_key: russh::keys::PrivateKey) -> Config {
    Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        // OpenSSH probes with "none" first: answer it at once (connect latency).
        auth_rejection_time_initial: Some(Duration::ZERO),
        auth_rejection_time: Duration::from_millis(200),
        // Idle interactive shells stay; dead clients are found by keepalives.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Default::default()
    }
}

fn serve(
    rt: tokio::runtime::Runtime,
    listener: OwnedFd,
    config: Arc<Config>,
    allowed: Arc<Vec<PublicKey>>,
) {
    let handle = rt.handle().clone();
    let listener = Arc::new(listener);
    rt.block_on(async move {
        loop {
            let l = listener.clone();
            match tokio::task::spawn_blocking(move || vsock::accept(&l)).await {
                Ok(Ok(conn)) => {
                    let client = handler::Client::new(allowed.clone(), handle.clone());
                    tokio::spawn(serve_connection(config.clone(), conn, client));
                }
                Ok(Err(e)) => {
                    // E.g. out of descriptors: back off rather than spin.
                    console(&format!("ssh: accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    console(&format!("ssh: accept task: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

/// A vsock stream as a tokio stream: any connected SOCK_STREAM descriptor
/// works behind `UnixStream` for plain reads and writes.
fn async_stream(conn: File) -> std::io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(OwnedFd::from(conn));
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

async fn serve_connection(config: Arc<Config>, conn: File, client: handler::Client) {
    let stream = match async_stream(conn) {
        Ok(s) => s,
        Err(e) => return console(&format!("ssh: connection: {e}")),
    };
    match russh::server::run_stream(config, stream, client).await {
        Ok(session) => {
            if let Err(e) = session.await {
                console(&format!("ssh: session ended: {e}"));
            }
        }
        Err(e) => console(&format!("ssh: handshake: {e}")),
    }
}
