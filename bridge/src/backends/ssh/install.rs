//! `kiln fleet add-host`: installs or upgrades kiln on an owned host over
//! SSH, so that an `ssh` backend can drive it. The host gets this
//! machine's `kiln`, `kiln-vmm` and `kiln-shim` side by side in one
//! directory (kiln finds the other two beside itself), and this machine's
//! guest agent and guest kernel in its `KILN_HOME`.
//!
//! Invariants:
//! - Nothing is sent before the host's key is checked (or learned, on
//!   first use) and `/dev/kvm` is found usable there.
//! - A file is never written in place: it arrives under a temporary name
//!   beside its destination, its SHA-256 is computed there and compared
//!   with this machine's, and only then is it renamed over the old one. A
//!   half-sent file is never run, and a VM running the old binary keeps it.
//! - A file whose copy on the host already has the same SHA-256 is not
//!   sent, so adding an installed host again costs a few round trips.
//! - The host's `host.toml` is the operator's: written only when absent.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::remote::shell_quote;
use super::session::{ExecOutput, HostTarget, Session, SessionError};
use crate::bundle::{Place, Sources, LAYOUT};
use crate::host::wire::{self, HostInfo, Reply};
use crate::host::HOST_FILE;

/// Where the binaries go by default: one directory of kiln's own, off
/// PATH (`kiln-vmm` and `kiln-shim` are not commands for a person), named
/// in full in the backend's configuration.
pub const DEFAULT_PREFIX: &str = "/usr/local/lib/kiln";
/// The host's `KILN_HOME` by default, as `kiln host` assumes.
pub const DEFAULT_KILN_HOME: &str = "/var/lib/kiln";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// For the small commands; the checksums of files already there included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// An upload may take this long, plus a second per MiB: a link slower
/// than that is taken for a dead one.
const UPLOAD_BASE: Duration = Duration::from_secs(60);

/// Which host, and how to log in and lay kiln out there.
#[derive(Clone, Debug)]
pub struct AddHost {
    /// `host`, `host:port` or `[v6]:port`.
    pub address: String,
    pub user: String,
    /// An unencrypted ed25519 private key (OpenSSH format), absolute.
    pub identity_file: PathBuf,
    /// The host key to insist on; None trusts the one offered (and says
    /// which it was).
    pub host_key: Option<String>,
    /// The host's directory for `kiln`, `kiln-vmm` and `kiln-shim`.
    pub prefix: String,
    /// The host's `KILN_HOME`.
    pub kiln_home: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("host {host}: {what} must be an absolute path, not {path:?}")]
    NotAbsolute {
        host: String,
        what: &'static str,
        path: String,
    },
    #[error("host {host}: cannot read this machine's {what} {}", .path.display())]
    Local {
        host: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("host {0}: hashing this machine's files stopped: {1}")]
    Hashing(String, String),
    #[error("host {0}")]
    Session(String, #[source] SessionError),
    #[error("host {0} has no usable /dev/kvm (it must exist and be readable and writable by {1})")]
    NoKvm(String, String),
    /// A shell command there failed: what it was for, its exit, and the
    /// first line of its standard error.
    #[error("host {host}: {step} failed ({status}){stderr}")]
    Command {
        host: String,
        step: String,
        status: String,
        stderr: String,
    },
    #[error("host {host}: {file} arrived with SHA-256 {got}, not {want}; nothing was replaced")]
    Checksum {
        host: String,
        file: &'static str,
        got: String,
        want: String,
    },
    #[error("host {host}: the installed kiln refused `kiln host info`: {message}")]
    InfoRefused { host: String, message: String },
    #[error("host {host}: the installed kiln answered `kiln host info` with nothing readable ({status}){stderr}")]
    InfoGarbled {
        host: String,
        status: String,
        stderr: String,
    },
    #[error("host {host} runs kiln {have} after the install, not {want}")]
    Version {
        host: String,
        have: String,
        want: String,
    },
    #[error("host {0}: the installed kiln finds no usable KVM")]
    KvmUnseen(String),
}

/// One step done, for the person watching.
#[derive(Clone, Debug)]
pub enum Progress<'a> {
    Connected {
        fingerprint: &'a str,
        /// Trusted on first use, not checked against a pin.
        learned: bool,
    },
    KvmUsable,
    Unchanged {
        file: &'static str,
    },
    Uploaded {
        file: &'static str,
        bytes: u64,
        took: Duration,
    },
    HostFileWritten {
        address: IpAddr,
    },
    /// There is no `host.toml`, and none was written: the host's own
    /// address could not be told.
    HostFileMissing,
    Checked {
        version: &'a str,
        kvm: &'a str,
    },
}

impl std::fmt::Display for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Progress::Connected {
                fingerprint,
                learned: true,
            } => write!(f, "connected; host key {fingerprint}, trusted on first use"),
            Progress::Connected { fingerprint, .. } => {
                write!(f, "connected; host key {fingerprint}, as pinned")
            }
            Progress::KvmUsable => write!(f, "/dev/kvm is usable"),
            Progress::Unchanged { file } => write!(f, "{file}: already there, unchanged"),
            Progress::Uploaded { file, bytes, took } => write!(
                f,
                "{file}: uploaded {:.1} MiB in {:.1} s, checksum verified",
                *bytes as f64 / (1 << 20) as f64,
                took.as_secs_f64()
            ),
            Progress::HostFileWritten { address } => {
                write!(f, "wrote {HOST_FILE}: VMs reachable at {address}")
            }
            Progress::HostFileMissing => write!(
                f,
                "no {HOST_FILE}, and the host's address is unknown: its VMs listen on 127.0.0.1 until one sets `address`"
            ),
            Progress::Checked { version, kvm } => {
                write!(f, "kiln {version} answers there (KVM: {kvm})")
            }
        }
    }
}

/// What the host has now, and the configuration that reaches it.
#[derive(Clone, Debug, Serialize)]
pub struct Installed {
    pub address: String,
    pub user: String,
    pub identity_file: PathBuf,
    pub host_key: String,
    pub host_key_fingerprint: String,
    /// The key was trusted on first use rather than checked.
    pub host_key_learned: bool,
    /// The installed `kiln`.
    pub kiln: String,
    pub kiln_home: String,
    /// As `kiln host info` answered after the install.
    pub version: String,
    pub kvm: String,
    /// Where requesters reach its VMs (`host.toml`'s `address`).
    pub vm_address: String,
    pub host_file_written: bool,
    pub files: Vec<InstalledFile>,
    /// The `[[backend.host]]` table for kilnd's configuration.
    pub section: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstalledFile {
    pub name: &'static str,
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// False when the host already had it.
    pub uploaded: bool,
}

/// One file to put on the host.
struct Artifact {
    /// What it is, for messages: `kiln`, `guest kernel`.
    what: &'static str,
    local: PathBuf,
    /// The host's directory for it, and its name there.
    dir: String,
    file_name: &'static str,
    mode: u32,
}

impl Artifact {
    fn remote(&self) -> String {
        format!("{}/{}", self.dir, self.file_name)
    }
}

/// Where each of `sources` goes on the host: the layout the bundle has
/// too.
fn artifacts(sources: &Sources, prefix: &str, home: &str) -> Vec<Artifact> {
    LAYOUT
        .iter()
        .map(|entry| {
            let base = match entry.place {
                Place::Prefix => prefix,
                Place::Home => home,
            };
            Artifact {
                what: entry.what,
                local: sources.path(entry.piece).to_path_buf(),
                dir: if entry.dir.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}/{}", entry.dir)
                },
                file_name: entry.file_name,
                mode: entry.mode,
            }
        })
        .collect()
}

/// Installs or upgrades kiln on the host, telling `progress` each step.
pub async fn add_host(
    plan: &AddHost,
    sources: &Sources,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Installed, InstallError> {
    let host = plan.address.as_str();
    for (what, path) in [("prefix", &plan.prefix), ("kiln_home", &plan.kiln_home)] {
        if !path.starts_with('/') {
            return Err(InstallError::NotAbsolute {
                host: host.to_string(),
                what,
                path: path.clone(),
            });
        }
    }
    let prefix = plan.prefix.trim_end_matches('/');
    let home = plan.kiln_home.trim_end_matches('/');
    let (session, target, learned) = connect(plan).await?;
    let fingerprint = target
        .pinned_fingerprint()
        .map_err(|e| InstallError::Session(host.to_string(), e))?;
    progress(Progress::Connected {
        fingerprint: &fingerprint,
        learned,
    });
    let remote = Remote {
        session: &session,
        host,
    };

    let kvm = remote
        .run(
            "test -c /dev/kvm && test -r /dev/kvm && test -w /dev/kvm",
            b"",
        )
        .await?;
    if !kvm.success() {
        return Err(InstallError::NoKvm(host.to_string(), plan.user.clone()));
    }
    progress(Progress::KvmUsable);

    let files = artifacts(sources, prefix, home);
    // The host's checksums and this machine's at once: each reads
    // hundreds of MB.
    let jobs: Vec<(&'static str, PathBuf)> =
        files.iter().map(|f| (f.what, f.local.clone())).collect();
    let owned_host = host.to_string();
    let hashing = tokio::task::spawn_blocking(move || hash_all(&owned_host, jobs));
    let (there, here) = tokio::join!(remote.checksums(&files), hashing);
    let there = there?;
    let here = here.map_err(|e| InstallError::Hashing(host.to_string(), e.to_string()))??;

    let mut installed = Vec::new();
    for (file, (sha256, bytes)) in files.iter().zip(here) {
        let path = file.remote();
        let uploaded = there.iter().all(|(p, sum)| *p != path || *sum != sha256);
        let (sha256, bytes) = if uploaded {
            let start = Instant::now();
            let sent = remote.upload(file).await?;
            progress(Progress::Uploaded {
                file: file.what,
                bytes: sent.1,
                took: start.elapsed(),
            });
            sent
        } else {
            progress(Progress::Unchanged { file: file.what });
            (sha256, bytes)
        };
        installed.push(InstalledFile {
            name: file.file_name,
            path,
            sha256,
            bytes,
            uploaded,
        });
    }
    // A file left as it was keeps whatever mode it had; put them right.
    remote.chmod(&files).await?;

    let host_file_written = match remote.write_host_file(home).await? {
        HostFile::Kept => false,
        HostFile::Written(address) => {
            progress(Progress::HostFileWritten { address });
            true
        }
        HostFile::NoAddress => {
            progress(Progress::HostFileMissing);
            false
        }
    };

    let kiln = format!("{prefix}/kiln");
    let info = remote.info(&kiln, home).await?;
    let kvm = info
        .kvm
        .clone()
        .ok_or_else(|| InstallError::KvmUnseen(host.to_string()))?;
    progress(Progress::Checked {
        version: &info.version,
        kvm: &kvm,
    });

    let section = section(&target, &kiln, home);
    Ok(Installed {
        address: target.address,
        user: target.user,
        identity_file: target.identity_file,
        host_key: target.host_key,
        host_key_fingerprint: fingerprint,
        host_key_learned: learned,
        kiln,
        kiln_home: home.to_string(),
        version: info.version,
        kvm,
        vm_address: info.address,
        host_file_written,
        files: installed,
        section,
    })
}

/// The session, the target as it is pinned from now on, and whether its
/// key was learned rather than checked.
async fn connect(plan: &AddHost) -> Result<(Session, HostTarget, bool), InstallError> {
    let lost = |e| InstallError::Session(plan.address.clone(), e);
    match &plan.host_key {
        Some(key) => {
            let target = HostTarget {
                address: plan.address.clone(),
                user: plan.user.clone(),
                identity_file: plan.identity_file.clone(),
                host_key: key.trim().to_string(),
            };
            let session = Session::connect(&target, CONNECT_TIMEOUT)
                .await
                .map_err(lost)?;
            Ok((session, target, false))
        }
        None => {
            let (session, target) = Session::connect_learning_key(
                &plan.address,
                &plan.user,
                &plan.identity_file,
                CONNECT_TIMEOUT,
            )
            .await
            .map_err(lost)?;
            Ok((session, target, true))
        }
    }
}

/// The `[[backend.host]]` table that reaches the host as it was reached
/// here.
fn section(target: &HostTarget, kiln: &str, home: &str) -> String {
    let mut s = String::from("[[backend.host]]\n");
    let mut key = |k: &str, v: &str| s.push_str(&format!("{k} = {}\n", toml_string(v)));
    key("address", &target.address);
    key("user", &target.user);
    key("identity_file", &target.identity_file.to_string_lossy());
    key("host_key", &target.host_key);
    key("kiln", kiln);
    if home != DEFAULT_KILN_HOME {
        key("kiln_home", home);
    }
    s
}

/// `s` as a TOML basic string.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Each file's SHA-256 and size, or the first that cannot be read.
fn hash_all(
    host: &str,
    files: Vec<(&'static str, PathBuf)>,
) -> Result<Vec<(String, u64)>, InstallError> {
    files
        .into_iter()
        .map(|(what, path)| {
            hash_file(&path).map_err(|source| InstallError::Local {
                host: host.to_string(),
                what,
                path,
                source,
            })
        })
        .collect()
}

/// A file's SHA-256 (hex) and size, read in pieces.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex(&hasher.finalize()), bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What became of `host.toml`.
enum HostFile {
    Kept,
    Written(IpAddr),
    NoAddress,
}

/// The host, over the session: the shell commands of an install.
struct Remote<'a> {
    session: &'a Session,
    host: &'a str,
}

impl Remote<'_> {
    async fn run(&self, command: &str, stdin: &[u8]) -> Result<ExecOutput, InstallError> {
        self.run_for(command, stdin, COMMAND_TIMEOUT).await
    }

    async fn run_for(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, InstallError> {
        self.session
            .exec(command, stdin, timeout)
            .await
            .map_err(|e| InstallError::Session(self.host.to_string(), e))
    }

    /// Runs `command`, which must succeed.
    async fn must(&self, step: &str, command: &str) -> Result<ExecOutput, InstallError> {
        let out = self.run(command, b"").await?;
        if out.success() {
            Ok(out)
        } else {
            Err(self.failed(step, &out))
        }
    }

    fn failed(&self, step: &str, out: &ExecOutput) -> InstallError {
        let (status, stderr) = describe(out);
        InstallError::Command {
            host: self.host.to_string(),
            step: step.to_string(),
            status,
            stderr,
        }
    }

    /// Makes the destination directories, and answers (path, SHA-256) for
    /// each destination that already holds a file.
    async fn checksums(&self, files: &[Artifact]) -> Result<Vec<(String, String)>, InstallError> {
        let mut dirs: Vec<&str> = files.iter().map(|f| f.dir.as_str()).collect();
        dirs.sort_unstable();
        dirs.dedup();
        let dirs: Vec<String> = dirs.into_iter().map(shell_quote).collect();
        let paths: Vec<String> = files.iter().map(|f| shell_quote(&f.remote())).collect();
        // sha256sum reports what it finds and complains of the rest.
        let command = format!(
            "mkdir -p -- {} && {{ sha256sum -- {} 2>/dev/null; true; }}",
            dirs.join(" "),
            paths.join(" ")
        );
        let out = self
            .must("creating the directories of the install", &command)
            .await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let (sum, path) = line.split_once("  ")?;
                Some((path.to_string(), sum.to_string()))
            })
            .collect())
    }

    /// Sends the file to a temporary name beside its destination, checks
    /// what arrived, and renames it into place; answers the SHA-256 and
    /// size of what was sent.
    async fn upload(&self, file: &Artifact) -> Result<(String, u64), InstallError> {
        let local_error = |source| InstallError::Local {
            host: self.host.to_string(),
            what: file.what,
            path: file.local.clone(),
            source,
        };
        let bytes = std::fs::read(&file.local).map_err(local_error)?;
        // What is sent is what is checked: the file may have changed since
        // it was first hashed.
        let want = hex(&Sha256::digest(&bytes));
        let tmp = format!(
            "{}/.{}.kiln-upload-{}",
            file.dir,
            file.file_name,
            std::process::id()
        );
        let (tmp_q, dest_q) = (shell_quote(&tmp), shell_quote(&file.remote()));
        let command = format!(
            "cat > {tmp_q} && chmod {:o} {tmp_q} && sha256sum -- {tmp_q}",
            file.mode
        );
        let timeout = UPLOAD_BASE + Duration::from_secs(bytes.len() as u64 >> 20);
        let sent = self.run_for(&command, &bytes, timeout).await;
        let out = match sent {
            Ok(out) if out.success() => out,
            failed => {
                self.remove(&tmp_q).await;
                return match failed {
                    Ok(out) => Err(self.failed(&format!("uploading {}", file.what), &out)),
                    Err(e) => Err(e),
                };
            }
        };
        let got = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        if got != want {
            self.remove(&tmp_q).await;
            return Err(InstallError::Checksum {
                host: self.host.to_string(),
                file: file.what,
                got,
                want,
            });
        }
        let out = self.run(&format!("mv -f -- {tmp_q} {dest_q}"), b"").await?;
        if !out.success() {
            self.remove(&tmp_q).await;
            return Err(self.failed(&format!("moving {} into place", file.what), &out));
        }
        Ok((want, bytes.len() as u64))
    }

    /// Removes a temporary file after a failure, as far as it can.
    async fn remove(&self, quoted: &str) {
        let gone = self
            .session
            .exec(&format!("rm -f -- {quoted}"), b"", COMMAND_TIMEOUT)
            .await;
        if let Err(e) = gone {
            tracing::debug!(host = %self.host, error = %e, "could not remove an upload");
        }
    }

    async fn chmod(&self, files: &[Artifact]) -> Result<(), InstallError> {
        let command: Vec<String> = files
            .iter()
            .map(|f| format!("chmod {:o} {}", f.mode, shell_quote(&f.remote())))
            .collect();
        self.must("setting the files' modes", &command.join(" && "))
            .await?;
        Ok(())
    }

    /// Writes a `host.toml` naming the address the host was reached at,
    /// unless it has one.
    async fn write_host_file(&self, home: &str) -> Result<HostFile, InstallError> {
        let path = format!("{home}/{HOST_FILE}");
        let out = self
            .must(
                "looking for host.toml",
                &format!(
                    "if test -e {}; then echo kept; else echo \"$SSH_CONNECTION\"; fi",
                    shell_quote(&path)
                ),
            )
            .await?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if answer == "kept" {
            return Ok(HostFile::Kept);
        }
        // `client-ip client-port server-ip server-port`, from sshd.
        let Some(address) = answer
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse::<IpAddr>().ok())
        else {
            return Ok(HostFile::NoAddress);
        };
        let text = format!(
            "# Written by `kiln fleet add-host`, which never overwrites it.\n\
             # Where requesters reach this host's VMs: the address the bridge\n\
             # reached it at. Other keys: vcpus, ram_mib, reserve_vcpus,\n\
             # reserve_ram_mib, overcommit, insecure_registries.\n\
             address = \"{address}\"\n"
        );
        let (path_q, tmp_q) = (shell_quote(&path), shell_quote(&format!("{path}.tmp")));
        let out = self
            .run(
                &format!("cat > {tmp_q} && mv -f -- {tmp_q} {path_q}"),
                text.as_bytes(),
            )
            .await?;
        if !out.success() {
            return Err(self.failed("writing host.toml", &out));
        }
        Ok(HostFile::Written(address))
    }

    /// Asks the installed kiln what it is, as a bridge will.
    async fn info(&self, kiln: &str, home: &str) -> Result<HostInfo, InstallError> {
        let command = format!(
            "{} host --home {} info",
            shell_quote(kiln),
            shell_quote(home)
        );
        let out = self.run(&command, b"").await?;
        let info = match wire::parse_reply::<HostInfo>(&out.stdout) {
            Ok(Reply::Ok(info)) => info,
            Ok(Reply::Error(failure)) => {
                return Err(InstallError::InfoRefused {
                    host: self.host.to_string(),
                    message: failure.message,
                })
            }
            Err(_) => {
                let (status, stderr) = describe(&out);
                return Err(InstallError::InfoGarbled {
                    host: self.host.to_string(),
                    status,
                    stderr,
                });
            }
        };
        if info.version != wire::VERSION {
            return Err(InstallError::Version {
                host: self.host.to_string(),
                have: info.version,
                want: wire::VERSION.to_string(),
            });
        }
        Ok(info)
    }
}

/// A failed command's exit and the first line of its standard error
/// (with its separator), for a one-line message.
fn describe(out: &ExecOutput) -> (String, String) {
    let status = match (&out.status, &out.signal) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".to_string(),
    };
    let text = String::from_utf8_lossy(&out.stderr);
    let line: String = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    let stderr = if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    };
    (status, stderr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SshHostSection;

    fn target() -> HostTarget {
        HostTarget {
            address: "10.0.0.2:2222".into(),
            user: "kiln".into(),
            identity_file: PathBuf::from("/etc/kiln/id \"rack\""),
            host_key:
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc"
                    .into(),
        }
    }

    #[test]
    fn the_section_reads_back_as_a_backend_host() {
        let text = section(&target(), "/opt/kiln/kiln", "/srv/kiln");
        let h: SshHostSection = toml::from_str(text.trim_start_matches("[[backend.host]]\n"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let t = target();
        assert_eq!(h.address, t.address);
        assert_eq!(h.user.as_deref(), Some("kiln"));
        assert_eq!(h.identity_file, t.identity_file);
        assert_eq!(h.host_key, t.host_key);
        assert_eq!(h.kiln.as_deref(), Some("/opt/kiln/kiln"));
        assert_eq!(h.kiln_home.as_deref(), Some("/srv/kiln"));

        let text = section(&target(), "/opt/kiln/kiln", DEFAULT_KILN_HOME);
        assert!(!text.contains("kiln_home"), "{text}");
    }

    #[test]
    fn toml_strings_escape_what_toml_needs() {
        assert_eq!(toml_string("a\"b\\c"), r#""a\"b\\c""#);
        let v: toml::Value = toml::from_str(&format!("k = {}", toml_string("x\u{1}\ny"))).unwrap();
        assert_eq!(v["k"].as_str(), Some("x\u{1}\ny"));
    }

    #[test]
    fn failures_describe_themselves_in_one_line() {
        let out = ExecOutput {
            status: Some(1),
            stderr: b"\nmkdir: cannot create directory '/x': Permission denied\nmore\n".to_vec(),
            ..ExecOutput::default()
        };
        assert_eq!(
            describe(&out),
            (
                "exit 1".to_string(),
                ": mkdir: cannot create directory '/x': Permission denied".to_string()
            )
        );
        let out = ExecOutput {
            signal: Some("KILL".into()),
            ..ExecOutput::default()
        };
        assert_eq!(describe(&out), ("signal KILL".to_string(), String::new()));
    }

    #[tokio::test]
    async fn bad_paths_and_identities_are_refused_before_dialing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none");
        let sources = Sources {
            kiln: missing.clone(),
            kiln_vmm: missing.clone(),
            kiln_shim: missing.clone(),
            agent: missing.clone(),
            kernel: missing.clone(),
        };
        // Port 1 on loopback: a dial would fail as unreachable.
        let mut plan = AddHost {
            address: "127.0.0.1:1".into(),
            user: "root".into(),
            identity_file: missing.clone(),
            host_key: None,
            prefix: "usr/local/lib/kiln".into(),
            kiln_home: DEFAULT_KILN_HOME.into(),
        };
        let e = add_host(&plan, &sources, &mut |_| {}).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "host 127.0.0.1:1: prefix must be an absolute path, not \"usr/local/lib/kiln\""
        );
        plan.prefix = DEFAULT_PREFIX.into();
        let e = add_host(&plan, &sources, &mut |_| {}).await.unwrap_err();
        assert!(
            matches!(&e, InstallError::Session(_, SessionError::Identity(..))),
            "{e:?}"
        );
        assert_eq!(
            crate::error_chain(&e),
            format!(
                "host 127.0.0.1:1: Unusable SSH identity {}: Cannot read it: \
                 No such file or directory (os error 2)",
                missing.display()
            )
        );
    }
}
