//! Host side of guest ports: a TCP listener whose connections are joined
//! to a port inside the VM through the VMM's hybrid vsock Unix socket.
//!
//! Each accepted TCP connection opens the VM's socket, sends
//! `CONNECT <port>\n`, waits for `OK <host port>\n`, and then copies bytes
//! both ways until either side closes. A guest TCP port ([`Target::Tcp`],
//! `kiln run -p`) is reached through the agent's [`PUBLISH_PORT`], with the
//! header of [`crate::publish`] after the handshake. It uses plain threads
//! and std only, so the bridge and the CLI can reuse it without an async
//! runtime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::publish::{self, ACCEPTED};
use crate::PUBLISH_PORT;

/// How long the VMM may take to join a new stream to the guest port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted from the VMM (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the VM socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake for guest port {port} failed")]
    Handshake {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection")]
    Refused { port: u32 },
    #[error("unexpected reply {reply:?} to CONNECT {port}")]
    BadReply { port: u32, reply: String },
    #[error("the VM serves no published ports (yet)")]
    NotPublishing,
    #[error("guest TCP port {port} refused the connection")]
    TcpRefused { port: u16 },
    #[error("handshake with the agent for guest TCP port {port} failed")]
    TcpHandshake {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected reply {reply:?} from the agent for guest TCP port {port}")]
    TcpBadReply { port: u16, reply: String },
    #[error("cannot start the thread serving {addr}")]
    Thread {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a forwarded connection reaches inside the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A guest vsock port (the agent's SSH server).
    Vsock(u32),
    /// A guest TCP port on the guest's loopback, through the agent.
    Tcp(u16),
}

/// Opens a stream to `port` inside the VM whose vsock device serves `uds`.
/// On success the returned socket carries the guest stream and nothing else.
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, ForwardError> {
    let mut s = UnixStream::connect(uds).map_err(|source| ForwardError::Connect {
        path: uds.to_path_buf(),
        source,
    })?;
    let handshake = |source| ForwardError::Handshake { port, source };
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(handshake)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(handshake)?;
    // Byte by byte: whatever follows the newline is already guest data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return Err(ForwardError::Refused { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_REPLY => line.push(byte[0]),
            Ok(_) => {
                return Err(ForwardError::BadReply {
                    port,
                    reply: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset while waiting is the VMM dropping a refused stream.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ForwardError::Refused { port })
            }
            Err(e) => return Err(handshake(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if !reply.starts_with("OK ") {
        return Err(ForwardError::BadReply { port, reply });
    }
    s.set_read_timeout(None).map_err(handshake)?;
    Ok(s)
}

/// Opens a stream to TCP `port` on the guest's loopback through the agent.
/// On success the returned socket carries that TCP connection and nothing else.
pub fn connect_guest_tcp(uds: &Path, port: u16) -> Result<UnixStream, ForwardError> {
    let mut s = match connect_guest(uds, PUBLISH_PORT) {
        Err(ForwardError::Refused { .. }) => return Err(ForwardError::NotPublishing),
        other => other?,
    };
    let handshake = |source| ForwardError::TcpHandshake { port, source };
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(handshake)?;
    s.write_all(publish::header(port).as_bytes())
        .map_err(handshake)?;
    let mut reply = Vec::with_capacity(ACCEPTED.len());
    let mut byte = [0u8; 1];
    while reply.len() < ACCEPTED.len() {
        match s.read(&mut byte) {
            // The agent closes the stream when it refuses.
            Ok(0) => return Err(ForwardError::TcpRefused { port }),
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ForwardError::TcpRefused { port })
            }
            Err(e) => return Err(handshake(e)),
        }
    }
    if reply != ACCEPTED {
        return Err(ForwardError::TcpBadReply {
            port,
            reply: String::from_utf8_lossy(&reply).into_owned(),
        });
    }
    s.set_read_timeout(None).map_err(handshake)?;
    Ok(s)
}

/// Opens a stream to `target` inside the VM whose vsock device serves `uds`.
pub fn connect_target(uds: &Path, target: Target) -> Result<UnixStream, ForwardError> {
    match target {
        Target::Vsock(port) => connect_guest(uds, port),
        Target::Tcp(port) => connect_guest_tcp(uds, port),
    }
}

/// A bound TCP listener not yet forwarding: bind first (a taken port is an
/// error before the VM starts), then [`Bound::serve`] once the VM's socket
/// exists. Connections made meanwhile wait in the listen backlog.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Joins each connection to `target` through the VM socket `uds`.
    /// Per-connection failures (VM gone, guest port closed) close that TCP
    /// connection and are passed to `on_error`; they never stop the listener.
    pub fn serve(
        self,
        uds: impl Into<PathBuf>,
        target: Target,
        on_error: impl Fn(ForwardError) + Send + Sync + 'static,
    ) -> Result<Forwarder, ForwardError> {
        let Bound { listener, addr } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let uds = uds.into();
        let on_error: Arc<dyn Fn(ForwardError) + Send + Sync> = Arc::new(on_error);
        let acceptor = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("forward-{}", addr.port()))
                .spawn(move || accept_loop(listener, &stop, &uds, target, on_error))
                .map_err(|source| ForwardError::Thread { addr, source })?
        };
        Ok(Forwarder {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

/// A running TCP listener forwarding to one guest port. Dropping it stops
/// accepting new connections; connections already joined run until either
/// side closes.
pub struct Forwarder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `listen` without serving yet (see [`Bound`]).
    pub fn bind(listen: impl ToSocketAddrs + std::fmt::Debug) -> Result<Bound, ForwardError> {
        let shown = format!("{listen:?}");
        let listen_err = |source| ForwardError::Listen {
            addr: shown.clone(),
            source,
        };
        let listener = TcpListener::bind(listen).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        Ok(Bound { listener, addr })
    }

    /// Listens on `listen` (e.g. `127.0.0.1:0`) and joins each connection
    /// to guest vsock `port` through the VM socket `uds` (see [`Bound::serve`]).
    pub fn start(
        listen: impl ToSocketAddrs + std::fmt::Debug,
        uds: impl Into<PathBuf>,
        port: u32,
        on_error: impl Fn(ForwardError) + Send + Sync + 'static,
    ) -> Result<Self, ForwardError> {
        Self::bind(listen)?.serve(uds, Target::Vsock(port), on_error)
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept so the thread sees the flag and exits.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    uds: &Path,
    target: Target,
    on_error: Arc<dyn Fn(ForwardError) + Send + Sync>,
) {
    for tcp in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(tcp) = tcp else {
            // Transient (e.g. the client reset before accept): keep serving.
            continue;
        };
        let uds = uds.to_path_buf();
        let on_error = on_error.clone();
        let _ = std::thread::Builder::new()
            .name("forward-conn".into())
            .spawn(move || match connect_target(&uds, target) {
                Ok(guest) => join(tcp, guest),
                Err(e) => {
                    let _ = tcp.shutdown(Shutdown::Both);
                    on_error(e);
                }
            });
    }
}

/// Copies both ways; each direction passes its end-of-stream on as a
/// half-close so the other direction can still drain.
fn join(tcp: TcpStream, guest: UnixStream) {
    let (Ok(tcp_in), Ok(guest_out)) = (tcp.try_clone(), guest.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        copy_then_close(tcp_in, guest_out, |s| {
            let _ = s.shutdown(Shutdown::Write);
        })
    });
    copy_then_close(guest, tcp, |s| {
        let _ = s.shutdown(Shutdown::Write);
    });
    let _ = upstream.join();
}

fn copy_then_close<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W)) {
    let _ = std::io::copy(&mut from, &mut to);
    close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the VMM's socket: answers the handshake like the
    /// muxer does, then echoes the stream back upper-cased.
    fn fake_vmm(dir: &Path, reply: &'static [u8]) -> PathBuf {
        let path = dir.join("vm.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, b"CONNECT 22");
                s.write_all(reply).unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => s.write_all(&buf[..n].to_ascii_uppercase()).unwrap(),
                    }
                }
            }
        });
        path
    }

    #[test]
    fn joins_tcp_to_the_guest_port_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_vmm(dir.path(), b"OK 1073741824\n");
        let fwd = Forwarder::start("127.0.0.1:0", &uds, 22, |e| panic!("{e}")).unwrap();
        assert_ne!(fwd.local_addr().port(), 0);
        for _ in 0..2 {
            let mut c = TcpStream::connect(fwd.local_addr()).unwrap();
            c.write_all(b"hello").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert_eq!(got, "HELLO");
        }
    }

    #[test]
    fn a_refused_port_closes_the_tcp_connection_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        // The VMM closes the stream when the guest refuses the port.
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut b = [0u8; 11];
                let _ = s.read_exact(&mut b);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let fwd = Forwarder::start("127.0.0.1:0", &uds, 22, move |e| {
            let _ = tx.lock().unwrap().send(e.to_string());
        })
        .unwrap();
        let mut c = TcpStream::connect(fwd.local_addr()).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty());
        let msg = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(msg, "guest port 22 refused the connection");
    }

    #[test]
    fn handshake_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let e = connect_guest(&missing, 22).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot open the VM socket"),
            "{e}"
        );

        let uds = fake_vmm(dir.path(), b"ERR bad CONNECT line\n");
        let e = connect_guest(&uds, 22).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected reply \"ERR bad CONNECT line\" to CONNECT 22"
        );
    }

    /// A stand-in for the VMM and the agent's publish port: reads the
    /// handshake and the header, then either accepts (echoing upper-cased)
    /// or, for guest port 1, closes as the agent does on a refused port.
    fn fake_publisher(dir: &Path) -> PathBuf {
        let path = dir.join("vm.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, format!("CONNECT {PUBLISH_PORT}").as_bytes());
                    s.write_all(b"OK 1073741824\n").unwrap();
                    let port = publish::read_header(&mut s).unwrap();
                    if port == 1 {
                        return;
                    }
                    s.write_all(ACCEPTED).unwrap();
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => s.write_all(&buf[..n].to_ascii_uppercase()).unwrap(),
                        }
                    }
                    // The half-close passes on: the guest's end follows.
                    let _ = s.write_all(format!("/{port}").as_bytes());
                });
            }
        });
        path
    }

    #[test]
    fn joins_tcp_to_a_guest_tcp_port_through_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_publisher(dir.path());
        let bound = Forwarder::bind("127.0.0.1:0").unwrap();
        let addr = bound.local_addr();
        // Bound but not yet serving: a client waits in the backlog.
        let mut early = TcpStream::connect(addr).unwrap();
        early.write_all(b"early").unwrap();
        let fwd = bound
            .serve(&uds, Target::Tcp(8000), |e| panic!("{e}"))
            .unwrap();
        early.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        early.read_to_string(&mut got).unwrap();
        assert_eq!(got, "EARLY/8000");
        drop(fwd);
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }

    #[test]
    fn a_refused_guest_tcp_port_closes_the_tcp_connection_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_publisher(dir.path());
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let fwd = Forwarder::bind("127.0.0.1:0")
            .unwrap()
            .serve(&uds, Target::Tcp(1), move |e| {
                let _ = tx.lock().unwrap().send(e.to_string());
            })
            .unwrap();
        let mut c = TcpStream::connect(fwd.local_addr()).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty());
        let msg = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(msg, "guest TCP port 1 refused the connection");
    }

    #[test]
    fn a_vm_not_publishing_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        // No listener on the publish port: the VMM closes the stream.
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut b = [0u8; 13];
                let _ = s.read_exact(&mut b);
            }
        });
        let e = connect_guest_tcp(&uds, 8000).unwrap_err();
        assert_eq!(e.to_string(), "the VM serves no published ports (yet)");
    }

    #[test]
    fn bind_failure_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = match Forwarder::start(taken.local_addr().unwrap(), "/nonexistent", 22, |_| {}) {
            Err(e) => e,
            Ok(_) => panic!("bound a taken port"),
        };
        assert!(e.to_string().starts_with("cannot listen on"), "{e}");
    }
}
