//! `--features otlp`: a node started with `OTEL_EXPORTER_OTLP_ENDPOINT` exports its spans to
//! a real OTLP/HTTP receiver (protobuf over `POST /v1/traces`): a WebSocket connection's
//! `session` span arrives with its connection id, and the `request` span of the upgrade.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::common::plain::{Plain, PlainState};

const WAIT: Duration = Duration::from_secs(30);

/// One OTLP export request: its content type and body.
struct Export {
    content_type: String,
    body: Vec<u8>,
}

/// Accepts OTLP/HTTP exports on `listener`, answers each 200 (an empty
/// `ExportTraceServiceResponse`), and passes them on.
async fn receive(listener: TcpListener, tx: tokio::sync::mpsc::UnboundedSender<Export>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            loop {
                let mut line = String::new();
                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                assert!(line.starts_with("POST /v1/traces "), "request line: {line}");
                let (mut length, mut content_type) = (0usize, String::new());
                loop {
                    let mut h = String::new();
                    stream.read_line(&mut h).await.unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => length = v.trim().parse().unwrap(),
                        "content-type" => content_type = v.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                stream.read_exact(&mut body).await.unwrap();
                let _ = tx.send(Export { content_type, body });
                let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                stream.get_mut().write_all(ok.as_bytes()).await.unwrap();
            }
        });
    }
}

fn has(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_an_otlp_collector() {
    let collector = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(receive(collector, tx));

    let client = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut node = tokio::process::Command::new(crate::common::tern())
        .args(["edge", "--listen", &client.to_string()])
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "tern-otlp-test")
        // Export batches every 100 ms (the SDK reads the standard variable).
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::common::ready(&format!("http://{client}"), WAIT).await;

    // A WebSocket session: its span ends when the connection closes, and is exported.
    let mut plain = Plain::connect(&format!("ws://{client}")).await.unwrap();
    let mut state = PlainState::default();
    plain.subscribe(&mut state, "chat:traced").await.unwrap();
    drop(plain);

    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut session, mut request, mut service) = (false, false, false);
    while !(session && request && service) {
        let export = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the session and request spans exported in time")
            .expect("receiver running");
        assert_eq!(export.content_type, "application/x-protobuf");
        // Span names and strings are plain bytes in the protobuf: a span's name is field 5
        // (tag 0x2a), then its length.
        session |= has(&export.body, "\x2a\x07session") && has(&export.body, "conn");
        request |= has(&export.body, "\x2a\x07request") && has(&export.body, "/v1/ws");
        service |= has(&export.body, "tern-otlp-test");
    }
    crate::common::sigterm(&mut node).await;
}
