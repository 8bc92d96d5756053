//! Per-address limits: a slow-loris (connections that never finish their handshake) and a
//! connection flood from one IP are cut off at `limits.max_connections_per_ip`, while
//! clients from other addresses connect normally.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestNode, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PER_IP: usize = 4;

async fn node() -> TestNode {
    TestNode::start(|cfg| {
        cfg.limits.max_connections_per_ip = PER_IP;
        cfg.timeouts.http_header = Duration::from_secs(1);
    })
    .await
}

/// A TCP connection from `from` (any 127.x address works on loopback).
async fn tcp_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the node closes `s` (EOF or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A WebSocket client from `from` that connects, subscribes and gets its own publish back.
async fn works_from(from: [u8; 4], to: SocketAddr) -> bool {
    let stream = tcp_from(from, to).await;
    let url = format!("ws://{to}/v1/ws?format=json");
    let Ok((mut ws, _)) = tokio_tungstenite::client_async(url, stream).await else {
        return false;
    };
    for f in [
        r#"{"connect":{"protocol":1}}"#,
        r#"{"subscribe":{"requestId":1,"channel":"chat:l"}}"#,
        r#"{"publish":{"requestId":2,"channel":"chat:l","text":"ok"}}"#,
    ] {
        if ws.send(WsMessage::Text(f.into())).await.is_err() {
            return false;
        }
    }
    let read = async {
        while let Some(Ok(m)) = ws.next().await {
            if m.to_text().is_ok_and(|t| t.contains("deliver")) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(WAIT, read).await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_and_a_flood_from_one_address_are_cut_off_others_connect() {
    let n = node().await;
    let me = [127, 0, 0, 1];
    // The slow-loris: connections that never send a byte of their handshake.
    let mut loris = Vec::new();
    for _ in 0..PER_IP {
        loris.push(tcp_from(me, n.addr).await);
    }
    // The flood: more from the same address are closed at once.
    for _ in 0..10 {
        let mut extra = tcp_from(me, n.addr).await;
        assert!(closed_within(&mut extra, WAIT).await, "connection past the per-address limit");
    }
    // Meanwhile a client from another address connects, subscribes and publishes.
    assert!(works_from([127, 0, 0, 2], n.addr).await, "another address is unaffected");
    // The slow-loris connections are closed when the handshake timeout passes…
    for s in &mut loris {
        assert!(closed_within(s, WAIT).await, "a handshake that never completes is closed");
    }
    // …which frees the address again.
    assert!(works_from(me, n.addr).await);

    // Upgraded WebSocket sessions count too: PER_IP open sessions fill the address.
    let mut sessions = Vec::new();
    for _ in 0..PER_IP {
        let url = format!("ws://{}/v1/ws?format=json", n.addr);
        let (ws, _) =
            tokio_tungstenite::client_async(url, tcp_from(me, n.addr).await).await.unwrap();
        sessions.push(ws);
    }
    let mut extra = tcp_from(me, n.addr).await;
    assert!(closed_within(&mut extra, WAIT).await, "open sessions count against the address");
    drop(sessions);
    n.stop().await;
}

#[tokio::test]
async fn only_listed_browser_origins_may_open_a_websocket() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::error::Error as WsError;
    let n = TestNode::start(|cfg| {
        // Written as operators do; browsers send `https://app.example`.
        cfg.websocket.allowed_origins = vec!["https://App.Example:443/".into()];
    })
    .await;
    let open = |origin: Option<&'static str>| {
        let mut req = format!("ws://{}/v1/ws", n.addr).into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    for other in ["https://evil.example", "http://app.example", "https://app.example:8443", "null"]
    {
        match open(Some(other)).await {
            Err(WsError::Http(res)) => assert_eq!(res.status(), 403, "{other}"),
            r => panic!("{other}: expected 403, got {:?}", r.map(|_| ())),
        }
    }
    assert!(open(Some("https://app.example")).await.is_ok(), "a listed origin");
    assert!(open(Some("https://APP.example:443")).await.is_ok(), "the same origin, written so");
    assert!(open(None).await.is_ok(), "non-browser clients send no Origin");
    n.stop().await;
}
