//! The end of a migration that succeeds: the destination holds the state
//! ([`Ready`]), the source hands the VM over ([`Handover`]), the VM runs
//! at the destination ([`Started`]).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::receipt::SignedReceipt;

use super::FaultFigures;

/// Destination → source: "I hold exactly this state."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Root recomputed over the staging image.
    pub memory_root: Digest,
    /// Digest of the device state received.
    pub device_digest: Digest,
    /// The destination's signed `Ready` receipt over those digests.
    pub receipt: SignedReceipt,
    /// After a post-copy switch: the faults the VM took (informational,
    /// not signed).
    pub faults: Option<FaultFigures>,
}

/// Source → destination: the VM is yours; start it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The source's signed `Sent` receipt.
    pub receipt: SignedReceipt,
    /// The source keeps the VM's image, sealed under this key, which it
    /// forgets: the destination keeps it with the VM, to offer it when the
    /// VM migrates back (see [`crate::reuse`]).
    pub reuse: Option<Box<crate::reuse::ReuseOffer>>,
}

/// Destination → source: the VM runs here now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Milliseconds from receiving Handover to the VM running.
    pub start_ms: u32,
    /// Milliseconds from the VM running to this message: its disks put on
    /// stable storage and its start recorded in the destination's journal,
    /// which this message waited for (the source keeps its copy until
    /// then) but the guest did not: not downtime.
    pub synced_ms: u32,
    /// Where the destination's share of a pre-copy pause went
    /// (informational, not signed; zero after a post-copy switch).
    pub pause: DestinationPause,
    /// The destination's signed `Started` receipt.
    pub receipt: SignedReceipt,
}

/// The destination's share of a pre-copy pause, microseconds, each on its
/// own clock: what the source cannot see from its side of the link. The
/// source bounds each by the part of the pause it falls in (a destination
/// that lies can only move time between the parts it reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationPause {
    /// `Finish` received to the last batch applied: the last round's
    /// pages still in flight or being applied.
    pub drain_us: u32,
    /// The last batch applied to `Ready` written: the root folded and
    /// checked, the device state's digest, the `Ready` receipt signed.
    pub check_us: u32,
    /// The handover recorded durably in the destination's journal.
    pub record_us: u32,
    /// The VM started from staging with its device state.
    pub start_us: u32,
}

impl DestinationPause {
    /// `parts`, the source's own, with this share put in: each figure
    /// held to what is left of the part it falls in (drain and check in
    /// verify, record and start in start), so a wrong one cannot make the
    /// finer parts add up to more than the pause.
    pub fn put_in(self, parts: crate::model::PauseParts) -> crate::model::PauseParts {
        let within = |total: u64, a: u32, b: u32| {
            let a = u64::from(a).min(total);
            (a, u64::from(b).min(total - a))
        };
        let (drain_us, root_check_us) = within(parts.verify_us, self.drain_us, self.check_us);
        let (record_us, vm_start_us) = within(parts.start_us, self.record_us, self.start_us);
        crate::model::PauseParts {
            drain_us,
            root_check_us,
            record_us,
            vm_start_us,
            ..parts
        }
    }
}
