//! The modes table: one migration per mode and dirty rate. A mode the
//! agent refuses is a row saying so.

use anyhow::Result;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::figures::{self, outcome_cell, Figures};
use super::{Ctx, NamedRate};
use crate::render;

#[derive(Serialize)]
pub struct ModeRow {
    pub mode: MigrationMode,
    pub dirty: String,
    pub dirty_pages_per_sec: u64,
    pub outcome: String,
    pub completed: bool,
    pub verified: bool,
    pub figures: Option<Figures>,
}

/// One migration of a VM of `memory` (with the context's disk, if any)
/// per mode and dirty rate, modes outermost.
pub async fn run(
    ctx: &Ctx<'_>,
    modes: &[MigrationMode],
    dirty: &[NamedRate],
    memory: u64,
    base: &MigrationPlan,
) -> Result<Vec<ModeRow>> {
    let mut rows = Vec::new();
    for &mode in modes {
        for r in dirty {
            ctx.note(&format!(
                "{mode}, {} ({} pages/s) …",
                r.name, r.pages_per_sec
            ));
            let o = MigrationPlan {
                mode,
                ..base.clone()
            };
            let ran = ctx.migrate_one(memory, r.pages_per_sec, o, true).await?;
            rows.push(ModeRow {
                mode,
                dirty: r.name.clone(),
                dirty_pages_per_sec: r.pages_per_sec,
                outcome: ran.outcome,
                completed: ran.completed,
                verified: ran.verified,
                figures: ran.figures,
            });
        }
    }
    Ok(rows)
}

/// The table as text (nothing when it has no rows).
pub fn text(modes: &[ModeRow]) -> String {
    let mut s = String::new();
    if !modes.is_empty() {
        let rows: Vec<Vec<String>> = modes
            .iter()
            .map(|r| {
                let mut row = vec![
                    r.mode.to_string(),
                    format!("{} ({}/s)", r.dirty, r.dirty_pages_per_sec),
                ];
                row.extend(figures::cells(&r.figures));
                row.push(outcome_cell(&r.outcome, r.completed, r.verified));
                row
            })
            .collect();
        let mut heads = vec!["mode", "dirty pages"];
        heads.extend(figures::HEADS);
        heads.push("outcome");
        s.push('\n');
        s.push_str(&render::table(&heads, &rows));
    }
    s
}
