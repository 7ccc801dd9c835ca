//! Evidence bundles: what happened to one migration, provable to a third
//! party offline with only the CA bundle.
//!
//! A bundle ([`EvidenceBundle`]) holds the operator's signed ticket and, for
//! each side — the ticket's source agent, then its destination agent —
//! that agent's certificate chain (from its audit log's header), the
//! records of its log that concern the migration (signed bodies and
//! signatures, with their leaf index), an RFC 9162 inclusion proof of each
//! record, and the signed tree head the proofs lead to.
//!
//! [`build_bundle`] takes the records from verified logs
//! ([`crate::audit::verify_log`]); [`check_bundle`] verifies a bundle from
//! its bytes:
//!
//! 1. bounds, magic and version, before anything is allocated from a length
//!    in the file;
//! 2. the ticket: the operator's chain and signature at the ticket's issue
//!    time (a ticket checked later has long expired), and that it names the
//!    bundle's migration;
//! 3. per side: the agent's chain at the log's creation time, that it is
//!    exactly the ticket's source (resp. destination), the tree head's
//!    signature, and per record its signature, its inclusion proof to the
//!    tree head, its sequence number, and that it concerns this migration;
//! 4. per receipt: its own chain and signature, that it names this
//!    migration and this ticket's digest, and that the right party signed
//!    it (`Sent` the source; `Accepted`, `Ready`, `Started` the
//!    destination);
//! 5. across records: the ticket is in a log, receipts of one kind are the
//!    same signed object wherever they appear, a migration that started
//!    (or that a log says completed) has its `Accepted`, `Ready`, `Sent`
//!    and `Started` receipts, and the memory root and device digest of the
//!    destination's `Ready` are those the source signed in `Sent` (and the
//!    destination in `Started`).
//!
//! Every refusal names the side and the record where it was found. A bundle
//! proves what it holds; it cannot prove that a log holds nothing else about
//! the migration. Its tree heads are what a reader compares with heads held
//! elsewhere (see [`crate::audit`]).
//!
//! On disk: [`BUNDLE_MAGIC`], a big-endian `u16` [`BUNDLE_VERSION`], then
//! the postcard [`EvidenceBundle`]; at most [`MAX_BUNDLE_LEN`] bytes.
//!
//! # Parts
//! - `format`: the bundle's types, its file encoding, and the bounded
//!   decoder that refuses a length before it allocates for it.
//! - `build`: [`build_bundle`], a bundle from verified logs.
//! - `check`: [`check_bundle`] and [`EvidenceBundle::check`], the offline
//!   verification, and what it reports ([`BundleSummary`]).
//! - `error`: why a bundle is refused ([`EvidenceError`], naming the
//!   [`RecordProblem`]) or cannot be built ([`BuildError`]).

use std::fmt;

use crate::audit::AuditEvent;
use crate::names::{MigrationId, SpiffeId};
use crate::receipt::Receipt;
use crate::ticket::Ticket;

mod build;
mod check;
mod error;
mod format;
#[cfg(test)]
mod tests;

pub use build::build_bundle;
pub use check::{check_bundle, BundleSummary, SideSummary};
pub use error::{
    AcceptanceMismatch, BuildError, EvidenceError, Oversize, RecordProblem, Undecodable,
};
pub use format::{EvidenceBundle, EvidenceRecord, SideEvidence};

/// The first bytes of a bundle file.
pub const BUNDLE_MAGIC: [u8; 8] = *b"CVYEVID\0";
/// The format version this code writes and reads.
pub const BUNDLE_VERSION: u16 = 1;
/// Largest bundle file.
pub const MAX_BUNDLE_LEN: usize = 2 << 20;
/// Most records of one side.
pub const MAX_SIDE_RECORDS: usize = 64;
/// Largest record body.
pub const MAX_RECORD_BODY: usize = 64 << 10;
/// Most hashes in an inclusion proof (a log of 2^64 records needs 64).
pub const MAX_PROOF_LEN: usize = 64;

/// One side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Side {
    /// The agent that sent the VM.
    Source,
    /// The agent that received it.
    Destination,
}

impl Side {
    /// Both sides, in bundle order.
    pub const BOTH: [Side; 2] = [Side::Source, Side::Destination];

    fn of(self, t: &Ticket) -> &SpiffeId {
        match self {
            Side::Source => &t.source,
            Side::Destination => &t.destination,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// The migration a record is about, if any; receipts are read without
/// verification.
fn migration_of(e: &AuditEvent) -> Option<MigrationId> {
    match e {
        AuditEvent::TicketAccepted { migration, .. }
        | AuditEvent::Outcome { migration, .. }
        | AuditEvent::Phase { migration, .. }
        | AuditEvent::Unfinished { migration, .. }
        | AuditEvent::Resolution { migration, .. } => Some(*migration),
        AuditEvent::Refused { migration, .. } | AuditEvent::Decision { migration, .. } => {
            *migration
        }
        AuditEvent::Receipt(r) => postcard::from_bytes::<Receipt>(&r.body)
            .ok()
            .map(|r| r.migration),
        AuditEvent::Ticket(t) => postcard::from_bytes::<Ticket>(&t.body).ok().map(|t| t.id),
        AuditEvent::AgentStarted { .. }
        | AuditEvent::PolicyLoaded { .. }
        | AuditEvent::PolicyRejected { .. }
        | AuditEvent::TornTailCut { .. }
        | AuditEvent::VmAtStart { .. }
        | AuditEvent::Snapshot { .. } => None,
    }
}
