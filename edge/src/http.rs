//! HTTP on the client port: WebSocket upgrade at `/v1/ws`, health, latency probe, HTTP publish.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tern_proto::client::{self, ErrorCode, publish};
use tern_proto::codec::Format;
use tern_proto::{SUBPROTOCOL_JSON, SUBPROTOCOL_PROTOBUF};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::debug;

use crate::node::Node;
use crate::publish::{self as pubmod, PublishRequest};
use crate::session;

/// Builds the router for the client port (`/metrics` is here only without an admin
/// listener).
pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.settings().config.limits.max_frame_bytes;
    let client = Router::new();
    let client = if node.settings().config.listen.admin.is_none() {
        client.route("/metrics", get(metrics))
    } else {
        client
    };
    client
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/ping", get(ping))
        .route("/v1/regions", get(regions))
        .route("/v1/ws", get(websocket))
        // `{channel}/messages`, where the channel may hold `/` (encoded or not).
        .route("/v1/channels/{*path}", post(http_publish).get(http_get))
        .route("/v1/sse", get(plain_sse))
        .route("/v1/sessions", get(session_open))
        .route("/v1/sessions/{id}", post(session_post).delete(session_delete))
        .route("/v1/sessions/{id}/poll", get(session_poll))
        .route("/demo", get(|| async { axum::response::Redirect::permanent("/demo/") }))
        .route("/demo/", get(|node: State<Arc<Node>>| demo_file(node, Path("index.html".into()))))
        .route("/demo/{file}", get(demo_file))
        // After routing, so the span knows the route.
        .route_layer(axum::middleware::from_fn(request_span))
        .layer(DefaultBodyLimit::max(body_limit))
        // The last layer is the outermost: `guard_origin` refuses a browser origin that is
        // not allowed before anything (its preflight too); then the CORS layer answers
        // preflights and adds its headers for the allowed ones.
        .layer(cors_layer(&node))
        .layer(axum::middleware::from_fn_with_state(node.clone(), guard_origin))
        .with_state(node)
}

/// Request ids, for the `request` spans.
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Runs each routed request in a `request` span with its id, method and route (the matched
/// template, e.g. `/v1/channels/{*path}`: bounded, and never the query, which may carry a
/// token). Probes (`/healthz`, `/readyz`, `/v1/ping`) get none: they come every few seconds
/// and say nothing. A WebSocket or SSE session started by a request runs in its own
/// `session` span.
async fn request_span(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned());
    let Some(route) = route.filter(|r| !matches!(r.as_str(), "/healthz" | "/readyz" | "/v1/ping"))
    else {
        return next.run(req).await;
    };
    let id = REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = tracing::info_span!("request", request = id, method = %req.method(), route);
    next.run(req).instrument(span).await
}

/// Builds the router for the admin listener (`listen.admin`): metrics, probes and the drain.
/// No browser is expected here: no CORS, and any `Origin` is refused.
pub fn admin_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/drain", get(drain_status).post(drain_start).delete(drain_end))
        .layer(axum::middleware::from_fn(no_browsers))
        .with_state(node)
}

/// The admin listener answers no browser: a page must not drive it from a user's machine
/// (a request from a page carries `Origin`; `curl` and Prometheus do not).
async fn no_browsers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.headers().contains_key(header::ORIGIN) {
        return plain(StatusCode::FORBIDDEN, "the admin listener does not answer browsers\n");
    }
    next.run(req).await
}

/// The drain's state, as the admin endpoints answer it.
fn drain_body(node: &Node, status: StatusCode) -> Response {
    let body = serde_json::json!({
        "draining": node.is_draining(),
        "reason": node.is_draining().then(|| node.drain_reason()),
        "connections": node.connection_count(),
        "closeInMs": node.settings().config.timeouts.drain_time().as_millis() as u64,
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /admin/drain`: whether the node drains, and the sessions still open.
async fn drain_status(State(node): State<Arc<Node>>) -> Response {
    drain_body(&node, StatusCode::OK)
}

/// `POST /admin/drain`: drain without stopping. Every session gets a `draining` frame and
/// is closed with 1001 `timeouts.drain` later; new connections are refused (503) and
/// `/readyz` answers 503 until `DELETE /admin/drain`. 202 when this started the drain, 200
/// when it drained already.
async fn drain_start(State(node): State<Arc<Node>>) -> Response {
    let started = node.start_drain();
    if started {
        tracing::info!(open = node.connection_count(), "draining on request: clients told to go");
    }
    drain_body(&node, if started { StatusCode::ACCEPTED } else { StatusCode::OK })
}

/// `DELETE /admin/drain`: take clients again. 200 with `draining: false` (whether it drained
/// or not); 409 while the node shuts down (that drain cannot end; the admin listener stops
/// then, so only a request already in flight gets it).
async fn drain_end(State(node): State<Arc<Node>>) -> Response {
    if node.shutdown().is_cancelled() {
        let reason = "the node shuts down; its drain cannot end".into();
        return error_response(StatusCode::CONFLICT, ErrorCode::Unavailable, reason);
    }
    if node.end_drain() {
        tracing::info!("drain ended on request: taking clients again");
    }
    drain_body(&node, StatusCode::OK)
}

/// CORS for the origins `guard_origin` lets through: every origin that reaches this layer
/// is allowed, so it is echoed (with `Vary: Origin`). No credentials mode: clients send
/// their token in `Authorization`, which preflights allow, never in cookies.
fn cors_layer(node: &Node) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let cfg = &node.settings().config.cors;
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([http::Method::GET, http::Method::POST, http::Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-tern-session-secret"),
            header::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::HeaderName::from_static("x-tern-region"),
            header::HeaderName::from_static("x-tern-batch"),
        ])
        .max_age(cfg.max_age)
        // Chrome's Private Network Access: a public page of an allowed origin may reach a
        // node on a private address (an intranet, a local cluster).
        .allow_private_network(true)
}

/// Refuses a request from a browser origin outside `cors.allowed_origins` (with the
/// `[[regions]]` URLs' origins): 403 `ERROR_CODE_FORBIDDEN`, before any handler runs, on
/// every endpoint. Requests without `Origin` pass.
async fn guard_origin(
    State(node): State<Arc<Node>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let dev = node.settings().auth.mode() == crate::auth::AuthMode::Dev;
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let allowed = origin.to_str().ok().is_some_and(|o| {
            node.settings().config.cors.allows(o)
                || (dev && host.is_some_and(|h| crate::config::is_own_loopback_origin(o, h)))
        });
        if !allowed {
            let reason = format!(
                "origin {:?} is not in cors.allowed_origins",
                String::from_utf8_lossy(origin.as_bytes())
            );
            return error_response(StatusCode::FORBIDDEN, ErrorCode::Forbidden, reason);
        }
    }
    next.run(req).await
}

/// `GET /metrics`: the node's metrics in the Prometheus text format (see
/// [`crate::metrics`]; docs/operations.md lists them).
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    if !node.metrics().enabled() {
        let reason = "metrics are off on this node ([metrics] enabled = false)".into();
        return error_response(StatusCode::NOT_FOUND, ErrorCode::NotFound, reason);
    }
    let body = node.render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// The demo chat (edge/demo/: a page, its script and the TypeScript SDK's bundle, built
/// from js/ by `npm run build`), embedded in the binary.
const DEMO_FILES: [(&str, &str, &[u8]); 3] = [
    ("index.html", "text/html; charset=utf-8", include_bytes!("../demo/index.html")),
    ("demo.js", "text/javascript; charset=utf-8", include_bytes!("../demo/demo.js")),
    ("tern.min.js", "text/javascript; charset=utf-8", include_bytes!("../demo/tern.min.js")),
];

/// `GET /demo/{file}`: the demo chat, on dev-mode nodes only (it connects anonymously;
/// a token-mode node answers 404).
async fn demo_file(State(node): State<Arc<Node>>, Path(file): Path<String>) -> Response {
    let dev = node.settings().auth.mode() == crate::auth::AuthMode::Dev;
    match DEMO_FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) if dev => {
            ([(header::CONTENT_TYPE, *mime), (header::CACHE_CONTROL, "no-cache")], *body)
                .into_response()
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            if dev {
                "no such demo file".into()
            } else {
                "the demo is served in dev mode only".into()
            },
        ),
    }
}

/// `GET /readyz`: 200 once the node is ready for traffic, 503 (with `Retry-After: 1`) while
/// it catches up with its peers after a start (at most `backbone.ready_wait`) or shuts down.
/// The body says why, and each peer's link: `{"ready": false, "reason": "catching up with
/// peers", "peers": [{"node": "us-east/edge-1", "linked": true, "caughtUp": false}]}`.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let r = node.readiness();
    let peers: Vec<serde_json::Value> = r
        .peers
        .iter()
        .map(|(n, up, caught_up)| serde_json::json!({"node": n, "linked": up, "caughtUp": caught_up}))
        .collect();
    let body = serde_json::json!({"ready": r.ready, "reason": r.reason, "peers": peers});
    let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut res =
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    if !r.ready {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    res
}

/// `GET /v1/ping`: 204 for latency probes (header `x-tern-region`); 503 with `Retry-After`
/// while the node is not ready (see [`readyz`]), so SDKs choosing the nearest region skip a
/// node that is still catching up.
async fn ping(State(node): State<Arc<Node>>) -> Response {
    let status = if node.readiness().ready {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut res = status.into_response();
    if status != StatusCode::NO_CONTENT {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    if let Ok(v) = HeaderValue::from_str(node.settings().region.as_str()) {
        res.headers_mut().insert("x-tern-region", v);
    }
    res
}

/// Every region's public URL (from `[[regions]]`), so clients can probe them and pick the
/// nearest. Without a configured list, this node alone, at the host the client used.
async fn regions(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let settings = node.settings();
    let mut list: Vec<serde_json::Value> = settings
        .config
        .regions
        .iter()
        .map(|r| serde_json::json!({"region": r.name, "url": r.url}))
        .collect();
    if list.is_empty() {
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            list.push(serde_json::json!({"region": settings.region.as_str(), "url": format!("{}://{host}", if settings.config.tls.is_some() { "wss" } else { "ws" })}));
        }
    }
    let body = serde_json::json!({"self": settings.region.as_str(), "regions": list});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Reads a request body of at most `limit` bytes (named `what` in the error) within
/// `timeouts.http_body`: 413 `MESSAGE_TOO_LARGE` past the limit, 408 for a body that does
/// not arrive in time (a client that never ends its body holds no handler for ever), 400
/// for one that breaks off.
pub(crate) async fn read_body(
    node: &Node,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<Bytes, Box<Response>> {
    let wait = node.settings().config.timeouts.http_body;
    match tokio::time::timeout(wait, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Err(_) => {
            let reason = format!("the body did not arrive within {wait:?} (timeouts.http_body)");
            Err(Box::new(error_response(StatusCode::REQUEST_TIMEOUT, ErrorCode::BadFrame, reason)))
        }
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(Box::new(if too_big {
                let reason = format!("the body is over {what} ({limit} bytes)");
                error_response(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge, reason)
            } else {
                error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, e.to_string())
            }))
        }
    }
}

pub(crate) fn error_response(status: StatusCode, code: ErrorCode, reason: String) -> Response {
    let body = client::Error { request_id: 0, code: code as i32, reason, channel: String::new() };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut res = (status, [(header::CONTENT_TYPE, "application/json")], json).into_response();
    // For the handler's metrics (see `http_publish`).
    res.extensions_mut().insert(code);
    res
}

/// The media type of an HTTP publish body, from what the request declares: `Content-Type`
/// `application/json` (the default), `text/plain` (both UTF-8: a `charset` other than
/// `utf-8` is refused, never reinterpreted) or `application/octet-stream`; no
/// `Content-Encoding` but `identity`. The error says what to send instead (HTTP 415).
fn publish_content_type(headers: &HeaderMap) -> Result<BodyType, String> {
    const TYPES: &str = "use application/json, text/plain or application/octet-stream";
    for v in headers.get_all(header::CONTENT_ENCODING) {
        let coding = v.to_str().unwrap_or("?");
        if coding.split(',').any(|c| !c.trim().eq_ignore_ascii_case("identity")) {
            return Err(format!(
                "Content-Encoding {coding:?} is not supported: send the body unencoded"
            ));
        }
    }
    let mut declared = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (declared.next(), declared.next()) else {
        return if headers.contains_key(header::CONTENT_TYPE) {
            Err(format!("more than one Content-Type: {TYPES}"))
        } else {
            Ok(BodyType::Json)
        };
    };
    let mime: mime::Mime = value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("Content-Type {value:?} is not a media type: {TYPES}"))?;
    let (essence, body) = match mime.essence_str() {
        "application/json" => ("application/json", BodyType::Json),
        "text/plain" => ("text/plain", BodyType::Text),
        "application/octet-stream" => return Ok(BodyType::Binary),
        other => return Err(format!("Content-Type {other:?}: {TYPES}")),
    };
    match mime.get_param(mime::CHARSET).map(|c| c.as_str().trim_matches('"').to_owned()) {
        Some(c) if !c.eq_ignore_ascii_case("utf-8") && !c.eq_ignore_ascii_case("utf8") => {
            Err(format!(
                "charset {c:?} is not supported: send {essence} as UTF-8 (charset=utf-8, or none)"
            ))
        }
        _ => Ok(body),
    }
}

/// What an HTTP publish body holds (see [`publish_content_type`]).
enum BodyType {
    /// A `Publish` object as JSON.
    Json,
    /// The payload, as UTF-8 text.
    Text,
    /// The payload, as bytes.
    Binary,
}

/// Longest an HTTP publish waits for its message to reach the history log.
const LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most messages one history page returns.
pub const MAX_HISTORY_PAGE: usize = 1_000;

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
    direction: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
    since: Option<u64>,
    until: Option<u64>,
}

/// `GET /v1/channels/{channel}/messages`: a page of the channel's durable history.
/// `direction=backwards` (default, newest first) or `forwards`; `from`/`to` offsets
/// (inclusive, in the direction of travel); `since`/`until` unix ms; `limit` (default 100,
/// at most 1000). The answer's `next` holds the `from` of the following page, or null.
async fn http_get(
    State(node): State<Arc<Node>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if let Some(channel) = path.strip_suffix("/presence") {
        let query = Query::<PresenceQuery>::try_from_uri(&uri);
        return http_presence(&node, channel, &headers, query);
    }
    let Some(channel) = channel_of(path) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    http_history(node, channel, headers, Query::<HistoryQuery>::try_from_uri(&uri)).await
}

#[derive(Deserialize)]
struct PresenceQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/channels/{channel}/presence`: a page of the channel's members, as the
/// `presence` request's `GET` (same order, `limit` up to `presence.page_size`, `after` the
/// `next` of the page before), with the same capability rule.
fn http_presence(
    node: &Node,
    channel: &str,
    headers: &HeaderMap,
    query: Result<Query<PresenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let caller = match authenticate(node, headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = query else {
        let reason = "bad query: limit is an unsigned integer, after a string";
        return error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, reason.into());
    };
    let name = match tern_proto::types::ChannelName::parse(channel) {
        Ok(n) => n,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidChannel,
                e.to_string(),
            );
        }
    };
    let cfg = &node.settings().config;
    let reads = caller.allow(crate::auth::Operation::Presence, channel).is_ok()
        || (caller.allow(crate::auth::Operation::Subscribe, channel).is_ok()
            && cfg.presence.subscribe_reads(channel));
    if !reads {
        if let Err(r) = caller.allow(crate::auth::Operation::Presence, channel) {
            return *r;
        }
    }
    let page = cfg.presence.page_size;
    let limit = q.limit.filter(|l| *l > 0).map_or(page, |l| l.min(page));
    let budget = cfg.limits.max_frame_bytes.saturating_sub(256 + channel.len());
    let after = q.after.unwrap_or_default();
    let (members, next) =
        match node.presence().get(node.hub().backbone(), &name, &after, limit, budget) {
            Ok(page) => page,
            Err(reason) => {
                return error_response(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
            }
        };
    let body = serde_json::json!({
        "channel": channel,
        "members": members,
        "next": Some(next).filter(|n| !n.is_empty()),
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn http_history(
    node: Arc<Node>,
    channel: String,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let caller = match authenticate(&node, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // As a frame that does not decode over the WebSocket.
    let Ok(Query(q)) = query else {
        let reason = "bad query: limit, from, to, since, until are unsigned 64-bit integers";
        return error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, reason.into());
    };
    if let Err(r) = valid_channel(&channel) {
        return *r;
    }
    let bad = |reason: String| {
        error_response(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason)
    };
    let backwards = match q.direction.as_deref() {
        None | Some("backwards") => true,
        Some("forwards") => false,
        Some(other) => return bad(format!("direction {other:?}: use forwards or backwards")),
    };
    // 0 is the default, as over the WebSocket (where an absent field reads as 0).
    let limit = q.limit.filter(|l| *l > 0).unwrap_or(100);
    if limit > MAX_HISTORY_PAGE {
        return bad(format!("limit must be at most {MAX_HISTORY_PAGE}"));
    }
    if let Err(r) = caller.allow(crate::auth::Operation::History, &channel) {
        return *r;
    }
    let Some(store) = node.hub().store().filter(|s| s.keeps(&channel)) else {
        return error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
            format!(
                "history is not kept for {channel:?}: its namespace is not in [history.namespaces]"
            ),
        );
    };
    let query = crate::store::Query {
        from: q.from,
        to: q.to,
        since_ms: q.since,
        until_ms: q.until,
        limit,
        max_bytes: node.settings().config.limits.history_page_bytes,
        max_scan: crate::store::PAGE_SCAN_MAX,
        backwards,
    };
    // The page, its JSON values and the document.
    let Some(permit) = node.history_read(3 * node.settings().config.limits.history_page_bytes)
    else {
        let mut r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RateLimited,
            "the node is serving its limit of history reads; retry shortly".into(),
        );
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(1u32));
        return r;
    };
    let store = store.clone();
    let ch = channel.clone();
    // The read slot is back once the page is read (as over the WebSocket); the memory share
    // stays with the page, then with the document until the connection has written it
    // (`held_body`).
    let crate::node::ReadPermit { count, bytes } = permit;
    let read = move || {
        let page = store.page(&ch, query);
        drop(count);
        (page, bytes)
    };
    let (page, permit) = match tokio::task::spawn_blocking(read).await {
        Ok((Ok(page), permit)) => (page, permit),
        Ok((Err(e), _)) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            );
        }
        Err(_) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "history read failed".into(),
            );
        }
    };
    let next = page.next_from;
    let messages: Vec<serde_json::Value> = page
        .messages
        .iter()
        .filter_map(|m| {
            let msg = <client::Message as prost::Message>::decode(m.message.as_slice()).ok()?;
            serde_json::to_value(&msg).ok()
        })
        .collect();
    let body = serde_json::json!({
        "channel": channel,
        "epoch": node.hub().log_epoch().0.to_string(),
        "messages": messages,
        // 64-bit integers as strings, as everywhere in the JSON mapping.
        "next": next.map(|from| serde_json::json!({"from": from.to_string()})),
    });
    let body = body.to_string();
    let length = body.len().to_string();
    let timeouts = &node.settings().config.timeouts;
    (
        [(header::CONTENT_TYPE, "application/json"), (header::CONTENT_LENGTH, length.as_str())],
        held_body(body.into_bytes(), permit, timeouts.http_write),
    )
        .into_response()
}

/// A history answer's bytes, and the share of `limits.history_read_bytes` they hold: the
/// share goes back when the last piece of them is dropped — written to the client, or
/// dropped with its connection.
struct HeldBytes {
    bytes: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Slowest average pace an HTTP answer may be read at (after a first `timeouts.http_write`):
/// 16 KiB/s, a poor mobile link's. A client slower than that would hold its answer's memory
/// for too long; it is let go like one that stops reading.
const MIN_READ_RATE: u64 = 16 * 1024;

/// `body` handed to the connection in pieces of 64 KiB, its memory counted in the read
/// budget (`permit`) until the last piece is gone. The answer must be taken within
/// `stall + len / MIN_READ_RATE`; otherwise the connection ends (as it does, through
/// `WriteDeadline`, when no piece moves for `stall`).
fn held_body(
    body: Vec<u8>,
    permit: tokio::sync::OwnedSemaphorePermit,
    stall: std::time::Duration,
) -> Body {
    const PIECE: usize = 64 * 1024;
    let len = body.len() as u64;
    let deadline = tokio::time::Instant::now()
        + stall
        + std::time::Duration::from_secs(len.div_ceil(MIN_READ_RATE));
    let rest = Bytes::from_owner(HeldBytes { bytes: body, _permit: permit });
    let pieces = futures_util::stream::unfold(rest, move |mut rest| async move {
        if rest.is_empty() {
            return None;
        }
        if tokio::time::Instant::now() > deadline {
            let late = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client reads its answer too slowly",
            );
            return Some((Err(late), Bytes::new()));
        }
        let piece = rest.split_to(rest.len().min(PIECE));
        Some((Ok(piece), rest))
    });
    Body::from_stream(pieces)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

#[derive(Deserialize)]
struct WsQuery {
    format: Option<String>,
    /// The auth token, for clients that cannot send it in `Connect` (it then stays out of
    /// the first frame; note that URLs may end up in proxy logs).
    token: Option<String>,
}

/// Who is calling the HTTP API: an API key's or a token's claims, or nobody (dev mode
/// without an API key).
struct Caller(Option<crate::auth::Claims>);

impl Caller {
    /// The caller's id: `key:ID` for an API key, a token's subject.
    fn id(&self) -> Option<&str> {
        self.0.as_ref().map(|c| c.sub.as_str())
    }

    /// 403 unless the caller may do `op` on `channel` (anyone may, in dev mode).
    fn allow(&self, op: crate::auth::Operation, channel: &str) -> Result<(), Box<Response>> {
        match &self.0 {
            Some(claims) if !claims.allows(op, channel) => Err(Box::new(error_response(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("{} may not {op:?} on {channel}", claims.sub),
            ))),
            _ => Ok(()),
        }
    }
}

/// Who is calling, from `Authorization`: an API key (HTTP Basic with `id:secret`, checked
/// in every mode) or, in token mode, a client token (`Bearer`, checked as on every other
/// surface). 401 `ERROR_CODE_UNAUTHORIZED` without valid credentials where they are needed.
///
/// Every HTTP request is checked in the one order of the protocol: who is asking (401),
/// then the request itself (400, 413, 415), then what the caller may do (403), then what
/// the node supports and its limits (404, 429, 503), then the operation.
fn authenticate(node: &Node, headers: &HeaderMap) -> Result<Caller, Box<Response>> {
    let verifier = &node.settings().auth;
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let unauthorized = |e: crate::auth::TokenError| {
        let mut r =
            error_response(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string());
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"tern\", Bearer"),
        );
        Box::new(r)
    };
    let claims = match authorization {
        // An API key: HTTP Basic `id:secret` (checked in dev mode too, so a wrong key shows).
        Some(v) if v.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("basic ")) => {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(v.get(6..).unwrap_or_default().trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            let Some((id, secret)) = decoded.as_deref().and_then(|s| s.split_once(':')) else {
                return Err(unauthorized(crate::auth::TokenError::ApiKey));
            };
            Some(verifier.verify_api_key(id, secret).map_err(unauthorized)?)
        }
        // Dev mode takes no tokens, here as over the WebSocket.
        _ if verifier.mode() == crate::auth::AuthMode::Dev => None,
        // A client token.
        other => {
            // The scheme is case-insensitive (RFC 9110, 11.1).
            let token = other
                .filter(|v| v.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")))
                .and_then(|v| v.get(7..))
                .map_or("", str::trim);
            Some(verifier.verify(token).map_err(unauthorized)?)
        }
    };
    Ok(Caller(claims))
}

/// The channel of a `/v1/channels/{channel}/messages` path (after `/v1/channels/`).
fn channel_of(path: String) -> Option<String> {
    path.strip_suffix("/messages").map(str::to_owned)
}

/// 400 `ERROR_CODE_INVALID_CHANNEL` for a name that is not a channel.
fn valid_channel(channel: &str) -> Result<(), Box<Response>> {
    tern_proto::types::ChannelName::validate(channel).map_err(|e| {
        Box::new(error_response(StatusCode::BAD_REQUEST, ErrorCode::InvalidChannel, e.to_string()))
    })
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Upgrades to a WebSocket session. The wire format comes from `?format=json|proto`, or
/// from the subprotocol (`tern.v1.json` / `tern.v1.proto`); JSON is the default.
async fn websocket(
    State(node): State<Arc<Node>>,
    Query(q): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return plain(StatusCode::UPGRADE_REQUIRED, "this endpoint needs a WebSocket upgrade\n");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13\n");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered = |p: &str| header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, p);
    let (format, subprotocol) = match q.format.as_deref() {
        Some(f) => match Format::parse(f) {
            Some(f) => (f, None),
            None => return plain(StatusCode::BAD_REQUEST, "format must be json or proto\n"),
        },
        None if offered(SUBPROTOCOL_PROTOBUF) => (Format::Protobuf, Some(SUBPROTOCOL_PROTOBUF)),
        None if offered(SUBPROTOCOL_JSON) => (Format::Json, Some(SUBPROTOCOL_JSON)),
        None => (Format::Json, None),
    };
    // (A browser `Origin` was checked by `guard_origin`.)
    if node.is_draining() {
        let text = format!("{}\n", node.drain_reason());
        let mut res = (StatusCode::SERVICE_UNAVAILABLE, text).into_response();
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return res;
    }
    let token = q.token;
    let Some(admission) = node.admit(crate::metrics::Transport::WebSocket) else {
        let mut res = plain(StatusCode::SERVICE_UNAVAILABLE, "connection limit reached\n");
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return res;
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "connection cannot be upgraded\n");
    };
    let cfg = &node.settings().config;
    let ws_config = websocket_config(cfg);
    node.tracker().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                session::run(ws, format, admission, token).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    res
}

/// The WebSocket settings of a client connection.
pub fn websocket_config(cfg: &crate::Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(cfg.websocket.read_buffer_bytes)
        // Frames queued in one loop turn (acks, batches) go out in one write on flush.
        .write_buffer_size(cfg.websocket.max_batch_bytes)
        .max_write_buffer_size(cfg.websocket.max_batch_bytes * 4 + cfg.limits.max_frame_bytes)
        .max_message_size(Some(cfg.limits.max_frame_bytes))
        .max_frame_size(Some(cfg.limits.max_frame_bytes))
}

/// `POST /v1/channels/{channel}/messages`.
///
/// Body: `application/json` in the `Publish` frame's JSON form (`{"id":"…","name":"…",
/// "text":"…"}` or `"binary":"<base64>"`), `text/plain` (the body is the text), or
/// `application/octet-stream` (the body is the binary payload). Answers 201 with the `Ack`
/// frame's JSON form.
async fn http_publish(
    State(node): State<Arc<Node>>,
    path: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let res = http_publish_inner(State(node.clone()), path, headers, body).await;
    if let Some(code) = res.extensions().get::<ErrorCode>() {
        node.metrics().refused(*code);
    }
    res
}

async fn http_publish_inner(
    State(node): State<Arc<Node>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(channel) = channel_of(path) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let caller = match authenticate(&node, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // The body decodes first, then `pubmod::check` takes the channel and the fields.
    let max = node.settings().config.limits.max_frame_bytes;
    let body = match read_body(&node, body, max, "limits.max_frame_bytes").await {
        Ok(body) => body,
        Err(r) => return *r,
    };
    let content_type = match publish_content_type(&headers) {
        Ok(t) => t,
        Err(reason) => {
            return error_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::BadFrame, reason);
        }
    };
    let mut body_channel = String::new();
    let p = match content_type {
        BodyType::Json => match serde_json::from_slice::<client::Publish>(&body) {
            Ok(p) => {
                body_channel = p.channel.clone();
                client::Publish { channel: channel.clone(), ..p }
            }
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, e.to_string());
            }
        },
        BodyType::Text => match String::from_utf8(body.to_vec()) {
            Ok(t) => client::Publish {
                channel: channel.clone(),
                data: Some(publish::Data::Text(t)),
                ..Default::default()
            },
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadFrame,
                    "text/plain body is not UTF-8".into(),
                );
            }
        },
        BodyType::Binary => client::Publish {
            channel: channel.clone(),
            data: Some(publish::Data::Binary(body)),
            ..Default::default()
        },
    };
    // The one order of checks, as over the WebSocket (`pubmod::check`).
    if let Err(e) = pubmod::check(&node, &p) {
        return error_response(e.http_status(), e.code(), e.to_string());
    }
    if !body_channel.is_empty() && body_channel != channel {
        return error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidArgument,
            "the body's channel differs from the URL's".into(),
        );
    }
    if let Err(r) = caller.allow(crate::auth::Operation::Publish, &channel) {
        return *r;
    }
    if let Err(e) = pubmod::supported(&node, p.durability) {
        return error_response(e.http_status(), e.code(), e.to_string());
    }
    if let Err((wait, rate)) = node.take_http_publish(caller.id().unwrap_or(""), &channel) {
        let mut r = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!("more than {rate} publishes/s from this caller; retry after {wait:?}"),
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return r;
    }
    let replicated = p.durability == client::Durability::Replicated as i32;
    let mut req = PublishRequest { channel, id: p.id, name: p.name, data: p.data, after: p.after };
    let channel_name = req.channel.clone();
    if let Some(after) = req.after.take() {
        // A publisher that moved here: its earlier messages come first.
        let wait = node.settings().config.limits.publish_order_wait;
        let deadline = tokio::time::Instant::now() + wait;
        // Forgets the question to the other node however this request ends (a client
        // that goes away drops it mid-wait).
        struct Probe(Arc<Node>, Option<u64>);
        impl Drop for Probe {
            fn drop(&mut self) {
                self.0.hub().forget_probe_opt(self.1);
            }
        }
        let mut probe = Probe(node.clone(), None);
        loop {
            match node.hub().order_ready(&req.channel, &after, &mut probe.1) {
                crate::channel::order::OrderReady::Ready(verified) => {
                    req.after = verified;
                    break;
                }
                crate::channel::order::OrderReady::Wait(reason) => {
                    if tokio::time::Instant::now() >= deadline {
                        let mut r = error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            ErrorCode::Unavailable,
                            format!(
                                "not sequenced within {wait:?}: {reason}; retry with the same id"
                            ),
                        );
                        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                        return r;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    match pubmod::publish(&node, req, caller.id().unwrap_or("http")) {
        Ok(a) => {
            // Answer once the message is in the history log, if it goes there.
            if let (Some(ticket), Some(store)) = (a.log_ticket, node.hub().store()) {
                let mut committed = store.committed();
                let logged = committed.wait_for(|t| *t >= ticket);
                if !matches!(tokio::time::timeout(LOG_WAIT, logged).await, Ok(Ok(_))) {
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Internal,
                        "delivered, but not confirmed in the history log in time".into(),
                    );
                }
                // As over the WebSocket: once answered, the message is out.
                node.hub().release_channel(&channel_name, *store.committed().borrow());
                if store.failed(ticket) {
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Internal,
                        "delivered, but the history log could not be written".into(),
                    );
                }
            }
            if replicated && a.own {
                let mut changes = node.hub().replicated_watch();
                let hub = node.hub();
                let (ch, seq) = (channel_name.clone(), a.seq.0);
                let wait = changes.wait_for(|_| hub.is_replicated(&ch, seq));
                if !matches!(tokio::time::timeout(LOG_WAIT, wait).await, Ok(Ok(_))) {
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::NotReplicated,
                        "delivered and logged here, but no other region acknowledged it in time"
                            .into(),
                    );
                }
            }
            let duplicate = a.duplicate;
            let ack = a.into_ack(0, channel_name);
            let json = serde_json::to_vec(&ack).unwrap_or_default();
            let status = if duplicate { StatusCode::OK } else { StatusCode::CREATED };
            (status, [(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        Err(e) => error_response(e.http_status(), e.code(), e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct SessionQuery {
    transport: Option<String>,
    format: Option<String>,
    token: Option<String>,
    secret: Option<String>,
    ack: Option<u64>,
}

/// `GET /v1/sessions`: opens an HTTP session (see `session::http::open`).
async fn session_open(
    State(node): State<Arc<Node>>,
    Query(q): Query<SessionQuery>,
    req: Request,
) -> Response {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
    // The token of `Connect` falls back to this one, as `/v1/ws?token=` does.
    let ip = peer.map(|p| p.0.ip());
    let token = q.token.or_else(|| bearer(req.headers()));
    session::http::open(node, ip, q.transport.as_deref(), q.format.as_deref(), token).await
}

/// `POST /v1/sessions/{id}`: client frames (see `session::http::post`).
async fn session_post(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<SessionQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let secret = session::http::secret_of(&headers, q.secret.as_deref());
    session::http::post(node.clone(), &id, secret, body).await
}

/// `GET /v1/sessions/{id}/poll`: a long poll (see `session::http::poll`).
async fn session_poll(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<SessionQuery>,
    headers: HeaderMap,
) -> Response {
    let secret = session::http::secret_of(&headers, q.secret.as_deref());
    session::http::poll(node.clone(), &id, secret, q.ack.unwrap_or(0)).await
}

/// `DELETE /v1/sessions/{id}`: the client leaves (see `session::http::delete`).
async fn session_delete(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<SessionQuery>,
    headers: HeaderMap,
) -> Response {
    let secret = session::http::secret_of(&headers, q.secret.as_deref());
    session::http::delete(node.clone(), &id, secret).await
}

/// `GET /v1/sse?channel=…&channel=…[&rewind=N][&token=…][&lastEventId=…]`: plain
/// server-sent events (see `session::sse`).
async fn plain_sse(
    State(node): State<Arc<Node>>,
    Query(q): Query<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
    let headers = req.headers();
    let mut r = session::sse::Request {
        token: bearer(headers),
        last_event_id: headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        ..Default::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "channel" => r.channels.push(v),
            "token" => r.token = Some(v),
            "lastEventId" if r.last_event_id.is_none() => r.last_event_id = Some(v),
            "rewind" => match v.parse() {
                Ok(n) => r.rewind = n,
                Err(_) => {
                    let reason = "rewind must be a count of messages".into();
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidArgument,
                        reason,
                    );
                }
            },
            _ => {}
        }
    }
    session::sse::open(node, peer.map(|p| p.0.ip()), r).await
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}
