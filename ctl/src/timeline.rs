//! One migration over time, from the source's periodic samples (native
//! engine, every 100 ms; see `convoy_protocol::ctl::Sample`): what
//! `migrate --plot FILE` and `demo --plot FILE` write. `FILE.svg` or
//! `FILE.png`: three panels over the same time axis — bytes per second on
//! the wire's payload, pages sent per second against the guest's dirty
//! rate (and pages served on post-copy faults), and the guest's work per
//! second at the source (it falls to nothing while the VM is paused
//! there) — with the time the VM was paused at the source shaded and each
//! round's start marked.
//! `FILE.json`: the series themselves.
//!
//! The guest's work *wherever it runs* comes from a [`Probe`]: convoyctl
//! polls the VM's counter on the source and (when it can reach it) the
//! destination every 100 ms, from outside, as a client of the service
//! would see it — the source's own samples stop seeing the guest once it
//! left (after a post-copy switch, it runs at the destination).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use convoy_agent::client::CtlClient;
use convoy_protocol::ctl::{MigrationReport, Progress, VmState};
use convoy_protocol::names::VmName;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

/// The font family the chart names (registered from the embedded font).
const FONT: &str = "sans-serif";
const WIRE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const DIRTY: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const LEFT: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const WORK: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const PAUSE: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
const GREY: RGBColor = RGBColor(0x80, 0x80, 0x80);

/// What `--plot FILE` writes, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.svg`
    Svg,
    /// `.png`
    Png,
    /// `.json`: the series.
    Json,
}

/// The format `path` names; checked before the migration runs.
pub fn format(path: &Path) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(Format::Svg),
        Some(e) if e.eq_ignore_ascii_case("png") => Ok(Format::Png),
        Some(e) if e.eq_ignore_ascii_case("json") => Ok(Format::Json),
        _ => bail!(
            "{}: --plot takes FILE.svg, FILE.png or FILE.json",
            path.display()
        ),
    }
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
    service: Vec<(f64, f64)>,
}

/// Polls a VM's work counter on a few agents while a migration runs.
#[derive(Debug)]
pub struct Probe {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(Instant, u64)>>,
}

impl Probe {
    /// Starts polling `vm` on each of `clients` every 100 ms.
    pub fn start(clients: Vec<CtlClient>, vm: VmName) -> Probe {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut tick =
                tokio::time::interval(Duration::from_millis(convoy_protocol::ctl::SAMPLE_EVERY_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                // The counter runs on wherever the VM runs, carried over
                // by the migration: the highest one seen is the guest's.
                let mut best = None;
                for c in &clients {
                    if let Ok(list) = c.vm_list().await {
                        let running = list.into_iter().find(|v| {
                            v.name == vm
                                && matches!(
                                    v.state,
                                    VmState::Running | VmState::MigratingOut | VmState::PostcopyIn
                                )
                        });
                        if let Some(v) = running {
                            best = best.max(Some(v.counter));
                        }
                    }
                }
                if let Some(c) = best {
                    seen.push((Instant::now(), c));
                }
            }
            for c in clients {
                c.close().await;
            }
            seen
        });
        Probe { stop, task }
    }

    /// Stops polling; what was seen.
    pub async fn finish(self) -> Vec<(Instant, u64)> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
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
    /// polls, on the samples' time axis. A counter that stood still
    /// while the VM was paused is work 0, as it was.
    pub fn add_service(&mut self, polled: &[(Instant, u64)]) {
        let Some(origin) = self.origin else { return };
        let mut high = 0;
        self.service = polled
            .windows(2)
            .map(|w| {
                high = high.max(w[0].1);
                let dt = w[1].0.saturating_duration_since(w[0].0).as_secs_f64();
                // CAST: counter steps of 100 ms, exact in f64.
                #[allow(clippy::cast_precision_loss)]
                let rate = if dt > 0.0 {
                    w[1].1.saturating_sub(high) as f64 / dt
                } else {
                    0.0
                };
                (w[1].0.saturating_duration_since(origin).as_secs_f64(), rate)
            })
            .collect();
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
                "{}: the migration was too short for a timeline ({} sample(s) of {} ms; QEMU migrations have none yet)",
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
                    .service
                    .iter()
                    .map(|(t, r)| serde_json::json!({ "t_s": t, "work_per_sec": r }))
                    .collect::<Vec<_>>(),
            });
            std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
            return Ok(());
        }
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow!("the embedded DejaVu Sans font does not load"))?;
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
        let frame = Frame {
            points: &self.points,
            service: &self.service,
            title: &title,
            paused: &paused,
            end,
        };
        match fmt {
            Format::Svg => chart(&SVGBackend::new(path, size).into_drawing_area(), &frame),
            _ => chart(&BitMapBackend::new(path, size).into_drawing_area(), &frame),
        }
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the timeline: {e:?}")
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

/// One line of a panel: its legend, colour and points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
/// One panel: its axis label, lines and the top of its axis.
type Panel<'a> = (&'a str, Vec<Line<'a>>, f64);

/// What one chart shows.
struct Frame<'a> {
    points: &'a [Point],
    /// The guest's work per second wherever it runs (time, rate).
    service: &'a [(f64, f64)],
    title: &'a str,
    /// Spans when the VM was paused at the source, seconds.
    paused: &'a [(f64, f64)],
    /// The migration's end, seconds.
    end: f64,
}

fn chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, frame: &Frame<'_>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (points, title) = (frame.points, frame.title);
    area.fill(&WHITE).map_err(err)?;
    let area = area.titled(title, (FONT, 18)).map_err(err)?;
    let panels = area.split_evenly((3, 1));
    let t_end = points
        .last()
        .map_or(1.0, |p| p.t_s)
        .max(frame.end)
        .max(frame.service.last().map_or(0.0, |s| s.0))
        .max(0.1);
    let max =
        |f: &dyn Fn(&Point) -> f64| points.iter().map(f).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let rounds: Vec<f64> = points
        .windows(2)
        .filter(|w| w[1].round != w[0].round)
        .map(|w| w[1].t_s)
        .collect();
    let paused = frame.paused;
    #[allow(clippy::cast_precision_loss)]
    let series: [Panel<'_>; 3] = [
        (
            "MB/s sent",
            vec![(
                "payload MB/s",
                WIRE,
                points
                    .iter()
                    .map(|p| (p.t_s, p.bytes_per_sec / 1e6))
                    .collect(),
            )],
            max(&|p| p.bytes_per_sec / 1e6),
        ),
        (
            "k pages/s",
            {
                let mut v = vec![
                    (
                        "pages sent, k/s",
                        LEFT,
                        points
                            .iter()
                            .map(|p| (p.t_s, p.pages_per_sec / 1e3))
                            .collect(),
                    ),
                    (
                        "dirty rate (last estimate), k pages/s",
                        DIRTY,
                        points
                            .iter()
                            .map(|p| (p.t_s, p.dirty_pages_per_sec as f64 / 1e3))
                            .collect(),
                    ),
                ];
                if points.iter().any(|p| p.faults_served > 0) {
                    v.push((
                        "served on post-copy faults, k pages",
                        WIRE,
                        points
                            .iter()
                            .map(|p| (p.t_s, p.faults_served as f64 / 1e3))
                            .collect(),
                    ));
                }
                v
            },
            max(&|p| {
                (p.pages_per_sec / 1e3)
                    .max(p.dirty_pages_per_sec as f64 / 1e3)
                    .max(p.faults_served as f64 / 1e3)
            }),
        ),
        (
            "guest work/s",
            {
                let mut v = vec![(
                    "guest work per second at the source (its samples)",
                    GREY,
                    points
                        .iter()
                        .map(|p| (p.t_s, p.guest_work_per_sec))
                        .collect::<Vec<_>>(),
                )];
                if !frame.service.is_empty() {
                    v.push((
                        "guest work per second wherever it runs (polled)",
                        WORK,
                        frame.service.to_vec(),
                    ));
                }
                v
            },
            max(&|p| p.guest_work_per_sec)
                .max(frame.service.iter().map(|s| s.1).fold(0.0, f64::max) * 1.1),
        ),
    ];
    for (panel, (y_label, lines, y_max)) in panels.iter().zip(series) {
        let mut c = ChartBuilder::on(panel)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_end, 0.0..y_max)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("seconds")
            .y_desc(y_label)
            .label_style((FONT, 12))
            .draw()
            .map_err(err)?;
        for (s, e) in paused {
            c.draw_series(std::iter::once(Rectangle::new(
                [(*s, 0.0), (*e, y_max)],
                PAUSE.filled(),
            )))
            .map_err(err)?;
        }
        for r in &rounds {
            c.draw_series(LineSeries::new([(*r, 0.0), (*r, y_max)], BLACK.mix(0.15)))
                .map_err(err)?;
        }
        for (name, color, data) in lines {
            c.draw_series(LineSeries::new(data, color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 12))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
    }
    area.present().map_err(err)?;
    Ok(())
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
