//! Publish pacing: the client keeps under the node's per-connection publish limits
//! (`Connected.limits`), so a well-behaved application that publishes in bursts sees its
//! publishes delayed, in order, rather than refused.

use std::time::{Duration, Instant};

use tern_proto::client::Limits;
use tern_proto::rate::TokenBucket;

/// Buckets a little stricter than the node's: the node counts arrivals, and the network can
/// bunch up what the client spread out.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// `None`: the node announced no limit.
    global: Option<TokenBucket>,
    namespaces: Vec<(String, TokenBucket)>,
}

/// The share of the node's rate the client uses, and of its burst.
const RATE_SHARE: f64 = 0.9;
const BURST_SHARE: f64 = 0.5;

fn bucket(rate: u32, burst: u32) -> TokenBucket {
    let r = (f64::from(rate) * RATE_SHARE).floor().max(1.0) as u32;
    let b = (f64::from(burst) * BURST_SHARE).floor().max(1.0) as u32;
    TokenBucket::new(r, b)
}

impl Pacer {
    /// Pacing for the limits a node announced (none when it announced none).
    pub(crate) fn new(limits: Option<&Limits>) -> Self {
        let Some(l) = limits else { return Self { global: None, namespaces: Vec::new() } };
        let global = (l.publish_rate > 0).then(|| bucket(l.publish_rate, l.publish_burst));
        let namespaces = l
            .namespaces
            .iter()
            .filter(|n| n.publish_rate > 0)
            .map(|n| (n.namespace.clone(), bucket(n.publish_rate, n.publish_burst)))
            .collect();
        Self { global, namespaces }
    }

    /// The bucket publishes to `channel` take from: their namespace's, or the global one
    /// (`None`: unpaced). Namespaces as the node reads them (`types::namespace_of`).
    fn bucket_for(&mut self, channel: &str) -> Option<&mut TokenBucket> {
        let ns = tern_proto::types::namespace_of(channel);
        match self.namespaces.iter_mut().find(|(n, _)| n == ns) {
            Some((_, b)) => Some(b),
            None => self.global.as_mut(),
        }
    }

    /// The paced rate (publishes per second) for `channel`; `None` when unpaced.
    pub(crate) fn rate(&mut self, channel: &str) -> Option<f64> {
        self.bucket_for(channel).map(|b| b.rate())
    }

    /// Takes a token for a publish to `channel`, or says how long to wait.
    pub(crate) fn take(&mut self, channel: &str, now: Instant) -> Result<(), Duration> {
        self.bucket_for(channel).map_or(Ok(()), |b| b.take(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::client::NamespaceLimits;

    #[test]
    fn paces_below_the_announced_limits() {
        let limits = Limits {
            publish_rate: 100,
            publish_burst: 10,
            namespaces: vec![NamespaceLimits {
                namespace: "slow".into(),
                publish_rate: 2,
                publish_burst: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut p = Pacer::new(Some(&limits));
        let t0 = Instant::now();
        // Half the burst at once, then the client waits.
        for _ in 0..5 {
            assert!(p.take("chat:x", t0).is_ok());
        }
        assert!(p.take("chat:x", t0).is_err());
        // The namespace has its own bucket.
        assert!(p.take("slow:x", t0).is_ok());
        assert!(p.take("slow:x", t0).is_err());
        // A node that announces nothing is not paced.
        let mut free = Pacer::new(None);
        for _ in 0..10_000 {
            assert!(free.take("chat:x", t0).is_ok());
        }
    }
}
