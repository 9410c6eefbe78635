//! The keys SSH needs: the grant's authorized public keys, and a host key
//! generated fresh at every boot (each VM is its own host).

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness for the host key")]
    Random(#[source] std::io::Error),
    #[error("the host key from the host is not an OpenSSH private key")]
    BadHostKey,
}

/// The host key the host chose (so it can pin its fingerprint).
pub fn parse_host_key(text: &str) -> Result<PrivateKey, KeyError> {
    PrivateKey::from_openssh(text).map_err(|_| KeyError::BadHostKey)
}

/// Parses OpenSSH `authorized_keys` lines; returns the keys and the lines
/// that could not be used (so the caller can log them, not fail).
pub fn parse_authorized(lines: &[String]) -> (Vec<PublicKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut bad = Vec::new();
    for line in lines.iter().flat_map(|l| l.lines()) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match PublicKey::from_openssh(line) {
            Ok(k) => keys.push(k),
            Err(_) => bad.push(line.chars().take(40).collect()),
        }
    }
    (keys, bad)
}

/// Whether `offered` is one of `allowed` (the key material, not the comment).
pub fn is_authorized(allowed: &[PublicKey], offered: &PublicKey) -> bool {
    allowed.iter().any(|k| k.key_data() == offered.key_data())
}

/// A new ed25519 host key from the kernel's RNG.
pub fn host_key() -> Result<PrivateKey, KeyError> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: writes at most the remaining bytes of `seed`.
        let n =
            unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(KeyError::Random(e));
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

    #[test]
    fn parses_good_lines_and_reports_bad_ones() {
        let lines = vec![
            format!("# comment\n\n{KEY}"),
            "ssh-ed25519 not-base64".to_string(),
        ];
        let (keys, bad) = parse_authorized(&lines);
        assert_eq!(keys.len(), 1);
        assert_eq!(bad, vec!["ssh-ed25519 not-base64".to_string()]);
        let same_key_other_comment = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl other",
        )
        .unwrap();
        assert!(is_authorized(&keys, &same_key_other_comment));
        let other = host_key().unwrap();
        assert!(!is_authorized(&keys, other.public_key()));
    }

    #[test]
    fn host_keys_differ_per_boot() {
        let (a, b) = (host_key().unwrap(), host_key().unwrap());
        assert_ne!(a.public_key().key_data(), b.public_key().key_data());
    }
}
