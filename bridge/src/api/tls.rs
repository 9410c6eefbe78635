//! TLS for kilnd's API (rustls): the certificate chain and private key
//! named in the configuration, read once at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("no PEM private key in {0}")]
    NoKey(PathBuf),
    #[error("invalid PEM in {0}")]
    Pem(PathBuf, #[source] pem::Error),
    #[error("unusable certificate or key")]
    Rustls(#[from] rustls::Error),
}

/// An acceptor serving `cert` (PEM chain, leaf first) with `key` (PEM:
/// PKCS#8, PKCS#1 or SEC1), for HTTP/1.1.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Read(cert.to_path_buf(), e))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(cert.to_path_buf(), e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let key_pem = std::fs::read(key).map_err(|e| TlsError::Read(key.to_path_buf(), e))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey(key.to_path_buf()),
        e => TlsError::Pem(key.to_path_buf(), e),
    })?;
    // ring rather than aws-lc-rs (no cmake/C toolchain build); rustls
    // deprecates it only for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("none.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = acceptor(&none, &empty).err().unwrap();
        assert!(matches!(&e, TlsError::Read(p, _) if p == &none), "{e:?}");
        let e = acceptor(&empty, &empty).err().unwrap();
        assert!(
            matches!(&e, TlsError::NoCertificate(p) if p == &empty),
            "{e:?}"
        );
    }
}
