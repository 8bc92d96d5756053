//! Scenarios: TOML files in `sim/scenarios/` naming the regions, clients, workload, link
//! conditions, faults and seed of a run.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::matrix::RttMatrix;
use crate::profile::{self, JitterKind};

/// The built-in scenarios, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("global", include_str!("../scenarios/global.toml")),
    ("broadcast", include_str!("../scenarios/broadcast.toml")),
    ("partition", include_str!("../scenarios/partition.toml")),
    ("lossy", include_str!("../scenarios/lossy.toml")),
];

/// A simulation scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Seed for every random choice (jitter, loss, publish phases).
    pub seed: u64,
    /// How long clients publish, per run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Time after the last publish for stragglers (repairs, heals) to arrive.
    #[serde(with = "humantime_serde", default = "default_drain")]
    pub drain: Duration,
    /// The region of the single-region hub baseline.
    pub hub: String,
    /// Whether to run the hub baseline.
    #[serde(default = "yes")]
    pub compare_hub: bool,
    /// Regions with a node and clients.
    pub regions: Vec<RegionSpec>,
    /// What clients do.
    pub workload: Workload,
    /// Inter-region link conditions.
    #[serde(default)]
    pub backbone: BackboneLinks,
    /// Last-mile overrides.
    #[serde(default)]
    pub lastmile: LastMile,
    /// Regions cut off from every other region for a while (backbone only).
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn yes() -> bool {
    true
}

/// A region of the scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Region name (a row of the RTT matrix).
    pub name: String,
    /// Clients located in this region.
    pub clients: usize,
    /// Last-mile profiles, assigned to the region's clients in turn.
    #[serde(default = "default_profiles")]
    pub profiles: Vec<String>,
    /// Whether this region runs an edge node (clients of a region without one connect to
    /// the nearest other region).
    #[serde(default = "yes")]
    pub edge: bool,
}

fn default_profiles() -> Vec<String> {
    vec!["cable".into()]
}

/// The workload.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Chat rooms; clients are spread over them across regions.
    pub rooms: usize,
    /// Publishing clients per room (0 = every member publishes).
    #[serde(default)]
    pub publishers_per_room: usize,
    /// Messages per second per publishing client.
    pub publish_rate: f64,
    /// Payload size in bytes (at least the measurement header).
    #[serde(default = "default_payload")]
    pub payload_bytes: usize,
}

fn default_payload() -> usize {
    64
}

/// Inter-region link conditions (applied per direction on every pair).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneLinks {
    /// Jitter distribution.
    #[serde(default)]
    pub jitter: JitterKind,
    /// Mean jitter per direction, ms.
    #[serde(default = "default_bb_jitter")]
    pub jitter_ms: f64,
    /// Datagram loss probability per direction.
    #[serde(default = "default_bb_loss")]
    pub loss: f64,
    /// Bandwidth cap per direction, Mbit/s (0 = none).
    #[serde(default)]
    pub bandwidth_mbps: f64,
}

impl Default for BackboneLinks {
    fn default() -> Self {
        Self {
            jitter: JitterKind::Normal,
            jitter_ms: default_bb_jitter(),
            loss: default_bb_loss(),
            bandwidth_mbps: 0.0,
        }
    }
}

fn default_bb_jitter() -> f64 {
    0.5
}
fn default_bb_loss() -> f64 {
    0.0001
}

/// Last-mile overrides (the profiles' own values otherwise).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LastMile {
    /// Jitter distribution.
    #[serde(default)]
    pub jitter: JitterKind,
    /// Replaces every profile's jitter, ms.
    pub jitter_ms: Option<f64>,
    /// Replaces every profile's loss.
    pub loss: Option<f64>,
}

/// A region cut off from all others, then healed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// The region.
    pub region: String,
    /// When, after publishing starts.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// For how long.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

/// A scenario that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not valid TOML for a scenario.
    #[error("scenario {0}: {1}")]
    Parse(String, toml::de::Error),
    /// Readable, but inconsistent.
    #[error("scenario {name}: {reason}")]
    Invalid {
        /// Scenario name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Neither a built-in name nor a readable file.
    #[error(
        "no scenario {0:?}: built-in ones are global, broadcast, partition, lossy; or give a .toml path"
    )]
    Unknown(String),
}

impl Scenario {
    /// A built-in scenario by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ScenarioError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(name_or_path, text);
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path)
            .map_err(|_| ScenarioError::Unknown(name_or_path.to_owned()))?;
        Self::parse(name_or_path, &text)
    }

    /// Parses and checks a scenario against the built-in matrix.
    pub fn parse(label: &str, text: &str) -> Result<Self, ScenarioError> {
        let s: Self = toml::from_str(text).map_err(|e| ScenarioError::Parse(label.into(), e))?;
        s.check(&RttMatrix::builtin())?;
        Ok(s)
    }

    fn check(&self, m: &RttMatrix) -> Result<(), ScenarioError> {
        let bad = |reason: String| ScenarioError::Invalid { name: self.name.clone(), reason };
        let known = |r: &str| m.regions().iter().any(|x| x == r);
        if self.regions.is_empty() || !self.regions.iter().any(|r| r.edge) {
            return Err(bad("needs at least one region with an edge".into()));
        }
        for r in &self.regions {
            if !known(&r.name) {
                return Err(bad(format!("region {} is not in the RTT matrix", r.name)));
            }
            if r.profiles.is_empty() {
                return Err(bad(format!("region {} lists no profiles", r.name)));
            }
            for p in &r.profiles {
                if profile::profile(p).is_none() {
                    return Err(bad(format!(
                        "unknown profile {p:?} (fibre, cable, dsl, 5g, 4g, poor, starlink)"
                    )));
                }
            }
        }
        if !self.regions.iter().any(|r| r.name == self.hub) {
            return Err(bad(format!("hub {} is not one of the regions", self.hub)));
        }
        for p in &self.partitions {
            if !self.regions.iter().any(|r| r.name == p.region && r.edge) {
                return Err(bad(format!("partitioned region {} has no edge", p.region)));
            }
        }
        let w = &self.workload;
        if w.rooms == 0 || !(w.publish_rate > 0.0 && w.publish_rate <= 1_000.0) {
            return Err(bad("workload needs rooms > 0 and 0 < publish_rate <= 1000".into()));
        }
        if self.clients() == 0 || self.clients() > 5_000 {
            return Err(bad("between 1 and 5000 clients in total".into()));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3_600) {
            return Err(bad("duration must be between 0 and 1h".into()));
        }
        if !(0.0..=0.5).contains(&self.backbone.loss) {
            return Err(bad("backbone.loss must be between 0 and 0.5".into()));
        }
        Ok(())
    }

    /// Total clients.
    pub fn clients(&self) -> usize {
        self.regions.iter().map(|r| r.clients).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_scenarios_parse_and_bad_ones_are_refused() {
        for (name, _) in BUILTIN {
            let s = Scenario::load(name).unwrap();
            assert_eq!(&s.name, name);
        }
        let global = Scenario::load("global").unwrap();
        assert!(global.regions.len() >= 6);
        let text = include_str!("../scenarios/global.toml").replace("us-east-1", "mars-1");
        assert!(Scenario::parse("x", &text).unwrap_err().to_string().contains("mars-1"));
        assert!(matches!(Scenario::load("nope"), Err(ScenarioError::Unknown(_))));
    }
}
