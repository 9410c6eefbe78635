//! Host side of guest ports: a TCP listener whose connections are joined
//! to a port inside the VM through the VMM's hybrid vsock Unix socket.
//!
//! Each accepted TCP connection opens the VM's socket, sends
//! `CONNECT <port>\n`, waits for `OK <host port>\n`, and then copies bytes
//! both ways until either side closes. It uses plain threads and std only,
//! so the bridge and the CLI can reuse it without an async runtime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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

/// A running TCP listener forwarding to one guest port. Dropping it stops
/// accepting new connections; connections already joined run until either
/// side closes.
pub struct Forwarder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and joins each connection
    /// to guest `port` through the VM socket `uds`. Per-connection failures
    /// (VM gone, guest port closed) close that TCP connection and are passed
    /// to `on_error`; they never stop the listener.
    pub fn start(
        listen: impl ToSocketAddrs + std::fmt::Debug,
        uds: impl Into<PathBuf>,
        port: u32,
        on_error: impl Fn(ForwardError) + Send + Sync + 'static,
    ) -> Result<Self, ForwardError> {
        let shown = format!("{listen:?}");
        let listen_err = |source| ForwardError::Listen {
            addr: shown.clone(),
            source,
        };
        let listener = TcpListener::bind(listen).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let uds = uds.into();
        let on_error: Arc<dyn Fn(ForwardError) + Send + Sync> = Arc::new(on_error);
        let acceptor = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("forward-{}", addr.port()))
                .spawn(move || accept_loop(listener, &stop, &uds, port, on_error))
                .map_err(listen_err)?
        };
        Ok(Forwarder {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
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
    port: u32,
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
            .spawn(move || match connect_guest(&uds, port) {
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
