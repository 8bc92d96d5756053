//! The cluster CA and node certificates (`tern certs`), and the TLS configurations built
//! from them: mutual TLS between nodes, each certificate naming its node.
//!
//! A node's identity is the DNS name `NAME.REGION.node.tern` in its certificate. A dialing
//! node checks the server's certificate for the expected peer's name; an accepting node
//! checks the client's certificate against its configured peers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tern_proto::types::NodeId;

/// ALPN protocol of the backbone.
pub const ALPN: &[u8] = b"tern-backbone/1";

/// Errors making or loading certificates. Operator's fault; fix files and retry.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("tls: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The DNS name in a node's certificate.
pub fn node_dns_name(node: &NodeId) -> String {
    format!("{}.{}.node.tern", node.name(), node.region())
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    std::fs::write(path, text).map_err(|source| CertError::Io { path: path.into(), source })
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.into(), source })
}

/// Creates a development cluster CA: `DIR/ca.pem` and `DIR/ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.into(), source })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "Tern cluster CA (development)");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.pem"), &cert.pem())?;
    write(&dir.join("ca.key"), &key.serialize_pem())?;
    Ok(())
}

/// File names of a node's certificate and key in a certs directory.
pub fn node_files(dir: &Path, node: &NodeId) -> (PathBuf, PathBuf) {
    let base = format!("{}-{}", node.region(), node.name());
    (dir.join(format!("{base}.pem")), dir.join(format!("{base}.key")))
}

/// Issues a certificate for `node`, signed by the CA in `dir`.
pub fn issue_node(dir: &Path, node: &NodeId) -> Result<(PathBuf, PathBuf), CertError> {
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node_dns_name(node)])?;
    params.distinguished_name.push(DnType::CommonName, node.as_str());
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = node_files(dir, node);
    write(&cert_path, &cert.pem())?;
    write(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Issues a development certificate for a client listener (`[tls]`, `wss://`) naming
/// `hosts` (DNS names or IP addresses), signed by the CA in `dir`: `DIR/server.pem` and
/// `DIR/server.key`. Clients trust `DIR/ca.pem` (SDK: `ClientOptions::trust_pem`).
pub fn issue_server(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), CertError> {
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    if let Some(first) = hosts.first() {
        params.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    write(&cert_path, &cert.pem())?;
    write(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Paths of a node's TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::Pem { path: path.into(), reason: e.to_string() })?
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem { path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::Pem { path: path.into(), reason: "no certificate".into() });
    }
    Ok(certs)
}

/// Server and client TLS configurations for QUIC, both requiring certificates signed by the
/// cluster CA.
pub fn tls_configs(
    files: &TlsFiles,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca)?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| CertError::Pem { path: files.key.clone(), reason: e.to_string() })?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok((server, client))
}

/// Whether a (CA-verified) certificate names `node`.
pub fn cert_names(cert: &CertificateDer<'_>, node: &NodeId) -> bool {
    let Ok(name) = ServerName::try_from(node_dns_name(node)) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}
