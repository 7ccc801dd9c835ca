//! The drawing of a timeline: panels over one time axis, the pauses
//! shaded, each round's start marked.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Point, ServicePoint};
use crate::plot::FONT;

const WIRE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const DIRTY: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const LEFT: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const WORK: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const WAIT: RGBColor = RGBColor(0x94, 0x67, 0xbd);
const PAUSE: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
const GREY: RGBColor = RGBColor(0x80, 0x80, 0x80);

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the timeline: {e:?}")
}

/// One line of a panel: its legend, colour and points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
/// One panel: its axis label, lines and the top of its axis.
type Panel<'a> = (&'a str, Vec<Line<'a>>, f64);

/// What one chart shows.
pub(super) struct Frame<'a> {
    pub(super) points: &'a [Point],
    /// The guest's work per second wherever it runs (time, rate).
    pub(super) work: &'a [(f64, f64)],
    /// Its service (empty: none).
    pub(super) service: &'a [ServicePoint],
    pub(super) title: &'a str,
    /// Spans when the VM was paused, seconds.
    pub(super) paused: &'a [(f64, f64)],
    /// The migration's end, seconds.
    pub(super) end: f64,
}

/// The service's two panels: requests served per second, and response
/// times.
fn service_panels<'a>(service: &'a [ServicePoint]) -> [Panel<'a>; 2] {
    let top = |f: &dyn Fn(&ServicePoint) -> f64| {
        service.iter().map(f).fold(0.0f64, f64::max).max(1.0) * 1.1
    };
    let opt = |f: fn(&ServicePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        service
            .iter()
            .filter_map(|s| Some((s.t_s, f(s)?)))
            .collect()
    };
    [
        (
            "requests/s",
            vec![(
                "service: requests served per second (wherever the VM runs)",
                WORK,
                service.iter().map(|s| (s.t_s, s.served_per_sec)).collect(),
            )],
            top(&|s| s.served_per_sec),
        ),
        (
            "response ms",
            vec![
                ("response time, mean per 100 ms", WIRE, opt(|s| s.mean_ms)),
                ("response time, p99 per 100 ms", DIRTY, opt(|s| s.p99_ms)),
                (
                    "oldest request waiting",
                    WAIT,
                    service
                        .iter()
                        .map(|s| (s.t_s, s.oldest_waiting_ms))
                        .collect(),
                ),
            ],
            top(&|s| {
                s.p99_ms
                    .unwrap_or(0.0)
                    .max(s.mean_ms.unwrap_or(0.0))
                    .max(s.oldest_waiting_ms)
            }),
        ),
    ]
}

pub(super) fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    frame: &Frame<'_>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (points, title) = (frame.points, frame.title);
    area.fill(&WHITE).map_err(err)?;
    let area = area.titled(title, (FONT, 18)).map_err(err)?;
    let t_end = points
        .last()
        .map_or(1.0, |p| p.t_s)
        .max(frame.end)
        .max(frame.work.last().map_or(0.0, |s| s.0))
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
    let series: Vec<Panel<'_>> = vec![
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
                if !frame.work.is_empty() {
                    v.push((
                        "guest work per second wherever it runs (polled)",
                        WORK,
                        frame.work.to_vec(),
                    ));
                }
                v
            },
            max(&|p| p.guest_work_per_sec)
                .max(frame.work.iter().map(|s| s.1).fold(0.0, f64::max) * 1.1),
        ),
    ];
    let mut series = series;
    // A guest without a work counter (QEMU's) has no work panel.
    let worked =
        points.iter().any(|p| p.guest_work_per_sec > 0.0) || frame.work.iter().any(|w| w.1 > 0.0);
    if !worked {
        series.truncate(2);
    }
    if !frame.service.is_empty() {
        series.extend(service_panels(frame.service));
    }
    let panels = area.split_evenly((series.len(), 1));
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
