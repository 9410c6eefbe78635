//! The control socket (`--api-sock`): a Unix stream socket that takes one
//! JSON request per line and answers one JSON line each.
//!
//! ```text
//! {"op":"pause"}                                  -> {"ok":true}
//! {"op":"resume"}                                 -> {"ok":true}
//! {"op":"snapshot","state":PATH,"mem":PATH}       -> {"ok":true}   (paused only)
//! {"op":"metrics"}                                -> {"ok":true,"metrics":{...}}
//! {"op":"stop"}                                   -> {"ok":true}   (then ends as on SIGTERM)
//! anything else                                   -> {"ok":false,"error":"..."}
//! ```
//! This subscriber only reads and queues requests; the VM's event loop
//! thread carries them out (it owns the vCPU handles) and answers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

use crate::devices::bus::lock;

/// Longest request line accepted; a client sending more is dropped.
const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Pause,
    Resume,
    Snapshot { state: PathBuf, mem: PathBuf },
    Metrics,
    Stop,
}

#[derive(Debug, Serialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
}

impl Reply {
    pub fn ok() -> Self {
        Reply {
            ok: true,
            error: None,
            metrics: None,
        }
    }
    pub fn error(e: impl std::fmt::Display) -> Self {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            metrics: None,
        }
    }
}

/// A request waiting for the event loop, with where its answer goes.
pub struct Pending {
    pub request: Result<Request, String>,
    stream: UnixStream,
}

impl Pending {
    pub fn answer(mut self, reply: &Reply) {
        let mut line = serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        // The socket is non-blocking (the event loop reads it); a client
        // that does not read its answers within a second is given up on.
        let mut rest = &line[..];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !rest.is_empty() && std::time::Instant::now() < deadline {
            match self.stream.write(rest) {
                Ok(0) => break,
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on the control socket {}", path.display())]
pub struct ApiError {
    path: PathBuf,
    source: std::io::Error,
}

/// Accepts clients and queues their requests.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    queue: Arc<Mutex<Vec<Pending>>>,
}

impl ApiServer {
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let err = |source| ApiError {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            clients: HashMap::new(),
            queue: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Where the event loop takes requests from.
    pub fn queue(&self) -> Arc<Mutex<Vec<Pending>>> {
        self.queue.clone()
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new_raw(fd, EventSet::IN)).is_ok() {
                self.clients.insert(fd, (stream, Vec::new()));
            }
        }
    }

    /// Reads what a client sent; queues each complete line. Returns false
    /// when the client is gone or misbehaved.
    fn read_client(&mut self, fd: RawFd) -> bool {
        let Some((stream, buf)) = self.clients.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let request = serde_json::from_slice::<Request>(&line[..end])
                .map_err(|e| format!("bad request: {e}"));
            let Ok(stream) = stream.try_clone() else {
                return false;
            };
            lock(&self.queue).push(Pending { request, stream });
        }
        buf.len() <= MAX_LINE
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch it: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if !self.read_client(fd) {
            let _ = ops.remove(events);
            self.clients.remove(&fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_are_refused() {
        let r: Request = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(r, Request::Pause);
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","state":"/s","mem":"/m"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                state: "/s".into(),
                mem: "/m".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"snapshot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"snapshot","state":"/s","mem":"/m","x":1}"#
        )
        .is_err());
        assert_eq!(
            serde_json::to_string(&Reply::error("the VM must be paused first")).unwrap(),
            r#"{"ok":false,"error":"the VM must be paused first"}"#
        );
    }
}
