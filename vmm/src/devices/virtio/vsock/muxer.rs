//! The host side of virtio-vsock: guest streams mapped onto Unix sockets.
//!
//! Host-initiated: a process connects to the VM's socket and writes
//! `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n`
//! and the socket is the stream. Guest-initiated: a guest connection to
//! (CID 2, port P) is joined to the Unix socket `<uds>_P`, if something
//! listens there. Flow control follows the virtio credit scheme.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::packet::*;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// Receive buffer we advertise per connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much has been forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First port number handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most packets without payload (replies, resets) held for the guest. A
/// guest that sends packets but posts no rx buffers stops being served
/// (see [`Muxer::control_full`]) instead of growing this queue.
pub const MAX_CONTROL: usize = 1024;
/// Most streams one guest may have open at once; more are reset.
pub const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket {0} already exists")]
    SocketInUse(PathBuf),
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The host's stream ended (a close or a half-close: they read the
    /// same): SHUTDOWN(SEND) sent. The guest may still send until it
    /// closes its end (its SHUTDOWN(RCV|SEND) or RST removes the
    /// connection); a host that closed fully makes those writes fail,
    /// which resets the connection.
    Closing,
}

struct Connection {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes the stream could not take yet.
    to_host: Vec<u8>,
    /// Host bytes read before the guest accepted the connection.
    to_guest: Vec<u8>,
    /// The stream may have bytes (IN interest is off while this is set).
    readable: bool,
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_host: Vec::new(),
            to_guest: Vec::new(),
            readable: false,
            interest: EventSet::IN,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Writes queued guest bytes to the stream; false when the stream is gone.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// A host process that connected but has not sent its CONNECT line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    uds_path: PathBuf,
    guest_cid: u64,
    listener: UnixListener,
    pending: HashMap<RawFd, PendingHost>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    /// Packets without payload waiting for a guest rx buffer.
    control: VecDeque<Header>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path`, which must not exist yet.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, MuxerError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(MuxerError::SocketInUse(uds_path.to_path_buf()));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MuxerError::Bind {
                path: uds_path.to_path_buf(),
                source,
            })?;
        Ok(Muxer {
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the replies held for the guest reached [`MAX_CONTROL`]: the
    /// device then leaves the guest's packets in its tx queue until the
    /// guest takes some (every packet handled may add one reply).
    pub fn control_full(&self) -> bool {
        self.control.len() >= MAX_CONTROL
    }

    /// Guest bytes held for host streams that cannot take them yet, at
    /// most the credit the guest was given per stream ([`CONN_BUF_ALLOC`]).
    pub fn bytes_held_for_host(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len()).sum()
    }

    /// Packets held for the guest without payload.
    pub fn control_len(&self) -> usize {
        self.control.len()
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0),
        }
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = self.header(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn rst_for(&mut self, hdr: &Header) {
        if hdr.op != OP_RST {
            self.control.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: hdr.src_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Default::default()
            });
        }
    }

    fn remove(&mut self, key: Key, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if !c.interest.is_empty() {
                let _ = ops.remove(Events::new(&c.stream, c.interest));
            }
        }
    }

    fn set_interest(c: &mut Connection, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if !c.readable && c.state == State::Established {
            want |= EventSet::IN;
        }
        if !c.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if want == c.interest {
            return;
        }
        let result = if c.interest.is_empty() {
            ops.add(Events::new(&c.stream, want))
        } else if want.is_empty() {
            ops.remove(Events::new(&c.stream, c.interest))
        } else {
            ops.modify(Events::new(&c.stream, want))
        };
        if result.is_ok() {
            c.interest = want;
        }
    }

    /// Accepts host processes connecting to the VM's socket.
    pub fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                        self.pending.insert(
                            stream.as_raw_fd(),
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Whether `fd` belongs to this muxer's streams.
    pub fn owns(&self, fd: RawFd) -> bool {
        self.pending.contains_key(&fd) || self.by_fd.contains_key(&fd)
    }

    /// Handles readiness of a host stream.
    pub fn handle_stream_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd, ops);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let mut gone = false;
        if let Some(c) = self.conns.get_mut(&key) {
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                c.readable = true;
            }
            if set.contains(EventSet::OUT) && !c.flush_to_host() {
                gone = true;
            }
            Self::set_interest(c, ops);
        }
        if gone {
            self.push_control(key, OP_RST, 0);
            self.remove(key, ops);
        } else {
            self.maybe_credit_update(key);
        }
    }

    fn read_connect_line(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let done = match p.stream.read(&mut buf) {
            Ok(0) => Err(()),
            Ok(n) => {
                p.line.extend_from_slice(&buf[..n]);
                if p.line.contains(&b'\n') {
                    Ok(true)
                } else if p.line.len() > MAX_CONNECT_LINE {
                    Err(())
                } else {
                    Ok(false)
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                Ok(false)
            }
            Err(_) => Err(()),
        };
        match done {
            Ok(false) => {}
            Err(()) => {
                if let Some(p) = self.pending.remove(&fd) {
                    let _ = ops.remove(Events::new(&p.stream, EventSet::IN));
                }
            }
            Ok(true) => {
                let Some(mut p) = self.pending.remove(&fd) else {
                    return;
                };
                let nl = p.line.iter().position(|b| *b == b'\n').unwrap_or(0);
                let rest = p.line.split_off(nl + 1);
                match parse_connect(&p.line) {
                    Some(port) => {
                        let local = self.next_local_port;
                        self.next_local_port =
                            self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
                        let key = (local, port);
                        // No IN interest until the guest accepts.
                        let _ = ops.remove(Events::new(&p.stream, EventSet::IN));
                        let mut c = Connection::new(p.stream, State::Connecting);
                        c.interest = EventSet::empty();
                        c.to_guest = rest;
                        self.by_fd.insert(fd, key);
                        self.conns.insert(key, c);
                        self.push_control(key, OP_REQUEST, 0);
                    }
                    None => {
                        let _ = p.stream.write_all(b"ERR bad CONNECT line\n");
                        let _ = ops.remove(Events::new(&p.stream, EventSet::IN));
                    }
                }
            }
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8], ops: &mut EventOps) {
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM || hdr.src_cid != self.guest_cid {
            self.rst_for(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, hdr, ops);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_for(hdr);
            return;
        };
        c.update_peer(hdr);
        match hdr.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                c.to_host
                    .extend_from_slice(format!("OK {}\n", key.0).as_bytes());
                let ok = c.flush_to_host();
                // The OK line is protocol, not guest data: not counted as credit.
                c.fwd_cnt = Wrapping(0);
                c.readable = !c.to_guest.is_empty();
                Self::set_interest(c, ops);
                if !ok {
                    self.push_control(key, OP_RST, 0);
                    self.remove(key, ops);
                }
            }
            // More than the credit we gave: the guest broke flow control.
            OP_RW if c.to_host.len() + data.len() > CONN_BUF_ALLOC as usize => {
                self.push_control(key, OP_RST, 0);
                self.remove(key, ops);
            }
            OP_RW if c.state != State::Connecting => {
                c.to_host.extend_from_slice(data);
                let ok = c.flush_to_host();
                Self::set_interest(c, ops);
                if ok {
                    self.maybe_credit_update(key);
                } else {
                    self.push_control(key, OP_RST, 0);
                    self.remove(key, ops);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.push_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    let _ = c.flush_to_host();
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV) {
                    self.push_control(key, OP_RST, 0);
                    self.remove(key, ops);
                }
            }
            OP_RST => self.remove(key, ops),
            _ => {
                self.push_control(key, OP_RST, 0);
                self.remove(key, ops);
            }
        }
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header, ops: &mut EventOps) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.rst_for(hdr);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.rst_for(hdr);
                return;
            }
        };
        if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
            self.rst_for(hdr);
            return;
        }
        let mut c = Connection::new(stream, State::Established);
        c.update_peer(hdr);
        self.by_fd.insert(c.stream.as_raw_fd(), key);
        self.conns.insert(key, c);
        self.push_control(key, OP_RESPONSE, 0);
    }

    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get(&key) {
            if (c.fwd_cnt - c.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
                self.push_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// Whether a packet may be ready for the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == State::Established
                    && (c.readable || !c.to_guest.is_empty())
                    && c.peer_credit() > 0
            })
    }

    /// The next packet for the guest with at most `max_data` payload bytes,
    /// written into `data`.
    pub fn next_rx(
        &mut self,
        max_data: usize,
        data: &mut Vec<u8>,
        ops: &mut EventOps,
    ) -> Option<Header> {
        data.clear();
        if let Some(h) = self.control.pop_front() {
            return Some(h);
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Established
                    && (c.readable || !c.to_guest.is_empty())
                    && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = max_data.min(c.peer_credit() as usize);
            if !c.to_guest.is_empty() {
                let n = want.min(c.to_guest.len());
                data.extend(c.to_guest.drain(..n));
            } else {
                data.resize(want, 0);
                match c.stream.read(data) {
                    Ok(0) => {
                        data.clear();
                        c.state = State::Closing;
                        c.readable = false;
                        Self::set_interest(c, ops);
                        // SEND only: the host's half-close is passed on, and
                        // the guest's answer still reaches the host.
                        let mut h = self.header(key, OP_SHUTDOWN);
                        h.flags = SHUTDOWN_SEND;
                        return Some(h);
                    }
                    Ok(n) => data.truncate(n),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        data.clear();
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        data.clear();
                        c.readable = false;
                        Self::set_interest(c, ops);
                        continue;
                    }
                    Err(_) => {
                        data.clear();
                        self.push_control(key, OP_RST, 0);
                        self.remove(key, ops);
                        return self.control.pop_front();
                    }
                }
            }
            c.rx_cnt += Wrapping(data.len() as u32);
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let mut h = self.header(key, OP_RW);
            h.len = data.len() as u32;
            return Some(h);
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Parses `CONNECT <port>\n`.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches(['\n', '\r']);
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"connect 52\n"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
    }

    #[test]
    fn refuses_an_existing_socket_path_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        std::fs::write(&p, b"someone else's").unwrap();
        assert!(matches!(Muxer::new(&p, 3), Err(MuxerError::SocketInUse(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
    }

    #[test]
    fn credit_accounting() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established);
        c.update_peer(&Header {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..Default::default()
        });
        c.rx_cnt = Wrapping(60);
        assert_eq!(c.peer_credit(), 40);
        c.update_peer(&Header {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 100);
        // Counters wrap.
        c.rx_cnt = Wrapping(5);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 4);
        assert_eq!(c.peer_credit(), 90);
    }
}
