//! The cluster CA and node certificates (`tern certs`), and the TLS configurations built
//! from them: mutual TLS between nodes, each certificate naming its node.
//!
//! A node's identity is the DNS name `NAME.REGION.node.tern` in its certificate. A dialing
//! node checks the server's certificate for the expected peer's name; an accepting node
//! checks the client's certificate against its configured peers.
//!
//! Revocation: `tern certs revoke REGION/NAME` adds a node's certificate to the CA's
//! certificate revocation list (`DIR/crl.pem`); nodes given that file (`backbone.crl`)
//! refuse the revoked node in both directions, when it dials and when it is dialled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
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

/// Revokes `node`'s certificate in `DIR` (as issued by [`issue_node`]): adds its serial
/// number to the CA's revocation list `DIR/crl.pem` (created if missing, re-signed with
/// every earlier entry kept) and returns the list's path. Revoking twice changes nothing
/// but the list's dates. Nodes given the list (`backbone.crl`) re-read it while running.
pub fn revoke_node(dir: &Path, node: &NodeId) -> Result<PathBuf, CertError> {
    let (cert_path, _) = node_files(dir, node);
    let serial = cert_serial(&cert_path)?;
    let crl_path = dir.join("crl.pem");
    let mut revoked = if crl_path.exists() { revoked_serials(&crl_path)? } else { Vec::new() };
    let now = time::OffsetDateTime::now_utc();
    if !revoked.iter().any(|(s, _)| *s == serial) {
        revoked.push((serial, now));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(365),
        // Grows with every list the CA signs (seconds since the epoch).
        crl_number: SerialNumber::from(now.unix_timestamp().max(1).to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .into_iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: at,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    write(&crl_path, &crl.pem()?)?;
    Ok(crl_path)
}

fn pem_error(path: &Path, reason: impl ToString) -> CertError {
    CertError::Pem { path: path.into(), reason: reason.to_string() }
}

/// The serial number of the first certificate in a PEM file, big-endian without sign
/// padding.
fn cert_serial(path: &Path) -> Result<Vec<u8>, CertError> {
    let der = certs(path)?.remove(0);
    serial_of(&der).ok_or_else(|| pem_error(path, "unparsable certificate"))
}

/// A certificate's serial number, big-endian without sign padding (as revocation lists
/// name it); `None` if the certificate does not parse.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(cert.serial.to_bytes_be())
}

/// The serial numbers of the certificates a PEM revocation list names.
pub fn revoked(path: &Path) -> Result<std::collections::HashSet<Vec<u8>>, CertError> {
    Ok(revoked_serials(path)?.into_iter().map(|(serial, _)| serial).collect())
}

/// The serial numbers (and revocation times) a PEM revocation list names.
fn revoked_serials(path: &Path) -> Result<Vec<(Vec<u8>, time::OffsetDateTime)>, CertError> {
    let mut out = Vec::new();
    for der in crls(path)? {
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| pem_error(path, e))?;
        for r in crl.iter_revoked_certificates() {
            out.push((r.user_certificate.to_bytes_be(), r.revocation_date.to_datetime()));
        }
    }
    Ok(out)
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
    /// Certificate revocation lists of the cluster CA (PEM, from `tern certs revoke`), if
    /// any: peers whose certificates they name are refused.
    pub crl: Option<PathBuf>,
}

fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, e))?;
    if crls.is_empty() {
        return Err(pem_error(path, "no certificate revocation list"));
    }
    Ok(crls)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate"));
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
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let crls = match &files.crl {
        Some(path) => crls(path)?,
        None => Vec::new(),
    };
    // Node certificates are issued by the cluster CA itself, whose list is authoritative
    // for them: a certificate it does not cover (another CA's list) is refused, not waved
    // through.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .build()?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("tern-certs-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_revocation_list_keeps_every_revoked_node_once_and_loads_into_the_tls_configs() {
        let dir = temp_dir();
        init_ca(&dir).unwrap();
        let a = NodeId::parse("eu-west/a").unwrap();
        let b = NodeId::parse("us-east/b").unwrap();
        let kept = NodeId::parse("ap-south/c").unwrap();
        for n in [&a, &b, &kept] {
            issue_node(&dir, n).unwrap();
        }
        let serial = |n: &NodeId| cert_serial(&node_files(&dir, n).0).unwrap();
        let crl = revoke_node(&dir, &a).unwrap();
        revoke_node(&dir, &a).unwrap();
        revoke_node(&dir, &b).unwrap();
        let listed: Vec<Vec<u8>> =
            revoked_serials(&crl).unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(listed, [serial(&a), serial(&b)], "each revoked node once, none other");
        assert!(!listed.contains(&serial(&kept)));
        let (cert, key) = node_files(&dir, &kept);
        let files = TlsFiles { ca: dir.join("ca.pem"), cert, key, crl: Some(crl) };
        tls_configs(&files).unwrap();
        // A file that holds no list is refused at start, not ignored.
        let files = TlsFiles { crl: Some(dir.join("ca.pem")), ..files };
        assert!(matches!(tls_configs(&files), Err(CertError::Pem { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
