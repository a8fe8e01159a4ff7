//! AMQPS: the server's TLS identity (a PEM certificate chain and private
//! key, checked against each other when loaded) and the handshake that turns
//! an accepted TCP socket into a TLS stream. rustls does the TLS, with the
//! `ring` provider chosen explicitly so that the result does not depend on
//! which providers other crates in the process enabled.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key could not be loaded. Each names the file and
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no usable PEM `CERTIFICATE` block.
    #[error("the TLS certificate file {path} holds no PEM certificate ({reason}); expected a '-----BEGIN CERTIFICATE-----' block")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        reason: String,
    },
    /// The key file holds no usable PEM private key.
    #[error("the TLS private key file {path} holds no PEM private key ({reason}); expected a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) 'PRIVATE KEY' block")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        reason: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("the TLS private key {key} cannot be used with the certificate {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

/// The server's TLS identity, ready to accept handshakes. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads a PEM certificate chain (the server's certificate first) and
    /// the PEM private key that belongs to it. Clients are not asked for
    /// certificates.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsConfig, TlsError> {
        let chain = load_chain(cert)?;
        let private = load_key(key)?;
        let mismatch = |e: rustls::Error| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the key does not match the certificate's public key".to_string()
                }
                other => other.to_string(),
            },
        };
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(mismatch)?;
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Runs the server side of the TLS handshake on an accepted socket.
    pub(crate) async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read("certificate", path)?;
    let no_cert = |reason: String| TlsError::NoCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| no_cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(no_cert("no CERTIFICATE block found".to_string()));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::NoKey {
        path: path.to_path_buf(),
        reason: match e {
            pem::Error::NoItemsFound => "no PRIVATE KEY block found".to_string(),
            other => other.to_string(),
        },
    })
}
