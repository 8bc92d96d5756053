//! The inter-region RTT matrix (`sim/data/region-rtt.csv`, source in `sim/data/README.md`).

use std::collections::BTreeMap;
use std::time::Duration;

/// The built-in matrix: CloudPing AWS p50, 2021–22.
pub const BUILTIN: &str = include_str!("../data/region-rtt.csv");

/// Where the built-in matrix comes from (printed in every report).
pub const BUILTIN_SOURCE: &str = "CloudPing AWS latency grid, p50 over one year (about Apr 2021 - Apr 2022), \
symmetrised; sim/data/region-rtt.csv (see sim/data/README.md)";

/// Symmetric round-trip times between regions.
#[derive(Debug, Clone)]
pub struct RttMatrix {
    rtt: BTreeMap<(String, String), f64>,
    regions: Vec<String>,
}

/// A malformed matrix.
#[derive(Debug, thiserror::Error)]
#[error("rtt matrix line {line}: {reason}")]
pub struct MatrixError {
    line: usize,
    reason: String,
}

impl RttMatrix {
    /// Parses `region,<r1>,...` then one row per region, in milliseconds.
    pub fn parse(csv: &str) -> Result<Self, MatrixError> {
        let err = |line: usize, reason: String| MatrixError { line, reason };
        let mut lines = csv.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or_else(|| err(1, "empty".into()))?;
        let regions: Vec<String> = header.split(',').skip(1).map(|s| s.trim().to_owned()).collect();
        let mut rtt = BTreeMap::new();
        for (i, line) in lines {
            let mut cells = line.split(',');
            let from = cells.next().unwrap_or_default().trim().to_owned();
            for (to, cell) in regions.iter().zip(cells) {
                let v: f64 =
                    cell.trim().parse().map_err(|_| err(i + 1, format!("bad number {cell:?}")))?;
                if !(0.0..10_000.0).contains(&v) {
                    return Err(err(i + 1, format!("{v} ms is out of range")));
                }
                rtt.insert((from.clone(), to.clone()), v);
            }
        }
        for a in &regions {
            for b in &regions {
                if !rtt.contains_key(&(a.clone(), b.clone())) {
                    return Err(err(0, format!("missing {a} -> {b}")));
                }
            }
        }
        Ok(Self { rtt, regions })
    }

    /// The built-in matrix.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN).expect("the built-in matrix is valid")
    }

    /// The regions, in file order.
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// Round-trip time between two regions (0 within a region).
    pub fn rtt(&self, a: &str, b: &str) -> Option<Duration> {
        if a == b {
            return Some(Duration::ZERO);
        }
        self.rtt.get(&(a.to_owned(), b.to_owned())).map(|ms| Duration::from_secs_f64(ms / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_matrix_is_symmetric_and_complete() {
        let m = RttMatrix::builtin();
        assert_eq!(m.regions().len(), 10);
        assert_eq!(m.rtt("us-east-1", "eu-west-1"), Some(Duration::from_secs_f64(0.0681)));
        for a in m.regions() {
            for b in m.regions() {
                assert_eq!(m.rtt(a, b), m.rtt(b, a));
            }
        }
        assert!(RttMatrix::parse("region,a\na,x\n").is_err());
    }
}
