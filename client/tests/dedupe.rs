//! A publish retried after its origin crashed can reach a subscriber twice: the first copy
//! was delivered before the crash, the second is the retry, sequenced anew by the restarted
//! origin (a new epoch, the same message id), possibly after thousands of other messages.
//! The SDK must show it once. A hand-made node sends exactly that sequence.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_client::{Client, ClientOptions, Event};
use tern_proto::client::{
    ClientFrame, Connected, Deliver, Message, OriginPosition, ServerFrame, Subscribed,
    client_frame, message, server_frame,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(30);
/// Messages of other publishers between the two copies (more than the SDK's former fixed
/// memory of 1,024 ids, which let this very case through in the chaos test).
const BETWEEN: u64 = 5_000;

fn frame(kind: server_frame::Kind) -> WsMessage {
    WsMessage::Binary(ServerFrame { kind: Some(kind) }.encode_to_vec().into())
}

fn msg(id: &str, origin: &str, epoch: u64, seq: u64) -> Message {
    Message {
        channel: "chat:busy".into(),
        id: id.into(),
        origin: origin.into(),
        origin_epoch: epoch,
        origin_seq: seq,
        data: Some(message::Data::Text(id.into())),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_retried_publish_resequenced_by_a_restarted_origin_is_shown_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(WsMessage::Binary(b))) = ws.next().await {
            match ClientFrame::decode(b).unwrap().kind {
                Some(client_frame::Kind::Connect(_)) => {
                    let c = Connected { node: "r/a".into(), ..Default::default() };
                    ws.send(frame(server_frame::Kind::Connected(c))).await.unwrap();
                }
                Some(client_frame::Kind::Subscribe(s)) => {
                    let start = OriginPosition { origin: "r/a".into(), epoch: 1, seq: 0 };
                    let ok = Subscribed {
                        request_id: s.request_id,
                        channel: s.channel,
                        origins: vec![start],
                        ..Default::default()
                    };
                    ws.send(frame(server_frame::Kind::Subscribed(ok))).await.unwrap();
                    // The first copy, from the origin's first epoch...
                    let first = msg("retried", "r/a", 1, 1);
                    ws.feed(frame(server_frame::Kind::Deliver(Deliver { messages: vec![first] })))
                        .await
                        .unwrap();
                    // ...a busy channel's other publishers...
                    for k in 0..BETWEEN {
                        let m = msg(&format!("other-{k}"), "r/b", 7, k + 1);
                        let d = Deliver { messages: vec![m] };
                        ws.feed(frame(server_frame::Kind::Deliver(d))).await.unwrap();
                    }
                    // ...then the retry, sequenced again after the origin restarted.
                    let again = msg("retried", "r/a", 2, 1);
                    let last = msg("after", "r/a", 2, 2);
                    let d = Deliver { messages: vec![again, last] };
                    ws.send(frame(server_frame::Kind::Deliver(d))).await.unwrap();
                }
                _ => {}
            }
        }
    });

    let client = Client::connect(&format!("ws://{addr}"), ClientOptions::default()).await.unwrap();
    let mut sub = client.subscribe("chat:busy").await.unwrap();
    let mut ids = Vec::new();
    while ids.last().map(String::as_str) != Some("after") {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("messages in time") {
            Some(Event::Message(m)) => ids.push(m.id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ids.iter().filter(|id| *id == "retried").count(), 1, "shown once");
    assert_eq!(ids.len() as u64, BETWEEN + 2, "everything else shown");
}
