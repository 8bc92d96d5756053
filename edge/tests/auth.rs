//! Token mode over real connections: signed tokens (HS256, ES256) carrying a client id, an
//! expiry and capabilities; every refusal has its documented code, and an operation outside
//! the capabilities leaves the connection usable.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{RawJson, TestNode, WAIT, close_code, http_with};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tern_edge::auth::{AuthMode, Claims, Operation, mint_hs256};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str, exp: u64) -> Claims {
    let mut capability = BTreeMap::new();
    capability.insert("chat:*".to_owned(), vec![Operation::Subscribe, Operation::Publish]);
    capability.insert("news:*".to_owned(), vec![Operation::Subscribe]);
    Claims { sub: sub.into(), exp, iat: Some(now()), capability }
}

fn token(sub: &str) -> String {
    mint_hs256(SECRET, &claims(sub, now() + 3600)).unwrap()
}

async fn node() -> TestNode {
    TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.leeway = Duration::ZERO;
    })
    .await
}

/// Opens a JSON connection and sends Connect with `token`; returns the first answer frame,
/// or the close code.
async fn connect(addr: std::net::SocketAddr, token: &str) -> Result<(RawJson, Value), Option<u16>> {
    let mut c = RawJson::open(addr).await;
    let frame =
        serde_json::json!({"connect": {"protocol": 1, "clientId": "ignored", "token": token}});
    c.send(&frame.to_string()).await;
    match tokio::time::timeout(WAIT, c.ws.next()).await.unwrap() {
        Some(Ok(WsMessage::Text(t))) => Ok((c, serde_json::from_str(&t).unwrap())),
        Some(Ok(WsMessage::Close(f))) => {
            let code = f.map(|f| u16::from(f.code));
            Err(code)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_token_names_the_client_and_bounds_what_it_may_do() {
    let n = node().await;
    let (mut c, connected) = connect(n.addr, &token("alice")).await.unwrap();
    assert_eq!(
        connected["connected"]["clientId"], "alice",
        "the token's subject, not the declared id"
    );

    // Inside the capabilities.
    c.send(r#"{"subscribe":{"requestId":1,"channel":"chat:a"}}"#).await;
    assert!(c.recv().await.get("subscribed").is_some());
    // Outside: each refused with FORBIDDEN, and the connection stays usable.
    for (frame, kind) in [
        (r#"{"subscribe":{"requestId":2,"channel":"admin:x"}}"#, "error"),
        (r#"{"publish":{"requestId":3,"channel":"news:x","text":"fake news"}}"#, "nack"),
        (r#"{"history":{"requestId":4,"channel":"chat:a"}}"#, "error"),
        (r#"{"subscribe":{"requestId":5,"channel":"chatter:a"}}"#, "error"),
    ] {
        c.send(frame).await;
        let answer = c.recv().await;
        assert_eq!(answer[kind]["code"], "ERROR_CODE_FORBIDDEN", "{frame}: {answer}");
    }
    c.send(r#"{"publish":{"requestId":6,"channel":"chat:a","text":"hi"}}"#).await;
    let mut got = (false, false);
    while got != (true, true) {
        let f = c.recv().await;
        got.0 |= f.get("ack").is_some();
        if let Some(d) = f.get("deliver") {
            assert_eq!(d["messages"][0]["clientId"], "alice");
            got.1 = true;
        }
    }
    n.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4003() {
    let n = node().await;
    let good = token("bob");
    let payload = good.split('.').nth(1).unwrap();
    let cases = [
        ("missing", String::new()),
        ("expired", mint_hs256(SECRET, &claims("bob", now() - 60)).unwrap()),
        (
            "wrong key",
            mint_hs256("another-secret-that-is-long-enough-000000", &claims("bob", now() + 60))
                .unwrap(),
        ),
        // {"alg":"none","typ":"JWT"}, the real payload, no signature.
        ("alg none", format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")),
        ("malformed", "not-a-token".into()),
        ("tampered", {
            let mut parts: Vec<&str> = good.split('.').collect();
            let forged = mint_hs256(SECRET, &claims("root", now() + 60)).unwrap();
            let forged_payload = forged.split('.').nth(1).unwrap().to_owned();
            parts[1] = &forged_payload;
            parts.join(".")
        }),
    ];
    for (what, t) in cases {
        match connect(n.addr, &t).await {
            Err(code) => assert_eq!(code, Some(tern_proto::close::UNAUTHORIZED), "{what}"),
            Ok((_, f)) => panic!("{what}: accepted: {f}"),
        }
    }
    n.stop().await;
}

#[tokio::test]
async fn the_token_may_come_in_the_url_and_the_connection_ends_when_it_expires() {
    let n = node().await;
    let short = mint_hs256(SECRET, &claims("carol", now() + 2)).unwrap();
    let url = format!("ws://{}/v1/ws?format=json&token={short}", n.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(WsMessage::Text(r#"{"connect":{"protocol":1}}"#.into())).await.unwrap();
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let v: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(v["connected"]["clientId"], "carol");
    // Then, at expiry (no renewal), the node closes with 4003.
    assert_eq!(close_code(&mut ws).await, Some(tern_proto::close::UNAUTHORIZED));
    n.stop().await;
}

#[tokio::test]
async fn es256_tokens_verify_with_the_public_key_only() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = common::temp_dir("es256");
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.es256_public_key = Some(public.clone());
    })
    .await;
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let t = jsonwebtoken::encode(&header, &claims("dave", now() + 60), &signing).unwrap();
    let (_, connected) = connect(n.addr, &t).await.unwrap();
    assert_eq!(connected["connected"]["clientId"], "dave");
    // An HS256 token means nothing to a node that only holds an ES256 public key.
    assert_eq!(
        connect(n.addr, &token("dave")).await.err(),
        Some(Some(tern_proto::close::UNAUTHORIZED))
    );
    n.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_http_api_wants_a_bearer_token_with_the_capability() {
    let n = node().await;
    let path = "/v1/channels/chat:h/messages";
    let (status, _) = http_with(n.addr, "POST", path, "", "text/plain", b"x").await;
    assert_eq!(status, 401, "no token");
    let bearer = format!("Authorization: Bearer {}\r\n", token("erin"));
    let (status, body) = http_with(n.addr, "POST", path, &bearer, "text/plain", b"x").await;
    assert_eq!(status, 201, "{body}");
    let news = "/v1/channels/news:h/messages";
    let (status, _) = http_with(n.addr, "POST", news, &bearer, "text/plain", b"x").await;
    assert_eq!(status, 403, "subscribe-only namespace");
    let (status, _) = http_with(n.addr, "GET", path, &bearer, "text/plain", b"").await;
    assert_eq!(status, 403, "no history capability");
    // One order on every surface: credentials (401), then the channel (400), then the
    // capability (403) — a malformed name is INVALID_CHANNEL whatever the token allows.
    for (method, op) in [("POST", "publish"), ("GET", "history")] {
        let star = "/v1/channels/*/messages";
        let (status, _) = http_with(n.addr, method, star, "", "text/plain", b"x").await;
        assert_eq!(status, 401, "{op} without a token");
        let (status, body) = http_with(n.addr, method, star, &bearer, "text/plain", b"x").await;
        assert_eq!(status, 400, "{op}: {body}");
        assert!(body.contains("ERROR_CODE_INVALID_CHANNEL"), "{op}: {body}");
    }
    n.stop().await;
}

#[tokio::test]
async fn token_mode_without_a_key_is_a_config_error() {
    let mut cfg = tern_edge::Config::default();
    cfg.auth.mode = AuthMode::Token;
    let e = cfg.clone().validate().unwrap_err().to_string();
    assert!(e.contains("auth"), "{e}");
    cfg.auth.hs256_secret = Some("short".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("32 bytes"), "{e}");
}

#[tokio::test]
async fn a_token_renewed_in_band_keeps_the_connection() {
    let n = node().await;
    let short = mint_hs256(SECRET, &claims("fred", now() + 2)).unwrap();
    let (mut c, _) = connect(n.addr, &short).await.unwrap();
    // Refused renewals leave the old token in force.
    let other = token("mallory");
    c.send(&format!(r#"{{"auth":{{"requestId":1,"token":"{other}"}}}}"#)).await;
    assert_eq!(c.recv().await["error"]["code"], "ERROR_CODE_INVALID_ARGUMENT");
    c.send(r#"{"auth":{"requestId":2,"token":"garbage"}}"#).await;
    assert_eq!(c.recv().await["error"]["code"], "ERROR_CODE_UNAUTHORIZED");
    let fresh = token("fred");
    c.send(&format!(r#"{{"auth":{{"requestId":3,"token":"{fresh}"}}}}"#)).await;
    let renewed = c.recv().await;
    assert_eq!(renewed["authRenewed"]["clientId"], "fred", "{renewed}");
    // Past the first token's expiry the connection still works.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    c.send(r#"{"heartbeat":{"nonce":"9"}}"#).await;
    assert_eq!(c.recv().await["heartbeat"]["nonce"], "9");
    n.stop().await;
}

const BACKEND_SECRET: &str = "backend-secret-backend-secret-0123456789";
const READER_SECRET: &str = "reader-secret-reader-secret-reader-0123";

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    format!("Authorization: Basic {creds}\r\n")
}

fn api_keys() -> Vec<tern_edge::auth::ApiKeyConfig> {
    vec![
        tern_edge::auth::ApiKeyConfig {
            id: "backend".into(),
            secret: BACKEND_SECRET.into(),
            capability: None,
        },
        tern_edge::auth::ApiKeyConfig {
            id: "reader".into(),
            secret: READER_SECRET.into(),
            capability: Some([("chat:*".to_owned(), vec![Operation::History])].into()),
        },
    ]
}

#[tokio::test]
async fn api_keys_authenticate_backends_on_the_http_api() {
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.api_keys = api_keys();
    })
    .await;
    let (mut sub, _) = connect(n.addr, &token("watcher")).await.unwrap();
    sub.send(r#"{"subscribe":{"requestId":1,"channel":"chat:api"}}"#).await;
    assert!(sub.recv().await.get("subscribed").is_some());

    let path = "/v1/channels/chat:api/messages";
    let key = basic("backend", BACKEND_SECRET);
    let (status, body) = http_with(n.addr, "POST", path, &key, "text/plain", b"from backend").await;
    assert_eq!(status, 201, "{body}");
    let v = sub.recv().await;
    assert_eq!(v["deliver"]["messages"][0]["text"], "from backend", "{v}");
    assert_eq!(v["deliver"]["messages"][0]["clientId"], "key:backend", "{v}");

    // Refusals: wrong secret, a secret one byte short, unknown id, not base64, no colon.
    let short = &BACKEND_SECRET[..BACKEND_SECRET.len() - 1];
    for (what, header) in [
        ("wrong secret", basic("backend", READER_SECRET)),
        ("truncated secret", basic("backend", short)),
        ("unknown key", basic("nobody", BACKEND_SECRET)),
        ("not base64", "Authorization: Basic !!!\r\n".to_owned()),
        ("no colon", {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD.encode("backend");
            format!("Authorization: Basic {b}\r\n")
        }),
    ] {
        let (status, body) = http_with(n.addr, "POST", path, &header, "text/plain", b"x").await;
        assert_eq!(status, 401, "{what}: {body}");
    }
    // A key limited to history may read but not publish.
    let reader = basic("reader", READER_SECRET);
    let (status, _) = http_with(n.addr, "POST", path, &reader, "text/plain", b"x").await;
    assert_eq!(status, 403);
    let (status, _) = http_with(n.addr, "GET", path, &reader, "text/plain", b"").await;
    assert_ne!(status, 403, "history is allowed (404 here: the namespace keeps none)");
    n.stop().await;
}

#[tokio::test]
async fn api_keys_are_checked_in_dev_mode_too_and_must_be_long() {
    let n = TestNode::start(|cfg| cfg.auth.api_keys = api_keys()).await;
    let path = "/v1/channels/chat:dev/messages";
    let (status, _) = http_with(n.addr, "POST", path, "", "text/plain", b"x").await;
    assert_eq!(status, 201, "dev mode: anonymous is fine");
    let wrong = basic("backend", "not-the-secret-not-the-secret-0123456789");
    let (status, _) = http_with(n.addr, "POST", path, &wrong, "text/plain", b"x").await;
    assert_eq!(status, 401, "a wrong key is reported, not ignored");
    n.stop().await;

    let mut cfg = tern_edge::Config::default();
    cfg.auth.api_keys = vec![tern_edge::auth::ApiKeyConfig {
        id: "weak".into(),
        secret: "short".into(),
        capability: None,
    }];
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("at least 32 bytes"), "{err}");
    let mut cfg = tern_edge::Config::default();
    cfg.auth.api_keys = [api_keys(), api_keys()].concat();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("listed twice"), "{err}");
}

#[tokio::test]
async fn the_sdk_renews_in_band_and_a_narrower_token_ends_what_it_no_longer_allows() {
    use tern_client::{Client, ClientError, ClientOptions, Event};
    let n = node().await;
    let url = n.url();
    // Two seconds to live; allows chat:* (subscribe, publish) and news:* (subscribe).
    let short = mint_hs256(SECRET, &claims("gina", now() + 2)).unwrap();
    let options = ClientOptions { token: Some(short), ..ClientOptions::default() };
    let c = Client::connect(&url, options).await.unwrap();
    let mut chat = c.subscribe("chat:renew").await.unwrap();
    let mut news = c.subscribe("news:renew").await.unwrap();

    // A token for someone else is refused, and the old one stays in force.
    let refused = c.renew_token(token("mallory")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            ClientError::Refused { code: tern_proto::client::ErrorCode::InvalidArgument, .. }
        ),
        "{refused:?}"
    );
    // A narrower token for the same client: chat only, an hour.
    let mut capability = BTreeMap::new();
    capability.insert("chat:*".to_owned(), vec![Operation::Subscribe, Operation::Publish]);
    let narrower = Claims { sub: "gina".into(), exp: now() + 3600, iat: None, capability };
    let renewed = c.renew_token(mint_hs256(SECRET, &narrower).unwrap()).await.unwrap();
    assert_eq!(renewed.client_id, "gina");
    assert!(renewed.expires_at_ms > now() * 1000 + 3_000_000, "{renewed:?}");
    // The news subscription was ended by the node.
    let end = tokio::time::timeout(WAIT, news.next()).await.expect("the stream ends");
    assert!(end.is_none(), "{end:?}");

    // Past the first token's expiry, the connection lives on and chat flows.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.publish("chat:renew", "still here").await.unwrap();
    let ev = tokio::time::timeout(WAIT, chat.next()).await.unwrap().unwrap();
    let Event::Message(m) = ev else { panic!("{ev:?}") };
    assert_eq!(m.client_id, "gina");
    n.stop().await;
}

/// Rotating the signing keys: during a rotation a node accepts tokens signed with the new
/// key and with the one being retired, so no connected or reconnecting client is refused;
/// after it, only the new; a key it never had is refused throughout. HS256 and ES256 alike.
#[tokio::test]
async fn signing_keys_rotate_without_refusing_tokens_already_issued() {
    const NEW: &str = "the-new-secret-that-is-long-enough-0123456789";
    const OTHER: &str = "a-secret-this-node-never-had-0123456789abcdef";
    let signed = |secret: &str, sub: &str| mint_hs256(secret, &claims(sub, now() + 3600)).unwrap();
    let refused = Some(Some(tern_proto::close::UNAUTHORIZED));
    let during = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(NEW.into());
        cfg.auth.hs256_previous_secret = Some(SECRET.into());
    })
    .await;
    for (secret, sub) in [(SECRET, "issued-before"), (NEW, "issued-after")] {
        let (_, connected) = connect(during.addr, &signed(secret, sub)).await.unwrap();
        assert_eq!(connected["connected"]["clientId"], sub);
    }
    assert_eq!(connect(during.addr, &signed(OTHER, "x")).await.err(), refused);
    // Expiry is still checked on a token of the retired key.
    let expired = mint_hs256(SECRET, &claims("late", now() - 60)).unwrap();
    assert_eq!(connect(during.addr, &expired).await.err(), refused);
    during.stop().await;
    let after = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(NEW.into());
    })
    .await;
    assert_eq!(connect(after.addr, &signed(SECRET, "issued-before")).await.err(), refused);
    assert!(connect(after.addr, &signed(NEW, "issued-after")).await.is_ok());
    after.stop().await;

    // ES256: the retired key's public half beside the new one.
    let dir = common::temp_dir("es256-rotation");
    let keys: Vec<rcgen::KeyPair> = (0..3)
        .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .collect();
    let public: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let p = dir.join(format!("public-{i}.pem"));
            std::fs::write(&p, k.public_key_pem()).unwrap();
            p
        })
        .collect();
    let es256 = |k: &rcgen::KeyPair, sub: &str| {
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        jsonwebtoken::encode(&header, &claims(sub, now() + 60), &signing).unwrap()
    };
    let (new_key, old_key) = (public[0].clone(), public[1].clone());
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.es256_public_key = Some(new_key);
        cfg.auth.es256_previous_public_key = Some(old_key);
    })
    .await;
    assert!(connect(n.addr, &es256(&keys[0], "new")).await.is_ok());
    assert!(connect(n.addr, &es256(&keys[1], "old")).await.is_ok());
    assert_eq!(connect(n.addr, &es256(&keys[2], "stranger")).await.err(), refused);
    n.stop().await;

    // A retired key alone is a configuration error, not a silent acceptance.
    let c = tern_edge::auth::AuthConfig {
        mode: AuthMode::Token,
        hs256_previous_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let e = tern_edge::auth::Verifier::new(&c).unwrap_err();
    assert!(e.to_string().contains("hs256_previous_secret"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// One rule for a token's time, on every surface: valid while `now <= exp + leeway`, and a
/// connection it opened or renewed lasts exactly that long. A token that expired 2 s ago is
/// inside a 5 s leeway: accepted at connect, in a renewal and over HTTP alike, and the
/// connection stays open (a heartbeat is answered) until the leeway is used up, then 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_inside_the_leeway_is_valid_the_same_way_everywhere() {
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.leeway = Duration::from_secs(5);
    })
    .await;
    let lately = mint_hs256(SECRET, &claims("gina", now() - 2)).unwrap();
    // Connect: accepted, and open until the leeway ends.
    let (mut c, connected) = connect(n.addr, &lately).await.unwrap();
    assert_eq!(connected["connected"]["clientId"], "gina", "{connected}");
    // Renewal: the same token is accepted.
    let (mut r, _) = connect(n.addr, &token("gina")).await.unwrap();
    r.send(&serde_json::json!({"auth": {"requestId": 7, "token": lately}}).to_string()).await;
    assert_eq!(r.recv().await["authRenewed"]["requestId"], 7);
    // A second later (inside the ~3 s left of the leeway) both are still open: not closed
    // at once as if the token had expired.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for conn in [&mut c, &mut r] {
        conn.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
        assert!(conn.recv().await.get("heartbeat").is_some(), "still open");
    }
    // HTTP: accepted too.
    let bearer = format!("Authorization: Bearer {lately}\r\n");
    let (status, body) =
        http_with(n.addr, "POST", "/v1/channels/chat:t/messages", &bearer, "text/plain", b"x")
            .await;
    assert_eq!(status, 201, "{body}");
    // Once `exp + leeway` passed, both connections end with 4003.
    assert_eq!(c.close_code().await, Some(tern_proto::close::UNAUTHORIZED));
    assert_eq!(r.close_code().await, Some(tern_proto::close::UNAUTHORIZED));
    n.stop().await;
}

/// The largest numbers a token can carry are arithmetic like any other: `exp = 2^64 − 1`
/// connects, renews and publishes (a connection's timer saturates at 100 years) — no
/// panic, no connection dropped without its close code.
#[tokio::test]
async fn the_largest_expiry_a_token_can_carry_connects_and_renews() {
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
    })
    .await;
    let forever = mint_hs256(SECRET, &claims("hank", u64::MAX)).unwrap();
    let (mut c, connected) = connect(n.addr, &forever).await.unwrap();
    assert_eq!(connected["connected"]["clientId"], "hank", "{connected}");
    c.send(&serde_json::json!({"auth": {"requestId": 1, "token": forever}}).to_string()).await;
    let renewed = c.recv().await;
    assert_eq!(renewed["authRenewed"]["requestId"], 1, "{renewed}");
    c.send(r#"{"publish":{"requestId":2,"channel":"chat:max","text":"still here"}}"#).await;
    assert_eq!(c.recv().await["ack"]["requestId"], 2);
    n.stop().await;
}

/// A token's claims are checked as a whole, the same on every surface: a token must name
/// its client (`sub` non-empty, at most 128 bytes, no control characters, not `key:…`), its capability
/// patterns must be able to match a channel, and a token with no time left (the second
/// `exp + leeway` ends) opens nothing — at connect (4003), in a renewal (`UNAUTHORIZED`) and
/// over HTTP (401).
#[tokio::test]
async fn a_token_is_checked_as_a_whole_on_every_surface() {
    let n = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.leeway = Duration::from_secs(5);
    })
    .await;
    let mut spaced = claims("ivy", now() + 3600);
    spaced.capability.insert("chat:* ".into(), vec![Operation::Publish]);
    let bad = [
        ("an empty sub", mint_hs256(SECRET, &claims("", now() + 3600)).unwrap()),
        (
            "a sub of 129 bytes",
            mint_hs256(SECRET, &claims(&"s".repeat(129), now() + 3600)).unwrap(),
        ),
        ("a sub with a newline", mint_hs256(SECRET, &claims("iv\ny", now() + 3600)).unwrap()),
        ("a capability no channel matches", mint_hs256(SECRET, &spaced).unwrap()),
        // API keys publish as `key:ID`: a token may not pass for one.
        ("a sub of an API key", mint_hs256(SECRET, &claims("key:backend", now() + 3600)).unwrap()),
        // `exp + leeway` is now: the token has no time left.
        ("no time left", mint_hs256(SECRET, &claims("ivy", now() - 5)).unwrap()),
    ];
    let (mut renewing, _) = connect(n.addr, &token("ivy")).await.unwrap();
    for (i, (what, t)) in bad.iter().enumerate() {
        assert_eq!(connect(n.addr, t).await.err(), Some(Some(4003)), "connect with {what}");
        let id = i + 1;
        renewing
            .send(&serde_json::json!({"auth": {"requestId": id, "token": t}}).to_string())
            .await;
        let v = renewing.recv().await;
        assert_eq!(v["error"]["code"], "ERROR_CODE_UNAUTHORIZED", "renewal with {what}: {v}");
        assert_eq!(v["error"]["requestId"], id, "{v}");
        let bearer = format!("Authorization: Bearer {t}\r\n");
        let (status, body) =
            http_with(n.addr, "POST", "/v1/channels/chat:w/messages", &bearer, "text/plain", b"x")
                .await;
        assert_eq!(status, 401, "HTTP with {what}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "ERROR_CODE_UNAUTHORIZED", "HTTP with {what}: {body}");
    }
    // The authentication scheme is case-insensitive.
    let lower = format!("Authorization: bearer {}\r\n", token("ivy"));
    let (status, body) =
        http_with(n.addr, "POST", "/v1/channels/chat:w/messages", &lower, "text/plain", b"x").await;
    assert_eq!(status, 201, "{body}");
    n.stop().await;
}

/// Only an API key's messages carry a `key:` client id: a dev-mode client may not declare one.
#[tokio::test]
async fn a_dev_mode_client_may_not_pass_for_an_api_key() {
    let n = TestNode::start(|_| {}).await;
    let mut c = RawJson::open(n.addr).await;
    c.send(r#"{"connect":{"protocol":1,"clientId":"key:backend"}}"#).await;
    let v = c.recv().await;
    assert_eq!(v["error"]["code"], "ERROR_CODE_INVALID_ARGUMENT", "{v}");
    c.send(r#"{"connect":{"protocol":1,"clientId":"backend"}}"#).await;
    let v = c.recv().await;
    assert_eq!(v["connected"]["clientId"], "backend", "{v}");
    n.stop().await;
}

/// Auth settings that could never mean what they say are refused at start-up, naming them.
#[tokio::test]
async fn auth_settings_that_cannot_apply_are_refused() {
    for pattern in ["chat:* ", "Chat room:*", "", "**"] {
        let mut cfg = tern_edge::Config::default();
        cfg.auth.api_keys = vec![tern_edge::auth::ApiKeyConfig {
            id: "backend".into(),
            secret: "a-backend-secret-that-is-long-enough-0123".into(),
            capability: Some([(pattern.to_owned(), vec![Operation::Publish])].into()),
        }];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("backend") && err.contains("capability"), "{pattern:?}: {err}");
    }
    for leeway in [Duration::from_millis(500), Duration::from_secs(301)] {
        let mut cfg = tern_edge::Config::default();
        cfg.auth.leeway = leeway;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("auth.leeway"), "{leeway:?}: {err}");
    }
}
