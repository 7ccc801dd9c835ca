//! What the caller asks of a source: [`SourceConfig`], and when the VM is
//! handed over before all its pages are there ([`Switchover`]).

use std::time::Duration;

use crate::message::{Capabilities, Manifest};
use crate::names::{MigrationId, VmName};

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
    /// What will be sent.
    pub manifest: Manifest,
    /// The operator's ticket, forwarded to the destination.
    pub ticket: crate::ticket::SignedTicket,
    /// The destination this source expects (receipts must be its).
    pub peer: crate::names::SpiffeId,
    /// Signs our receipt and checks the destination's.
    pub notary: crate::receipt::Notary,
    /// Features offered.
    pub capabilities: Capabilities,
    /// Pause when the remaining pages are expected to take less than this.
    pub max_downtime: Duration,
    /// At most this many pre-copy rounds (see `force_stop`).
    pub max_rounds: u32,
    /// Pre-copy, post-copy or hybrid. With anything but `Never` the
    /// manifest announces post-copy and a fault stream.
    pub switchover: Switchover,
    /// Throttle the guest in steps when rounds stop shrinking.
    pub auto_converge: bool,
    /// Hold pages dirtied in several rounds back for the final round.
    pub hold_hot_pages: bool,
    /// At the round limit, stop and copy even when the downtime target
    /// cannot be met (otherwise the migration fails and the VM keeps
    /// running here).
    pub force_stop: bool,
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
    /// Storage post-copy: at the switch, disk blocks left are owed like
    /// memory pages (fetched on demand, pushed in the background) instead
    /// of going while the VM is paused.
    pub storage_postcopy: bool,
}
