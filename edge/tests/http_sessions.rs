//! HTTP sessions (streaming, SSE, long polling) under bad input and misuse: foreign and
//! unknown sessions, wrong secrets, oversize and never-ending POST bodies, malformed
//! framing, lost poll answers, floods of idle sessions — each answered with its documented
//! status, and a bystander's stream intact.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::transport::{self, Raw, Transport};
use common::{TestNode, WAIT, eventually};

fn publish(channel: &str, text: &str) -> String {
    format!(r#"{{"publish":{{"channel":"{channel}","text":"{text}"}}}}"#)
}

/// Reads frames until a delivery of `text` arrives (acks and replies in between skipped).
async fn delivered(c: &mut Raw, text: &str) {
    loop {
        let f = c.recv().await;
        if f["deliver"]["messages"][0]["text"] == text {
            return;
        }
    }
}

#[tokio::test]
async fn foreign_unknown_and_ended_sessions_and_wrong_secrets_are_refused() {
    let node = TestNode::start(|_| {}).await;
    let (mut a, _) = Raw::connected(node.addr, Transport::Poll).await;
    let (mut b, _) = Raw::connected(node.addr, Transport::Stream).await;
    let b_secret = b.http().unwrap().secret.clone();
    let a_id = a.http().unwrap().id.clone();
    let a_secret = a.http().unwrap().secret.clone();
    let frame = Bytes::from(publish("x:1", "nope") + "\n");

    // Another session's secret, no secret, a wrong one: 403, and nothing reaches A.
    for secret in [b_secret.as_str(), "", "0123"] {
        let (status, _, body) = a.http().unwrap().post_with(frame.clone(), secret).await;
        assert_eq!(status, 403, "{body:?}");
        assert!(String::from_utf8_lossy(&body).contains("ERROR_CODE_FORBIDDEN"), "{body:?}");
    }
    let mut conn = transport::connect(node.addr).await;
    let poll = format!("/v1/sessions/{a_id}/poll?ack=0");
    let (status, _, _) = transport::request(
        &mut conn,
        "GET",
        &poll,
        &[("x-tern-session-secret", &b_secret)],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 403);
    // A session that never existed: 404 NOT_FOUND.
    let (status, _, body) = transport::request(
        &mut conn,
        "POST",
        "/v1/sessions/00000000000000000000000000000000",
        &[("x-tern-session-secret", &a_secret)],
        frame.clone(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("ERROR_CODE_NOT_FOUND"), "{body:?}");
    // A poll of a streaming session: 400.
    let b_id = b.http().unwrap().id.clone();
    let path = format!("/v1/sessions/{b_id}/poll?ack=0");
    let (status, _, _) = transport::request(
        &mut conn,
        "GET",
        &path,
        &[("x-tern-session-secret", &b_secret)],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 400);

    // A still works after all that; then it leaves (DELETE with a wrong secret is refused).
    a.send(r#"{"heartbeat":{"nonce":"5"}}"#).await;
    assert_eq!(a.recv().await["heartbeat"]["nonce"], "5");
    let path = format!("/v1/sessions/{a_id}");
    let (status, _, _) = transport::request(
        &mut conn,
        "DELETE",
        &path,
        &[("x-tern-session-secret", "x")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = transport::request(
        &mut conn,
        "DELETE",
        &path,
        &[("x-tern-session-secret", &a_secret)],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(a.next_frame().await, None, "the session ended");
    let (status, _, _) = a.http().unwrap().post(frame).await;
    assert_eq!(status, 404, "an ended session is gone");
    assert!(eventually(|| node.node.http_sessions().len() == 1).await);
    node.stop().await;
}

#[tokio::test]
async fn oversize_malformed_and_never_ending_posts_get_their_status() {
    let node = TestNode::start(|cfg| {
        cfg.limits.max_frame_bytes = tern_edge::config::min_frame_bytes(64 * 1024);
        cfg.timeouts.http_body = Duration::from_millis(500);
    })
    .await;
    let max_frame = node.node.settings().config.limits.max_frame_bytes;
    let (mut c, _) = Raw::connected(node.addr, Transport::Stream).await;
    c.send(r#"{"subscribe":{"requestId":1,"channel":"b:1"}}"#).await;
    assert!(c.recv().await.get("subscribed").is_some());

    // One frame over limits.max_frame_bytes: 413, and nothing of the POST is handled.
    let big = "y".repeat(max_frame);
    let body = format!("{}\n{}\n", publish("b:1", "before"), publish("b:1", &big));
    let (status, _, text) = c.http().unwrap().post(Bytes::from(body)).await;
    assert_eq!(status, 413, "{text:?}");
    assert!(String::from_utf8_lossy(&text).contains("ERROR_CODE_MESSAGE_TOO_LARGE"));
    // A body over 4 frames' worth, or of more than 256 frames: 413.
    let (status, _, _) = c.http().unwrap().post(Bytes::from(vec![b'\n'; 4 * max_frame + 1])).await;
    assert_eq!(status, 413);
    let (status, _, _) = c.http().unwrap().post(Bytes::from("{}\n".repeat(257))).await;
    assert_eq!(status, 413);
    // Malformed JSON lines are answered on the stream, each as its request, like over a
    // WebSocket; the good line between them is handled in order.
    let body = format!("{{\"publish\":\n{}\n{{\"frobnicate\":{{}}}}\n", publish("b:1", "good"));
    let (status, _, _) = c.http().unwrap().post(Bytes::from(body)).await;
    assert_eq!(status, 202);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let f = c.recv().await;
        if let Some(n) = f.get("nack") {
            seen.push(n["code"].as_str().unwrap().to_owned());
        } else if let Some(e) = f.get("error") {
            seen.push(e["code"].as_str().unwrap().to_owned());
        } else if f.get("ack").is_some() {
            seen.push("ack".into());
        } else if f["deliver"]["messages"][0]["text"] == "good" {
            seen.push("good".into());
        }
    }
    seen.sort();
    assert_eq!(seen, ["ERROR_CODE_BAD_FRAME", "ERROR_CODE_UNKNOWN_FRAME", "ack", "good"]);

    // A body that never ends: 408 after timeouts.http_body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = c.http().unwrap().id.clone();
    let secret = c.http().unwrap().secret.clone();
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /v1/sessions/{id} HTTP/1.1\r\nHost: t\r\nX-Tern-Session-Secret: {secret}\r\n\
         Content-Length: 1000\r\n\r\n{{\"heart"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(WAIT, s.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The same for an HTTP publish.
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = "POST /v1/channels/b:1/messages HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
                Content-Length: 1000\r\n\r\nhal";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(WAIT, s.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // The session still works.
    c.send(&publish("b:1", "after")).await;
    delivered(&mut c, "after").await;
    node.stop().await;
}

#[tokio::test]
async fn protobuf_posts_that_are_not_length_prefixed_frames_get_400() {
    let node = TestNode::start(|_| {}).await;
    let mut c = Raw::open(node.addr, Transport::Poll, true).await;
    // A length prefix that runs past the body, and one that does not end.
    for body in [&[0x05, 1, 2][..], &[0xff, 0xff][..]] {
        let (status, _, text) = c.http().unwrap().post(Bytes::copy_from_slice(body)).await;
        assert_eq!(status, 400, "{body:?}");
        assert!(String::from_utf8_lossy(&text).contains("ERROR_CODE_BAD_FRAME"));
    }
    node.stop().await;
}

/// A poll answer the client did not get is sent again when the next poll names the one
/// before it; an older `ack` is a conflict.
#[tokio::test]
async fn a_lost_poll_answer_is_sent_again() {
    let node = TestNode::start(|_| {}).await;
    let mut opener = transport::connect(node.addr).await;
    let (status, _, body) =
        transport::request(&mut opener, "GET", "/v1/sessions?transport=poll", &[], Bytes::new())
            .await;
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_slice(body.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let id = first["session"]["id"].as_str().unwrap().to_owned();
    let secret = first["session"]["secret"].as_str().unwrap().to_owned();
    let h = [("x-tern-session-secret", secret.as_str())];
    let mut conn = transport::connect(node.addr).await;
    let post = format!("/v1/sessions/{id}");
    let connect = Bytes::from_static(b"{\"connect\":{\"protocol\":1}}\n");
    assert_eq!(transport::request(&mut conn, "POST", &post, &h, connect).await.0, 202);
    let poll = |ack: u64| format!("/v1/sessions/{id}/poll?ack={ack}");
    let (status, headers, first_answer) =
        transport::request(&mut conn, "GET", &poll(0), &h, Bytes::new()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-tern-batch"], "1");
    assert!(String::from_utf8_lossy(&first_answer).contains("\"connected\""));
    // As if that answer was lost: the same poll again gets the same batch.
    let (_, headers, again) =
        transport::request(&mut conn, "GET", &poll(0), &h, Bytes::new()).await;
    assert_eq!(headers["x-tern-batch"], "1");
    assert_eq!(again, first_answer);
    // Acknowledged: the next answer is new.
    let hb = Bytes::from_static(b"{\"heartbeat\":{\"nonce\":\"9\"}}\n");
    assert_eq!(transport::request(&mut conn, "POST", &post, &h, hb).await.0, 202);
    let (_, headers, next) = transport::request(&mut conn, "GET", &poll(1), &h, Bytes::new()).await;
    assert_eq!(headers["x-tern-batch"], "2");
    assert!(String::from_utf8_lossy(&next).contains("\"heartbeat\""), "{next:?}");
    // An ack older than the answer kept: 409.
    let hb = Bytes::from_static(b"{\"heartbeat\":{\"nonce\":\"10\"}}\n");
    assert_eq!(transport::request(&mut conn, "POST", &post, &h, hb).await.0, 202);
    assert_eq!(transport::request(&mut conn, "GET", &poll(2), &h, Bytes::new()).await.0, 200);
    let (status, _, _) = transport::request(&mut conn, "GET", &poll(0), &h, Bytes::new()).await;
    assert_eq!(status, 409);
    node.stop().await;
}

/// Thousands of HTTP sessions opened from one address and left idle: the address's limit
/// (`limits.max_connections_per_ip`, sessions and TCP connections together) refuses the
/// rest with 503; the idle ones are reaped after `heartbeat.idle_timeout`; a bystander's
/// stream, opened before the flood, loses nothing.
#[tokio::test]
async fn thousands_of_idle_sessions_from_one_address_are_bounded_and_reaped() {
    let node = TestNode::start(|cfg| {
        cfg.limits.max_connections_per_ip = 1000;
        cfg.heartbeat.interval = Duration::from_millis(500);
        cfg.heartbeat.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let (mut bystander, _) = Raw::connected(node.addr, Transport::Stream).await;
    bystander.send(r#"{"subscribe":{"requestId":1,"channel":"by:1"}}"#).await;
    assert!(bystander.recv().await.get("subscribed").is_some());
    // The bystander holds 2 TCP connections and 1 session; the opener 1 connection.
    let mut opener = transport::connect(node.addr).await;
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..2000 {
        let (status, headers, body) = transport::request(
            &mut opener,
            "GET",
            "/v1/sessions?transport=poll",
            &[],
            Bytes::new(),
        )
        .await;
        match status {
            200 => opened += 1,
            503 => {
                assert!(headers.contains_key("retry-after"));
                assert!(String::from_utf8_lossy(&body).contains("ERROR_CODE_UNAVAILABLE"));
                refused += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert_eq!(opened, 1000 - 4, "the address's limit counts sessions and connections");
    assert_eq!(refused, 2000 - opened);
    // Nobody polls them: they are reaped, and the address may open sessions again.
    assert!(eventually(|| node.node.http_sessions().len() == 1).await, "reaped");
    let (status, _, _) =
        transport::request(&mut opener, "GET", "/v1/sessions?transport=poll", &[], Bytes::new())
            .await;
    assert_eq!(status, 200);
    // The bystander's stream was kept alive through it all, and delivers.
    bystander.send(&publish("by:1", "still here")).await;
    delivered(&mut bystander, "still here").await;
    node.stop().await;
}

/// A stream session ends with its stream: a client that goes away leaves no session and
/// no subscription behind.
#[tokio::test]
async fn a_dropped_stream_ends_its_session() {
    let node = TestNode::start(|cfg| {
        cfg.heartbeat.interval = Duration::from_millis(500);
        cfg.heartbeat.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    for t in [Transport::Stream, Transport::Sse] {
        let (mut c, _) = Raw::connected(node.addr, t).await;
        c.send(r#"{"subscribe":{"requestId":1,"channel":"d:1"}}"#).await;
        assert!(c.recv().await.get("subscribed").is_some());
        assert_eq!(node.node.http_sessions().len(), 1);
        drop(c);
        // Noticed at the latest with the next keep-alive write (heartbeat.interval).
        assert!(eventually(|| node.node.http_sessions().is_empty()).await, "{t:?}");
        assert!(eventually(|| node.node.connection_count() == 0).await, "{t:?}");
    }
    node.stop().await;
}

/// The last answer of a long-polling session (its `close` frame) is sent again to a poll
/// that did not get it, as any answer is; the poll that acknowledges it finds the session
/// over (404).
#[tokio::test]
async fn a_lost_close_answer_is_sent_again() {
    let node = TestNode::start(|_| {}).await;
    let mut conn = transport::connect(node.addr).await;
    let (_, _, body) =
        transport::request(&mut conn, "GET", "/v1/sessions?transport=poll", &[], Bytes::new())
            .await;
    let first: serde_json::Value =
        serde_json::from_slice(body.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let id = first["session"]["id"].as_str().unwrap().to_owned();
    let secret = first["session"]["secret"].as_str().unwrap().to_owned();
    let h = [("x-tern-session-secret", secret.as_str())];
    // A frame before `connect` ends the session with 4002.
    let early = Bytes::from_static(b"{\"subscribe\":{\"requestId\":1,\"channel\":\"a\"}}\n");
    let post = format!("/v1/sessions/{id}");
    assert_eq!(transport::request(&mut conn, "POST", &post, &h, early).await.0, 202);
    let poll = |ack: u64| format!("/v1/sessions/{id}/poll?ack={ack}");
    let (status, headers, closed) =
        transport::request(&mut conn, "GET", &poll(0), &h, Bytes::new()).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&closed).contains("\"code\":4002"), "{closed:?}");
    let batch: u64 = headers["x-tern-batch"].to_str().unwrap().parse().unwrap();
    // As if that answer was lost.
    let (status, _, again) =
        transport::request(&mut conn, "GET", &poll(batch - 1), &h, Bytes::new()).await;
    assert_eq!((status, &again), (200, &closed));
    let (status, _, _) = transport::request(&mut conn, "GET", &poll(batch), &h, Bytes::new()).await;
    assert_eq!(status, 404);
    node.stop().await;
}
