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
}

/// A fresh ed25519 host key.
pub struct HostKey {
    key: PrivateKey,
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
}
