//! The SDK's own liveness check, against a node that stops talking: a hand-made WebSocket
//! server that completes the handshake, confirms the subscription, then goes silent without
//! closing. The SDK must notice within the idle timeout the node announced, reconnect, and
//! subscribe again presenting where it left off (resume).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_client::{Client, ClientOptions};
use tern_proto::client::{
    ClientFrame, Connected, ServerFrame, Subscribed, client_frame, server_frame,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(30);

fn frame(kind: server_frame::Kind) -> WsMessage {
    WsMessage::Binary(ServerFrame { kind: Some(kind) }.encode_to_vec().into())
}

#[tokio::test]
async fn a_silent_node_is_detected_and_the_client_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let subscribes = Arc::new(Mutex::new(Vec::new()));
    let seen = subscribes.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            // Answer Connect and Subscribe, then say nothing more and read nothing more.
            while let Some(Ok(WsMessage::Binary(b))) = ws.next().await {
                match ClientFrame::decode(b).unwrap().kind {
                    Some(client_frame::Kind::Connect(_)) => {
                        let c = Connected {
                            idle_timeout_ms: 300,
                            node: "r/silent".into(),
                            ..Default::default()
                        };
                        ws.send(frame(server_frame::Kind::Connected(c))).await.unwrap();
                    }
                    Some(client_frame::Kind::Subscribe(s)) => {
                        seen.lock().unwrap().push(s.clone());
                        let ok = Subscribed {
                            request_id: s.request_id,
                            channel: s.channel,
                            ..Default::default()
                        };
                        ws.send(frame(server_frame::Kind::Subscribed(ok))).await.unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            held.push(ws);
        }
    });

    let client = Client::connect(&format!("ws://{addr}"), ClientOptions::default()).await.unwrap();
    let _sub = client.subscribe("chat:quiet").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while subscribes.lock().unwrap().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the client did not reconnect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    let again = subscribes.lock().unwrap()[1].clone();
    let resume = again.resume.expect("the second subscribe resumes");
    assert_eq!(resume.node, "r/silent", "it names the node it left");
}
