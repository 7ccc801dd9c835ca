//! The source's side of its driver: what it asks the driver to do
//! ([`SourceAction`]), what the driver may report ([`SourceEvent`]), and
//! what the driver tells it it sent ([`SentBatch`]).

use crate::ctl::Progress;
use crate::digest::Digest;
use crate::message::Message;
use crate::page::{EncodingStats, PageBitmap, PageIndex};

#[cfg(doc)]
use super::Source;
use super::SourceSummary;

/// What the driver must do.
#[derive(Debug)]
#[must_use]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum SourceAction {
    /// Send on the control stream.
    Send(Box<Message>),
    /// Clear and start the VM's dirty log (before round 1 reads a page).
    StartDirtyLog,
    /// Throttle the guest's CPU to `percent` (0 = unthrottled). The driver
    /// undoes any throttle on [`SourceAction::RollBack`].
    Throttle {
        /// Share of the guest's CPU time taken away, 0..=99.
        percent: u8,
    },
    /// Read and send `pages` over the data streams, then call
    /// [`Source::handle_batch_sent`] per batch and
    /// [`Source::handle_round_sent`] once. With `skip_zero` (the first
    /// round) zero pages are not sent: the destination's staging memory
    /// starts zeroed.
    SendPages {
        /// Round number.
        round: u32,
        /// Pages to send.
        pages: PageBitmap,
        /// Leave zero pages out.
        skip_zero: bool,
    },
    /// Fetch-and-clear the dirty log, then call [`Source::handle_dirty_log`].
    CollectDirtyLog,
    /// Pause the VM, collect the dirty log and the device state, then call
    /// [`Source::handle_paused`].
    PauseVm,
    /// Durably record that the VM is being handed over, then call
    /// [`Source::handle_handover_committed`]; if it cannot be recorded,
    /// call [`Source::handle_commit_failed`] instead (the VM resumes here).
    CommitHandover,
    /// The migration failed before handover: stop the dirty log and resume
    /// the VM if it was paused. It runs here, exactly once.
    RollBack,
    /// The destination runs the VM: discard and wipe the local copy
    /// (after sealing it as a retained image, if the driver called
    /// [`Source::retain_image`]).
    DiscardVm,
    /// The VM is paused for a post-copy switch: durably record that it is
    /// handed over (it must never resume here by itself), then call
    /// [`Source::handle_switch_committed`]; if it cannot be recorded, call
    /// [`Source::handle_commit_failed`] instead (the VM resumes here).
    CommitSwitch,
    /// Post-copy: read `pages` of the paused VM and send them as exactly
    /// one batch on the fault stream (index `data_streams`), then report
    /// it with [`Source::handle_batch_sent`].
    ServePages {
        /// Round number (the post-copy round).
        round: u32,
        /// Ascending, at most one batch's worth.
        pages: Vec<PageIndex>,
    },
    /// Post-copy: every owed page is pushed and every fault the machine
    /// knows of is served. Stop serving Fetches outside the machine (a
    /// driver that serves them as they are read,
    /// [`Source::handle_fetches_served`]), then call
    /// [`Source::handle_faults_stopped`] with how many were served that
    /// way and not yet reported: `Finish` waits for their batches.
    StopFaults,
    /// Recovery: the link broke after the switch, or in a pre-copy round
    /// (the VM still running here, its dirty log on: a dirty log collected
    /// meanwhile is kept). Drop the
    /// connection and its streams (report what the old streams had sent
    /// with [`Source::handle_batch_sent`]: only its leaves count now),
    /// dial the destination again, open the control stream and the data
    /// streams on the new connection and call
    /// [`Source::handle_reconnected`]. Keep trying until
    /// [`Source::poll_timeout`], then call [`Source::handle_timeout`].
    Reconnect,
}

/// What the driver may report.
#[derive(Debug, Clone, PartialEq)]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum SourceEvent {
    /// Progress.
    Progress(Progress),
    /// The end, with figures.
    Finished(Box<SourceSummary>),
}

/// One batch the driver wrote to a data stream.
#[derive(Debug, Clone)]
pub struct SentBatch {
    /// Stream index.
    pub stream: u16,
    /// Leaf digests of the pages as read.
    pub leaves: Vec<(PageIndex, Digest)>,
    /// By encoding.
    pub stats: EncodingStats,
    /// Frame bytes.
    pub frame_bytes: u64,
}
