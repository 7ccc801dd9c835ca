//! Why the source refuses what it was told ([`SourceError`]), and how a
//! refusal fails the migration safely (the `Abort` it sends).

use std::time::Instant;

use thiserror::Error;

use crate::digest::Digest;
use crate::message::Reason;

use super::Source;

/// A message or event the source cannot accept in its phase, or a bad value
/// from the peer. The machine has already failed safely when this is
/// returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SourceError {
    /// (phase, message) pair with no transition.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// Phase.
        phase: &'static str,
        /// What arrived.
        message: &'static str,
    },
    /// The destination accepted a version we did not offer.
    #[error("destination chose version {0}, outside our range")]
    Downgrade(u16),
    /// The destination claims capabilities we did not offer.
    #[error("destination accepted capabilities we did not offer")]
    Capabilities,
    /// The destination's roots are not ours.
    #[error("destination holds memory root {theirs}, we sent {ours}")]
    RootMismatch {
        /// Ours.
        ours: Digest,
        /// Theirs.
        theirs: Digest,
    },
    /// The destination's device-state digest is not ours.
    #[error("destination holds a different device state")]
    DeviceStateMismatch,
    /// A batch on a stream that does not exist.
    #[error("batch reported on stream {0}, beyond the manifest")]
    NoSuchStream(u16),
    /// A leaf past the end of memory.
    #[error("leaf for page {0} past the end of memory")]
    LeafOutOfRange(u64),
    /// The destination's Resumed does not fit what was owed.
    #[error("bad Resumed: {0}")]
    BadResume(&'static str),
    /// A restarted source cannot take the migration up
    /// ([`super::Source::restarted_after_switch`]).
    #[error("cannot restart after the switch: {0}")]
    BadRestart(&'static str),
    /// Device state too large for the protocol.
    #[error("device state of {0} bytes exceeds the limit")]
    DeviceStateTooLarge(usize),
    /// A receipt from the destination is missing, invalid or wrong.
    #[error("destination receipt refused: {0}")]
    Receipt(crate::receipt::ReceiptError),
}

impl Source {
    /// Fails with a protocol error from the peer: tell it, roll back.
    pub(super) fn fail(&mut self, now: Instant, e: SourceError) -> SourceError {
        let reason = match e {
            SourceError::RootMismatch { .. } | SourceError::DeviceStateMismatch => {
                Reason::RootMismatch
            }
            SourceError::DeviceStateTooLarge(_) => Reason::Internal(e.to_string()),
            _ => Reason::ProtocolViolation(e.to_string()),
        };
        self.fail_with(now, reason, e.to_string());
        e
    }
}
