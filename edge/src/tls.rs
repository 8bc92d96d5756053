//! TLS for the client listener (`[tls]`): the certificate chain and key come from PEM files
//! and are re-read every [`RELOAD`], so a renewed certificate (Let's Encrypt, cert-manager)
//! is served from the next handshake on without a restart. Connections already open keep
//! the session they negotiated.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TlsSection;

/// How often the certificate and key files are checked for a change.
pub const RELOAD: Duration = Duration::from_secs(5);

/// The certificate every handshake presents: the newest that loaded.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Loads the chain and key of `t`, checking that they belong together. The error names
/// the file at fault.
fn load(t: &TlsSection, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let err = |what: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", what.display());
    let chain = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(&t.cert, &e))?;
    if chain.is_empty() {
        return Err(err(&t.cert, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| err(&t.key, &e))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| err(&t.key, &e))
}

/// The client listener's TLS: the acceptor, and the task that keeps its certificate
/// current.
pub struct ClientTls {
    /// Accepts TLS connections with the current certificate.
    pub acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    files: TlsSection,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("cert", &self.files.cert).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads `[tls]`'s files; an error names the file at fault.
    pub fn new(t: &TlsSection) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = Arc::new(Current(RwLock::new(Arc::new(load(t, &provider)?))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Self { acceptor, current, files: t.clone(), provider })
    }

    /// Re-reads the files every [`RELOAD`] until `shutdown`; when either changed and both
    /// load and match, new handshakes present the new certificate. A pair that does not
    /// load (a renewal half written, a key that does not match) is reported once and the
    /// previous certificate stays in service; the next change of either file is tried.
    pub async fn reload(self, shutdown: CancellationToken) {
        let read = |f: &TlsSection| (std::fs::read(&f.cert).ok(), std::fs::read(&f.key).ok());
        let mut last = read(&self.files);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD) => {}
            }
            let now = read(&self.files);
            if now == last {
                continue;
            }
            last = now;
            match load(&self.files, &self.provider) {
                Ok(key) => {
                    *self.current.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                    info!(cert = %self.files.cert.display(), "client TLS certificate reloaded");
                }
                Err(e) => {
                    warn!(error = %e, "cannot reload the client TLS certificate; the previous one stays in service")
                }
            }
        }
    }
}
