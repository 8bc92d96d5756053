//! The client protocol with hand-written frames over a raw client (no SDK): the documented
//! frames, error codes and close codes, over every transport (the WebSocket, HTTP
//! streaming, server-sent events, long polling) in both encodings where the transport
//! carries them.

mod common;

use common::transport::{ALL, BINARY, Raw, Transport};
use common::{RawJson, TestNode, close_code, http};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn hand_written_json_frames_publish_and_deliver() {
    for t in ALL {
        for u in [Transport::WebSocket, t] {
            publish_and_deliver(t, u).await;
        }
    }
}

/// A subscriber over `sub_t` and a publisher over `pub_t`.
async fn publish_and_deliver(sub_t: Transport, pub_t: Transport) {
    let node = TestNode::start(|_| {}).await;
    let (mut sub, connected) = Raw::connected(node.addr, sub_t).await;
    let c = &connected["connected"];
    assert_eq!(c["node"], "local/edge-1");
    assert_eq!(c["clientId"], "raw");
    assert_eq!(c["limits"]["maxMessageBytes"], 65536);
    sub.send(r#"{"subscribe":{"requestId":1,"channel":"chat:lobby"}}"#).await;
    let s = sub.recv().await;
    assert_eq!(s["subscribed"]["requestId"], 1);
    assert_eq!(s["subscribed"]["channel"], "chat:lobby");

    let (mut publ, _) = Raw::connected(node.addr, pub_t).await;
    publ.send(r#"{"publish":{"requestId":7,"channel":"chat:lobby","id":"m-1","name":"greeting","text":"hi"}}"#).await;
    let ack = publ.recv().await;
    assert_eq!(ack["ack"]["requestId"], 7);
    assert_eq!(ack["ack"]["messageId"], "m-1");
    assert_eq!(ack["ack"]["originSeq"], "1");
    publ.send(r#"{"publish":{"requestId":8,"channel":"chat:lobby","binary":"AAEC"}}"#).await;
    assert_eq!(publ.recv().await["ack"]["requestId"], 8);

    let d = sub.recv().await;
    let m = &d["deliver"]["messages"][0];
    assert_eq!(m["channel"], "chat:lobby");
    assert_eq!(m["id"], "m-1");
    assert_eq!(m["name"], "greeting");
    assert_eq!(m["text"], "hi");
    assert_eq!(m["clientId"], "raw");
    assert_eq!(m["origin"], "local/edge-1");
    let m2 = sub.recv().await;
    let m2 = &m2["deliver"]["messages"][0];
    assert_eq!(m2["binary"], "AAEC");
    assert_eq!(m2["originSeq"], "2");

    // App-level heartbeat is echoed.
    sub.send(r#"{"heartbeat":{"nonce":"42"}}"#).await;
    assert_eq!(sub.recv().await, json!({"heartbeat":{"nonce":"42"}}));

    // Unsubscribe: confirmed, and no more deliveries.
    sub.send(r#"{"unsubscribe":{"requestId":2,"channel":"chat:lobby"}}"#).await;
    assert_eq!(sub.recv().await["unsubscribed"]["requestId"], 2);
    publ.send(r#"{"publish":{"requestId":9,"channel":"chat:lobby","text":"gone"}}"#).await;
    publ.recv().await;
    sub.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
    assert!(sub.recv().await.get("heartbeat").is_some(), "no delivery after unsubscribe");
    node.stop().await;
}

#[tokio::test]
async fn recoverable_errors_keep_the_connection_working() {
    for t in ALL {
        recoverable_errors(t).await;
    }
}

async fn recoverable_errors(t: Transport) {
    let node = TestNode::start(|cfg| cfg.limits.max_channels_per_connection = 2).await;
    let (mut c, _) = Raw::connected(node.addr, t).await;
    let cases = [
        (r#"{"subscribe":"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"[1,2,3]"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"{"subscribe":{"requestId":"x","channel":5}}"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"{"frobnicate":{"requestId":1}}"#, 0, "ERROR_CODE_UNKNOWN_FRAME"),
        (r#"{}"#, 0, "ERROR_CODE_UNKNOWN_FRAME"),
        (r#"{"subscribe":{"requestId":3,"channel":"chat room"}}"#, 3, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"subscribe":{"requestId":4,"channel":"Chat:x"}}"#, 4, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"subscribe":{"requestId":5,"channel":""}}"#, 5, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"connect":{}}"#, 0, "ERROR_CODE_ALREADY_CONNECTED"),
    ];
    for (frame, request_id, code) in cases {
        c.send(frame).await;
        let e = c.recv().await;
        assert_eq!(e["error"]["code"], code, "{t:?}: frame {frame}: got {e}");
        assert_eq!(e["error"].get("requestId").and_then(|v| v.as_u64()).unwrap_or(0), request_id);
        assert!(!e["error"]["reason"].as_str().unwrap_or("").is_empty());
    }
    // Channel limit: two channels fit, the third is refused, re-subscribing is fine.
    for (i, ch) in ["a:1", "a:2", "a:1"].iter().enumerate() {
        c.send(&format!(r#"{{"subscribe":{{"requestId":{},"channel":"{ch}"}}}}"#, 10 + i)).await;
        assert!(c.recv().await.get("subscribed").is_some());
    }
    c.send(r#"{"subscribe":{"requestId":20,"channel":"a:3"}}"#).await;
    let e = c.recv().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_TOO_MANY_CHANNELS");
    assert_eq!(e["error"]["requestId"], 20);
    // Publish errors are nacks.
    let big = "x".repeat(65537);
    c.send(&format!(r#"{{"publish":{{"requestId":30,"channel":"a:1","text":"{big}"}}}}"#)).await;
    let n = c.recv().await;
    assert_eq!(n["nack"]["code"], "ERROR_CODE_MESSAGE_TOO_LARGE");
    assert_eq!(n["nack"]["requestId"], 30);
    c.send(r#"{"publish":{"requestId":31,"channel":"bad channel","text":"x"}}"#).await;
    assert_eq!(c.recv().await["nack"]["code"], "ERROR_CODE_INVALID_CHANNEL");
    let long_id = "i".repeat(200);
    c.send(&format!(
        r#"{{"publish":{{"requestId":32,"channel":"a:1","id":"{long_id}","text":"x"}}}}"#
    ))
    .await;
    assert_eq!(c.recv().await["nack"]["code"], "ERROR_CODE_INVALID_ARGUMENT");
    // After all that, the connection still publishes and delivers.
    c.send(r#"{"publish":{"requestId":40,"channel":"a:1","text":"still here"}}"#).await;
    let mut saw_ack = false;
    let mut saw_msg = false;
    while !(saw_ack && saw_msg) {
        let f = c.recv().await;
        saw_ack |= f["ack"]["requestId"] == 40;
        saw_msg |= f["deliver"]["messages"][0]["text"] == "still here";
    }
    node.stop().await;
}

#[tokio::test]
async fn protobuf_by_subprotocol_and_binary_frames() {
    use prost::Message as _;
    use tern_proto::client::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start(|_| {}).await;
    let mut req = format!("ws://{}/v1/ws", node.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "tern.v1.proto".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "tern.v1.proto");
    let frame = ClientFrame { kind: Some(client_frame::Kind::Connect(Connect::default())) };
    ws.send(WsMessage::Binary(frame.encode_to_vec().into())).await.unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Binary(b))) => {
            let f = ServerFrame::decode(b).unwrap();
            assert!(matches!(f.kind, Some(server_frame::Kind::Connected(_))));
        }
        other => panic!("expected a binary Connected frame, got {other:?}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let node = TestNode::start(|_| {}).await;
    let (mut c, _) = RawJson::connected(node.addr).await;
    // Above the default frame limit (`min_frame_bytes(max_message_bytes)`, 392 KiB).
    let huge = "y".repeat(tern_edge::config::min_frame_bytes(64 * 1024) + 1);
    let _ = c
        .ws
        .send(WsMessage::Text(format!(r#"{{"publish":{{"channel":"a","text":"{huge}"}}}}"#).into()))
        .await;
    assert_eq!(c.close_code().await, Some(1009));
    node.stop().await;
}

#[tokio::test]
async fn frames_before_connect_close_with_4002() {
    for t in ALL {
        let node = TestNode::start(|_| {}).await;
        let mut c = Raw::open(node.addr, t, false).await;
        c.send(r#"{"subscribe":{"requestId":1,"channel":"a"}}"#).await;
        assert_eq!(c.close_code().await, Some(4002), "{t:?}");
        node.stop().await;
    }
}

/// Protobuf frames over every transport that carries them: connect, subscribe, publish,
/// deliver, and the close code at the end.
#[tokio::test]
async fn protobuf_frames_over_every_binary_transport() {
    use tern_proto::client::*;
    use tern_proto::codec::{Format, encode_client};
    for t in BINARY {
        let node = TestNode::start(|_| {}).await;
        let mut c = Raw::open(node.addr, t, true).await;
        c.send_binary(encode_client(
            client_frame::Kind::Connect(Connect::default()),
            Format::Protobuf,
        ))
        .await;
        assert!(matches!(c.recv_binary().await, server_frame::Kind::Connected(_)), "{t:?}");
        let sub = Subscribe { request_id: 1, channel: "p:1".into(), ..Default::default() };
        c.send_binary(encode_client(client_frame::Kind::Subscribe(sub), Format::Protobuf)).await;
        assert!(matches!(c.recv_binary().await, server_frame::Kind::Subscribed(_)), "{t:?}");
        let p = Publish {
            request_id: 2,
            channel: "p:1".into(),
            data: Some(publish::Data::Binary(vec![0, 1, 2].into())),
            ..Default::default()
        };
        c.send_binary(encode_client(client_frame::Kind::Publish(p), Format::Protobuf)).await;
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match c.recv_binary().await {
                server_frame::Kind::Ack(a) => acked = a.request_id == 2,
                server_frame::Kind::Deliver(d) => {
                    let data = &d.messages[0].data;
                    delivered = *data == Some(message::Data::Binary(vec![0, 1, 2].into()));
                }
                other => panic!("{t:?}: {other:?}"),
            }
        }
        // A second Connect is an error, not an end; bytes that are no frame are BAD_FRAME.
        c.send_binary(bytes::Bytes::from_static(&[0xff, 0xff, 0xff])).await;
        match c.recv_binary().await {
            server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::BadFrame as i32),
            other => panic!("{t:?}: {other:?}"),
        }
        node.stop().await;
        assert_eq!(c.close_code().await, Some(1001), "{t:?}: shutdown closes with 1001");
    }
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let node = TestNode::start(|_| {}).await;
    let (mut c, _) = RawJson::connected(node.addr).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x22], OpCode::Data(Data::Text), true);
    let _ = c.ws.send(WsMessage::Frame(frame)).await;
    assert_eq!(close_code(&mut c.ws).await, Some(1007));
    node.stop().await;
}

#[tokio::test]
async fn plain_http_gets_426_and_bad_format_400() {
    let node = TestNode::start(|_| {}).await;
    let (status, _) = http(node.addr, "GET", "/v1/ws", "text/plain", b"").await;
    assert_eq!(status, 426);
    let (status, body) = http(node.addr, "GET", "/healthz", "text/plain", b"").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _) = http(node.addr, "GET", "/v1/ping", "text/plain", b"").await;
    assert_eq!(status, 204);
    let r = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?format=xml", node.addr)).await;
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected HTTP 400, got {other:?}"),
    }
    node.stop().await;
}

/// A connection is not resumed as a whole: `connected` offers no session token, and one
/// sent by an older client is accepted and ignored.
#[tokio::test]
async fn a_session_resume_token_is_neither_offered_nor_refused() {
    for t in ALL {
        resume_token(t).await;
    }
}

async fn resume_token(t: Transport) {
    let n = TestNode::start(|_| {}).await;
    let mut c = Raw::open(n.addr, t, false).await;
    c.send(r#"{"connect":{"protocol":1,"clientId":"old","resumeToken":"f85f8b3ab8d5c.12"}}"#).await;
    let v = c.recv().await;
    let connected = v["connected"].as_object().unwrap_or_else(|| panic!("connected: {v}"));
    assert_eq!(connected["clientId"], "old");
    assert!(!connected.contains_key("resumeToken"), "{v}");
    n.stop().await;
}
