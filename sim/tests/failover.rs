//! Nearest-region selection and failover through the SDK: an edge lists every region at
//! `/v1/regions`, the client probes them and connects to the nearest, and when that edge
//! goes away it fails over to the next one and carries on there.

use std::time::Duration;

use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, ConnectionState, Event};
use tern_edge::config::RegionUrl;
use tern_edge::{Config, Server};
use tern_sim::emu::{Scheduler, tcp_relay};
use tern_sim::profile::Direction;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn start(
    region: &str,
    listen: std::net::SocketAddr,
    regions: Vec<RegionUrl>,
) -> CancellationToken {
    let mut cfg = Config::default();
    cfg.node.region = region.into();
    cfg.node.name = "edge-1".into();
    cfg.listen.client = listen;
    cfg.timeouts.shutdown_grace = Duration::from_secs(1);
    cfg.timeouts.close = Duration::from_millis(300);
    cfg.regions = regions;
    start_config(cfg).await.0
}

/// Starts a node with `cfg`; its stop token and the address it listens on.
async fn start_config(cfg: Config) -> (CancellationToken, std::net::SocketAddr) {
    let stop = CancellationToken::new();
    let server = Server::bind(cfg.validate().unwrap(), stop.clone()).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.run());
    (stop, addr)
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_picks_the_nearest_region_and_fails_over_to_the_next() {
    let sched = Scheduler::start();
    let relays = CancellationToken::new();
    let (near_addr, far_addr) = (free_port(), free_port());
    // The far region is 2 × 40 ms away; the near one is on loopback.
    let d = Direction::fixed(Duration::from_millis(40));
    let far_via = tcp_relay(&sched, far_addr, d, d, 1, relays.clone()).await.unwrap();
    let list = vec![
        RegionUrl { name: "far".into(), url: format!("ws://{far_via}") },
        RegionUrl { name: "near".into(), url: format!("ws://{near_addr}") },
    ];
    let near = start("near", near_addr, list.clone()).await;
    let far = start("far", far_addr, list).await;

    // Asked through the far edge, the SDK still picks the near one.
    let client = Client::connect_nearest(&format!("ws://{far_via}"), ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(client.connected().unwrap().region, "near");
    let mut sub = client.subscribe("chat:f").await.unwrap();

    // The near region goes away: the client fails over to the far one and resubscribes.
    near.cancel();
    let mut state = client.state();
    tokio::time::timeout(WAIT, async {
        loop {
            if let ConnectionState::Connected(c) = &*state.borrow_and_update() {
                if c.region == "far" {
                    return;
                }
            }
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("failed over to the far region");

    // Published in the far region, it reaches the client (after the SDK's gap notice).
    let publisher =
        Client::connect(&format!("ws://{far_addr}"), ClientOptions::default()).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            publisher.publish("chat:f", "after failover").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                Ok(Some(Event::Message(m))) => return m,
                Ok(Some(Event::Discontinuity { .. })) | Err(_) => continue,
                Ok(None) => panic!("subscription ended"),
            }
        }
    })
    .await
    .expect("a message after failover");
    assert_eq!(got.origin, "far/edge-1");
    far.cancel();
    relays.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_lists_the_configured_urls_or_the_node_itself() {
    // Port 0: the kernel's choice, so no other test's socket can have taken it meanwhile.
    let mut cfg = Config::default();
    cfg.node.region = "solo".into();
    cfg.listen.client = "127.0.0.1:0".parse().unwrap();
    let (stop, addr) = start_config(cfg).await;
    let list = tern_client::nearest::regions(&format!("ws://{addr}"), WAIT).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].region.as_str(), list[0].url.clone()), ("solo", format!("ws://{addr}")));
    stop.cancel();

    let bad = Config {
        regions: vec![RegionUrl { name: "x".into(), url: "ftp://h".into() }],
        ..Config::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("regions.url"));
}
