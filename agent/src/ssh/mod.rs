//! The SSH server: listens on vsock port [`SSH_PORT`] in the guest (the
//! host forwards a TCP port to it) and serves sessions to holders of the
//! grant's keys. Accepts block on one thread; sessions run on a small
//! async runtime on another. If it cannot start, the agent logs why and
//! goes on without it.

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

/// Starts serving SSH on vsock port [`SSH_PORT`] for `authorized_keys`
/// (OpenSSH public key lines) with `host_key` (OpenSSH private key; a new
/// one when None) and returns once the server is listening.
pub fn start(authorized_keys: &[String], host_key: Option<&str>) -> Result<(), SshError> {
    let listener = vsock::listen(SSH_PORT).map_err(SshError::Listen)?;
    start_on(authorized_keys, host_key, move || vsock::accept(&listener))
}

/// Serves SSH on the connected streams `accept` returns (any SOCK_STREAM
/// descriptor; tests use TCP on loopback where vsock is not available).
pub fn start_on(
    authorized_keys: &[String],
    host_key: Option<&str>,
    accept: impl FnMut() -> std::io::Result<File> + Send + 'static,
) -> Result<(), SshError> {
    let (allowed, bad) = keys::parse_authorized(authorized_keys);
    for line in bad {
        console(&format!("ssh: ignoring unusable authorized key {line:?}"));
    }
    if allowed.is_empty() {
        return Err(SshError::NoKeys);
    }
    let host_key = match host_key {
        Some(text) => keys::parse_host_key(text)?,
        None => keys::host_key()?,
    };
    let config = Arc::new(config(host_key));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SshError::Runtime)?;
    let allowed = Arc::new(allowed);
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("ssh".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(SshError::Runtime)?;
    std::thread::Builder::new()
        .name("ssh-accept".into())
        .spawn(move || accept_loop(accept, handle, config, allowed))
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

/// Blocking accepts on a plain thread; each connection becomes a task on
/// the runtime thread.
fn accept_loop(
    mut accept: impl FnMut() -> std::io::Result<File>,
    rt: tokio::runtime::Handle,
    config: Arc<Config>,
    allowed: Arc<Vec<PublicKey>>,
) {
    loop {
        match accept() {
            Ok(conn) => {
                let client = handler::Client::new(allowed.clone(), rt.clone());
                rt.spawn(serve_connection(config.clone(), conn, client));
            }
            Err(e) => {
                // E.g. out of descriptors: back off rather than spin.
                console(&format!("ssh: accept: {e}"));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
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
