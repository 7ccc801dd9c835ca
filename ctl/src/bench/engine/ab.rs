//! The A/B table: at the highest dirty rate, a baseline with every
//! pre-copy technique on against runs with one technique off, medians of
//! `--runs`, and each technique's saving as a ratio.

use anyhow::Result;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::figures::{self, Figures, Ran};
use super::{Ctx, NamedRate};
use crate::render;

#[derive(Serialize)]
pub struct AbArm {
    /// `baseline` (every technique on) or the technique turned off.
    pub arm: String,
    pub hold_hot_pages: bool,
    pub auto_converge: bool,
    pub runs: u32,
    pub completed: u32,
    pub outcomes: Vec<String>,
    /// Medians over the completed runs.
    pub median: Option<Figures>,
}

/// One technique's saving: its figure with it off divided by the
/// baseline's (above 1: the technique saves that much).
#[derive(Serialize)]
pub struct Saving {
    pub technique: String,
    pub resent_pages: Option<f64>,
    pub wire_bytes: Option<f64>,
    pub downtime: Option<f64>,
    /// Why there is no A/B for it.
    pub skipped: Option<String>,
}

#[derive(Serialize)]
pub struct Ab {
    pub dirty: String,
    pub dirty_pages_per_sec: u64,
    pub arms: Vec<AbArm>,
    pub savings: Vec<Saving>,
}

/// The A/B runs at `heavy`: the baseline and each technique off, in turn
/// within each run so that drifts of the machine hit every arm alike.
pub async fn run(
    ctx: &Ctx<'_>,
    memory: u64,
    heavy: &NamedRate,
    base: &MigrationPlan,
    runs: u32,
) -> Result<Ab> {
    let arms = [
        ("baseline (all on)", true, true),
        ("hot-page ordering off", false, true),
        ("auto-converge off", true, false),
    ];
    let mut ran: Vec<Vec<Ran>> = vec![Vec::new(); arms.len()];
    for run in 1..=runs {
        for (i, &(name, hold, converge)) in arms.iter().enumerate() {
            ctx.note(&format!(
                "A/B at {} ({} pages/s), run {run}/{runs}: {name} …",
                heavy.name, heavy.pages_per_sec
            ));
            let o = MigrationPlan {
                mode: MigrationMode::Precopy,
                hold_hot_pages: hold,
                auto_converge: converge,
                force_stop: true,
                ..base.clone()
            };
            let r = ctx
                .migrate_one(memory, heavy.pages_per_sec, o, false)
                .await?;
            if let Some(v) = ran.get_mut(i) {
                v.push(r);
            }
        }
    }
    let arms: Vec<AbArm> = arms
        .iter()
        .zip(ran)
        .map(|(&(name, hold, converge), v)| {
            let done: Vec<Figures> = v
                .iter()
                .filter(|r| r.completed)
                .filter_map(|r| r.figures)
                .collect();
            AbArm {
                arm: name.into(),
                hold_hot_pages: hold,
                auto_converge: converge,
                runs: v.len() as u32,
                completed: done.len() as u32,
                outcomes: v.into_iter().map(|r| r.outcome).collect(),
                median: Figures::median(&done),
            }
        })
        .collect();
    let on = arms.first().and_then(|a| a.median);
    let ratio = |off: f64, on: f64| (on > 0.0).then(|| off / on);
    let mut savings: Vec<Saving> = arms
        .iter()
        .skip(1)
        .map(|arm| {
            let both = on.zip(arm.median);
            Saving {
                technique: arm.arm.trim_end_matches(" off").into(),
                resent_pages: both
                    .and_then(|(on, off)| ratio(off.resent_pages as f64, on.resent_pages as f64)),
                wire_bytes: both
                    .and_then(|(on, off)| ratio(off.wire_bytes as f64, on.wire_bytes as f64)),
                downtime: both.and_then(|(on, off)| ratio(off.downtime_ms, on.downtime_ms)),
                skipped: None,
            }
        })
        .collect();
    savings.push(Saving {
        technique: "delta pages".into(),
        resent_pages: None,
        wire_bytes: None,
        downtime: None,
        skipped: Some(
            "no request option turns delta pages off (the destination always accepts them)".into(),
        ),
    });
    Ok(Ab {
        dirty: heavy.name.clone(),
        dirty_pages_per_sec: heavy.pages_per_sec,
        arms,
        savings,
    })
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}×"))
}

/// The tables as text: the arms, why runs did not complete, the savings.
pub fn text(ab: &Ab, runs: u32, max_rounds: u32) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\npre-copy techniques at {} ({} pages/s), medians of {} runs, \
         all with --force-stop at {} rounds\n",
        ab.dirty, ab.dirty_pages_per_sec, runs, max_rounds
    ));
    let rows: Vec<Vec<String>> = ab
        .arms
        .iter()
        .map(|a| {
            let mut row = vec![a.arm.clone(), format!("{}/{}", a.completed, a.runs)];
            row.extend(figures::cells(&a.median));
            row
        })
        .collect();
    let mut heads = vec!["arm", "completed"];
    heads.extend(figures::HEADS);
    s.push_str(&render::table(&heads, &rows));
    for a in ab.arms.iter().filter(|a| a.completed < a.runs) {
        for why in a.outcomes.iter().filter(|w| w.as_str() != "completed") {
            s.push_str(&format!("  {}: {why}\n", a.arm));
        }
    }
    s.push_str("\nsaving = figure with the technique off ÷ baseline (above 1: it saves)\n");
    let rows: Vec<Vec<String>> = ab
        .savings
        .iter()
        .map(|v| match &v.skipped {
            Some(why) => vec![
                v.technique.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("no A/B: {why}"),
            ],
            None => vec![
                v.technique.clone(),
                ratio_cell(v.resent_pages),
                ratio_cell(v.wire_bytes),
                ratio_cell(v.downtime),
                String::new(),
            ],
        })
        .collect();
    s.push_str(&render::table(
        &[
            "technique",
            "re-sent pages",
            "wire bytes",
            "downtime",
            "note",
        ],
        &rows,
    ));
    s
}
