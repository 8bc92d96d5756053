//! TLS for clients: a node with `[tls]` serves `wss://` and `https://` only, with the
//! certificate from its PEM files; the SDK verifies it (against a private CA here, the
//! public roots by default) for the WebSocket and for nearest-region probing.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNode, WAIT};
use futures_util::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tern_client::{Client, ClientOptions, Event};
use tern_edge::config::TlsSection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and a certificate for `localhost` and 127.0.0.1 signed by it; returns the CA's PEM
/// and the `[tls]` section.
fn certificates(dir: &Path) -> (String, TlsSection) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cert_path: PathBuf = dir.join("edge.pem");
    let key_path: PathBuf = dir.join("edge.key");
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_cert.pem(), TlsSection { cert: cert_path, key: key_path })
}

async fn tls_node(section: TlsSection) -> TestNode {
    TestNode::start(move |cfg| {
        cfg.tls = Some(section);
        cfg.timeouts.http_header = Duration::from_millis(500);
    })
    .await
}

#[tokio::test]
async fn clients_connect_over_wss_and_messages_flow() {
    let dir = common::temp_dir("tls");
    let (ca, section) = certificates(&dir);
    let n = tls_node(section).await;
    let url = format!("wss://localhost:{}", n.addr.port());
    let options = ClientOptions::default().trust_pem(ca.as_bytes()).unwrap();

    let sub_client = Client::connect(&url, options.clone()).await.unwrap();
    let mut sub = sub_client.subscribe("chat:tls").await.unwrap();
    let publisher = Client::connect(&url, options.clone()).await.unwrap();
    publisher.publish("chat:tls", "over TLS").await.unwrap();
    let ev = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    let Event::Message(m) = ev else { panic!("{ev:?}") };
    assert_eq!(m.data, Some(tern_proto::client::message::Data::Text("over TLS".into())));

    // Nearest-region selection works over TLS too, and the node lists itself as wss://.
    let tls = options.tls.clone().unwrap();
    let regions = tern_client::nearest::regions_with(&url, WAIT, &tls).await.unwrap();
    assert!(regions[0].url.starts_with("wss://"), "{regions:?}");
    let ranked = tern_client::nearest::rank_with(std::slice::from_ref(&url), 2, WAIT, &tls).await;
    assert!(ranked[0].rtt.is_some(), "probed over TLS: {ranked:?}");
    let nearest = Client::connect_nearest(&url, options).await.unwrap();
    nearest.publish("chat:tls", "nearest").await.unwrap();
    n.stop().await;
}

#[tokio::test]
async fn untrusted_certificates_and_plaintext_are_refused() {
    let dir = common::temp_dir("tls-refused");
    let (_ca, section) = certificates(&dir);
    let n = tls_node(section).await;
    let port = n.addr.port();

    // The public roots do not know this CA: the SDK refuses the node.
    let quick =
        ClientOptions { connect_timeout: Duration::from_secs(5), ..ClientOptions::default() };
    let r = Client::connect(&format!("wss://localhost:{port}"), quick.clone()).await;
    assert!(r.is_err(), "an untrusted certificate must be refused");
    // A certificate for another CA, presented as trusted, is not this one.
    let (other_ca, _) = certificates(&common::temp_dir("tls-other"));
    let wrong = quick.clone().trust_pem(other_ca.as_bytes()).unwrap();
    assert!(Client::connect(&format!("wss://localhost:{port}"), wrong).await.is_err());

    // Plain WebSocket and plain HTTP get no service on the TLS port.
    assert!(Client::connect(&format!("ws://127.0.0.1:{port}"), quick).await.is_err());
    let mut s = TcpStream::connect(n.addr).await.unwrap();
    s.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("closed");
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 2"), "no plaintext answer");

    // A TLS handshake that never comes is cut off at timeouts.http_header.
    let mut idle = TcpStream::connect(n.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, idle.read(&mut buf)).await.expect("cut off in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    n.stop().await;
}

#[tokio::test]
async fn a_missing_or_bad_certificate_stops_the_node_at_start() {
    let dir = common::temp_dir("tls-bad");
    let mut cfg = tern_edge::Config::default();
    cfg.listen.client = "127.0.0.1:0".parse().unwrap();
    cfg.tls = Some(TlsSection { cert: dir.join("missing.pem"), key: dir.join("missing.key") });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = tern_edge::Server::bind(cfg.clone().validate().unwrap(), shutdown.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    std::fs::write(dir.join("garbage.pem"), "not a certificate").unwrap();
    let (_, good) = certificates(&dir);
    cfg.tls = Some(TlsSection { cert: dir.join("garbage.pem"), key: good.key });
    let err = tern_edge::Server::bind(cfg.validate().unwrap(), shutdown).await.unwrap_err();
    assert!(err.to_string().contains("garbage.pem"), "{err}");
}

/// A renewed certificate written over the `[tls]` files is served from the next handshake
/// on, without a restart; connections opened before carry on. A renewal that does not load
/// leaves the current certificate in service.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    // A new client configuration each time: TLS session resumption would let a client that
    // connected before skip the certificate.
    let trusting = |ca: &str| {
        ClientOptions { connect_timeout: Duration::from_secs(5), ..ClientOptions::default() }
            .trust_pem(ca.as_bytes())
            .unwrap()
    };
    let dir = common::temp_dir("tls-renew");
    let (old_ca, section) = certificates(&dir);
    let n = tls_node(section.clone()).await;
    let url = format!("wss://localhost:{}", n.addr.port());
    let before = Client::connect(&url, trusting(&old_ca)).await.unwrap();
    let mut sub = before.subscribe("chat:renew").await.unwrap();

    // A broken renewal (a key that is not PEM) changes nothing.
    std::fs::write(&section.key, "not a key").unwrap();
    tokio::time::sleep(tern_edge::tls::RELOAD + Duration::from_secs(1)).await;
    Client::connect(&url, trusting(&old_ca)).await.expect("the previous certificate stays");

    // The real renewal: a certificate from another CA over the same files.
    let (new_ca, _) = certificates(&dir);
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        if let Ok(c) = Client::connect(&url, trusting(&new_ca)).await {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate is never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        Client::connect(&url, trusting(&old_ca)).await.is_err(),
        "the old certificate is no longer served"
    );
    after.publish("chat:renew", "after the renewal").await.unwrap();
    let ev = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    let Event::Message(m) = ev else { panic!("{ev:?}") };
    assert_eq!(m.data, Some(tern_proto::client::message::Data::Text("after the renewal".into())));
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
