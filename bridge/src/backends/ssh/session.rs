//! The SSH client side of an owned host: [`Session`], one authenticated
//! connection that runs shell commands, each on its own channel, and
//! [`Link`], which keeps one session alive for a backend, reconnecting with
//! backoff.
//!
//! Invariants:
//! - The server must offer exactly the pinned host key. The check runs
//!   inside the key exchange, before authentication, so neither the
//!   identity's signature nor any command reaches a host that is not the
//!   pinned one. The one exception is [`Session::connect_learning_key`],
//!   for an operator adding a host by hand (trust on first use); kilnd's
//!   backends never call it.
//! - Only unencrypted ed25519 identities in OpenSSH format are used; kilnd
//!   runs unattended and has no one to ask for a passphrase.
//! - Every network wait is bounded: `connect` and `exec` by their timeouts,
//!   an idle connection by keepalives. `exec`'s timeout bounds the caller's
//!   wait, not the command's life on the host (see [`Session::exec`]).
//! - A command's stdout is capped ([`STDOUT_LIMIT`]); stderr is kept up to
//!   [`STDERR_LIMIT`] and the rest dropped, as it only explains failures.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use russh::client::{Config, Handle, Handler, Msg};
use russh::keys::ssh_key::{self, Algorithm, HashAlg, PrivateKey, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error_chain;

/// The most stdout bytes one command may return; more is an error.
pub const STDOUT_LIMIT: usize = 16 << 20;
/// The most stderr bytes kept of one command; the rest is dropped.
pub const STDERR_LIMIT: usize = 1 << 20;
/// Channels open at once on one session: sshd refuses channels beyond its
/// `MaxSessions` (10 by default), so more callers wait for a free one
/// instead. Below 10 because sshd holds the channel of a command given up
/// on until the command ends (see [`Session::exec`]); past the spare two,
/// channels are refused all the same ([`SessionError::ChannelRefused`]).
const MAX_CHANNELS: usize = 8;
/// Silence after which the client asks the server whether it is still
/// there; three unanswered asks close the session.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// One owned host, as its backend's configuration names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTarget {
    /// `host`, `host:port` or `[v6]:port`; port 22 when none is given.
    pub address: String,
    pub user: String,
    /// An unencrypted ed25519 private key in OpenSSH format.
    pub identity_file: PathBuf,
    /// The host's public key, pinned: `ssh-ed25519 AAAA…` (a comment
    /// after the key is allowed and ignored).
    pub host_key: String,
}

impl HostTarget {
    /// Checks what can be checked without the network: the address, the
    /// pinned key and the identity file.
    pub fn check(&self) -> Result<(), SessionError> {
        self.endpoint()?;
        self.pinned_key()?;
        load_identity(&self.identity_file)?;
        Ok(())
    }

    fn endpoint(&self) -> Result<(String, u16), SessionError> {
        split_address(&self.address).ok_or_else(|| SessionError::Address(self.address.clone()))
    }

    /// The pinned key's SHA-256 fingerprint (`SHA256:…`), as `ssh-keygen
    /// -l` prints it, for a person to compare.
    pub fn pinned_fingerprint(&self) -> Result<String, SessionError> {
        Ok(fingerprint(self.pinned_key()?.key_data()))
    }

    fn pinned_key(&self) -> Result<PublicKey, SessionError> {
        PublicKey::from_openssh(self.host_key.trim()).map_err(|e| SessionError::PinnedKey {
            address: self.address.clone(),
            source: Arc::new(e),
        })
    }
}

/// Why a session or a command failed. Cloneable, so that [`Link`] can
/// answer with the last failure while it backs off.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SessionError {
    #[error("Unusable SSH address {0:?}")]
    Address(String),
    #[error("Unusable pinned host key for {address}")]
    PinnedKey {
        address: String,
        #[source]
        source: Arc<ssh_key::Error>,
    },
    #[error("Unusable SSH identity {}", .0.display())]
    Identity(PathBuf, #[source] IdentityError),
    #[error(
        "{address} offered host key {offered_fingerprint}, not the pinned {expected_fingerprint}"
    )]
    HostKeyMismatch {
        address: String,
        expected_fingerprint: String,
        offered_fingerprint: String,
    },
    #[error("{address} refused the key of {user}")]
    AuthRejected { user: String, address: String },
    #[error("Cannot reach {0}")]
    Unreachable(String, #[source] Arc<std::io::Error>),
    #[error("No SSH session with {0} within {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("Connection to {0} lost")]
    Disconnected(String, #[source] Option<Arc<russh::Error>>),
    #[error("Command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("Command wrote more than {0} bytes to stdout")]
    OutputTooLarge(usize),
    /// sshd's `MaxSessions` reached, by commands given up on that still run.
    #[error("{0} refused a new channel")]
    ChannelRefused(String),
    #[error("{0} refused to run the command")]
    ExecRefused(String),
    #[error("SSH protocol error with {0}")]
    Protocol(String, #[source] Arc<russh::Error>),
    #[error("{0} offered a host key that cannot be written in OpenSSH form")]
    UnprintableKey(String, #[source] Arc<ssh_key::Error>),
}

impl SessionError {
    /// Whether trying again later may succeed with nothing changed. A
    /// command that timed out counts (the host may only have been slow), and
    /// so does a refused channel (the commands that hold them end). A wrong
    /// key, identity or configuration never heals by itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SessionError::Unreachable(..)
                | SessionError::ConnectTimeout(..)
                | SessionError::Disconnected(..)
                | SessionError::Timeout(..)
                | SessionError::ChannelRefused(..)
        )
    }

    fn from_russh(address: &str, e: russh::Error) -> SessionError {
        use russh::Error as E;
        let address = address.to_string();
        match e {
            E::SendError | E::Disconnect | E::HUP => SessionError::Disconnected(address, None),
            E::IO(_)
            | E::RecvError
            | E::ConnectionTimeout
            | E::KeepaliveTimeout
            | E::InactivityTimeout => SessionError::Disconnected(address, Some(Arc::new(e))),
            e => SessionError::Protocol(address, Arc::new(e)),
        }
    }
}

/// Why an identity file cannot be used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Cannot read it")]
    Read(#[source] Arc<std::io::Error>),
    #[error("Not an OpenSSH private key")]
    Format(#[source] Arc<ssh_key::Error>),
    #[error("It is encrypted; kiln needs an unencrypted key")]
    Encrypted,
    #[error("It is a {0} key, not ssh-ed25519")]
    NotEd25519(String),
}

fn load_identity(path: &Path) -> Result<PrivateKey, SessionError> {
    let fail = |e| SessionError::Identity(path.to_path_buf(), e);
    let text = std::fs::read_to_string(path).map_err(|e| fail(IdentityError::Read(Arc::new(e))))?;
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|e| fail(IdentityError::Format(Arc::new(e))))?;
    if key.is_encrypted() {
        return Err(fail(IdentityError::Encrypted));
    }
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(fail(IdentityError::NotEd25519(key.algorithm().to_string())));
    }
    Ok(key)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address, as
/// (host, port).
fn split_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = match address.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (host, port)
        }
        None => match address.split_once(':') {
            // More than one colon: an IPv6 address without a port.
            Some((_, p)) if p.contains(':') => (address, None),
            Some((host, p)) => (host, Some(p)),
            None => (address, None),
        },
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return None;
    }
    let port = match port {
        None => 22,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
    };
    Some((host.to_string(), port))
}

/// Accepts the server only if it offers the pinned key, or, when learning,
/// accepts any key and keeps it.
struct Verifier {
    check: KeyCheck,
}

enum KeyCheck {
    Pinned(PublicKey),
    /// Trust on first use: the key offered, once the server has shown it
    /// holds its private half.
    Learn(Arc<Mutex<Option<PublicKey>>>),
}

#[derive(Debug)]
enum VerifyError {
    Ssh(russh::Error),
    /// The fingerprint of what the server offered instead.
    Mismatch(String),
}

impl From<russh::Error> for VerifyError {
    fn from(e: russh::Error) -> Self {
        VerifyError::Ssh(e)
    }
}

impl Handler for Verifier {
    type Error = VerifyError;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // russh checked the exchange's signature with this key before
        // asking, so the server holds its private half. Certificates are
        // not asked for; should one come, the key it certifies must match.
        let key = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            PublicKeyOrCertificate::Certificate(cert) => cert.public_key(),
        };
        match &self.check {
            KeyCheck::Pinned(pinned) if key == pinned.key_data() => Ok(true),
            KeyCheck::Pinned(_) => Err(VerifyError::Mismatch(fingerprint(key))),
            KeyCheck::Learn(learned) => {
                let key = PublicKey::new(key.clone(), "");
                *learned.lock().unwrap_or_else(PoisonError::into_inner) = Some(key);
                Ok(true)
            }
        }
    }
}

fn fingerprint(key: &ssh_key::public::KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// russh's defaults, with the pinned key's algorithm asked for first (a
/// host with several host keys then offers the pinned one) and keepalives
/// on. (Its `nodelay` applies only to sockets russh dials itself; see
/// [`Session::connect`].)
fn client_config(pinned: Algorithm) -> Config {
    let mut config = Config {
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: 3,
        ..Config::default()
    };
    let mut keys = vec![pinned.clone()];
    keys.extend(
        config
            .preferred
            .key
            .iter()
            .filter(|a| **a != pinned)
            .cloned(),
    );
    config.preferred.key = keys.into();
    config
}

/// One authenticated connection to a host. Its methods take `&self`:
/// share it (in an `Arc`) and run commands from several tasks at once,
/// each on its own channel.
pub struct Session {
    handle: Handle<Verifier>,
    address: String,
    channels: Arc<Semaphore>,
    /// Set when a command saw the connection go, which can be noticed
    /// before russh's own task has wound down.
    lost: AtomicBool,
}

/// What a command left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit status; None when the command was killed by a signal (or
    /// the server reported no status).
    pub status: Option<u32>,
    /// The signal's name without `SIG` (`KILL`), when one ended it.
    pub signal: Option<String>,
    pub stdout: Vec<u8>,
    /// At most [`STDERR_LIMIT`] bytes.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Takes one channel message into the output so far; true once the
    /// channel is closed.
    fn take(&mut self, msg: ChannelMsg) -> Result<bool, SessionError> {
        match msg {
            ChannelMsg::Data { data } => {
                if self.stdout.len() + data.len() > STDOUT_LIMIT {
                    return Err(SessionError::OutputTooLarge(STDOUT_LIMIT));
                }
                self.stdout.extend_from_slice(&data);
            }
            // Extended data type 1 is stderr (RFC 4254 5.2).
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                let room = STDERR_LIMIT.saturating_sub(self.stderr.len());
                self.stderr.extend_from_slice(&data[..data.len().min(room)]);
            }
            ChannelMsg::ExitStatus { exit_status } => self.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                self.signal = Some(match signal_name {
                    Sig::Custom(name) => name,
                    other => format!("{other:?}"),
                })
            }
            ChannelMsg::Close => return Ok(true),
            _ => {}
        }
        Ok(false)
    }
}

impl Session {
    /// Dials `target`, checks its host key against the pin and logs in with
    /// the identity file, all within `timeout`.
    pub async fn connect(target: &HostTarget, timeout: Duration) -> Result<Session, SessionError> {
        // Configuration errors come first: they need no network.
        let endpoint = target.endpoint()?;
        let pinned = target.pinned_key()?;
        let identity = load_identity(&target.identity_file)?;
        Session::open(
            &target.address,
            &target.user,
            endpoint,
            identity,
            KeyCheck::Pinned(pinned),
            timeout,
        )
        .await
    }

    /// As [`Session::connect`] for a host whose key is not known yet: any
    /// host key is accepted (trust on first use), and the answer is the
    /// session with the target as it should be pinned from now on. For an
    /// operator adding a host, who is shown the key to check; kilnd only
    /// ever connects pinned.
    pub async fn connect_learning_key(
        address: &str,
        user: &str,
        identity_file: &Path,
        timeout: Duration,
    ) -> Result<(Session, HostTarget), SessionError> {
        let endpoint =
            split_address(address).ok_or_else(|| SessionError::Address(address.to_string()))?;
        let identity = load_identity(identity_file)?;
        let learned = Arc::new(Mutex::new(None));
        let check = KeyCheck::Learn(Arc::clone(&learned));
        let session = Session::open(address, user, endpoint, identity, check, timeout).await?;
        // Set by the key exchange, which every open session has been through.
        let offered = learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| SessionError::Disconnected(address.to_string(), None))?;
        let host_key = offered
            .to_openssh()
            .map_err(|e| SessionError::UnprintableKey(address.to_string(), Arc::new(e)))?;
        let target = HostTarget {
            address: address.to_string(),
            user: user.to_string(),
            identity_file: identity_file.to_path_buf(),
            host_key,
        };
        Ok((session, target))
    }

    /// Whether an SSH server at `host:port` answers with the pinned host
    /// key, within `timeout`: the key exchange only, no login. A cloud
    /// instance's VM is ready for its requester once it does.
    pub async fn host_key_answers(
        host: std::net::IpAddr,
        port: u16,
        pinned: &PublicKey,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let address = std::net::SocketAddr::new(host, port).to_string();
        let expected_fingerprint = fingerprint(pinned.key_data());
        let dial = async {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|e| SessionError::Unreachable(address.clone(), Arc::new(e)))?;
            let config = Arc::new(client_config(pinned.algorithm()));
            let verifier = Verifier {
                check: KeyCheck::Pinned(pinned.clone()),
            };
            let handle = russh::client::connect_stream(config, tcp, verifier)
                .await
                .map_err(|e| match e {
                    VerifyError::Mismatch(offered_fingerprint) => SessionError::HostKeyMismatch {
                        address: address.clone(),
                        expected_fingerprint: expected_fingerprint.clone(),
                        offered_fingerprint,
                    },
                    VerifyError::Ssh(e) => SessionError::from_russh(&address, e),
                })?;
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "", "")
                .await;
            Ok(())
        };
        tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| SessionError::ConnectTimeout(address.clone(), timeout))?
    }

    /// Dials, checks the host key as `check` says and logs in, all within
    /// `timeout`.
    async fn open(
        address: &str,
        user: &str,
        (host, port): (String, u16),
        identity: PrivateKey,
        check: KeyCheck,
        timeout: Duration,
    ) -> Result<Session, SessionError> {
        let address = address.to_string();
        let (algorithm, expected_fingerprint) = match &check {
            KeyCheck::Pinned(pinned) => (pinned.algorithm(), fingerprint(pinned.key_data())),
            // What Debian's sshd and ssh-keygen make by default, and the
            // only kind kiln's own keys are.
            KeyCheck::Learn(_) => (Algorithm::Ed25519, String::new()),
        };
        let dial = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| SessionError::Unreachable(address.clone(), Arc::new(e)))?;
            // Nagle off: a command is a few small messages each way, and
            // with it on each waits for the last one's delayed ACK.
            tcp.set_nodelay(true)
                .map_err(|e| SessionError::Unreachable(address.clone(), Arc::new(e)))?;
            let config = Arc::new(client_config(algorithm));
            let verifier = Verifier { check };
            let mut handle = russh::client::connect_stream(config, tcp, verifier)
                .await
                .map_err(|e| match e {
                    VerifyError::Mismatch(offered_fingerprint) => SessionError::HostKeyMismatch {
                        address: address.clone(),
                        expected_fingerprint: expected_fingerprint.clone(),
                        offered_fingerprint,
                    },
                    VerifyError::Ssh(e) => SessionError::from_russh(&address, e),
                })?;
            let key = PrivateKeyWithHashAlg::new(Arc::new(identity), None);
            let auth = handle
                .authenticate_publickey(user, key)
                .await
                .map_err(|e| SessionError::from_russh(&address, e))?;
            if !auth.success() {
                return Err(SessionError::AuthRejected {
                    user: user.to_string(),
                    address: address.clone(),
                });
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| SessionError::ConnectTimeout(address.clone(), timeout))??;
        tracing::debug!(address = %address, user = %user, "SSH session open");
        Ok(Session {
            handle,
            address,
            channels: Arc::new(Semaphore::new(MAX_CHANNELS)),
            lost: AtomicBool::new(false),
        })
    }

    /// The target's address, as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether the connection is gone; a closed session stays closed.
    pub fn is_closed(&self) -> bool {
        self.lost.load(Ordering::Relaxed) || self.handle.is_closed()
    }

    /// Runs `command` (a shell command line, as `ssh host command` does)
    /// with `stdin` as its input, and waits for it to end, all within
    /// `timeout`. On a timeout or too much output the client asks for
    /// SIGKILL and closes the channel, and the error comes at once. OpenSSH
    /// refuses that signal in sessions without privilege separation, which
    /// root's are: there a command that no longer writes (a `sleep`) runs
    /// on until it ends, as it would after `ssh host cmd` is interrupted,
    /// and holds one of sshd's channels until then. A caller that needs a
    /// hard bound on the host wraps the command in `timeout(1)`.
    pub async fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let open = async {
            // Never closed, so this never fails.
            let permit = Arc::clone(&self.channels)
                .acquire_owned()
                .await
                .map_err(|_| SessionError::Disconnected(self.address.clone(), None))?;
            let channel = self
                .handle
                .channel_open_session()
                .await
                .map_err(|e| match e {
                    russh::Error::ChannelOpenFailure(reason) => {
                        tracing::debug!(address = %self.address, ?reason, "channel refused");
                        SessionError::ChannelRefused(self.address.clone())
                    }
                    e => self.lost(e),
                })?;
            Ok::<_, SessionError>((permit, channel))
        };
        let (permit, channel) = tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| SessionError::Timeout(timeout))??;
        let (mut read, write) = channel.split();
        let mut output = ExecOutput::default();
        let ran = tokio::time::timeout_at(
            deadline,
            self.run(&mut read, &write, command, stdin, &mut output),
        )
        .await
        .unwrap_or(Err(SessionError::Timeout(timeout)));
        match ran {
            Ok(()) => Ok(output),
            Err(e) => {
                if !matches!(e, SessionError::Disconnected(..)) {
                    abandon(write, permit);
                }
                Err(e)
            }
        }
    }

    /// Starts the command, feeds it `stdin` and collects its output until
    /// the server closes the channel.
    async fn run(
        &self,
        read: &mut ChannelReadHalf,
        write: &ChannelWriteHalf<Msg>,
        command: &str,
        stdin: &[u8],
        output: &mut ExecOutput,
    ) -> Result<(), SessionError> {
        write.exec(true, command).await.map_err(|e| self.lost(e))?;
        // stdin waits for the server's answer: before the command is
        // started sshd has nowhere to put it.
        loop {
            match read.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(SessionError::ExecRefused(self.address.clone()))
                }
                Some(msg) => {
                    if output.take(msg)? {
                        return Ok(());
                    }
                }
                None => return Err(self.lost(russh::Error::Disconnect)),
            }
        }
        // Fed while the output is read: a command such as `cat` writes
        // back while it reads, and the flow-control windows stall both
        // directions if either is left waiting. A command that exits
        // without reading all of stdin ends the run; the feed is dropped.
        let feed = async {
            if let Err(e) = feed(write, stdin).await {
                tracing::debug!(address = %self.address, error = %e, "stdin not fully sent");
            }
            std::future::pending::<Infallible>().await
        };
        let collect = async {
            loop {
                match read.wait().await {
                    Some(msg) => {
                        if output.take(msg)? {
                            return Ok(());
                        }
                    }
                    None => return Err(self.lost(russh::Error::Disconnect)),
                }
            }
        };
        tokio::select! {
            done = collect => done,
            never = feed => match never {},
        }
    }

    /// The error for a channel that failed under a command; marks the
    /// session closed when the connection is what failed.
    fn lost(&self, e: russh::Error) -> SessionError {
        let e = SessionError::from_russh(&self.address, e);
        if matches!(e, SessionError::Disconnected(..)) {
            self.lost.store(true, Ordering::Relaxed);
        }
        e
    }
}

async fn feed(write: &ChannelWriteHalf<Msg>, stdin: &[u8]) -> Result<(), russh::Error> {
    if !stdin.is_empty() {
        write.data_bytes(stdin.to_vec()).await?;
    }
    write.eof().await
}

/// Asks the host to kill a command being given up on (see
/// [`Session::exec`]) and closes its channel, in the background so that the
/// caller gets its error at once. The channel slot is freed only then.
fn abandon(write: ChannelWriteHalf<Msg>, permit: OwnedSemaphorePermit) {
    tokio::spawn(async move {
        let ends = async {
            write.signal(Sig::KILL).await?;
            write.close().await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), ends)
            .await
            .unwrap_or(Err(russh::Error::ConnectionTimeout))
        {
            tracing::debug!(error = %e, "could not close an abandoned channel");
        }
        drop(permit);
    });
}

/// How long [`Link`] waits after a failed dial before the next: `first`
/// after the first failure, doubling with each further one up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after a failure that followed a wait of `previous` (None
    /// for the first failure).
    fn next(&self, previous: Option<Duration>) -> Duration {
        match previous {
            Some(p) => p.saturating_mul(2).min(self.max),
            None => self.first,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// A backend's hold on one host: a live session when there is one, a new
/// one when it is gone. Failed dials are spaced by [`Backoff`]; until the
/// next dial is due every caller gets the last failure at once, so a dead
/// host costs its callers no waiting and the host no connection storm.
pub struct Link {
    target: HostTarget,
    connect_timeout: Duration,
    backoff: Backoff,
    state: Mutex<LinkState>,
    /// Held while dialing, so that callers who find no session wait for
    /// one dial instead of each making their own.
    dialing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct LinkState {
    session: Option<Arc<Session>>,
    failed: Option<Failed>,
    unreachable_since: Option<DateTime<Utc>>,
}

struct Failed {
    error: SessionError,
    /// The wait that followed it.
    delay: Duration,
    retry_at: Instant,
}

impl Link {
    pub fn new(target: HostTarget, connect_timeout: Duration) -> Link {
        Link {
            target,
            connect_timeout,
            backoff: Backoff::default(),
            state: Mutex::default(),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Link {
        self.backoff = backoff;
        self
    }

    pub fn target(&self) -> &HostTarget {
        &self.target
    }

    /// The live session, or a new one; while backing off after a failed
    /// dial, that failure again without dialing.
    pub async fn session(&self) -> Result<Arc<Session>, SessionError> {
        if let Some(answer) = self.ready() {
            return answer;
        }
        let _dialing = self.dialing.lock().await;
        // Another caller may have dialed while this one waited.
        if let Some(answer) = self.ready() {
            return answer;
        }
        let dialed = Session::connect(&self.target, self.connect_timeout).await;
        let mut state = self.lock();
        match dialed {
            Ok(session) => {
                let session = Arc::new(session);
                state.session = Some(Arc::clone(&session));
                state.failed = None;
                if state.unreachable_since.take().is_some() {
                    tracing::info!(address = %self.target.address, "SSH link back");
                }
                Ok(session)
            }
            Err(error) => {
                let delay = self.backoff.next(state.failed.as_ref().map(|f| f.delay));
                tracing::warn!(
                    address = %self.target.address,
                    error = %error_chain(&error),
                    retry_in = ?delay,
                    "SSH link down"
                );
                state.failed = Some(Failed {
                    error: error.clone(),
                    delay,
                    retry_at: Instant::now() + delay,
                });
                state.unreachable_since.get_or_insert_with(Utc::now);
                Err(error)
            }
        }
    }

    /// Lets go of the session, so the next call dials: for a caller that
    /// found it answering nothing (a cut cable shows as silence until the
    /// keepalives give up).
    pub fn forget(&self) {
        self.lock().session = None;
    }

    /// Since when the link has had no session: set by the first failed
    /// dial after a success (or since it was made), cleared by a success.
    pub fn unreachable_since(&self) -> Option<DateTime<Utc>> {
        self.lock().unreachable_since
    }

    /// The answer that needs no dial: the live session, or the last
    /// failure while its backoff runs.
    fn ready(&self) -> Option<Result<Arc<Session>, SessionError>> {
        let mut state = self.lock();
        if let Some(session) = &state.session {
            if !session.is_closed() {
                return Some(Ok(Arc::clone(session)));
            }
            tracing::debug!(address = %self.target.address, "SSH session closed");
            state.session = None;
        }
        match &state.failed {
            Some(f) if Instant::now() < f.retry_at => Some(Err(f.error.clone())),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_host_and_port() {
        let split = |a: &str| split_address(a);
        assert_eq!(split("example.org"), Some(("example.org".into(), 22)));
        assert_eq!(split("10.0.0.2:2222"), Some(("10.0.0.2".into(), 2222)));
        assert_eq!(split("[::1]:2200"), Some(("::1".into(), 2200)));
        assert_eq!(split("[fe80::1]"), Some(("fe80::1".into(), 22)));
        assert_eq!(split("fe80::1"), Some(("fe80::1".into(), 22)));
        for bad in [
            "",
            ":22",
            "host:",
            "host:0",
            "host:65536",
            "host:x",
            "[::1",
            "[::1]x",
            "[]:22",
            "a b",
            "a/b:22",
        ] {
            assert_eq!(split(bad), None, "{bad:?}");
        }
    }

    fn target(dir: &Path) -> HostTarget {
        HostTarget {
            address: "127.0.0.1:1".into(),
            user: "root".into(),
            identity_file: dir.join("id"),
            host_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc host".into(),
        }
    }

    #[test]
    fn identities_must_be_readable_openssh_keys() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path());
        let err = |t: &HostTarget| match t.check() {
            Err(SessionError::Identity(path, e)) => {
                assert_eq!(path, t.identity_file);
                e.to_string()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(err(&t), "Cannot read it");
        std::fs::write(&t.identity_file, "not a key").unwrap();
        assert_eq!(err(&t), "Not an OpenSSH private key");

        // (An encrypted key is made by ssh-keygen in tests/ssh_session.rs.)
        let key = crate::host_key::HostKey::generate().unwrap();
        std::fs::write(&t.identity_file, key.private_openssh().unwrap()).unwrap();
        t.check().unwrap();
    }

    #[test]
    fn a_bad_pin_or_address_is_refused_before_dialing() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = target(dir.path());
        t.host_key = "ssh-ed25519 AAAA-not-base64".into();
        assert!(matches!(t.check(), Err(SessionError::PinnedKey { .. })));
        t.address = "host:99999".into();
        let e = t.check().unwrap_err();
        assert_eq!(e.to_string(), "Unusable SSH address \"host:99999\"");
        assert!(!e.is_transient());
    }

    #[test]
    fn the_backoff_doubles_up_to_its_limit() {
        let b = Backoff::default();
        let mut waits = vec![b.next(None)];
        for _ in 0..8 {
            waits.push(b.next(waits.last().copied()));
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn messages_name_both_fingerprints_and_do_not_repeat_sources() {
        let e = SessionError::HostKeyMismatch {
            address: "h:22".into(),
            expected_fingerprint: "SHA256:aaa".into(),
            offered_fingerprint: "SHA256:bbb".into(),
        };
        assert_eq!(
            e.to_string(),
            "h:22 offered host key SHA256:bbb, not the pinned SHA256:aaa"
        );
        assert!(!e.is_transient());
        let e = SessionError::Unreachable(
            "h:22".into(),
            Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(error_chain(&e), "Cannot reach h:22: connection refused");
        assert!(e.is_transient());
    }
}
