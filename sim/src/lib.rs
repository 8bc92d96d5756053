//! The Tern latency simulator: real edge nodes behind emulated inter-region links, real SDK
//! clients behind emulated last miles, and latency and its variance for every region pair,
//! beside the naive single-region hub.
//!
//! ```text
//!  scenario (TOML) ──▶ run(Tern): node per region ◀─UDP relays (RTT/2, jitter, loss, cuts)─▶ nodes
//!                       clients ─TCP relays (last mile + path)─▶ nearest edge (SDK probe)
//!                  ──▶ run(Hub):  one node in the hub region, every client to it
//!                  ──▶ measure: HdrHistogram per (publisher region, subscriber region)
//!                  ──▶ report: table, results.json, report.html (plotters SVG)
//! ```
//!
//! Modules: [`matrix`] (RTT data), [`profile`] (last miles, link models), [`scenario`],
//! [`emu`] (link emulation), [`run`], [`measure`], [`report`].

pub mod emu;
pub mod matrix;
pub mod measure;
pub mod profile;
pub mod report;
pub mod run;
pub mod scenario;

use std::path::Path;

pub use scenario::Scenario;

/// Runs a scenario (Tern, then the hub baseline unless the scenario turns it off), prints
/// the table, and writes `results.json` and `report.html` into `out`.
pub async fn simulate(
    scenario: &Scenario,
    out: &Path,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(measure::RunResult, Option<measure::RunResult>), Box<dyn std::error::Error>> {
    let matrix = matrix::RttMatrix::builtin();
    let sched = emu::Scheduler::start();
    log(&format!(
        "tern: {} regions with a node each, backbone over emulated links",
        scenario.regions.len()
    ));
    let tern = run::run(scenario, &matrix, run::Mode::Tern, &sched, log).await?;
    let hub = if scenario.compare_hub {
        log(&format!("hub baseline: one node in {}, every client connects to it", scenario.hub));
        Some(run::run(scenario, &matrix, run::Mode::Hub, &sched, log).await?)
    } else {
        None
    };
    let report = report::Report { scenario, tern: &tern, hub: hub.as_ref() };
    println!("{}", report.table());
    report.write(out)?;
    log(&format!(
        "wrote {} and {}",
        out.join("results.json").display(),
        out.join("report.html").display()
    ));
    Ok((tern, hub))
}
