//! Why the destination refuses what it was told ([`DestinationError`]),
//! and how a refusal ends the migration safely: the `Abort` it sends, the
//! staging copy discarded, or after a post-copy switch the VM kept in
//! doubt.

use std::sync::Arc;

use thiserror::Error;

use crate::digest::Digest;
use crate::message::{Abort, Message, Reason};
use crate::page::BatchError;
use crate::DecodeError;

use super::{Destination, DestinationAction, DestinationEvent, Phase};

/// A message or report the destination cannot accept. The machine has
/// already failed safely when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// Staging failed here, not the source's fault (a disk write failed,
    /// say): the source is told `Internal` and keeps the VM.
    #[error("staging failed here: {0}")]
    Staging(#[source] LocalFailure),
    /// (phase, message) pair with no transition.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// Phase.
        phase: &'static str,
        /// What arrived.
        message: &'static str,
    },
    /// A data stream index outside the manifest, or opened twice.
    #[error("data stream {0} is not expected")]
    BadStream(u16),
    /// A batch reported out of sequence (a driver bug or a replay).
    #[error("stream {stream}: batch {got} applied, expected {expected}")]
    BatchSequence {
        /// Stream.
        stream: u16,
        /// Expected.
        expected: u64,
        /// Got.
        got: u64,
    },
    /// The source's Finish disagrees with what arrived.
    #[error("Finish announces {announced} batches on stream {stream}, {applied} arrived")]
    BatchCount {
        /// Stream.
        stream: u16,
        /// Announced.
        announced: u64,
        /// Applied.
        applied: u64,
    },
    /// Finish lists the wrong number of streams.
    #[error("Finish lists {0} streams")]
    StreamCount(usize),
    /// A leaf past the end of memory.
    #[error("page {0} past the end of memory")]
    PageOutOfRange(u64),
    /// A batch that did not decode.
    #[error("bad page batch: {0}")]
    Batch(#[from] BatchError),
    /// The post-copy switch does not fit the manifest.
    #[error("bad post-copy switch: {0}")]
    BadSwitch(&'static str),
    /// A frame or message that did not decode.
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
    /// A receipt could not be signed, or the source's is invalid.
    #[error("receipt: {0}")]
    Receipt(crate::receipt::ReceiptError),
    /// A page the source sent as retained that this host cannot open: it
    /// holds no such image, or the page does not authenticate.
    #[error("retained page: {0}")]
    Retained(#[from] crate::reuse::ReuseError),
    /// After a post-copy switch, `Finish` names another device state than
    /// the one the VM started from here.
    #[error("Finish names another device state than the post-copy switch's")]
    SwitchStateMismatch,
    /// The staging image does not hash to the source's root.
    #[error("memory root mismatch: staging {staging}, source {source_root}")]
    RootMismatch {
        /// Recomputed over staging.
        staging: Digest,
        /// Announced.
        source_root: Digest,
    },
}

/// A failure of the destination's own host while it stages (a disk write,
/// a thread that would not start), as its driver's typed error. Two are
/// equal only when they are the same failure.
#[derive(Debug, Clone)]
pub struct LocalFailure(Arc<dyn std::error::Error + Send + Sync>);

impl LocalFailure {
    /// Wraps the driver's error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> LocalFailure {
        LocalFailure(Arc::new(error))
    }
}

impl std::fmt::Display for LocalFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for LocalFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for LocalFailure {
    fn eq(&self, other: &LocalFailure) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LocalFailure {}

impl Destination {
    /// A data stream carried a batch that did not decode, or a stream
    /// carried bytes that are not a message: the source is faulty or
    /// hostile.
    pub fn handle_bad_input(&mut self, e: DestinationError) -> DestinationError {
        self.fail(e)
    }

    pub(super) fn fail(&mut self, e: DestinationError) -> DestinationError {
        if matches!(self.phase, Phase::Starting) {
            // Handover received: the VM is ours, a late bad message changes
            // nothing.
            return e;
        }
        let reason = match e {
            DestinationError::RootMismatch { .. } => Reason::RootMismatch,
            DestinationError::Staging(ref why) => Reason::Internal(why.to_string()),
            _ => Reason::ProtocolViolation(e.to_string()),
        };
        let mismatch = reason == Reason::RootMismatch;
        self.actions
            .push_back(DestinationAction::Send(Message::Abort(Abort { reason })));
        if self.phase.has_staging() {
            self.give_up(e.to_string(), mismatch);
        } else {
            self.events
                .push_back(DestinationEvent::Failed(e.to_string()));
            self.phase = Phase::Done;
        }
        e
    }

    /// Ends without the VM becoming ours. Before a post-copy switch the
    /// staging copy is discarded. After it the VM runs here and is the only
    /// running copy, so it is kept, in doubt — unless it ran on memory that
    /// is not the source's (`bad_memory`: a root mismatch), then it stops.
    pub(super) fn give_up(&mut self, detail: String, bad_memory: bool) {
        if self.switched && !bad_memory {
            self.in_doubt(detail);
        } else {
            self.discard(detail);
        }
    }

    /// After the switch: keep the VM, report the outcome in doubt.
    pub(super) fn in_doubt(&mut self, detail: String) {
        self.tree = None;
        self.events.push_back(DestinationEvent::InDoubt(detail));
        self.phase = Phase::Done;
    }

    fn discard(&mut self, detail: String) {
        self.tree = None;
        self.actions.push_back(DestinationAction::DiscardStaging);
        self.events.push_back(DestinationEvent::Failed(detail));
        self.phase = Phase::Done;
    }
}
