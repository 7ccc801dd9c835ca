//! What the caller asks of a source: [`SourceConfig`], and when the VM is
//! handed over before all its pages are there ([`Switchover`]).

use std::time::Duration;

use crate::message::{Capabilities, Manifest};
use crate::model::{MigrationMode, MigrationPlan};
use crate::names::{MigrationId, VmName};

use crate::model::ramp_pages;

/// When the source hands the VM over before all its pages are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Switchover {
    /// Pre-copy: stop and copy, never post-copy.
    #[default]
    Never,
    /// Post-copy: switch right after Accept, with no pre-copy round.
    Immediately,
    /// Hybrid: pre-copy until the downtime target is met, else switch to
    /// post-copy `after` the first round started (without a limit: after
    /// the first full pass), or when rounds stall or reach the limit.
    Hybrid {
        /// Pre-copy time before switching.
        after: Option<Duration>,
    },
}

/// How the source behaves.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Migration id.
    pub migration: MigrationId,
    /// VM.
    pub vm: VmName,
    /// Its attributes, for the destination's policy.
    pub attributes: crate::vm::VmAttributes,
    /// What will be sent, with the operator's whole plan
    /// (`manifest.plan`: downtime target, rounds, mode, convergence,
    /// storage post-copy). The machine reads the plan from here and
    /// nowhere else, so each value has one name from convoyctl's flag to
    /// the state machine.
    pub manifest: Manifest,
    /// The operator's ticket, forwarded to the destination.
    pub ticket: crate::ticket::SignedTicket,
    /// The destination this source expects (receipts must be its).
    pub peer: crate::names::SpiffeId,
    /// Signs our receipt and checks the destination's.
    pub notary: crate::receipt::Notary,
    /// Features offered.
    pub capabilities: Capabilities,
    /// How long to wait for Accept.
    pub accept_timeout: Duration,
    /// How long to wait for Ready after Finish (covers draining the streams
    /// and the destination's verification), and for `RoundApplied` after
    /// each pre-copy round's `RoundEnd`.
    pub ready_timeout: Duration,
    /// How long to wait for Started after Handover before declaring the
    /// outcome in doubt.
    pub started_timeout: Duration,
    /// After a post-copy switch, how long a broken link may take to come
    /// back before the outcome is in doubt (zero: no recovery).
    pub recovery: Duration,
    /// How long the durable records a pre-copy pause holds take, both
    /// sides together (ours before `Handover`, the destination's before
    /// its VM runs), as the driver estimates them from its own: the
    /// expected downtime counts them. Zero where nothing is recorded.
    pub durable_records: Duration,
}

impl SourceConfig {
    /// The operator's plan this source runs.
    pub fn plan(&self) -> &MigrationPlan {
        &self.manifest.plan
    }

    /// The operator's downtime target: the most the pause may be
    /// expected to take ([`SourceConfig::downtime_aim`] aims lower first).
    pub fn max_downtime(&self) -> Duration {
        Duration::from_millis(u64::from(self.plan().max_downtime_ms))
    }

    /// What pre-copy aims at after round `round`, for a pause whose
    /// handover's round trips take `handover`: pause once the rest is
    /// expected to take less. The operator's target is a ceiling, reached
    /// by a ramp of the pages' share ([`ramp_pages`]: 30 ms of pages, plus
    /// the handover, which no round shortens, for the first four rounds,
    /// then half as much again each round), never above the target; the
    /// last two rounds `max_rounds` allows aim at the target itself. A guest whose rounds shrink gets a short
    /// pause for a few more short rounds; one whose rounds do not still
    /// converges at the target, a few rounds later.
    pub fn downtime_aim(&self, round: u32, handover: Duration) -> Duration {
        let ceiling = self.max_downtime();
        let Some(pages) = ramp_pages(round, self.plan().max_rounds) else {
            return ceiling;
        };
        let aim = handover.as_secs_f64() + pages.as_secs_f64();
        if aim >= ceiling.as_secs_f64() {
            ceiling
        } else {
            Duration::from_secs_f64(aim)
        }
    }

    /// When the VM is handed over before all its pages are there: with
    /// anything but `Never` the manifest announces post-copy and a fault
    /// stream.
    pub fn switchover(&self) -> Switchover {
        let plan = self.plan();
        match plan.mode {
            MigrationMode::Precopy => Switchover::Never,
            MigrationMode::Postcopy => Switchover::Immediately,
            MigrationMode::Hybrid => Switchover::Hybrid {
                after: plan
                    .postcopy_after_ms
                    .map(|ms| Duration::from_millis(u64::from(ms))),
            },
        }
    }
}
