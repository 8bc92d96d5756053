//! Last-mile access profiles (client ↔ its edge) and link models.
//!
//! Base RTTs are published medians; jitter and loss are estimates (see
//! `sim/data/README.md` for the sources).

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A last-mile access profile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Profile {
    /// Name used in scenarios.
    pub name: &'static str,
    /// Round trip to the access network's edge, ms.
    pub rtt_ms: f64,
    /// Mean extra delay per direction, ms.
    pub jitter_ms: f64,
    /// Probability that a segment is lost (and retransmitted), per direction.
    pub loss: f64,
}

/// The built-in profiles.
pub const PROFILES: &[Profile] = &[
    Profile { name: "fibre", rtt_ms: 10.0, jitter_ms: 1.0, loss: 0.0005 },
    Profile { name: "cable", rtt_ms: 18.0, jitter_ms: 4.0, loss: 0.001 },
    Profile { name: "dsl", rtt_ms: 28.0, jitter_ms: 5.0, loss: 0.002 },
    Profile { name: "5g", rtt_ms: 50.0, jitter_ms: 8.0, loss: 0.003 },
    Profile { name: "4g", rtt_ms: 60.0, jitter_ms: 12.0, loss: 0.005 },
    Profile { name: "poor", rtt_ms: 180.0, jitter_ms: 30.0, loss: 0.02 },
    Profile { name: "starlink", rtt_ms: 26.0, jitter_ms: 8.0, loss: 0.005 },
];

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<Profile> {
    PROFILES.iter().copied().find(|p| p.name == name)
}

/// How jitter is drawn. Jitter is extra delay on top of the propagation delay, never less:
/// nothing arrives before its floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JitterKind {
    /// No jitter.
    None,
    /// Uniform on [0, 2 × mean].
    Uniform,
    /// Half-normal with the given mean.
    #[default]
    Normal,
    /// Exponential with the given mean (a long tail).
    Exponential,
}

/// One direction of an emulated link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Direction {
    /// Propagation delay.
    pub delay: Duration,
    /// Mean jitter.
    pub jitter: Duration,
    /// Jitter distribution.
    pub kind: JitterKind,
    /// Loss probability.
    pub loss: f64,
    /// Bandwidth cap in bits per second (0 = none).
    pub bandwidth_bps: u64,
}

impl Direction {
    /// A fixed delay, nothing else.
    pub fn fixed(delay: Duration) -> Self {
        Self { delay, jitter: Duration::ZERO, kind: JitterKind::None, loss: 0.0, bandwidth_bps: 0 }
    }

    /// Draws this packet's extra delay.
    pub fn draw_jitter(&self, rng: &mut impl Rng) -> Duration {
        let mean = self.jitter.as_secs_f64();
        if mean <= 0.0 {
            return Duration::ZERO;
        }
        let x = match self.kind {
            JitterKind::None => 0.0,
            JitterKind::Uniform => rng.random::<f64>() * 2.0 * mean,
            // Half-normal: E|N(0, σ)| = σ √(2/π).
            JitterKind::Normal => {
                let sigma = mean / (2.0 / std::f64::consts::PI).sqrt();
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()).abs() * sigma
            }
            JitterKind::Exponential => -mean * rng.random::<f64>().max(1e-12).ln(),
        };
        Duration::from_secs_f64(x.min(10.0))
    }

    /// Time to put `bytes` on the wire at the bandwidth cap.
    pub fn serialization(&self, bytes: usize) -> Duration {
        if self.bandwidth_bps == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bandwidth_bps as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn jitter_means_match_and_never_go_negative() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for kind in [JitterKind::Uniform, JitterKind::Normal, JitterKind::Exponential] {
            let d = Direction {
                jitter: Duration::from_millis(4),
                kind,
                ..Direction::fixed(Duration::ZERO)
            };
            let n = 20_000;
            let sum: f64 = (0..n).map(|_| d.draw_jitter(&mut rng).as_secs_f64()).sum();
            let mean_ms = sum / n as f64 * 1e3;
            assert!((mean_ms - 4.0).abs() < 0.3, "{kind:?}: mean {mean_ms} ms");
        }
        assert!(profile("4g").is_some() && profile("nope").is_none());
    }
}
