//! Interest routing in the replication core, step by step on a lossless two-node network:
//! a channel flows to a peer only while that peer has subscribers (plus the grace period),
//! a new interest starts at the origin's current position, and replicate-all namespaces
//! flow regardless.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_backbone::core::{Config, Event, Frame, Replica};
use tern_proto::types::{ChannelName, Epoch, NodeId, RegionId, Seq};

struct Pair {
    a: Replica,
    b: Replica,
    ids: [NodeId; 2],
    now: Instant,
    /// Data frames A sent to B during the last `pump`.
    data_to_b: usize,
    /// Events B reported during the last `pump`.
    b_events: Vec<Event>,
}

fn id(r: &str) -> NodeId {
    NodeId::new(&RegionId::parse(r).unwrap(), "n").unwrap()
}

fn ch(s: &str) -> ChannelName {
    ChannelName::parse(s).unwrap()
}

impl Pair {
    fn new() -> Self {
        let ids = [id("a"), id("b")];
        let config = Config {
            replicate_all: ["hist".to_owned()].into(),
            interest_grace: Duration::from_secs(5),
            ..Config::default()
        };
        let now = Instant::now();
        let mut a = Replica::new(ids[0].clone(), Epoch(1), &ids, config.clone());
        let mut b = Replica::new(ids[1].clone(), Epoch(2), &ids, config);
        a.handle_link_up(now, &ids[1]);
        b.handle_link_up(now, &ids[0]);
        let mut p = Self { a, b, ids, now, data_to_b: 0, b_events: Vec::new() };
        p.pump(Duration::from_millis(100));
        p
    }

    /// Moves frames both ways (instantly) and runs timers for `time`.
    fn pump(&mut self, time: Duration) {
        self.data_to_b = 0;
        self.b_events.clear();
        let end = self.now + time;
        loop {
            let mut moved = false;
            while let Some((_, f)) = self.a.poll_transmit() {
                moved = true;
                if matches!(f, Frame::Data { .. }) {
                    self.data_to_b += 1;
                }
                self.b.handle_frame(self.now, &self.ids[0], f);
            }
            while let Some((_, f)) = self.b.poll_transmit() {
                moved = true;
                self.a.handle_frame(self.now, &self.ids[1], f);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_events.push(e);
            }
            while self.a.poll_event().is_some() {}
            if moved {
                continue;
            }
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(end);
            if next > end {
                self.now = end;
                break;
            }
            self.now = self.now.max(next);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
        }
    }

    fn publish(&mut self, channel: &str) -> Seq {
        self.a.publish_next(self.now, ch(channel), Bytes::from_static(b"m"))
    }

    fn delivered(&self) -> Vec<u64> {
        self.b_events
            .iter()
            .filter_map(|e| match e {
                Event::Deliver { seq, .. } => Some(seq.0),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_channel_flows_only_to_interested_peers_from_where_they_asked() {
    let mut p = Pair::new();
    // No subscriber on B: nothing crosses the link.
    p.publish("chat:x");
    p.publish("chat:x");
    p.pump(Duration::from_secs(1));
    assert_eq!(p.data_to_b, 0, "a channel nobody on B wants is not sent to B");

    // B's first subscriber: interest → Start after 2 → Ready; seq 3 on flows.
    let now = p.now;
    assert!(!p.b.add_interest(now, &ch("chat:x")), "a new interest waits for the peer");
    p.pump(Duration::from_millis(100));
    assert!(p.b_events.contains(&Event::Ready { channel: ch("chat:x") }), "{:?}", p.b_events);
    assert!(
        p.b_events.iter().any(|e| matches!(e, Event::Started { after: Seq(2), .. })),
        "the stream starts after what was published before: {:?}",
        p.b_events
    );
    p.publish("chat:x");
    p.publish("chat:x");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![3, 4]);
    let now = p.now;
    assert!(p.b.add_interest(now, &ch("chat:x")), "an established interest is ready at once");

    // The last subscriber leaves and comes back within the grace period: nothing missed.
    let now = p.now;
    p.b.remove_interest(now, &ch("chat:x"));
    p.pump(Duration::from_secs(1));
    p.publish("chat:x");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![5], "still flowing during the grace period");
    let now = p.now;
    assert!(p.b.add_interest(now, &ch("chat:x")));
    p.publish("chat:x");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![6]);

    // Gone for longer than the grace period: withdrawn, A stops sending.
    let now = p.now;
    p.b.remove_interest(now, &ch("chat:x"));
    p.pump(Duration::from_secs(6));
    assert!(!p.b.has_interest(&ch("chat:x")));
    p.publish("chat:x");
    p.publish("chat:x");
    p.pump(Duration::from_secs(1));
    assert_eq!(p.data_to_b, 0, "a withdrawn channel is no longer sent");

    // A new subscriber later starts afresh, after 8.
    let now = p.now;
    assert!(!p.b.add_interest(now, &ch("chat:x")));
    p.pump(Duration::from_millis(100));
    assert!(p.b_events.iter().any(|e| matches!(e, Event::Started { after: Seq(8), .. })));
    p.publish("chat:x");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![9]);
}

#[test]
fn replicate_all_namespaces_flow_without_interest() {
    let mut p = Pair::new();
    p.publish("hist:x");
    p.publish("hist:x");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![1, 2]);
    let now = p.now;
    assert!(p.b.add_interest(now, &ch("hist:x")), "replicate-all channels are always ready");
}

#[test]
fn an_interest_survives_a_link_drop_and_resumes_where_it_was() {
    let mut p = Pair::new();
    let now = p.now;
    p.b.add_interest(now, &ch("chat:y"));
    p.pump(Duration::from_millis(100));
    p.publish("chat:y");
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![1]);
    let (a_id, b_id) = (p.ids[0].clone(), p.ids[1].clone());
    let now = p.now;
    p.a.handle_link_down(now, &b_id);
    p.b.handle_link_down(now, &a_id);
    p.publish("chat:y");
    p.publish("chat:y");
    p.pump(Duration::from_secs(1));
    assert!(p.delivered().is_empty());
    let now = p.now;
    p.a.handle_link_up(now, &b_id);
    p.b.handle_link_up(now, &a_id);
    p.pump(Duration::from_millis(100));
    assert_eq!(p.delivered(), vec![2, 3], "what was published during the outage follows");
}

#[test]
fn a_new_interest_waits_for_a_peer_that_just_dropped_but_not_for_one_long_gone() {
    let mut p = Pair::new();
    let (a_id, b_id) = (p.ids[0].clone(), p.ids[1].clone());
    let now = p.now;
    p.a.handle_link_down(now, &b_id);
    p.b.handle_link_down(now, &a_id);
    // Just dropped: the subscription waits (for the link, or interest_wait).
    assert!(!p.b.add_interest(now, &ch("chat:soon")));
    let now = p.now;
    p.a.handle_link_up(now, &b_id);
    p.b.handle_link_up(now, &a_id);
    p.pump(Duration::from_millis(100));
    assert!(p.b_events.contains(&Event::Ready { channel: ch("chat:soon") }));
    assert!(
        p.b_events.iter().any(|e| matches!(e, Event::Started { late: false, .. })),
        "{:?}",
        p.b_events
    );

    // Down for longer than interest_wait: ready at once; the stream starts late when the
    // peer returns, and says so.
    let now = p.now;
    p.a.handle_link_down(now, &b_id);
    p.b.handle_link_down(now, &a_id);
    p.publish("chat:late");
    p.pump(Duration::from_secs(3));
    let now = p.now;
    assert!(p.b.add_interest(now, &ch("chat:late")), "an unreachable peer is not waited for");
    p.a.handle_link_up(now, &b_id);
    p.b.handle_link_up(now, &a_id);
    p.pump(Duration::from_millis(100));
    assert!(
        p.b_events.iter().any(|e| matches!(e, Event::Started { late: true, after: Seq(1), .. })),
        "{:?}",
        p.b_events
    );
}
