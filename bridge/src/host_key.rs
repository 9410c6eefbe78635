//! The SSH host key of one grant's VM. The host makes it and hands it to
//! the agent, so the requester can pin it before the first connection.

use std::io::Read;

use ssh_key::private::Ed25519Keypair;
use ssh_key::{HashAlg, LineEnding, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("no randomness for a host key")]
    Random(#[source] std::io::Error),
    #[error("cannot encode the host key")]
    Encode(#[source] ssh_key::Error),
    #[error("not an OpenSSH private key")]
    Parse(#[source] ssh_key::Error),
    #[error("the host key is {0}, not an unencrypted ed25519 key")]
    Kind(String),
}

/// An ed25519 host key: fresh, or the one a bridge made for a grant.
#[derive(Clone)]
pub struct HostKey {
    key: PrivateKey,
}

/// Names the key by its fingerprint: the private half never reaches a log.
impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({})", self.fingerprint())
    }
}

impl HostKey {
    pub fn generate() -> Result<HostKey, HostKeyError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(HostKeyError::Random)?;
        Ok(HostKey {
            key: PrivateKey::from(Ed25519Keypair::from_seed(&seed)),
        })
    }

    /// A key made elsewhere (the bridge's, for a grant on a cloud
    /// instance), from its OpenSSH private key file.
    pub fn from_openssh(text: &str) -> Result<HostKey, HostKeyError> {
        let key = PrivateKey::from_openssh(text.trim()).map_err(HostKeyError::Parse)?;
        // The agent serves ed25519 only; an encrypted key cannot be used
        // unattended.
        if key.is_encrypted() || key.algorithm() != ssh_key::Algorithm::Ed25519 {
            let what = if key.is_encrypted() {
                "encrypted".to_string()
            } else {
                key.algorithm().to_string()
            };
            return Err(HostKeyError::Kind(what));
        }
        Ok(HostKey { key })
    }

    /// The private key in OpenSSH format (what the agent serves).
    pub fn private_openssh(&self) -> Result<String, HostKeyError> {
        self.key
            .to_openssh(LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(HostKeyError::Encode)
    }

    /// `ssh-ed25519 AAAA…`, for a known_hosts line.
    pub fn public_openssh(&self) -> Result<String, HostKeyError> {
        self.key
            .public_key()
            .to_openssh()
            .map_err(HostKeyError::Encode)
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_match_ssh_keygen() {
        let k = HostKey::generate().unwrap();
        let other = HostKey::generate().unwrap();
        assert_ne!(k.fingerprint(), other.fingerprint());
        let private = k.private_openssh().unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let public = k.public_openssh().unwrap();
        assert!(public.starts_with("ssh-ed25519 "));
        // The stock tool agrees on the fingerprint.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pub");
        std::fs::write(&path, format!("{public}\n")).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&path)
            .output()
            .expect("ssh-keygen (openssh-client)");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(&k.fingerprint()), "{shown}");
    }

    #[test]
    fn a_key_made_elsewhere_reads_back_as_itself() {
        let k = HostKey::generate().unwrap();
        let back = HostKey::from_openssh(&k.private_openssh().unwrap()).unwrap();
        assert_eq!(back.fingerprint(), k.fingerprint());
        assert!(!format!("{back:?}").contains("PRIVATE"));
        // One ssh-keygen wrote, as an operator's tooling might.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .output()
            .expect("ssh-keygen (openssh-client)");
        assert!(out.status.success(), "{out:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        let key = HostKey::from_openssh(&text).unwrap();
        assert!(public.starts_with(&key.public_openssh().unwrap()));
        for bad in [
            "",
            "ssh-ed25519 AAAA",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n",
        ] {
            assert!(
                matches!(HostKey::from_openssh(bad), Err(HostKeyError::Parse(_))),
                "{bad}"
            );
        }
    }
}
