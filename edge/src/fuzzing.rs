//! The inputs an attacker controls, as plain functions: the fuzz targets under `fuzz/`
//! call them with whatever the fuzzer makes, and the corpus replay test
//! (`tests/fuzz_corpus.rs`) calls them with every checked-in input. Each must return
//! without panicking, whatever the bytes.

use std::sync::OnceLock;

use crate::auth::{AuthConfig, AuthMode, Claims, Operation, Verifier};
use tern_proto::client::server_frame;

/// A client frame as a WebSocket text frame (JSON).
pub fn client_frame_json(data: &[u8]) {
    let _ = tern_proto::codec::decode_client(data, true);
}

/// A client frame as a WebSocket binary frame (protobuf).
pub fn client_frame_protobuf(data: &[u8]) {
    let _ = tern_proto::codec::decode_client(data, false);
}

/// A backbone frame body (after the length prefix), as a peer sends it; what decodes is
/// encoded again and must decode to the same frame.
pub fn backbone_frame(data: &[u8]) {
    if let Ok(frame) = tern_backbone::wire::decode(data) {
        let bytes = tern_backbone::wire::encode(&frame);
        let again = tern_backbone::wire::decode(&bytes[4..]).expect("re-encoded frame decodes");
        assert_eq!(format!("{frame:?}"), format!("{again:?}"), "round trip");
    }
}

/// A public key for the ES256 half of [`token`] (its private half was discarded: no input
/// can carry a valid ES256 signature, as in production).
const ES256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELnolasqLCINthqYgEW2GOcnML/CQ
4VrABTvswtYvQ06m5KffzanvSORdgMpMtEWC4dNt7Ng+1pPZVfHIUTPDmQ==
-----END PUBLIC KEY-----
";

/// The HS256 secret of [`token`]'s verifier.
pub const FUZZ_HS256_SECRET: &str = "fuzzing-secret-fuzzing-secret-0123456789";

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let c = AuthConfig {
            mode: AuthMode::Token,
            hs256_secret: Some(FUZZ_HS256_SECRET.into()),
            ..AuthConfig::default()
        };
        Verifier::with_keys(&c, Some(ES256_PUBLIC.as_bytes())).expect("the fuzz keys are valid")
    })
}

/// A token as a client presents it (connect, `?token=`, renewal, HTTP bearer), checked by a
/// verifier holding both an HS256 secret and an ES256 key; and the same bytes as a claims
/// document and as a `tern token --capability` argument.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(claims) = verifier().verify(text) {
        let _ = claims.allows(Operation::Publish, "chat:room");
    }
    if let Ok(claims) = serde_json::from_slice::<Claims>(data) {
        for channel in ["chat:room", "a", "chat:room:x"] {
            let _ = claims.allows(Operation::Subscribe, channel);
        }
        let _ = claims.remaining(std::time::Duration::from_secs(5));
    }
    let _ = crate::auth::parse_capability(text);
}

/// Most frames one [`session`] input sends.
const SESSION_FRAMES: usize = 64;

/// The nonce of the heartbeat that ends a [`session`] input.
const MARK: u64 = 0x007e_570f_f022_e2d5;

/// How long a [`session`] input waits for its marker's echo.
const MARK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a session may take to end once its client closed.
const SESSION_END: std::time::Duration = std::time::Duration::from_secs(10);

/// A real node for [`session`], without sockets: a history namespace (`log`) in a
/// temporary directory, no backbone; and the runtime its sessions run on. The node is made
/// anew every [`NODE_INPUTS`] inputs, so what inputs leave behind (channels, logs) neither
/// fills the node's limits for the inputs after them nor makes a finding depend on a long
/// history.
struct SessionHarness {
    runtime: tokio::runtime::Runtime,
    node: std::sync::Mutex<(std::sync::Arc<crate::node::Node>, u32)>,
}

/// Inputs one fuzzing node serves before it is replaced.
const NODE_INPUTS: u32 = 1000;

fn fuzz_node(runtime: &tokio::runtime::Runtime) -> std::sync::Arc<crate::node::Node> {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("tern-fuzz-session-{}-{generation}", std::process::id()));
    let mut config = crate::Config::default();
    config.history.data_dir = dir.clone();
    config.history.namespaces = vec![crate::config::HistoryNamespace {
        name: "log".into(),
        max_messages: 16,
        max_age: std::time::Duration::from_secs(3600),
    }];
    // No fsync per write: the inputs are not worth keeping.
    config.history.sync = crate::config::SyncMode::Interval;
    config.history.sync_interval = std::time::Duration::from_secs(1);
    config.timeouts.close = std::time::Duration::from_millis(100);
    config.limits.publish_order_wait = std::time::Duration::from_millis(100);
    // Inputs name channels at random: the node's limit keeps its memory bounded (and its
    // refusal is explored too).
    config.limits.max_channels = 4096;
    let settings = config.validate().expect("the fuzz node's settings are valid");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let node = runtime
        .block_on(async { crate::server::open_node(settings, shutdown) })
        .expect("the fuzz node opens");
    // The store holds its file open: the directory goes now, not left behind by every
    // fuzzing process.
    let _ = std::fs::remove_dir_all(&dir);
    node
}

fn session_harness() -> &'static SessionHarness {
    static HARNESS: OnceLock<SessionHarness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let node = fuzz_node(&runtime);
        SessionHarness { runtime, node: std::sync::Mutex::new((node, 0)) }
    })
}

/// The node for the next input (a new one every [`NODE_INPUTS`]).
fn next_node(harness: &SessionHarness) -> std::sync::Arc<crate::node::Node> {
    let mut current = harness.node.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    current.1 += 1;
    if current.1 > NODE_INPUTS {
        let old = std::mem::replace(&mut current.0, fuzz_node(&harness.runtime));
        current.1 = 1;
        old.shutdown().cancel();
        if let Some(store) = old.hub().store() {
            store.close();
        }
    }
    current.0.clone()
}

/// The frames of a [`session`] input after its first byte: each a header byte (bit 0: a
/// binary frame, else text), a 16-bit big-endian length, and that many bytes (fewer at the
/// end of the input).
fn session_frames(mut data: &[u8]) -> Vec<tokio_tungstenite::tungstenite::Message> {
    use tokio_tungstenite::tungstenite::Message;
    let mut frames = Vec::new();
    while let [head, hi, lo, rest @ ..] = data {
        if frames.len() == SESSION_FRAMES {
            break;
        }
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (bytes, tail) = rest.split_at(len);
        frames.push(if head & 1 == 1 {
            Message::Binary(bytes::Bytes::copy_from_slice(bytes))
        } else {
            // A text frame must be UTF-8 (the WebSocket layer refuses it otherwise, tested
            // elsewhere): invalid bytes are replaced, so the frame reaches the session.
            Message::Text(String::from_utf8_lossy(bytes).into_owned().into())
        });
        data = tail;
    }
    frames
}

/// A connection's worth of client frames against a real session core on a real node,
/// over an in-memory pipe (no sockets). Byte 0 chooses the connection's wire format (bit 0:
/// protobuf, else JSON) and whether a `connect` frame goes first (bit 1 clear); the rest is
/// frames (see [`session_frames`]), at most 64. Then the client closes.
///
/// Beyond not panicking, the session must: never fail (close code 1011), end once the
/// client closed, and leave nothing behind (no subscription, its connection slot freed).
pub fn session(data: &[u8]) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let Some((&options, rest)) = data.split_first() else { return };
    let frames = session_frames(rest);
    let harness = session_harness();
    let node = next_node(harness);
    harness.runtime.block_on(async move {
        let before = node.connection_count();
        let Some(admission) = node.admit(crate::metrics::Transport::Internal) else { return };
        let conn = admission.id;
        let format = if options & 1 == 1 {
            tern_proto::codec::Format::Protobuf
        } else {
            tern_proto::codec::Format::Json
        };
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let config = crate::http::websocket_config(&node.settings().config);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(config)).await;
        let served = tokio::spawn(crate::session::run(server, format, admission, None));
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (mut tx, mut rx) = client.split();
        // Frames from the node: the marker's echo is signalled, the close code kept.
        let (marked, mut mark_seen) = tokio::sync::mpsc::channel::<()>(1);
        let reader = tokio::spawn(async move {
            let mut code = None;
            while let Some(Ok(m)) = rx.next().await {
                let decoded = match &m {
                    Message::Text(t) => tern_proto::codec::decode_server(t.as_bytes(), true).ok(),
                    Message::Binary(b) => tern_proto::codec::decode_server(b, false).ok(),
                    Message::Close(Some(f)) => {
                        code = Some(u16::from(f.code));
                        None
                    }
                    _ => None,
                };
                if let Some(server_frame::Kind::Heartbeat(h)) = decoded {
                    if h.nonce == MARK {
                        let _ = marked.try_send(());
                    }
                }
            }
            code
        });
        if options & 2 == 0 {
            let connect = r#"{"connect":{"protocol":1,"clientId":"fuzz"}}"#;
            let _ = tx.send(Message::Text(connect.into())).await;
        }
        for frame in frames {
            if tx.send(frame).await.is_err() {
                break;
            }
        }
        // A heartbeat marks the end of the input: once it is answered, the session has
        // handled every frame (answers that wait for the log may still be on their way).
        let mark = format!(r#"{{"heartbeat":{{"nonce":"{MARK}"}}}}"#);
        if tx.send(Message::Text(mark.into())).await.is_ok() {
            let _ = tokio::time::timeout(MARK_WAIT, mark_seen.recv()).await;
        }
        let _ = tx.send(Message::Close(None)).await;
        let ended = tokio::time::timeout(SESSION_END, served).await;
        assert!(ended.is_ok(), "the session did not end within {SESSION_END:?} of the close");
        drop(tx);
        let code = tokio::time::timeout(SESSION_END, reader).await.ok().and_then(|r| r.ok());
        assert_ne!(code.flatten(), Some(tern_proto::close::INTERNAL_ERROR), "the session failed");
        assert_eq!(node.hub().subscriptions_of(conn), 0, "the session left subscriptions behind");
        assert_eq!(node.connection_count(), before, "the session kept its connection slot");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_reaches_the_claims() {
        // The verifier is real: a token signed with its secret is accepted (so inputs
        // derived from such a token explore the claims, not only the header).
        let claims = Claims {
            sub: "fuzz".into(),
            exp: u64::MAX / 4,
            iat: None,
            capability: [("chat:*".to_owned(), vec![Operation::Publish])].into(),
        };
        let t = crate::auth::mint_hs256(FUZZ_HS256_SECRET, &claims).unwrap();
        assert_eq!(verifier().verify(&t).unwrap().sub, "fuzz");
        let forged = crate::auth::mint_hs256("another-secret-another-secret-0123456789", &claims);
        assert!(verifier().verify(&forged.unwrap()).is_err());
        token(t.as_bytes());
    }
}
