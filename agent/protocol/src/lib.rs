//! kiln-protocol: the host<->agent channel over vsock.
//!
//! Every frame is `u32` big-endian length (of what follows), one kind
//! byte, then the payload. Control messages are JSON with a version;
//! workload output and input travel as raw bytes so they need no encoding.
//! Decoding is defensive: a frame is bounded by [`MAX_FRAME`], and any
//! malformed input is an error value, never a panic.
//! This crate must not depend on anything a bare initramfs cannot run.

use serde::{Deserialize, Serialize};

pub mod console;
pub mod forward;
pub mod fuzz;
pub mod publish;
pub mod vmm;

/// Protocol version carried in every control message.
pub const VERSION: u32 = 1;
/// Largest frame accepted (kind byte + payload).
pub const MAX_FRAME: usize = 1 << 20;
/// Host vsock port the agent connects to for control (guest-initiated).
pub const CONTROL_PORT: u32 = 1025;
/// Guest vsock port the agent's SSH server listens on.
pub const SSH_PORT: u32 = 22;
/// Guest vsock port on which the agent joins host streams to the guest
/// TCP ports the host published (see [`publish`]).
pub const PUBLISH_PORT: u32 = 1026;

const KIND_CONTROL: u8 = 1;
const KIND_STDOUT: u8 = 2;
const KIND_STDERR: u8 = 3;
const KIND_STDIN: u8 = 4;
const KIND_STDIN_EOF: u8 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("empty frame")]
    EmptyFrame,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed control message: {0}")]
    BadMessage(String),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u32),
}

/// What the workload uses from the image config (`/kiln/config.json`) and
/// the per-boot settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// argv; empty means the image's Entrypoint + Cmd.
    #[serde(default)]
    pub argv: Vec<String>,
    /// KEY=VALUE added to (or replacing in) the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as in the OCI config.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep stdin open for `Stdin` frames.
    #[serde(default)]
    pub interactive: bool,
}

/// Whether `name` may name an environment variable of a workload: not
/// empty, no `=` (it would end the name) and no NUL (it would end the
/// string). Checked wherever a workload's environment is accepted.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// Per-VM identity the host hands the agent before the workload starts.
/// Clones of one snapshot share the template's kernel state: its random
/// pool, its clock and its hostname; these make each clone its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Fresh host random bytes, mixed into the guest kernel's pool (and
    /// credited) before its generator is reseeded. At most
    /// [`MAX_ENTROPY_BYTES`].
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// The host's wall clock, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl Identity {
    /// Fresh bytes from the host's generator and the host's clock now.
    pub fn from_host(hostname: Option<String>) -> std::io::Result<Box<Identity>> {
        use std::io::Read;
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
        let unix_time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64);
        Ok(Box::new(Identity {
            entropy,
            unix_time_ms,
            hostname,
        }))
    }
}

/// The most entropy bytes an [`Identity`] carries (the kernel's input pool
/// is 256 bits; more only costs frame space).
pub const MAX_ENTROPY_BYTES: usize = 256;

/// Resource usage as the agent measures it inside the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub uptime_ms: u64,
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub mem_used_kib: u64,
    pub mem_peak_kib: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub processes: u64,
    /// `starting`, `running` or `exited`.
    pub workload: String,
}

/// The workload's exit code when its program does not exist, as in a shell.
pub const EXIT_NOT_FOUND: i32 = 127;
/// The workload's exit code when its program exists but cannot be started.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;

/// How the workload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// A shell's view: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Code(c) => *c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Control messages, both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Agent -> host: it accepts work.
    Ready {
        agent_version: String,
        /// Guest uptime when the agent was ready.
        uptime_ms: u64,
        /// The agent's first instructions (the kernel's exec of `/init`)
        /// to this message, re-exec included.
        #[serde(default)]
        init_to_ready_ms: u64,
        /// The agent was waiting for its start when its channel was reset
        /// (a restored snapshot resumes here): a new `Start` may come.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
    },
    /// Host -> agent: run this (overrides merged onto the image config).
    Start {
        workload: Workload,
        /// OpenSSH public keys allowed to log in.
        #[serde(default)]
        authorized_keys: Vec<String>,
        /// The SSH host key to serve (OpenSSH private key format), so the
        /// host can pin it; the agent makes one up when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ssh_host_key: Option<String>,
        #[serde(default = "default_usage_interval")]
        usage_interval_ms: u64,
        /// Power the VM off when the workload ends.
        #[serde(default = "default_true")]
        one_shot: bool,
        /// What makes this VM itself rather than a copy of the snapshot it
        /// may have been restored from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<Box<Identity>>,
        /// Guest TCP ports the host publishes (`kiln run -p`): the agent
        /// serves [`PUBLISH_PORT`] for these ports only, and only when
        /// there are some.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        published_ports: Vec<u16>,
    },
    /// Agent -> host: the workload started.
    Started { pid: u32 },
    /// Agent -> host: the workload could not be started (its `Exited`
    /// follows, with [`EXIT_NOT_FOUND`] when the program does not exist,
    /// else [`EXIT_NOT_EXECUTABLE`]).
    NotStarted { message: String },
    /// Agent -> host: periodic and final usage.
    Usage(Usage),
    /// Agent -> host: the workload ended.
    Exited { status: ExitStatus, usage: Usage },
    /// Host -> agent: stop the workload (SIGTERM, then SIGKILL after the grace period).
    Shutdown { grace_ms: u64 },
    /// Host -> agent: deliver a signal to the workload.
    Signal { signal: i32 },
    /// Either way: the last frame could not be used.
    Error { message: String },
}

fn default_usage_interval() -> u64 {
    1000
}
fn default_true() -> bool {
    true
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Control(Message),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Stdin(Vec<u8>),
    StdinEof,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    message: serde_json::Value,
}

impl Frame {
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, std::borrow::Cow<[u8]>) = match self {
            Frame::Control(m) => {
                let json = serde_json::to_value(m)
                    .and_then(|message| {
                        serde_json::to_vec(&Envelope {
                            v: VERSION,
                            message,
                        })
                    })
                    .unwrap_or_default();
                (KIND_CONTROL, json.into())
            }
            Frame::Stdout(d) => (KIND_STDOUT, d.as_slice().into()),
            Frame::Stderr(d) => (KIND_STDERR, d.as_slice().into()),
            Frame::Stdin(d) => (KIND_STDIN, d.as_slice().into()),
            Frame::StdinEof => (KIND_STDIN_EOF, (&[][..]).into()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&payload);
        out
    }

    fn decode(body: &[u8]) -> Result<Frame, ProtocolError> {
        let (&kind, payload) = body.split_first().ok_or(ProtocolError::EmptyFrame)?;
        Ok(match kind {
            KIND_CONTROL => {
                let env: Envelope = serde_json::from_slice(payload)
                    .map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
                if env.v != VERSION {
                    return Err(ProtocolError::UnsupportedVersion(env.v));
                }
                Frame::Control(
                    serde_json::from_value(env.message)
                        .map_err(|e| ProtocolError::BadMessage(e.to_string()))?,
                )
            }
            KIND_STDOUT => Frame::Stdout(payload.to_vec()),
            KIND_STDERR => Frame::Stderr(payload.to_vec()),
            KIND_STDIN => Frame::Stdin(payload.to_vec()),
            KIND_STDIN_EOF => Frame::StdinEof,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// Splits a byte stream into frames. Holds at most one frame's bytes.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. After an error the offending frame
    /// is dropped (when its length was readable), so decoding can go on;
    /// an oversized length poisons the stream, which should be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            self.buf.clear();
            return Err(ProtocolError::FrameTooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
        Frame::decode(&body).map(Some)
    }

    /// Bytes held that do not yet form a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Reads one frame from a blocking reader (None at a clean end of stream).
pub fn read_frame(
    r: &mut impl std::io::Read,
) -> std::io::Result<Option<Result<Frame, ProtocolError>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Ok(Some(Err(ProtocolError::FrameTooLarge(n))));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(Some(Frame::decode(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for good in ["A", "a_b", "PATH", "x.y", "1"] {
            assert!(valid_env_name(good), "{good}");
        }
        for bad in ["", "A=B", "=", "A\0B"] {
            assert!(!valid_env_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn each_host_identity_has_its_own_entropy_and_the_clock() {
        let (a, b) = (
            Identity::from_host(None).unwrap(),
            Identity::from_host(Some("x".into())).unwrap(),
        );
        assert_eq!(a.entropy.len(), 64);
        assert!(a.entropy.len() <= MAX_ENTROPY_BYTES);
        assert_ne!(a.entropy, b.entropy);
        assert!(a.unix_time_ms.is_some_and(|t| t > 1_700_000_000_000));
        assert_eq!(b.hostname.as_deref(), Some("x"));
    }

    #[test]
    fn messages_without_the_clone_fields_still_decode() {
        let ready = br#"{"v":1,"type":"ready","agent_version":"0","uptime_ms":1}"#;
        let start = br#"{"v":1,"type":"start","workload":{}}"#;
        for (json, resumed) in [(&ready[..], Some(false)), (&start[..], None)] {
            let mut body = vec![KIND_CONTROL];
            body.extend_from_slice(json);
            match Frame::decode(&body).unwrap() {
                Frame::Control(Message::Ready { resumed: r, .. }) => assert_eq!(Some(r), resumed),
                Frame::Control(Message::Start {
                    identity,
                    published_ports,
                    ..
                }) => assert!(identity.is_none() && published_ports.is_empty()),
                other => panic!("{other:?}"),
            }
        }
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Control(Message::Ready {
                agent_version: "0.1.0".into(),
                uptime_ms: 1234,
                init_to_ready_ms: 56,
                resumed: false,
            }),
            Frame::Control(Message::Ready {
                agent_version: "0.1.0".into(),
                uptime_ms: 99,
                init_to_ready_ms: 0,
                resumed: true,
            }),
            Frame::Control(Message::Start {
                workload: Workload {
                    argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                    env: vec!["A=b".into()],
                    working_dir: Some("/tmp".into()),
                    user: Some("1000:1000".into()),
                    interactive: true,
                },
                authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
                ssh_host_key: None,
                usage_interval_ms: 500,
                one_shot: true,
                identity: Some(Box::new(Identity {
                    entropy: vec![1, 2, 3],
                    unix_time_ms: Some(1_800_000_000_000),
                    hostname: Some("clone-1".into()),
                })),
                published_ports: vec![8000, 65535],
            }),
            Frame::Control(Message::Exited {
                status: ExitStatus::Signal(9),
                usage: Usage {
                    cpu_user_ms: 5,
                    workload: "exited".into(),
                    ..Default::default()
                },
            }),
            Frame::Control(Message::Shutdown { grace_ms: 2000 }),
            Frame::Stdout(b"out\n".to_vec()),
            Frame::Stderr(vec![0, 255, 10]),
            Frame::Stdin(Vec::new()),
            Frame::StdinEof,
        ]
    }

    #[test]
    fn every_frame_round_trips_through_a_split_stream() {
        let frames = all_frames();
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        // Feed one byte at a time: frames must come out whole and in order.
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(&read_frame(&mut r).unwrap().unwrap().unwrap(), f);
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn malformed_frames_are_errors_and_decoding_continues() {
        let mut d = Decoder::new();
        let bad_json = [0, 0, 0, 3, KIND_CONTROL, b'{', b'x'];
        d.push(&bad_json);
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadMessage(_))));
        d.push(&[0, 0, 0, 1, 99]);
        assert_eq!(d.next_frame(), Err(ProtocolError::UnknownKind(99)));
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(ProtocolError::EmptyFrame));
        let v2 = br#"{"v":2,"type":"shutdown","grace_ms":1}"#;
        let mut f = ((v2.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(KIND_CONTROL);
        f.extend_from_slice(v2);
        d.push(&f);
        assert_eq!(d.next_frame(), Err(ProtocolError::UnsupportedVersion(2)));
        let unknown = br#"{"v":1,"type":"shutdown","grace_ms":1,"extra":true}"#;
        let mut f = ((unknown.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(KIND_CONTROL);
        f.extend_from_slice(unknown);
        d.push(&f);
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadMessage(_))));
        // A good frame after all that still decodes.
        d.push(&Frame::StdinEof.encode());
        assert_eq!(d.next_frame(), Ok(Some(Frame::StdinEof)));
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut d = Decoder::new();
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLarge(u32::MAX as usize))
        );
        assert_eq!(d.buffered(), 0);
        let mut r = &u32::MAX.to_be_bytes()[..];
        assert!(matches!(
            read_frame(&mut r),
            Ok(Some(Err(ProtocolError::FrameTooLarge(_))))
        ));
    }

    /// A small xorshift generator: reproducible arbitrary input without a
    /// fuzzing dependency.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_memory_stays_bounded() {
        let valid: Vec<u8> = all_frames().iter().flat_map(|f| f.encode()).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut d = Decoder::new();
            let len = (xorshift(&mut seed) % 4096) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            if round % 2 == 0 {
                // Mutate valid traffic: flip bytes, cut it short.
                input = valid.clone();
                for _ in 0..(xorshift(&mut seed) % 8) {
                    let i = (xorshift(&mut seed) as usize) % input.len();
                    input[i] = xorshift(&mut seed) as u8;
                }
                input.truncate((xorshift(&mut seed) as usize) % (input.len() + 1));
            }
            for chunk in input.chunks(1 + (xorshift(&mut seed) % 64) as usize) {
                d.push(chunk);
                while !matches!(d.next_frame(), Ok(None)) {
                    assert!(d.buffered() <= 4 + MAX_FRAME);
                }
            }
            let mut r = &input[..];
            while let Ok(Some(_)) = read_frame(&mut r) {}
        }
    }
}
