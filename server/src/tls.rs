//! TLS on the gRPC port: rustls (ring), certificates and keys from PEM
//! files, ALPN `h2`, and optionally client certificates required and
//! verified against a CA (mutual TLS).
//!
//! The files are watched: when one changes (cert-manager and the like
//! rotate them in place, or swap a symlink), the set is loaded again and new
//! connections get it; connections already open keep the session they
//! negotiated. A new set that does not load (a half-written file, a key
//! that does not match) keeps the old one, and the log says why.

use std::{
    fs,
    io::BufReader,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio_util::sync::CancellationToken;

/// How often the files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The PEM files TLS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; none: no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Why a set of files cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it is (certificate, key, client CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{what} {path}: {detail}")]
    Content {
        /// Which file it is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The certificate and key were read but rustls refused them (a key that
    /// is not the certificate's, an unsupported algorithm).
    #[error("the certificate {cert} and key {key} cannot be used together: {source}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

/// The PEM certificates in `path` (at least one).
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let content = |detail: String| TlsError::Content { what, path: path.to_owned(), detail };
    let certs = CertificateDer::pem_reader_iter(&mut BufReader::new(&pem[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(content("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

/// The first PEM private key in `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Content {
        what: "key",
        path: path.to_owned(),
        detail: format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

/// Builds the rustls server configuration from `files`.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates("certificate", &files.cert)?;
    let key = private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA", path)? {
                roots.add(cert).map_err(|e| TlsError::Content {
                    what: "client CA",
                    path: path.clone(),
                    detail: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Content { what: "client CA", path: path.clone(), detail: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|source| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })?;
    // gRPC is HTTP/2; HTTP/1.1 is offered for gRPC-Web callers that ask
    // for it (browsers take h2 when offered).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What identifies the files' current contents without reading them: each
/// file's inode, size and modification time (following symlinks, so a
/// swapped link counts as a change).
fn fingerprint(files: &TlsFiles) -> Vec<Option<(u64, u64, i64, i64)>> {
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| fs::metadata(path).ok().map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec())))
        .collect()
}

/// The server's TLS configuration, kept current with its files.
#[derive(Debug, Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Tls {
    /// Loads `files`; an error means the server cannot start with them.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self { files: Arc::new(files), current: Arc::new(RwLock::new(Arc::new(config))) })
    }

    /// The certificate file.
    pub fn cert(&self) -> &Path {
        &self.files.cert
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for a new connection: the configuration current now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Checks the files every `every` until `stop` fires, loading them again
    /// when they change.
    pub async fn watch(self, every: Duration, stop: CancellationToken) {
        let mut seen = fingerprint(&self.files);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = fingerprint(&self.files);
            if now == seen {
                continue;
            }
            // Remembered whether or not it loads: a broken set is reported
            // once, and tried again when a file changes again.
            seen = now;
            match server_config(&self.files) {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        "TLS files changed: new connections get the new certificate"
                    );
                }
                Err(err) => tracing::warn!(
                    error = %err,
                    "TLS files changed but cannot be used; keeping the previous certificate"
                ),
            }
        }
    }
}
