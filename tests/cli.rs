//! The `tern` binary end to end: `tern edge`, `tern sub`, `tern pub`, SIGTERM, bad config.

use crate::common;

use common::tern;

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(30);

struct Edge {
    child: Child,
    addr: String,
}

async fn start_edge(extra: &[&str]) -> Edge {
    let args = ["--listen", "127.0.0.1:0"].iter().chain(extra);
    let (child, line) = common::spawn_edge(args, WAIT).await;
    let addr = line.split_whitespace().skip_while(|w| *w != "on").nth(1).unwrap().to_owned();
    Edge { child, addr }
}

#[tokio::test]
async fn sub_and_pub_deliver_a_message_through_a_running_edge() {
    let edge = start_edge(&[]).await;
    let url = format!("ws://{}", edge.addr);
    let mut sub = Command::new(tern())
        .args(["sub", &url, "chat:cli", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the subscriber says it is subscribed.
    let mut err = BufReader::new(sub.stderr.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, err.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("sub exited early");
        if line.contains("subscribed to chat:cli") {
            break;
        }
    }
    let out = Command::new(tern())
        .args(["pub", &url, "chat:cli", "hello from the cli"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ack["originSeq"], "1");
    let sub_out = tokio::time::timeout(WAIT, sub.wait_with_output()).await.unwrap().unwrap();
    assert!(sub_out.status.success());
    let line = String::from_utf8(sub_out.stdout).unwrap();
    let msg: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(msg["text"], "hello from the cli");
    assert_eq!(msg["channel"], "chat:cli");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut edge = start_edge(&[]).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", edge.addr)).await.unwrap();
    ws.send(WsMessage::Text(r#"{"connect":{}}"#.into())).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(WsMessage::Text(_)))));
    let pid = edge.child.id().unwrap().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success());
    let mut code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(WAIT, ws.next()).await {
        match msg {
            Ok(WsMessage::Close(f)) => code = f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(1001));
    let exit = tokio::time::timeout(WAIT, edge.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[limits]\nmax_connections = 0\n").unwrap();
    let out = Command::new(tern()).args(["edge", "--config"]).arg(&path).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_connections"));
    std::fs::write(&path, "[limits]\nmax_conections = 5\n").unwrap();
    let out = Command::new(tern()).args(["edge", "--config"]).arg(&path).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_conections"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tern_token_mints_a_token_the_nodes_accept() {
    let secret = "a-cli-test-secret-that-is-long-enough-123456";
    let out = std::process::Command::new(tern())
        .args(["token", "--secret", secret, "--client-id", "zoe", "--ttl", "10m"])
        .args(["--capability", "chat:*=subscribe,publish", "--capability", "log:*=history"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = tern_edge::auth::AuthConfig {
        mode: tern_edge::auth::AuthMode::Token,
        hs256_secret: Some(secret.into()),
        ..Default::default()
    };
    let claims = tern_edge::auth::Verifier::new(&auth).unwrap().verify(token.trim()).unwrap();
    assert_eq!(claims.sub, "zoe");
    assert!(claims.allows(tern_edge::auth::Operation::Publish, "chat:x"));
    assert!(claims.allows(tern_edge::auth::Operation::History, "log:x"));
    assert!(!claims.allows(tern_edge::auth::Operation::Publish, "log:x"));
    // A capability naming an unknown operation is refused.
    let bad = std::process::Command::new(tern())
        .args(["token", "--secret", secret, "--client-id", "zoe", "--capability", "chat:*=shout"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown operation"));
}

#[tokio::test]
async fn tern_certs_server_makes_a_certificate_a_tls_edge_serves_and_the_sdk_trusts() {
    let dir = std::env::temp_dir().join(format!("tern-cli-tls-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    for args in [
        &["certs", "init", "--dir", d][..],
        &["certs", "server", "localhost", "127.0.0.1", "--dir", d],
    ] {
        let out = std::process::Command::new(tern()).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!("[tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n"),
    )
    .unwrap();
    let edge = start_edge(&["--config", config.to_str().unwrap()]).await;
    let port = edge.addr.rsplit_once(':').unwrap().1;
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let options = tern_client::ClientOptions::default().trust_pem(&ca).unwrap();
    let client = tern_client::Client::connect(&format!("wss://localhost:{port}"), options)
        .await
        .expect("wss with the development CA");
    let ack = client.publish("chat:tls", "hello").await.unwrap();
    assert_eq!(ack.channel, "chat:tls");
    drop(edge);
}

#[test]
fn tern_certs_revoke_lists_a_node_and_refuses_one_without_a_certificate() {
    let dir = std::env::temp_dir().join(format!("tern-cli-revoke-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let run = |args: &[&str]| std::process::Command::new(tern()).args(args).output().unwrap();
    for args in
        [&["certs", "init", "--dir", d][..], &["certs", "node", "eu-west/edge-2", "--dir", d]]
    {
        let out = run(args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run(&["certs", "revoke", "eu-west/edge-2", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("crl.pem"));
    let crl = std::fs::read_to_string(dir.join("crl.pem")).unwrap();
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");
    // No certificate was issued for this node: nothing to revoke, and the error says why.
    let out = run(&["certs", "revoke", "eu-west/edge-9", "--dir", d]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("eu-west-edge-9.pem"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Logs: `--log-format json` writes one JSON object per line (level, target, fields);
/// text written to a pipe or file carries no colour codes. `--data-dir` without a history
/// namespace says loudly that nothing is kept.
#[tokio::test]
async fn log_lines_are_json_on_request_and_plain_text_off_a_terminal() {
    let first_lines = |args: &'static [&'static str]| async move {
        let mut child = Command::new(tern())
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut got = Vec::new();
        while got.len() < 3 {
            let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap();
            got.push(line.expect("a log line"));
        }
        got
    };
    let json = first_lines(&[
        "--log-format",
        "json",
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "/nonexistent/tern",
    ])
    .await;
    let mut warned = false;
    for line in &json {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if msg.contains("keeps NO history") {
            warned = v["level"] == "WARN" && v["fields"]["dir"] == "/nonexistent/tern";
        }
    }
    assert!(warned, "the --data-dir warning: {json:?}");
    let text = first_lines(&["edge", "--listen", "127.0.0.1:0"]).await;
    for line in &text {
        assert!(!line.contains('\u{1b}'), "no ANSI codes off a terminal: {line:?}");
        assert!(line.contains("WARN") || line.contains("INFO"), "{line}");
    }
}

/// `tern edge --check`: a configuration is checked as at start-up, without starting: 0 and
/// a summary when it would start, non-zero naming the field otherwise.
#[tokio::test]
async fn edge_check_validates_a_config_without_starting() {
    let dir = std::env::temp_dir().join(format!("tern-cli-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[node]\nregion = \"eu-west\"\nname = \"edge-1\"\n[backbone]\nca = \"c\"\ncert = \"c\"\n\
         key = \"k\"\n[[backbone.peers]]\nid = \"us-east/edge-1\"\naddr = \"us-east.example:7401\"\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[backbone]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[backbone.peers]]\n\
         id = \"us-east/edge-1\"\naddr = \"us-east.example\"\n",
    )
    .unwrap();
    let run = |path: &std::path::Path| {
        std::process::Command::new(tern())
            .args(["edge", "--check", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let ok = run(&good);
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{said} {}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        said.contains("config OK: node eu-west/edge-1") && said.contains("1 backbone peer"),
        "{said}"
    );
    let refused = run(&bad);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("backbone.peers.addr"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
