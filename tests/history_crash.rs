//! A real `tern edge` process with durable history is SIGKILLed right after its last ack:
//! everything it acknowledged is there after the restart, with the same log epoch, and new messages continue the offsets.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Child;

const WAIT: Duration = Duration::from_secs(60);

async fn start(config: &std::path::Path) -> Child {
    common::spawn_edge([std::ffi::OsStr::new("--config"), config.as_os_str()], WAIT).await.0
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = common::http(&addr.to_string(), method, path, &[], body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn logged(addr: SocketAddr) -> Vec<Value> {
    let (status, page) =
        http(addr, "GET", "/v1/channels/log:crash/messages?direction=forwards&limit=1000", "")
            .await;
    assert_eq!(status, 200, "{page}");
    page["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_sigkill_with_its_epoch_and_offsets() {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("tern-crash-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nregion = \"solo\"\nname = \"edge-1\"\n[listen]\nclient = \"{addr}\"\n\
             [history]\ndata_dir = \"{}\"\n[[history.namespaces]]\nname = \"log\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();

    let mut node = start(&config).await;
    let mut epoch = Value::Null;
    for i in 1..=50 {
        let (status, ack) =
            http(addr, "POST", "/v1/channels/log:crash/messages", &format!("m{i}")).await;
        assert_eq!(status, 201, "{ack}");
        epoch = ack["position"]["epoch"].clone();
    }
    // Acked means logged: kill at once, without warning.
    node.start_kill().unwrap();
    let _ = node.wait().await;

    let mut node = start(&config).await;
    let after = logged(addr).await;
    let texts: Vec<&str> = after.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, (1..=50).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert!(after.iter().all(|m| m["position"]["epoch"] == epoch), "same log epoch");
    let (_, ack) = http(addr, "POST", "/v1/channels/log:crash/messages", "m51").await;
    assert_eq!(
        (ack["position"]["epoch"].clone(), ack["position"]["offset"].clone()),
        (epoch, Value::from("51"))
    );
    node.start_kill().unwrap();
    let _ = node.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
