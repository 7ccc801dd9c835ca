//! One migration over time, from the source's periodic samples (native
//! engine, every 100 ms; see `convoy_protocol::ctl::Sample`): what
//! `migrate --plot FILE` and `demo --plot FILE` write. `FILE.svg` or
//! `FILE.png`: panels over the same time axis — bytes per second on the
//! wire's payload; pages sent per second against the guest's dirty rate
//! (and pages served on post-copy faults); the guest's work per second;
//! and, for a VM with a service, requests served per second and their
//! response times — with the time the VM was paused shaded and each
//! round's start marked. `FILE.json`: the series themselves.
//!
//! The guest *wherever it runs* comes from a [`Probe`]: convoyctl polls
//! the VM on the source and (when it can reach it) the destination every
//! 100 ms, from outside, as a client of the service would see it — the
//! source's own samples stop seeing the guest once it left.
//!
//! - `probe`: the polling.
//! - `service`: the service's series and summary from the polls.
//! - `chart`: the drawing.

mod chart;
mod probe;
mod service;

pub use probe::{Poll, Probe};
pub use service::{ServicePoint, ServiceSummary};

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use convoy_protocol::ctl::{MigrationReport, Progress};
use plotters::prelude::*;
use serde::Serialize;

use crate::plot::Format;

/// The format `path` names; checked before the migration runs.
pub fn format(path: &Path) -> Result<Format> {
    crate::plot::format(path, true)
}

/// One sample as the timeline keeps it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Seconds since the migration started at the source.
    pub t_s: f64,
    /// The phase last reported.
    pub phase: String,
    /// The copy round.
    pub round: u32,
    /// Payload bytes per second since the previous sample.
    pub bytes_per_sec: f64,
    /// Pages sent per second since the previous sample.
    pub pages_per_sec: f64,
    /// Pages dirty and not yet sent again.
    pub remaining_pages: u64,
    /// The guest's dirty rate last estimated, pages per second.
    pub dirty_pages_per_sec: u64,
    /// The guest's work per second at the source since the previous
    /// sample (a sim VM's vCPU loop iterations).
    pub guest_work_per_sec: f64,
    /// Pages served on post-copy faults so far.
    pub faults_served: u64,
    /// The VM was paused at the source.
    pub paused: bool,
}

/// The samples of one migration, as they arrive.
#[derive(Debug, Default)]
pub struct Timeline {
    points: Vec<Point>,
    last: Option<(u64, u64, u64, u64)>,
    /// The instant the source's clock counts from, on this clock.
    origin: Option<Instant>,
    /// The guest's work per second wherever it runs, from a [`Probe`].
    work: Vec<(f64, f64)>,
    /// Its service, from the same polls.
    service: Vec<ServicePoint>,
    summary: Option<ServiceSummary>,
}

impl Timeline {
    /// Takes `p` if it is a periodic sample.
    pub fn record(&mut self, p: &Progress) {
        let Some(s) = p.sample else { return };
        if self.origin.is_none() {
            self.origin = Instant::now().checked_sub(Duration::from_millis(s.elapsed_ms));
        }
        let (bytes_per_sec, pages_per_sec, guest_work_per_sec) = match self.last {
            Some((ms, bytes, pages, work)) if s.elapsed_ms > ms => {
                // CAST: milliseconds of one migration, exact in f64.
                #[allow(clippy::cast_precision_loss)]
                let dt = (s.elapsed_ms - ms) as f64 / 1e3;
                #[allow(clippy::cast_precision_loss)]
                (
                    p.payload_bytes.saturating_sub(bytes) as f64 / dt,
                    p.pages_sent.saturating_sub(pages) as f64 / dt,
                    s.guest_work.saturating_sub(work) as f64 / dt,
                )
            }
            _ => (0.0, 0.0, 0.0),
        };
        self.last = Some((s.elapsed_ms, p.payload_bytes, p.pages_sent, s.guest_work));
        #[allow(clippy::cast_precision_loss)]
        self.points.push(Point {
            t_s: s.elapsed_ms as f64 / 1e3,
            phase: p.phase.clone(),
            round: p.round,
            bytes_per_sec,
            pages_per_sec,
            remaining_pages: p.remaining_pages,
            dirty_pages_per_sec: s.dirty_pages_per_sec,
            guest_work_per_sec,
            faults_served: s.faults_served,
            paused: s.paused,
        });
    }

    /// Takes what a [`Probe`] saw: the guest's work per second between
    /// polls, and its service, on the samples' time axis. A counter that
    /// stood still while the VM was paused is work 0, as it was.
    pub fn add_polls(&mut self, polled: &[Poll]) {
        let Some(origin) = self.origin else { return };
        let mut high = 0;
        self.work = polled
            .windows(2)
            .map(|w| {
                high = high.max(w[0].counter);
                let dt = w[1].at.saturating_duration_since(w[0].at).as_secs_f64();
                // CAST: counter steps of 100 ms, exact in f64.
                #[allow(clippy::cast_precision_loss)]
                let rate = if dt > 0.0 {
                    w[1].counter.saturating_sub(high) as f64 / dt
                } else {
                    0.0
                };
                (
                    w[1].at.saturating_duration_since(origin).as_secs_f64(),
                    rate,
                )
            })
            .collect();
        self.service = service::series(polled, origin);
        self.summary = service::summary(polled);
    }

    /// The service over the polls, if the VM has one.
    pub fn service_summary(&self) -> Option<&ServiceSummary> {
        self.summary.as_ref()
    }

    /// The samples so far.
    #[cfg(test)]
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Writes the timeline of `report` to `path`.
    pub fn write(&self, path: &Path, report: &MigrationReport) -> Result<()> {
        let fmt = format(path)?;
        if self.points.len() < 2 {
            bail!(
                "{}: the migration was too short for a timeline ({} sample(s) of {} ms)",
                path.display(),
                self.points.len(),
                convoy_protocol::ctl::SAMPLE_EVERY_MS
            );
        }
        if fmt == Format::Json {
            let v = serde_json::json!({
                "migration": report.migration,
                "vm": report.vm,
                "outcome": report.outcome.to_string(),
                "downtime_ms": report.downtime_ms,
                "total_ms": report.total_ms,
                "sample_every_ms": convoy_protocol::ctl::SAMPLE_EVERY_MS,
                "points": self.points,
                "guest_work_per_sec_wherever_it_runs": self
                    .work
                    .iter()
                    .map(|(t, r)| serde_json::json!({ "t_s": t, "work_per_sec": r }))
                    .collect::<Vec<_>>(),
                "service": self.service,
                "service_summary": self.summary,
            });
            std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
            return Ok(());
        }
        crate::plot::register_font()?;
        let title = format!(
            "{} {} → {}: {}, {:.0} ms, downtime {:.1} ms (shaded), {} rounds",
            report
                .qemu
                .as_ref()
                .map_or("migration of", |_| "QEMU migration of"),
            report.vm,
            report
                .destination
                .rsplit('/')
                .next()
                .unwrap_or(&report.destination),
            report.outcome,
            report.total_ms,
            report.downtime_ms,
            report.rounds
        );
        let size = (1000, 760);
        // Shaded: the downtime, when the guest ran nowhere. Pre-copy's
        // runs from the source's pause to the destination's Started (past
        // the last sample); a post-copy switch's is the gap at the switch
        // (after it the VM runs at the destination, paused at the source).
        let end = report.total_ms / 1e3;
        let downtime = report.downtime_ms / 1e3;
        let paused = if report.postcopy.is_some() {
            pauses(&self.points)
                .first()
                .map(|(s, _)| vec![(*s, s + downtime)])
                .unwrap_or_default()
        } else {
            let mut p = pauses(&self.points);
            if downtime > 0.0 {
                p.push((end - downtime, end));
            }
            p
        };
        let size = if self.service.is_empty() {
            size
        } else {
            (size.0, 1000)
        };
        let frame = chart::Frame {
            points: &self.points,
            work: &self.work,
            service: &self.service,
            title: &title,
            paused: &paused,
            end,
        };
        match fmt {
            Format::Svg => chart::draw(&SVGBackend::new(path, size).into_drawing_area(), &frame),
            _ => chart::draw(&BitMapBackend::new(path, size).into_drawing_area(), &frame),
        }
    }
}

/// The spans (start, end, seconds) where the VM was paused at the source.
fn pauses(points: &[Point]) -> Vec<(f64, f64)> {
    let mut spans = Vec::new();
    let mut open: Option<f64> = None;
    for p in points {
        match (p.paused, open) {
            (true, None) => open = Some(p.t_s),
            (false, Some(s)) => {
                spans.push((s, p.t_s));
                open = None;
            }
            _ => {}
        }
    }
    if let (Some(s), Some(last)) = (open, points.last()) {
        spans.push((s, last.t_s));
    }
    spans
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_protocol::ctl::Sample;

    fn progress(ms: u64, bytes: u64, work: u64, paused: bool, round: u32) -> Progress {
        Progress {
            phase: "precopy".into(),
            round,
            pages_sent: 0,
            remaining_pages: 10,
            total_pages: 100,
            payload_bytes: bytes,
            rate_bytes_per_sec: 0,
            sample: Some(Sample {
                elapsed_ms: ms,
                dirty_pages_per_sec: 5,
                guest_work: work,
                faults_served: 0,
                paused,
            }),
        }
    }

    #[test]
    fn rates_come_from_the_differences_between_samples_and_pauses_are_spans() {
        let mut t = Timeline::default();
        // A phase change (no sample) is not a point.
        t.record(&Progress {
            sample: None,
            ..progress(0, 0, 0, false, 1)
        });
        t.record(&progress(100, 1_000, 50, false, 1));
        t.record(&progress(200, 101_000, 150, false, 2));
        t.record(&progress(300, 151_000, 150, true, 2));
        t.record(&progress(400, 151_000, 150, true, 2));
        let p = t.points();
        assert_eq!(p.len(), 4);
        assert!((p[1].bytes_per_sec - 1_000_000.0).abs() < 1e-6);
        assert!((p[1].guest_work_per_sec - 1_000.0).abs() < 1e-6);
        assert!(p[3].guest_work_per_sec.abs() < 1e-9);
        assert_eq!(pauses(p), [(0.3, 0.4)]);
        let dir = tempfile::tempdir().unwrap();
        assert!(format(&dir.path().join("t.txt")).is_err());
        let report: MigrationReport = serde_json::from_value(serde_json::json!({
            "migration": "00", "vm": "demo", "source": "s", "destination": "spiffe://d/agent/b",
            "outcome": "Completed", "verified": true, "converged": true, "total_ms": 400.0,
            "downtime_ms": 100.0, "rounds": 2, "memory_bytes": 4096, "pages_sent": 1,
            "encodings": convoy_protocol::page::EncodingStats::default(), "payload_bytes": 1,
            "wire_bytes": 1, "memory_root": null, "counter_at_pause": null, "receipts": [],
            "qemu": null, "convergence": convoy_protocol::model::Convergence::default(),
            "postcopy": null, "disks": [], "disk_blocks_sent": 0, "transport": null, "lanes": 0
        }))
        .unwrap();
        for f in ["t.svg", "t.json"] {
            t.write(&dir.path().join(f), &report).unwrap();
            assert!(std::fs::metadata(dir.path().join(f)).unwrap().len() > 200);
        }
        let svg = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
        assert!(
            svg.contains("payload MB/s") && svg.contains("downtime 100.0 ms"),
            "{svg}"
        );
        let short = Timeline::default();
        assert!(short.write(&dir.path().join("s.svg"), &report).is_err());
    }
}
