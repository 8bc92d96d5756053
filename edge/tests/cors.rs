//! Browser origins over real sockets: `cors.allowed_origins` guards the HTTP API and the
//! WebSocket alike. A listed origin — or one of the cluster's own region URLs — gets its
//! preflights answered and CORS headers on every answer; any other browser origin is
//! refused (403) before anything is done; requests without `Origin` (servers, SDKs) pass.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestNode;

/// A raw HTTP/1.1 request with exactly these headers (`Host` included).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let lines: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    common::http_request(addr, method, path, &lines, body).await
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

async fn node(origins: &[&str], regions: &[&str]) -> (TestNode, std::path::PathBuf) {
    let dir = common::temp_dir("cors");
    let data = dir.clone();
    let origins: Vec<String> = origins.iter().map(|o| (*o).to_owned()).collect();
    let regions: Vec<tern_edge::config::RegionUrl> = regions
        .iter()
        .enumerate()
        .map(|(i, u)| tern_edge::config::RegionUrl { name: format!("r{i}"), url: (*u).into() })
        .collect();
    let n = TestNode::start(move |cfg| {
        cfg.cors.allowed_origins = origins;
        cfg.regions = regions;
        cfg.history.data_dir = data;
        cfg.history.namespaces = vec![tern_edge::config::HistoryNamespace {
            name: "log".into(),
            max_messages: 100,
            max_age: Duration::from_secs(3600),
        }];
    })
    .await;
    (n, dir)
}

/// The texts in a channel's history, read as a server would (no `Origin`).
async fn logged(addr: SocketAddr, channel: &str) -> Vec<String> {
    let path = format!("/v1/channels/{channel}/messages?direction=forwards");
    let (status, _, body) = request(addr, "GET", &path, &[("Host", "x")], b"").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().into()).collect()
}

#[tokio::test]
async fn only_listed_origins_may_use_the_http_api() {
    let (n, dir) = node(&["https://App.Example:443"], &[]).await;
    let path = "/v1/channels/log:a/messages";
    let app = "https://app.example";

    // A preflight from the listed origin is answered with what a browser needs to send a
    // token and JSON.
    let preflight = |origin: &'static str| async move {
        request(
            n.addr,
            "OPTIONS",
            path,
            &[
                ("Host", "edge.example"),
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type"),
            ],
            b"",
        )
        .await
    };
    let (status, h, _) = preflight(app).await;
    assert!(status == 200 || status == 204, "preflight: {status}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(app));
    assert!(header(&h, "access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    let allowed = header(&h, "access-control-allow-headers").unwrap_or("").to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    assert_eq!(header(&h, "access-control-max-age"), Some("600"));
    assert!(header(&h, "access-control-allow-credentials").is_none(), "no cookies, ever");
    // Another origin's preflight is refused, with nothing a browser could act on.
    let (status, h, _) = preflight("https://evil.example").await;
    assert_eq!(status, 403);
    assert!(header(&h, "access-control-allow-origin").is_none());

    // A simple POST (no preflight in a browser) from another origin is refused and not
    // published; from the listed origin it is, and its answer is readable by the page.
    let post = |origin: &'static str, text: &'static str| async move {
        request(
            n.addr,
            "POST",
            path,
            &[("Host", "edge.example"), ("Origin", origin), ("Content-Type", "text/plain")],
            text.as_bytes(),
        )
        .await
    };
    let (status, h, body) = post("https://evil.example", "forged").await;
    assert_eq!(status, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_FORBIDDEN");
    assert!(header(&h, "access-control-allow-origin").is_none());
    let (status, h, body) = post(app, "from the app").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(app));
    assert!(header(&h, "vary").is_some_and(|v| v.to_lowercase().contains("origin")));
    // Every endpoint: the latency probe, and the history read.
    let get = |p: &'static str, origin: &'static str| async move {
        request(n.addr, "GET", p, &[("Host", "edge.example"), ("Origin", origin)], b"").await
    };
    let (status, h, _) = get("/v1/ping", app).await;
    assert_eq!(status, 204);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(app));
    let exposed = header(&h, "access-control-expose-headers").unwrap_or("").to_lowercase();
    assert!(exposed.contains("x-tern-region") && exposed.contains("retry-after"), "{exposed}");
    assert_eq!(get("/v1/ping", "https://evil.example").await.0, 403);
    assert_eq!(get("/v1/channels/log:a/messages", "https://evil.example").await.0, 403);
    assert_eq!(get("/v1/channels/log:a/messages", app).await.0, 200);

    // A page on another site whose name was re-pointed at the node (DNS rebinding) sends a
    // `Host` that matches its `Origin`: still refused.
    let (status, _, _) = request(
        n.addr,
        "POST",
        path,
        &[
            ("Host", "evil.example:7400"),
            ("Origin", "http://evil.example:7400"),
            ("Content-Type", "text/plain"),
        ],
        b"rebound",
    )
    .await;
    assert_eq!(status, 403);
    // Servers send no `Origin`: served.
    let (status, _, _) = request(
        n.addr,
        "POST",
        path,
        &[("Host", "x"), ("Content-Type", "text/plain")],
        b"a server",
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(logged(n.addr, "log:a").await, ["from the app", "a server"]);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// By default only the origins of the cluster's region URLs may use a node, the WebSocket
/// too; `"*"` allows every origin.
#[tokio::test]
async fn the_default_is_the_clusters_own_origins_and_a_star_allows_every_origin() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::error::Error as WsError;
    let open = |addr: SocketAddr, origin: Option<String>| {
        let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    let (n, dir) = node(&[], &["wss://EU.edge.example/", "ws://us.edge.example:8080"]).await;
    // Another local page (another port); a rebound DNS name for this very node.
    let rebound = format!("http://evil.example:{}", n.addr.port());
    for refused in ["https://evil.example".to_owned(), "http://127.0.0.1:1".to_owned(), rebound] {
        match open(n.addr, Some(refused.clone())).await {
            Err(WsError::Http(res)) => assert_eq!(res.status(), 403, "{refused}"),
            r => panic!("{refused}: expected 403, got {:?}", r.map(|_| ())),
        }
    }
    // Pages served by the cluster's nodes, at their region URLs.
    for own in ["https://eu.edge.example", "http://us.edge.example:8080"] {
        assert!(open(n.addr, Some(own.into())).await.is_ok(), "{own}");
    }
    assert!(open(n.addr, None).await.is_ok(), "no Origin");
    let post = request(
        n.addr,
        "POST",
        "/v1/channels/log:b/messages",
        &[("Host", "x"), ("Origin", "https://evil.example"), ("Content-Type", "text/plain")],
        b"forged",
    )
    .await;
    assert_eq!(post.0, 403);
    assert!(logged(n.addr, "log:b").await.is_empty(), "nothing was published");
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let (n, dir) = node(&["*"], &[]).await;
    assert!(open(n.addr, Some("https://anyone.example".into())).await.is_ok());
    let (status, h, _) = request(
        n.addr,
        "POST",
        "/v1/channels/log:b/messages",
        &[("Host", "x"), ("Origin", "https://anyone.example"), ("Content-Type", "text/plain")],
        b"welcome",
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(header(&h, "access-control-allow-origin"), Some("https://anyone.example"));
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dev-mode node serves the demo chat at `/demo/` (embedded in the binary) and lets the
/// page it served use it: its own loopback origin, the WebSocket and HTTP alike. Another
/// local port, or a foreign name resolved to the node (DNS rebinding), stays refused; a
/// token-mode node serves no demo.
#[tokio::test]
async fn a_dev_node_serves_the_demo_and_its_own_page_may_use_it() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (n, dir) = node(&[], &[]).await;
    let host = n.addr.to_string();
    let get = |path: &'static str| request(n.addr, "GET", path, &[("Host", "x")], b"");
    let (status, h, _) = get("/demo").await;
    assert_eq!((status, header(&h, "location")), (308, Some("/demo/")));
    let (status, h, page) = get("/demo/").await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert!(page.contains("<script type=\"module\" src=\"demo.js\">"), "{page}");
    let (status, _, script) = get("/demo/demo.js").await;
    assert_eq!(status, 200);
    assert!(script.contains("from './tern.min.js'"));
    let (status, h, sdk) = get("/demo/tern.min.js").await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/javascript; charset=utf-8"));
    assert!(sdk.contains("/v1/sessions?transport="), "the SDK bundle");
    assert_eq!(get("/demo/../Cargo.toml").await.0, 404);
    assert_eq!(get("/demo/nothing.js").await.0, 404);

    let ws = |origin: String, host: String| {
        let mut req = format!("ws://{}/v1/ws", n.addr).into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req.headers_mut().insert("host", host.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let own = format!("http://{host}");
    assert!(ws(own.clone(), host.clone()).await.is_ok(), "the page the node served");
    let local = format!("http://localhost:{}", n.addr.port());
    assert!(ws(local.clone(), format!("localhost:{}", n.addr.port())).await.is_ok());
    let rebound = format!("evil.example:{}", n.addr.port());
    assert!(ws(format!("http://{rebound}"), rebound).await.is_err(), "DNS rebinding");
    assert!(ws("http://127.0.0.1:1".into(), host.clone()).await.is_err(), "another local page");
    let (status, _, _) = request(
        n.addr,
        "POST",
        "/v1/channels/log:demo/messages",
        &[("Host", &host), ("Origin", &own), ("Content-Type", "text/plain")],
        b"from the demo",
    )
    .await;
    assert_eq!(status, 201);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let n = TestNode::start(|cfg| {
        cfg.auth.mode = tern_edge::auth::AuthMode::Token;
        cfg.auth.hs256_secret = Some("a-secret-of-at-least-32-bytes-for-tests".into());
    })
    .await;
    let (status, _, body) = request(n.addr, "GET", "/demo/", &[("Host", "x")], b"").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("dev mode only"), "{body}");
    n.stop().await;
}
