//! What one migration of the engine tables measured ([`Figures`]), how it
//! ended ([`Ran`]), and the table cells for both.

use anyhow::Result;
use convoy_agent::client::ClientError;
use convoy_protocol::ctl::{CtlErrorKind, MigrationReport, Outcome};
use convoy_protocol::model::{MigrationMode, PauseParts};
use serde::Serialize;

use crate::bench::table::{median, mib};

/// What one migration measured.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Figures {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: u32,
    pub wire_bytes: u64,
    pub pages_sent: u64,
    /// Sends of pages already sent before (`convergence.resent_pages`).
    pub resent_pages: u64,
    /// Pages sent as XOR deltas.
    pub delta_pages: u64,
    /// Hot-page sends deferred to the final round.
    pub held_back: u64,
    /// Highest auto-converge throttle, percent.
    pub throttle_pct: u8,
    /// The engine's last dirty-rate estimate, pages per second.
    pub measured_dirty_rate: u64,
    /// Of the pages sent, disk blocks.
    pub disk_blocks_sent: u64,
    /// Post-copy: pages the VM touched before they had arrived, and the
    /// fault-to-installed latency (median, 99th percentile), µs.
    pub faults: Option<u64>,
    pub fault_median_us: Option<u64>,
    pub fault_p99_us: Option<u64>,
    /// Where a pre-copy pause went.
    pub pause: PauseParts,
    /// What the source expected the pause to take when it paused (or
    /// when it last decided, if it never did).
    pub expected_downtime_ms: u64,
    /// The durable records the source expected in the pause, µs.
    pub records_us: u64,
    /// The destination's apply lag the source expected in the pause, µs.
    pub apply_lag_us: u64,
}

impl Figures {
    pub fn of(r: &MigrationReport) -> Figures {
        Figures {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            rounds: r.rounds,
            wire_bytes: r.wire_bytes,
            pages_sent: r.pages_sent,
            resent_pages: r.convergence.resent_pages,
            delta_pages: r.encodings.delta,
            held_back: r.convergence.held_back,
            throttle_pct: r.convergence.throttle,
            measured_dirty_rate: r.convergence.dirty_rate,
            disk_blocks_sent: r.disk_blocks_sent,
            faults: r.postcopy.as_ref().and_then(|p| p.faults).map(|f| f.faults),
            fault_median_us: r
                .postcopy
                .as_ref()
                .and_then(|p| p.faults)
                .map(|f| f.median_us),
            fault_p99_us: r.postcopy.as_ref().and_then(|p| p.faults).map(|f| f.p99_us),
            pause: r.convergence.pause,
            expected_downtime_ms: r.convergence.expected_downtime_ms,
            records_us: r.convergence.records_us,
            apply_lag_us: r.convergence.apply_lag_us,
        }
    }

    /// The per-field median of `v` (`None` when empty).
    pub fn median(v: &[Figures]) -> Option<Figures> {
        if v.is_empty() {
            return None;
        }
        let pick = |f: fn(&Figures) -> f64| median(v.iter().map(f));
        // Over the runs that have the figure.
        let pick_some = |f: fn(&Figures) -> Option<u64>| {
            let mut x: Vec<u64> = v.iter().filter_map(f).collect();
            x.sort_unstable();
            x.get(x.len() / 2).copied()
        };
        Some(Figures {
            faults: pick_some(|s| s.faults),
            fault_median_us: pick_some(|s| s.fault_median_us),
            fault_p99_us: pick_some(|s| s.fault_p99_us),
            total_ms: pick(|s| s.total_ms),
            downtime_ms: pick(|s| s.downtime_ms),
            rounds: pick(|s| f64::from(s.rounds)) as u32,
            wire_bytes: pick(|s| s.wire_bytes as f64) as u64,
            pages_sent: pick(|s| s.pages_sent as f64) as u64,
            resent_pages: pick(|s| s.resent_pages as f64) as u64,
            delta_pages: pick(|s| s.delta_pages as f64) as u64,
            held_back: pick(|s| s.held_back as f64) as u64,
            throttle_pct: pick(|s| f64::from(s.throttle_pct)) as u8,
            measured_dirty_rate: pick(|s| s.measured_dirty_rate as f64) as u64,
            disk_blocks_sent: pick(|s| s.disk_blocks_sent as f64) as u64,
            pause: crate::bench::table::median_pause(v.iter().map(|s| &s.pause)),
            expected_downtime_ms: pick(|s| s.expected_downtime_ms as f64) as u64,
            records_us: pick(|s| s.records_us as f64) as u64,
            apply_lag_us: pick(|s| s.apply_lag_us as f64) as u64,
        })
    }
}

/// How one migration ended.
#[derive(Debug, Clone)]
pub struct Ran {
    /// `completed`, `aborted: …`, `in doubt: …`, `failed: …` or
    /// `not supported: …`.
    pub outcome: String,
    pub completed: bool,
    pub verified: bool,
    pub figures: Option<Figures>,
}

impl Ran {
    pub fn of(r: Result<MigrationReport, ClientError>, mode: MigrationMode) -> Result<Ran> {
        match r {
            Ok(r) => {
                let completed = r.outcome == Outcome::Completed;
                Ok(Ran {
                    outcome: r.outcome.to_string(),
                    completed,
                    verified: completed && r.verified,
                    figures: Some(Figures::of(&r)),
                })
            }
            // The agent refuses modes it cannot do yet for sim VMs.
            Err(ClientError::Agent(e))
                if e.kind == CtlErrorKind::BadRequest && mode != MigrationMode::Precopy =>
            {
                Ok(Ran::none(format!("not supported: {}", e.message)))
            }
            // A failed migration is a result, not a failed benchmark.
            Err(ClientError::Agent(e)) => Ok(Ran::none(format!("failed: {}", e.message))),
            Err(e) => Err(e.into()),
        }
    }

    pub fn none(outcome: String) -> Ran {
        Ran {
            outcome,
            completed: false,
            verified: false,
            figures: None,
        }
    }
}

/// An outcome for a table cell: `completed, verified`, the agent's whole
/// refusal of a mode, or a failure cut before the details of its reason.
pub fn outcome_cell(outcome: &str, completed: bool, verified: bool) -> String {
    if completed {
        return if verified {
            "completed, verified".into()
        } else {
            "completed, NOT verified".into()
        };
    }
    if outcome.starts_with("not supported:") {
        return outcome.to_string();
    }
    match outcome.match_indices(':').nth(1) {
        Some((i, _)) => outcome[..i].to_string(),
        None => outcome.to_string(),
    }
}

/// The column heads of [`cells`].
pub const HEADS: [&str; 13] = [
    "total ms",
    "downtime ms",
    "rounds",
    "wire MiB",
    "pages sent",
    "re-sent",
    "delta",
    "held back",
    "throttle %",
    "disk blocks",
    "faults",
    "fault µs p50/p99",
    "pause ms last/verify/commit/start",
];

/// A migration's figures as table cells (dashes for none), under [`HEADS`].
pub fn cells(f: &Option<Figures>) -> Vec<String> {
    match f {
        Some(f) => vec![
            format!("{:.0}", f.total_ms),
            format!("{:.1}", f.downtime_ms),
            f.rounds.to_string(),
            mib(f.wire_bytes),
            f.pages_sent.to_string(),
            f.resent_pages.to_string(),
            f.delta_pages.to_string(),
            f.held_back.to_string(),
            f.throttle_pct.to_string(),
            f.disk_blocks_sent.to_string(),
            f.faults.map_or("-".into(), |n| n.to_string()),
            match (f.fault_median_us, f.fault_p99_us) {
                (Some(m), Some(p)) => format!("{m}/{p}"),
                _ => "-".into(),
            },
            pause_cell(&f.pause),
        ],
        None => vec!["-".to_string(); HEADS.len()],
    }
}

/// A pause's parts in milliseconds, `12.1/3.0/1.2/2.5` (none: a dash).
fn pause_cell(p: &PauseParts) -> String {
    if !p.measured() {
        return "-".into();
    }
    // CAST: microseconds of one pause, exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let ms: Vec<String> = p
        .parts_us()
        .iter()
        .map(|&us| format!("{:.1}", us as f64 / 1000.0))
        .collect();
    ms.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_cell_keeps_the_reason_and_drops_its_details() {
        assert_eq!(
            outcome_cell("aborted: cannot converge: dirties 5 pages/s", false, false),
            "aborted: cannot converge"
        );
        assert_eq!(
            outcome_cell(
                "not supported: invalid options: pre-copy only",
                false,
                false
            ),
            "not supported: invalid options: pre-copy only"
        );
        assert_eq!(outcome_cell("completed", true, true), "completed, verified");
    }

    #[test]
    fn medians_pick_the_middle_of_each_figure() {
        let f = |t: f64, resent: u64| Figures {
            total_ms: t,
            resent_pages: resent,
            ..Figures::default()
        };
        let m = Figures::median(&[f(3.0, 10), f(1.0, 30), f(2.0, 20)]);
        assert_eq!(m.map(|m| (m.total_ms, m.resent_pages)), Some((2.0, 20)));
        assert!(Figures::median(&[]).is_none());
    }
}
