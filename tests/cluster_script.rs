//! `deploy/local/cluster.sh` as a user runs it from the README: with `CARGO_TARGET_DIR` set
//! (the binary is taken from there, not from a hard-coded `target/`), started in the
//! background by another script (so SIGINT arrives ignored), it brings up three regions
//! that keep and replicate the `chat` namespace's history, and SIGINT leaves no process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common;

const PORTS: [u16; 3] = [7400, 7410, 7420];

/// Pids of processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(name);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_script_runs_from_any_target_dir_keeps_history_and_stops_on_sigint() {
    for port in PORTS {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is busy (a local cluster running?): this test needs 7400, 7410, 7420"
        );
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("tern-cluster-script-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A target directory of its own, as CARGO_TARGET_DIR names one.
    let target = dir.join("elsewhere-target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::os::unix::fs::symlink(common::tern(), target.join("release/tern")).unwrap();
    let data = dir.join("data");
    let log = dir.join("cluster.log");
    // Started in the background by a non-interactive shell, which returns at once.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("deploy/local/cluster.sh > {} 2>&1 & echo $!", log.display()))
        .current_dir(repo)
        .env("CARGO_TARGET_DIR", &target)
        .env("TERN_SKIP_BUILD", "1")
        .env("TERN_CLUSTER_DATA", &data)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the script's pid");
    let show = || std::fs::read_to_string(&log).unwrap_or_default();

    for port in PORTS {
        let http = format!("http://127.0.0.1:{port}");
        tokio::time::timeout(
            Duration::from_secs(60),
            common::ready(&http, Duration::from_secs(60)),
        )
        .await
        .unwrap_or_else(|_| panic!("{http} not ready:\n{}", show()));
    }
    assert!(show().contains("cluster up"), "it says it is up:\n{}", show());

    // History: published in eu-west, logged and replicated, read in us-east.
    let client =
        tern_client::Client::connect("ws://127.0.0.1:7400", Default::default()).await.unwrap();
    client.publish("chat:cluster-script", "kept").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = common::plain::http_get(
            "http://127.0.0.1:7410/v1/channels/chat:cluster-script/messages",
        )
        .await;
        if body.contains("\"kept\"") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not in us-east's history: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
    let needle = data.to_string_lossy().to_string();
    assert_eq!(processes_with(&needle).len(), 3, "three nodes:\n{}", show());

    // SIGINT, as Ctrl-C (or a supervising script) sends it.
    assert_eq!(send_signal(pid, "INT"), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() || !processes_with(&needle).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running after SIGINT: {:?}\n{}",
            processes_with(&needle),
            show()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(show().contains("stopping"), "{}", show());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kill -SIG pid` through the shell's own kill (no libc binding in this crate).
fn send_signal(pid: i32, sig: &str) -> i32 {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}
