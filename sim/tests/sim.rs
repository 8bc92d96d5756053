//! The simulator end to end: real nodes, real QUIC through the emulated links, real SDK
//! clients through emulated last miles.

use std::path::PathBuf;

use tern_sim::Scenario;
use tern_sim::measure::RunResult;

fn out_dir(tag: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tern-sim-test-{tag}-{}-{nanos}", std::process::id()))
}

fn log(line: &str) {
    eprintln!("{line}");
}

fn assert_clean(r: &RunResult) {
    let i = &r.integrity;
    assert!(i.expected > 0, "{}: nothing was measured", r.label);
    assert_eq!(
        (i.lost, i.duplicated, i.out_of_order, i.delivered),
        (0, 0, 0, i.expected),
        "{}: every message once, in order",
        r.label
    );
}

/// Zero jitter and loss: the emulated delays are really applied (nothing beats its floor),
/// medians sit close to the floor, clients pick their own region's edge, and the reports
/// are written with the emulator's timing error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_are_applied_and_medians_sit_near_the_floor() {
    let s = Scenario::parse(
        "floor",
        r#"
name = "floor"
seed = 1
duration = "4s"
drain = "2s"
hub = "us-east-1"

[[regions]]
name = "us-east-1"
clients = 4
profiles = ["fibre", "4g"]

[[regions]]
name = "eu-west-1"
clients = 4
profiles = ["cable"]

[[regions]]
name = "ap-southeast-1"
clients = 4
profiles = ["fibre"]

[workload]
rooms = 2
publish_rate = 4.0

[backbone]
jitter = "none"
jitter_ms = 0.0
loss = 0.0

[lastmile]
jitter = "none"
jitter_ms = 0.0
loss = 0.0
"#,
    )
    .unwrap();
    let out = out_dir("floor");
    let (tern, hub) = tern_sim::simulate(&s, &out, &log).await.unwrap();
    let hub = hub.expect("the hub baseline runs");
    for r in [&tern, &hub] {
        assert_clean(r);
        assert_eq!(r.pairs.len(), 9, "{}: every region pair measured", r.label);
        for ((from, to), p) in &r.pairs {
            let sum = p.summary();
            assert_eq!(sum.below_floor, 0, "{} {from}->{to}: arrived before its floor", r.label);
            assert!(
                sum.overhead_p50_ms <= 25.0,
                "{} {from}->{to}: median {:.1} ms above the floor",
                r.label,
                sum.overhead_p50_ms
            );
        }
    }
    for (region, edges) in &tern.placement {
        assert_eq!(edges.keys().collect::<Vec<_>>(), vec![region], "clients pick the nearest edge");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert!(json["tern"]["emulator_timing_error"]["p99_us"].is_u64());
    assert_eq!(json["inputs"]["seed"], 1);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("emulator timing error"));
    assert!(!html.contains("<script src") && !html.contains("<link "), "self-contained");
    let _ = std::fs::remove_dir_all(&out);
}

/// A region cut off and healed: its messages arrive after the heal, in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_catches_up_after_the_heal() {
    let s = Scenario::parse(
        "cut",
        r#"
name = "cut"
seed = 5
duration = "9s"
drain = "8s"
hub = "us-east-1"
compare_hub = false

[[regions]]
name = "us-east-1"
clients = 3

[[regions]]
name = "eu-west-1"
clients = 3

[[regions]]
name = "ap-southeast-2"
clients = 3

[workload]
rooms = 1
publish_rate = 4.0

[[partitions]]
region = "ap-southeast-2"
at = "1500ms"
duration = "4s"
"#,
    )
    .unwrap();
    let out = out_dir("cut");
    let (tern, _) = tern_sim::simulate(&s, &out, &log).await.unwrap();
    assert_clean(&tern);
    let cut = s.regions.iter().position(|r| r.name == "ap-southeast-2").unwrap() as u8;
    let (start, heal) = (1_500.0f32, 5_500.0f32);
    let held_back = tern
        .timeline
        .iter()
        .filter(|x| {
            x.from == cut && x.to != cut && x.sent_ms > start + 100.0 && x.sent_ms < heal - 100.0
        })
        .collect::<Vec<_>>();
    assert!(!held_back.is_empty(), "messages were published in the cut-off region during the cut");
    for x in &held_back {
        assert!(
            x.sent_ms + x.latency_ms >= heal,
            "sent at {} ms during the cut, yet arrived at {} ms, before the heal",
            x.sent_ms,
            x.sent_ms + x.latency_ms
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
