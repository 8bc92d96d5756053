//! Measurement: latency histograms per (publisher region, subscriber region), overhead above
//! the emulated floor, and integrity counts.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::emu::TimingError;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Latency of one (publisher region, subscriber region) pair, in microseconds.
#[derive(Debug, Clone)]
pub struct Pair {
    /// End-to-end latency.
    pub latency: Histogram<u64>,
    /// Latency minus the message's emulated floor.
    pub overhead: Histogram<u64>,
    /// Sum of floors, µs (for the mean floor).
    pub floor_sum_us: f64,
    /// Messages that arrived before their floor (must be 0: the delays are applied).
    pub below_floor: u64,
}

impl Default for Pair {
    fn default() -> Self {
        Self { latency: histogram(), overhead: histogram(), floor_sum_us: 0.0, below_floor: 0 }
    }
}

impl Pair {
    /// Records one delivery.
    pub fn record(&mut self, latency: Duration, floor: Duration) {
        let l = latency.as_micros() as u64;
        let f = floor.as_micros() as u64;
        let _ = self.latency.record(l.max(1));
        if l < f {
            self.below_floor += 1;
        }
        let _ = self.overhead.record(l.saturating_sub(f).max(1));
        self.floor_sum_us += f as f64;
    }

    /// Adds another pair's samples.
    pub fn merge(&mut self, o: &Pair) {
        let _ = self.latency.add(&o.latency);
        let _ = self.overhead.add(&o.overhead);
        self.floor_sum_us += o.floor_sum_us;
        self.below_floor += o.below_floor;
    }

    /// The summary printed and saved.
    pub fn summary(&self) -> PairSummary {
        let h = &self.latency;
        let ms = |v: u64| v as f64 / 1e3;
        let n = h.len();
        PairSummary {
            samples: n,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            stddev_ms: h.stdev() / 1e3,
            floor_ms: if n == 0 { 0.0 } else { self.floor_sum_us / n as f64 / 1e3 },
            overhead_p50_ms: ms(self.overhead.value_at_quantile(0.5)),
            overhead_p99_ms: ms(self.overhead.value_at_quantile(0.99)),
            below_floor: self.below_floor,
        }
    }

    /// (latency ms, cumulative fraction) points for a CDF chart.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        let n = self.latency.len();
        if n == 0 {
            return out;
        }
        let mut seen = 0u64;
        for v in self.latency.iter_recorded() {
            seen += v.count_at_value();
            out.push((v.value_iterated_to() as f64 / 1e3, seen as f64 / n as f64));
        }
        out
    }
}

/// Printed figures for one pair.
#[derive(Debug, Clone, Serialize)]
pub struct PairSummary {
    /// Deliveries measured.
    pub samples: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// Standard deviation, ms.
    pub stddev_ms: f64,
    /// Mean emulated floor (last mile up + path + last mile down), ms.
    pub floor_ms: f64,
    /// Median latency above the floor, ms.
    pub overhead_p50_ms: f64,
    /// 99th percentile above the floor, ms.
    pub overhead_p99_ms: f64,
    /// Deliveries faster than their floor (0 when the emulation works).
    pub below_floor: u64,
}

/// Delivery integrity over a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Integrity {
    /// Deliveries owed (each message × each subscriber of its room).
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Owed but never delivered.
    pub lost: u64,
    /// Delivered more than once.
    pub duplicated: u64,
    /// Delivered after a later message of the same publisher.
    pub out_of_order: u64,
    /// Discontinuity events the SDK reported.
    pub discontinuities: u64,
}

impl Integrity {
    /// Adds another's counts.
    pub fn merge(&mut self, o: &Integrity) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.discontinuities += o.discontinuities;
    }

    /// True when nothing was lost, repeated or reordered.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// One delivery on the timeline (for the time-series chart).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// When it was published, ms after publishing started.
    pub sent_ms: f32,
    /// Its latency, ms.
    pub latency_ms: f32,
    /// Publisher region index.
    pub from: u8,
    /// Subscriber region index.
    pub to: u8,
}

/// Everything one run (Tern, or the hub baseline) measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// "tern" or "hub".
    pub label: String,
    /// Per (publisher region, subscriber region).
    pub pairs: BTreeMap<(String, String), Pair>,
    /// Integrity counts.
    pub integrity: Integrity,
    /// Deliveries over time (capped).
    pub timeline: Vec<Sample>,
    /// The emulator's timing error during this run.
    pub timing: TimingError,
    /// Which edge region each client region's clients chose (region → edge → count).
    pub placement: BTreeMap<String, BTreeMap<String, usize>>,
    /// Messages published.
    pub published: u64,
}
