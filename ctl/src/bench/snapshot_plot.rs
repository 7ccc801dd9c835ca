//! `convoyctl bench --snapshot --plot FILE`: the rows that have a plain
//! baseline as a bar chart, Convoy beside the plain transfer of the same
//! bytes (MB/s of stored bytes, log scale), each pair's ratio above it.
//! SVG or PNG by the file's extension; text in DejaVu Sans, embedded (no
//! system fonts are read).

use std::path::Path;

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::snapshot_rows::Row;
use crate::plot::{Format, FONT};

const CONVOY: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const PLAIN: RGBColor = RGBColor(0xa8, 0xa8, 0xa8);
/// The widest line of a bar pair's label, in characters.
const LABEL_WIDTH: usize = 16;

/// The format `path`'s extension names (SVG or PNG), checked before the
/// bench runs.
pub fn format(path: &Path) -> Result<Format> {
    crate::plot::format(path, false)
}

/// Draws `rows` (those with a baseline) to `path`.
pub fn draw(path: &Path, rows: &[Row]) -> Result<()> {
    let bars: Vec<&Row> = rows.iter().filter(|r| r.plain_mb_s.is_some()).collect();
    if bars.is_empty() {
        bail!("no row has a baseline to plot");
    }
    crate::plot::register_font()?;
    let n = u32::try_from(bars.len())?;
    let size = (n.saturating_mul(120).max(800) + 120, 620);
    match format(path)? {
        Format::Svg => chart(&SVGBackend::new(path, size).into_drawing_area(), &bars),
        _ => chart(&BitMapBackend::new(path, size).into_drawing_area(), &bars),
    }
}

/// The lines under a bar pair: the operation, wrapped at
/// [`LABEL_WIDTH`] characters, then the content.
pub fn label_lines(operation: &str, content: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in operation.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= LABEL_WIDTH => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines.push(format!("[{content}]"));
    lines
}

/// The log axis's range: powers of ten around every bar, with room for
/// the ratio above the highest.
fn y_range(bars: &[&Row]) -> (f64, f64) {
    let values = bars
        .iter()
        .flat_map(|r| [r.stored_mb_s, r.plain_mb_s.unwrap_or(r.stored_mb_s)]);
    let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let lo = 10f64.powf((min.max(0.01) / 2.0).log10().floor());
    let hi = 10f64.powf((max.max(lo) * 3.0).log10().ceil());
    (lo, hi)
}

fn chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, bars: &[&Row]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (lo, hi) = y_range(bars);
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "convoyctl bench --snapshot: Convoy beside a plain transfer of the same bytes",
            (FONT, 20),
        )
        .margin(15)
        .x_label_area_size(80)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("MB/s of stored bytes (log scale)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    let x = |i: usize| i as f64;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(x(i) + 0.12, lo), (x(i) + 0.5, r.stored_mb_s)],
                CONVOY.filled(),
            )
        }))?
        .label("Convoy (push, pull, copy)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], CONVOY.filled()));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(x(i) + 0.5, lo), (x(i) + 0.88, r.plain_mb_s.unwrap_or(lo))],
                PLAIN.filled(),
            )
        }))?
        .label("plain put, get, copy of the same objects")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], PLAIN.filled()));
    let centred =
        |size| TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().enumerate().filter_map(|(i, r)| {
        let top = r.stored_mb_s.max(r.plain_mb_s?);
        Some(Text::new(
            format!("{:.2}×", r.ratio_stored?),
            (x(i) + 0.5, top * 1.15),
            centred(13),
        ))
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    let below = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, r) in bars.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(x(i) + 0.5, lo));
        for (k, line) in (0..).zip(label_lines(&r.operation, &r.content)) {
            root.draw(&Text::new(line, (px, py + 8 + 15 * k), below.clone()))?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_wrap_at_word_boundaries_and_end_with_the_content() {
        assert_eq!(
            label_lines("copy s3 -> file (streamed)", "mixed"),
            ["copy s3 -> file", "(streamed)", "[mixed]"]
        );
        assert_eq!(
            label_lines("push VM -> s3", "random"),
            ["push VM -> s3", "[random]"]
        );
    }

    #[test]
    fn a_small_chart_is_drawn_as_svg() {
        let rows = [
            Row::new("push VM -> file", "mixed", (100, 50), &[1.0], &[0.5]),
            Row::new("seal only", "mixed", (100, 50), &[1.0], &[]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        draw(&path, &rows).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("0.50×"), "{svg}");
        assert!(svg.contains("[mixed]"));
        assert!(!svg.contains("seal only"));
        let png = dir.path().join("c.png");
        draw(&png, &rows).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    }
}
