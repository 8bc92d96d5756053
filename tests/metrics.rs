//! `/metrics` of real nodes during cross-region traffic: the counters move as the traffic
//! says — publishes where they were made, deliveries where subscribers are, backbone
//! frames and bytes per peer both ways, history writes, a slow consumer's disconnect — and
//! the exposition passes `promtool check metrics` where promtool is installed (the test
//! command installs Debian's `prometheus` package when it can).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, Event};

use crate::common::{self, ProcessCluster, plain::Plain};

const WAIT: Duration = Duration::from_secs(30);

/// `name{labels}` → value, from a text exposition.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn scrape(http: &str) -> (String, HashMap<String, f64>) {
    let text = common::plain::http_get(&format!("{http}/metrics")).await;
    let map = parse(&text);
    (text, map)
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_cross_region_traffic_and_pass_promtool() {
    let dir = std::env::temp_dir().join(format!("tern-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write_with_history(&dir);
    let nodes = cluster.start_all(WAIT).await;
    let (eu, us) = (cluster.http(0), cluster.http(1));
    let (_, eu0) = scrape(&eu).await;
    let (_, us0) = scrape(&us).await;

    // A subscriber in us-east, a publisher in eu-west.
    let sub_client = Client::connect(&cluster.url(1), ClientOptions::default()).await.unwrap();
    let mut sub = sub_client.subscribe("chat:metrics").await.unwrap();
    let publisher = Client::connect(&cluster.url(0), ClientOptions::default()).await.unwrap();
    const N: usize = 50;
    for i in 0..N {
        publisher.publish("chat:metrics", format!("m{i}")).await.unwrap();
    }
    for _ in 0..N {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("in time") {
            Some(Event::Message(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    let (eu_text, eu1) = scrape(&eu).await;
    let (us_text, us1) = scrape(&us).await;
    let d = |a: &HashMap<String, f64>, b: &HashMap<String, f64>, k: &str| get(b, k) - get(a, k);
    assert_eq!(d(&eu0, &eu1, r#"tern_publishes_total{namespace="chat"}"#), N as f64, "{eu_text}");
    assert_eq!(d(&us0, &us1, r#"tern_publishes_total{namespace="chat"}"#), 0.0);
    assert!(d(&us0, &us1, "tern_deliveries_total") >= N as f64, "{us_text}");
    assert_eq!(d(&eu0, &eu1, "tern_deliveries_total"), 0.0, "nobody subscribed in eu-west");
    // Logged where published and where replicated to.
    assert!(d(&eu0, &eu1, "tern_history_writes_total") >= N as f64, "{eu_text}");
    assert!(d(&us0, &us1, "tern_history_writes_total") >= N as f64, "{us_text}");
    assert!(get(&eu1, "tern_history_log_bytes") > 0.0);
    assert!(get(&eu1, r#"tern_publish_ack_seconds_count{durability="local"}"#) >= N as f64);
    // The backbone, per peer, both ways.
    let peer = |p: &str, m: &str| format!("tern_backbone_{m}{{peer=\"{p}\"}}");
    assert_eq!(get(&eu1, &peer("us-east/edge-1", "link_up")), 1.0, "{eu_text}");
    assert!(d(&eu0, &eu1, &peer("us-east/edge-1", "frames_sent_total")) >= N as f64, "{eu_text}");
    assert!(d(&eu0, &eu1, &peer("us-east/edge-1", "sent_bytes_total")) > (N * 2) as f64);
    assert!(d(&us0, &us1, &peer("eu-west/edge-1", "frames_received_total")) >= N as f64);
    assert!(d(&us0, &us1, &peer("eu-west/edge-1", "received_bytes_total")) > (N * 2) as f64);
    assert!(get(&eu1, &peer("us-east/edge-1", "rtt_seconds")) > 0.0, "{eu_text}");
    assert_eq!(get(&us1, r#"tern_connections{transport="websocket"}"#), 1.0, "{us_text}");
    assert!(get(&us1, r#"tern_connections_opened_total{transport="websocket"}"#) >= 1.0);
    assert!(get(&us1, "tern_channels") >= 1.0);
    assert_eq!(get(&us1, "tern_subscriptions"), 1.0, "{us_text}");
    assert_eq!(get(&eu1, "tern_subscriptions"), 0.0, "{eu_text}");
    // Every replicated message's lag is observed where it arrives, by its origin.
    let lag = r#"tern_replication_lag_seconds_count{origin="eu-west/edge-1"}"#;
    assert!(d(&us0, &us1, lag) >= N as f64, "{us_text}");
    assert_eq!(
        d(&eu0, &eu1, r#"tern_replication_lag_seconds_count{origin="us-east/edge-1"}"#),
        0.0
    );
    for text in [&eu_text, &us_text] {
        for m in ["unacknowledged_messages", "retransmitted_messages_total"] {
            assert!(text.contains(&format!("tern_backbone_{m}{{peer=")), "{m}: {text}");
        }
    }

    // A subscriber that stops reading is cut off as a slow consumer.
    let mut slow = Plain::connect(&cluster.url(1)).await.unwrap();
    let mut state = common::plain::PlainState::default();
    slow.subscribe(&mut state, "chat:flood").await.unwrap();
    let big = "x".repeat(60_000);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for _ in 0..20 {
            publisher.publish("chat:flood", big.clone()).await.unwrap();
        }
        let (_, now) = scrape(&us).await;
        if d(&us0, &now, r#"tern_disconnects_total{reason="slow_consumer"}"#) >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slow-consumer disconnect counted");
    }
    drop(slow);
    // A refused publish is counted by its code.
    let refused = publisher.publish("bad channel", "x").await;
    assert!(refused.is_err());
    let (eu_final, eu2) = scrape(&eu).await;
    assert_eq!(
        d(&eu1, &eu2, r#"tern_publish_refusals_total{code="ERROR_CODE_INVALID_CHANNEL"}"#),
        1.0,
        "{eu_final}"
    );
    let (us_final, _) = scrape(&us).await;
    let exported = format!("{eu_final}{us_final}");

    // Every metric the Grafana dashboard (deploy/grafana) plots exists.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/tern-dashboard.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("tern_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let base = name.trim_end_matches("_bucket");
                assert!(
                    exported.contains(&format!("# TYPE {base} ")),
                    "the dashboard plots {name}, which the node does not export"
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted >= 10, "{plotted}");

    // The exposition is valid for Prometheus.
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(eu_final.as_bytes())?;
            child.wait_with_output()
        })
    {
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "promtool check metrics:\n{said}\n{eu_final}");
        assert!(said.trim().is_empty(), "promtool lint findings:\n{said}");
    } else {
        eprintln!("promtool not installed: the exposition was not checked by it");
    }
    sub_client.close().await;
    publisher.close().await;
    for mut n in nodes {
        common::sigterm(&mut n).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
