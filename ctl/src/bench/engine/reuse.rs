//! The reuse table: memory reuse when a VM comes back. Per dirty rate, a
//! VM that opts in to retention goes a → b, runs there for
//! `--reuse-dwell`, and comes back b → a, where its encrypted image waits;
//! the row sets the bytes of the trip back against those of the first
//! trip. The pages sent back (as a share of the VM's pages) bound how much
//! of the memory changed.

use std::time::Duration;

use anyhow::Result;
use convoy_protocol::ctl::{ContentProfile, SimVmSpec};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::figures::{outcome_cell, Figures, Ran};
use super::{Ctx, NamedRate, SETTLE};
use crate::bench::table::mib;
use crate::render;

/// A VM's trip out and back (the reuse table).
#[derive(Serialize)]
pub struct ReuseRow {
    pub dirty: String,
    pub dirty_pages_per_sec: u64,
    /// How long it ran at b before coming back.
    pub dwell_ms: u64,
    pub outcome: String,
    pub completed: bool,
    pub verified: bool,
    pub there: Option<Figures>,
    pub back: Option<Figures>,
    /// Pages that came back as retained (not sent).
    pub retained_pages: u64,
    /// Pages sent on the way back, over the VM's pages.
    pub sent_back_share: Option<f64>,
    /// Wire bytes back ÷ wire bytes there.
    pub wire_ratio: Option<f64>,
}

/// A VM that opts in to retention goes a → b, runs there for `dwell`, and
/// comes back to a, which kept its image.
pub async fn run(
    ctx: &Ctx<'_>,
    memory: u64,
    rate: &NamedRate,
    base: &MigrationPlan,
    dwell: Duration,
) -> Result<ReuseRow> {
    ctx.note(&format!(
        "reuse: {} ({} pages/s), {} ms at b …",
        rate.name,
        rate.pages_per_sec,
        dwell.as_millis()
    ));
    let vm = ctx.name();
    let mut attributes = convoy_protocol::vm::VmAttributes::default();
    attributes.labels.insert(
        convoy_protocol::vm::RETAIN_LABEL.to_owned(),
        "true".to_owned(),
    );
    ctx.a
        .vm_create(SimVmSpec {
            name: vm.parse()?,
            memory_bytes: memory,
            dirty_pages_per_sec: rate.pages_per_sec,
            hot_set_pct: 10,
            content: ContentProfile::Mixed,
            seed: 1,
            attributes,
            disks: Vec::new(),
            service_requests_per_sec: 0,
        })
        .await?;
    tokio::time::sleep(SETTLE).await;
    let o = MigrationPlan {
        mode: MigrationMode::Precopy,
        ..base.clone()
    };
    let there = ctx
        .a
        .migrate(ctx.lab.migrate_request(&vm, "a", "b", o.clone())?, |_| {})
        .await;
    let there = Ran::of(there, MigrationMode::Precopy)?;
    let mut row = ReuseRow {
        dirty: rate.name.clone(),
        dirty_pages_per_sec: rate.pages_per_sec,
        dwell_ms: dwell.as_millis() as u64,
        outcome: there.outcome.clone(),
        completed: false,
        verified: false,
        there: there.figures,
        back: None,
        retained_pages: 0,
        sent_back_share: None,
        wire_ratio: None,
    };
    if there.completed {
        tokio::time::sleep(dwell).await;
        let back = ctx
            .b
            .migrate(ctx.lab.migrate_request(&vm, "b", "a", o)?, |_| {})
            .await;
        if let Ok(r) = &back {
            row.retained_pages = r.encodings.retained;
            row.sent_back_share = Some(r.pages_sent as f64 / r.memory_bytes.max(1) as f64 * 4096.0);
        }
        let back = Ran::of(back, MigrationMode::Precopy)?;
        row.outcome = back.outcome;
        row.completed = back.completed;
        row.verified = back.verified;
        row.back = back.figures;
        if let (Some(t), Some(b)) = (&row.there, &row.back) {
            row.wire_ratio = Some(b.wire_bytes as f64 / t.wire_bytes.max(1) as f64);
        }
    }
    ctx.delete(&vm).await?;
    Ok(row)
}

/// The table as text (nothing when it has no rows).
pub fn text(reuse: &[ReuseRow]) -> String {
    let mut s = String::new();
    if !reuse.is_empty() {
        s.push_str(
            "\nmemory reuse: out a → b, back b → a where the image was kept \
             (sent back = pages sent back ÷ the VM's pages)\n",
        );
        let rows: Vec<Vec<String>> = reuse
            .iter()
            .map(|r| {
                let fig = |f: &Option<Figures>, g: fn(&Figures) -> String| {
                    f.as_ref().map_or("-".to_string(), g)
                };
                vec![
                    format!("{} ({}/s)", r.dirty, r.dirty_pages_per_sec),
                    r.dwell_ms.to_string(),
                    fig(&r.there, |f| mib(f.wire_bytes)),
                    fig(&r.back, |f| mib(f.wire_bytes)),
                    r.wire_ratio
                        .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
                    r.sent_back_share
                        .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
                    r.retained_pages.to_string(),
                    fig(&r.there, |f| format!("{:.0}", f.total_ms)),
                    fig(&r.back, |f| format!("{:.0}", f.total_ms)),
                    fig(&r.back, |f| format!("{:.1}", f.downtime_ms)),
                    outcome_cell(&r.outcome, r.completed, r.verified),
                ]
            })
            .collect();
        s.push_str(&render::table(
            &[
                "dirty pages",
                "dwell ms",
                "there MiB",
                "back MiB",
                "back/there",
                "sent back",
                "retained",
                "there ms",
                "back ms",
                "back downtime ms",
                "outcome",
            ],
            &rows,
        ));
    }
    s
}
