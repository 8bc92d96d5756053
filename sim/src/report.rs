//! Reports: a terminal table, `results.json` and a self-contained `report.html` whose charts
//! (latency CDFs per region pair, p99 heat maps for Tern and for the hub, a time series
//! around a partition) are SVG drawn with plotters — nothing to download to view it.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::json;

use crate::matrix::BUILTIN_SOURCE;
use crate::measure::{PairSummary, RunResult};
use crate::profile::PROFILES;
use crate::scenario::Scenario;

/// Everything a report needs.
pub struct Report<'a> {
    /// The scenario run.
    pub scenario: &'a Scenario,
    /// The Tern run.
    pub tern: &'a RunResult,
    /// The hub baseline, when run.
    pub hub: Option<&'a RunResult>,
}

fn pairs(s: &Scenario) -> Vec<(String, String)> {
    let names: Vec<&String> = s.regions.iter().map(|r| &r.name).collect();
    names.iter().flat_map(|a| names.iter().map(move |b| ((*a).clone(), (*b).clone()))).collect()
}

fn summary(r: &RunResult, pair: &(String, String)) -> Option<PairSummary> {
    r.pairs.get(pair).map(|p| p.summary())
}

impl Report<'_> {
    /// The terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let s = self.scenario;
        let _ = writeln!(out, "\nTern simulation: {} — {}", s.name, s.description);
        let _ = writeln!(
            out,
            "inputs: seed {}, {} clients, {} s publishing, matrix: {}",
            s.seed,
            s.clients(),
            s.duration.as_secs_f64(),
            BUILTIN_SOURCE
        );
        let _ = writeln!(
            out,
            "latency in ms (publish → delivery, end to end); floor = emulated last mile up + path + last mile down"
        );
        let _ = write!(
            out,
            "\n{:<30} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "publisher → subscriber", "p50", "p99", "p99.9", "stddev", "floor", "over50", "n"
        );
        if self.hub.is_some() {
            let _ = write!(
                out,
                " │ {:>7} {:>7} {:>7} │ {:>7}",
                "hub p50", "hub p99", "hub sd", "p99 ×"
            );
        }
        let _ = writeln!(out);
        for pair in pairs(s) {
            let Some(t) = summary(self.tern, &pair) else { continue };
            let _ = write!(
                out,
                "{:<30} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7}",
                format!("{} → {}", pair.0, pair.1),
                t.p50_ms,
                t.p99_ms,
                t.p999_ms,
                t.stddev_ms,
                t.floor_ms,
                t.overhead_p50_ms,
                t.samples
            );
            if let Some(h) = self.hub.and_then(|h| summary(h, &pair)) {
                let gain = if t.p99_ms > 0.0 { h.p99_ms / t.p99_ms } else { 0.0 };
                let _ = write!(
                    out,
                    " │ {:>7.1} {:>7.1} {:>7.1} │ {:>6.1}×",
                    h.p50_ms, h.p99_ms, h.stddev_ms, gain
                );
            }
            let _ = writeln!(out);
        }
        for r in std::iter::once(self.tern).chain(self.hub) {
            let below: u64 = r.pairs.values().map(|p| p.below_floor).sum();
            let _ = writeln!(
                out,
                "\n{:<5} deliveries faster than their emulated floor: {below} (must be 0)",
                r.label
            );
            let i = &r.integrity;
            let _ = writeln!(
                out,
                "{:<5} integrity: {} published, {} deliveries owed, {} delivered; lost {}, duplicated {}, out of order {}, discontinuities {}",
                r.label,
                r.published,
                i.expected,
                i.delivered,
                i.lost,
                i.duplicated,
                i.out_of_order,
                i.discontinuities
            );
            let t = &r.timing;
            let _ = writeln!(
                out,
                "{:<5} emulator timing error (packet sent after its deadline): p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs over {} packets; queue drops {}",
                r.label, t.p50_us, t.p99_us, t.p999_us, t.max_us, t.packets, t.queue_drops
            );
        }
        let placement: Vec<String> = self
            .tern
            .placement
            .iter()
            .map(|(r, edges)| {
                let e: Vec<String> = edges.iter().map(|(e, n)| format!("{e}×{n}")).collect();
                format!("{r} → {}", e.join(" "))
            })
            .collect();
        let _ =
            writeln!(out, "nearest-edge choice (client region → edge): {}", placement.join("; "));
        out
    }

    /// `results.json`.
    pub fn json(&self) -> serde_json::Value {
        let run = |r: &RunResult| {
            let pairs: Vec<_> = pairs(self.scenario)
                .into_iter()
                .filter_map(|p| {
                    summary(r, &p).map(|s| json!({"from": p.0, "to": p.1, "latency": s}))
                })
                .collect();
            json!({
                "label": r.label,
                "published": r.published,
                "integrity": r.integrity,
                "emulator_timing_error": r.timing,
                "placement": r.placement,
                "pairs": pairs,
            })
        };
        json!({
            "scenario": self.scenario,
            "inputs": {
                "rtt_matrix": BUILTIN_SOURCE,
                "last_mile_profiles": PROFILES,
                "seed": self.scenario.seed,
                "rerun": format!("cargo run --release -- sim --scenario {}", self.scenario.name),
            },
            "tern": run(self.tern),
            "hub": self.hub.map(run),
        })
    }

    /// Writes `results.json` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(&self.json()).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("results.json"), json)?;
        std::fs::write(dir.join("report.html"), self.html())?;
        Ok(())
    }

    /// The HTML report.
    pub fn html(&self) -> String {
        let s = self.scenario;
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tern simulation: {name}</title>\
             <style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;font-size:13px}}\
             td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}th{{background:#eee}}\
             .charts{{display:flex;flex-wrap:wrap;gap:12px}}pre{{background:#f6f6f6;padding:8px}}</style></head><body>\
             <h1>Tern simulation: {name}</h1><p>{desc}</p>",
            name = esc(&s.name),
            desc = esc(&s.description)
        );
        let _ = write!(
            h,
            "<h2>Inputs</h2><ul><li>RTT matrix: {}</li><li>seed {}; {} clients; {} s publishing + {} s drain; \
             {} rooms, {} msg/s per publisher, {} B payloads</li><li>backbone links: one-way delay RTT/2, jitter {:?} mean {} ms, loss {}</li>\
             <li>last-mile profiles (client region: profiles): {}</li><li>rerun: <code>cargo run --release -- sim --scenario {}</code></li></ul>",
            esc(BUILTIN_SOURCE),
            s.seed,
            s.clients(),
            s.duration.as_secs_f64(),
            s.drain.as_secs_f64(),
            s.workload.rooms,
            s.workload.publish_rate,
            s.workload.payload_bytes,
            s.backbone.jitter,
            s.backbone.jitter_ms,
            s.backbone.loss,
            esc(&s
                .regions
                .iter()
                .map(|r| format!("{}: {}", r.name, r.profiles.join("/")))
                .collect::<Vec<_>>()
                .join("; ")),
            esc(&s.name),
        );
        let _ = write!(
            h,
            "<table><tr><th>profile</th><th>RTT ms</th><th>jitter ms</th><th>loss</th></tr>"
        );
        for p in PROFILES {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.name, p.rtt_ms, p.jitter_ms, p.loss
            );
        }
        let _ = write!(h, "</table><h2>Results</h2><pre>{}</pre>", esc(&self.table()));
        let _ = write!(
            h,
            "<h2>Latency CDF per region pair</h2><p>Solid: Tern. Faint: single-region hub in {}.</p><div class=\"charts\">",
            esc(&s.hub)
        );
        for from in &s.regions {
            h.push_str(&self.cdf_chart(&from.name));
        }
        h.push_str("</div><h2>p99 latency by pair (ms)</h2><div class=\"charts\">");
        h.push_str(&heatmap(s, self.tern, "Tern p99 (ms)"));
        if let Some(hub) = self.hub {
            h.push_str(&heatmap(s, hub, &format!("Hub in {} p99 (ms)", s.hub)));
        }
        h.push_str("</div><h2>Latency over time</h2>");
        h.push_str(&self.timeline_chart());
        h.push_str("</body></html>");
        h
    }

    fn cdf_chart(&self, from: &str) -> String {
        let s = self.scenario;
        let mut x_max: f64 = 10.0;
        for r in std::iter::once(self.tern).chain(self.hub) {
            for to in &s.regions {
                if let Some(p) = r.pairs.get(&(from.to_owned(), to.name.clone())) {
                    x_max = x_max.max(p.summary().p999_ms * 1.05);
                }
            }
        }
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (420, 300)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let Ok(mut chart) = ChartBuilder::on(&root)
                .caption(format!("from {from}"), ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(36)
                .build_cartesian_2d(0f64..x_max, 0f64..1f64)
            else {
                return String::new();
            };
            let _ = chart.configure_mesh().x_desc("ms").y_desc("fraction").draw();
            for (i, to) in s.regions.iter().enumerate() {
                let color = Palette99::pick(i);
                let key = (from.to_owned(), to.name.clone());
                if let Some(hub) = self.hub.and_then(|h| h.pairs.get(&key)) {
                    let _ = chart
                        .draw_series(LineSeries::new(hub.cdf(), color.mix(0.3).stroke_width(1)));
                }
                if let Some(p) = self.tern.pairs.get(&key) {
                    if let Ok(series) =
                        chart.draw_series(LineSeries::new(p.cdf(), color.stroke_width(2)))
                    {
                        series.label(format!("to {}", to.name)).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                    }
                }
            }
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw();
            let _ = root.present();
        }
        svg
    }

    fn timeline_chart(&self) -> String {
        let s = self.scenario;
        let cut = s.partitions.first();
        let cut_region = cut.and_then(|p| s.regions.iter().position(|r| r.name == p.region));
        // Around a partition: messages published in the cut-off region; otherwise all.
        let points: Vec<(f64, f64, u8)> = self
            .tern
            .timeline
            .iter()
            .filter(|x| cut_region.is_none_or(|c| x.from as usize == c && x.to as usize != c))
            .map(|x| (x.sent_ms as f64 / 1e3, x.latency_ms as f64, x.to))
            .collect();
        let y_max = points.iter().map(|p| p.1).fold(10.0, f64::max) * 1.05;
        let x_max = s.duration.as_secs_f64();
        let title = match (cut, cut_region) {
            (Some(p), Some(_)) => format!(
                "messages published in {} (cut off {:.0}–{:.0} s), by send time",
                p.region,
                p.at.as_secs_f64(),
                (p.at + p.duration).as_secs_f64()
            ),
            _ => "every delivery, by send time".to_owned(),
        };
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 380)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let Ok(mut chart) = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            else {
                return String::new();
            };
            let _ = chart.configure_mesh().x_desc("sent at (s)").y_desc("latency (ms)").draw();
            if let Some(p) = cut {
                let (a, b) = (p.at.as_secs_f64(), (p.at + p.duration).as_secs_f64());
                let _ = chart.draw_series(std::iter::once(Rectangle::new(
                    [(a, 0.0), (b, y_max)],
                    RGBColor(255, 200, 200).mix(0.4).filled(),
                )));
            }
            let step = (points.len() / 20_000).max(1);
            let _ =
                chart.draw_series(points.iter().step_by(step).map(|&(x, y, to)| {
                    Circle::new((x, y), 2, Palette99::pick(to as usize).filled())
                }));
            let _ = root.present();
        }
        svg
    }
}

fn heatmap(s: &Scenario, r: &RunResult, title: &str) -> String {
    let names: Vec<&str> = s.regions.iter().map(|x| x.name.as_str()).collect();
    let n = names.len();
    let cell = 86i32;
    let (left, top) = (120i32, 60i32);
    let size = ((left + cell * n as i32 + 20) as u32, (top + cell * n as i32 + 20) as u32);
    let max = r.pairs.values().map(|p| p.summary().p99_ms).fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let _ = root.fill(&WHITE);
        let _ = root.draw(&Text::new(title.to_owned(), (10, 10), ("sans-serif", 16)));
        let _ = root.draw(&Text::new(
            "rows: publisher, columns: subscriber",
            (10, 32),
            ("sans-serif", 11),
        ));
        for (i, a) in names.iter().enumerate() {
            let y = top + i as i32 * cell;
            let _ =
                root.draw(&Text::new((*a).to_owned(), (4, y + cell / 2 - 6), ("sans-serif", 11)));
            for (j, b) in names.iter().enumerate() {
                let x = left + j as i32 * cell;
                if i == 0 {
                    let _ = root.draw(&Text::new(
                        (*b).to_owned(),
                        (x + 2, top - 14),
                        ("sans-serif", 10),
                    ));
                }
                let Some(p) = r.pairs.get(&((*a).to_owned(), (*b).to_owned())) else { continue };
                let v = p.summary().p99_ms;
                let t = (v / max).clamp(0.0, 1.0);
                let color = RGBColor((255.0 * t) as u8, (200.0 * (1.0 - t)) as u8 + 40, 80);
                let _ = root
                    .draw(&Rectangle::new([(x, y), (x + cell - 2, y + cell - 2)], color.filled()));
                let _ = root.draw(&Text::new(
                    format!("{v:.0}"),
                    (x + 14, y + cell / 2 - 6),
                    ("sans-serif", 13).into_font().color(&WHITE),
                ));
            }
        }
        let _ = root.present();
    }
    svg
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
