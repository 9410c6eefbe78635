//! Published ports, guest side: listens on vsock port [`PUBLISH_PORT`]
//! and joins each host stream to the guest TCP port its header names
//! (see [`kiln_protocol::publish`]) on the guest's loopback, for the ports
//! the host published only. Accepts block on one thread; each connection
//! takes two threads, and at most [`MAX_CONNECTIONS`] run at once (more
//! wait in the listen backlog). Started after the host's `Start`, so a VM
//! restored from a snapshot listens on its own vsock device.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln_protocol::publish::{read_header, HeaderError, ACCEPTED};
use kiln_protocol::PUBLISH_PORT;

use crate::system::console;
use crate::vsock;

/// Forwarded connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long the host may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest port may take to accept (loopback: refusals are instant).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot listen on vsock port {PUBLISH_PORT}")]
    Listen(#[source] std::io::Error),
    #[error("cannot start the accepting thread")]
    Thread(#[source] std::io::Error),
}

/// Why one forwarded connection was not joined.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("guest TCP port {0} is not published")]
    NotPublished(u16),
    #[error("cannot connect to guest TCP port {port}")]
    Connect {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("host stream")]
    Host(#[source] std::io::Error),
}

/// Starts serving the guest TCP `ports` on vsock port [`PUBLISH_PORT`].
pub fn start(ports: &[u16]) -> Result<(), PublishError> {
    let listener = vsock::listen(PUBLISH_PORT).map_err(PublishError::Listen)?;
    start_on(ports, move || vsock::accept(&listener))
}

/// Serves the streams `accept` returns (any SOCK_STREAM descriptor; tests
/// use Unix sockets where vsock is not available).
pub fn start_on(
    ports: &[u16],
    accept: impl FnMut() -> std::io::Result<File> + Send + 'static,
) -> Result<(), PublishError> {
    let ports = ports.to_vec();
    std::thread::Builder::new()
        .name("publish-accept".into())
        .spawn(move || accept_loop(accept, &ports))
        .map(drop)
        .map_err(PublishError::Thread)
}

/// Counts the connections running; a slot is given back when its guard drops.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

struct Slot(Arc<Slots>);

impl Slots {
    fn take(self: &Arc<Self>) -> Slot {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= MAX_CONNECTIONS {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= 1;
        self.0.freed.notify_one();
    }
}

fn accept_loop(mut accept: impl FnMut() -> std::io::Result<File>, ports: &[u16]) {
    let slots = Arc::new(Slots {
        used: Mutex::new(0),
        freed: Condvar::new(),
    });
    loop {
        let slot = slots.take();
        let host = match accept() {
            Ok(f) => UnixStream::from(OwnedFd::from(f)),
            Err(e) => {
                // E.g. out of descriptors: back off rather than spin.
                console(&format!("publish: accept: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let ports = ports.to_vec();
        let spawned = std::thread::Builder::new()
            .name("publish-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve(host, &ports) {
                    // Refusals are the host's to report; the console keeps
                    // what only the guest can see.
                    if !matches!(e, ConnectionError::Connect { .. }) {
                        console(&format!("publish: {e}"));
                    }
                }
            });
        if let Err(e) = spawned {
            console(&format!("publish: cannot serve a connection: {e}"));
        }
    }
}

/// Reads the header, connects to the guest port, answers [`ACCEPTED`] and
/// copies both ways. Any failure drops `host`, which the host side reads
/// as a refusal.
fn serve(mut host: UnixStream, published: &[u16]) -> Result<(), ConnectionError> {
    host.set_read_timeout(Some(HEADER_TIMEOUT))
        .map_err(ConnectionError::Host)?;
    let port = read_header(&mut host)?;
    if !published.contains(&port) {
        return Err(ConnectionError::NotPublished(port));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let guest = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|source| ConnectionError::Connect { port, source })?;
    host.set_read_timeout(None).map_err(ConnectionError::Host)?;
    host.write_all(ACCEPTED).map_err(ConnectionError::Host)?;
    join(host, guest).map_err(ConnectionError::Host)
}

/// Copies both ways; each direction passes its end-of-stream on as a
/// half-close so the other direction can still drain.
fn join(host: UnixStream, guest: TcpStream) -> std::io::Result<()> {
    let (host_in, guest_out) = (host.try_clone()?, guest.try_clone()?);
    let upstream = std::thread::Builder::new()
        .name("publish-copy".into())
        .spawn(move || {
            copy_then_close(host_in, guest_out, |s| {
                let _ = s.shutdown(Shutdown::Write);
            })
        })?;
    copy_then_close(guest, host, |s| {
        let _ = s.shutdown(Shutdown::Write);
    });
    let _ = upstream.join();
    Ok(())
}

fn copy_then_close<R: std::io::Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W)) {
    let _ = std::io::copy(&mut from, &mut to);
    close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// Serves `ports` on Unix socket pairs; each call of the returned
    /// function hands the agent one new host stream.
    fn publisher(ports: &[u16]) -> impl Fn() -> UnixStream {
        let (tx, rx) = mpsc::channel::<UnixStream>();
        let rx = Mutex::new(rx);
        start_on(ports, move || match rx.lock().unwrap().recv() {
            Ok(s) => Ok(File::from(OwnedFd::from(s))),
            // The test is over: block like an idle vsock listener.
            Err(_) => loop {
                std::thread::park();
            },
        })
        .unwrap();
        move || {
            let (ours, theirs) = UnixStream::pair().unwrap();
            tx.send(theirs).unwrap();
            ours.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            ours
        }
    }

    /// A guest server on an ephemeral loopback port that answers each
    /// connection with what it read, reversed, after the client's half-close.
    fn guest_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                got.reverse();
                c.write_all(&got).unwrap();
            }
        });
        port
    }

    /// Closed (a close with our bytes unread reads as a reset) and nothing sent.
    fn closed_without_reply(mut s: UnixStream) -> bool {
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => got.is_empty(),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset && got.is_empty(),
        }
    }

    #[test]
    fn joins_a_published_port_with_half_close_both_ways() {
        let port = guest_server();
        let connect = publisher(&[port]);
        for _ in 0..3 {
            let mut s = connect();
            s.write_all(format!("TCP {port}\nhello").as_bytes())
                .unwrap();
            let mut ok = [0u8; 3];
            s.read_exact(&mut ok).unwrap();
            assert_eq!(&ok, ACCEPTED);
            // The guest server answers only after our end-of-stream.
            s.shutdown(Shutdown::Write).unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).unwrap();
            assert_eq!(got, "olleh");
        }
    }

    #[test]
    fn refusals_close_the_stream_without_a_reply() {
        let open = guest_server();
        // A port nothing listens on: bind one, then free it.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let connect = publisher(&[open, closed]);
        let cases = [
            format!("TCP {closed}\n"),
            // Listening, but not published.
            format!("TCP {}\n", guest_server()),
            "TCP 0\n".into(),
            "UDP 53\n".into(),
            "x".repeat(1000),
            String::new(),
        ];
        for header in cases {
            let mut s = connect();
            s.write_all(header.as_bytes()).unwrap();
            if header.is_empty() {
                s.shutdown(Shutdown::Write).unwrap();
            }
            assert!(closed_without_reply(s), "{header:?}");
        }
        // The refusals gave their slots back and the listener still serves.
        let mut s = connect();
        s.write_all(format!("TCP {open}\nab").as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "OK\nba");
    }

    #[test]
    fn connections_past_the_limit_wait_for_a_slot() {
        let port = guest_server();
        let connect = publisher(&[port]);
        // Each holds a slot: the header is never finished.
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect()).collect();
        let mut waiting = connect();
        waiting
            .write_all(format!("TCP {port}\nz").as_bytes())
            .unwrap();
        waiting.shutdown(Shutdown::Write).unwrap();
        waiting
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        let e = waiting.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        drop(held);
        waiting
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = String::new();
        waiting.read_to_string(&mut got).unwrap();
        assert_eq!(got, "OK\nz");
    }
}
