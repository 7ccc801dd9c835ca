//! Why a bundle is refused when checked ([`EvidenceError`], which names
//! the side and record and, for a record, its [`RecordProblem`]) or cannot
//! be built from the logs given ([`BuildError`]).

use thiserror::Error;

use super::{Side, BUNDLE_VERSION};
use crate::digest::Digest;
use crate::logtree::ProofError;
use crate::names::{MigrationId, SpiffeId, VmName};
use crate::receipt::{ReceiptError, ReceiptKind};
use crate::signed::ChainError;
use crate::ticket::TicketError;

/// What is wrong with one record of a side.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordProblem {
    /// The agent's signature over the record does not verify.
    #[error("record signature is invalid (edited?)")]
    Signature,
    /// The inclusion proof does not lead to the side's tree head.
    #[error("not in the log under its signed tree head: {0}")]
    Inclusion(ProofError),
    /// The body is not an audit record.
    #[error("undecodable record: {0}")]
    Undecodable(#[source] Undecodable),
    /// The record's sequence number is not its leaf index.
    #[error("the record says it is log entry {seq}")]
    Seq {
        /// The record's sequence number.
        seq: u64,
    },
    /// The record is not about this migration.
    #[error(
        "record does not concern this migration ({event}{})",
        of_migration(migration)
    )]
    Unrelated {
        /// What the record is.
        event: &'static str,
        /// The migration it concerns, if any.
        migration: Option<MigrationId>,
    },
    /// The receipt in the record does not verify.
    #[error("receipt does not verify: {0}")]
    Receipt(ReceiptError),
    /// A resolution's in-doubt statement does not verify, is about
    /// another migration or ticket, or is not the ticket destination's.
    #[error("in-doubt statement does not hold: {0}")]
    Statement(String),
    /// A valid receipt, of another migration (a swapped receipt).
    #[error("{kind:?} receipt is for migration {migration}, not this one")]
    ForeignReceipt {
        /// Its kind.
        kind: ReceiptKind,
        /// The migration it names.
        migration: MigrationId,
    },
    /// A receipt of this migration naming another ticket.
    #[error("{kind:?} receipt names ticket {named}, not the bundle's {expected}")]
    ReceiptTicket {
        /// Its kind.
        kind: ReceiptKind,
        /// The ticket digest it names.
        named: Digest,
        /// The bundle ticket's digest.
        expected: Digest,
    },
    /// A receipt signed by the wrong party for its kind.
    #[error("{kind:?} receipt signed by {signer}; only the {must} ({expected}) signs it")]
    ReceiptSigner {
        /// Its kind.
        kind: ReceiptKind,
        /// Who signed it.
        signer: SpiffeId,
        /// Which side must sign this kind.
        must: Side,
        /// That side's agent.
        expected: SpiffeId,
    },
    /// The log holds a ticket for this migration other than the bundle's.
    #[error("the log holds another ticket for this migration")]
    OtherTicket,
    /// The ticket acceptance disagrees with the ticket.
    #[error("ticket acceptance disagrees with the ticket: {0}")]
    Acceptance(#[source] AcceptanceMismatch),
    /// Records must come by strictly increasing leaf index.
    #[error("leaf index {index} does not follow the previous record's {previous}")]
    Order {
        /// This record's index.
        index: u64,
        /// The previous record's.
        previous: u64,
    },
}

/// Why a bundle is refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// Larger than [`MAX_BUNDLE_LEN`](crate::evidence::MAX_BUNDLE_LEN).
    #[error("evidence bundle is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Does not start with [`BUNDLE_MAGIC`](crate::evidence::BUNDLE_MAGIC).
    #[error("not an evidence bundle (bad magic)")]
    Magic,
    /// A format version this code does not read.
    #[error("evidence bundle format version {0} is not supported (this reads {BUNDLE_VERSION})")]
    Version(u16),
    /// A list longer than its limit.
    #[error("evidence bundle holds more than {max} {what}")]
    Limit {
        /// What.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// Does not decode.
    #[error("malformed evidence bundle: {0}")]
    Malformed(#[source] Undecodable),
    /// Too short to hold a format version.
    #[error("malformed evidence bundle: no version")]
    NoVersion,
    /// The operator's ticket does not verify.
    #[error("ticket: {0}")]
    Ticket(TicketError),
    /// The ticket is for another migration.
    #[error("bundle is for migration {bundle} but its ticket is for {ticket}")]
    TicketMigration {
        /// The bundle's migration.
        bundle: MigrationId,
        /// The ticket's.
        ticket: MigrationId,
    },
    /// A side is absent.
    #[error("the {side}'s evidence is missing")]
    MissingSide {
        /// Which.
        side: Side,
    },
    /// A side's certificate chain is out of bounds or does not verify.
    #[error("{side} log: agent certificate refused: {why}")]
    Chain {
        /// Which side.
        side: Side,
        /// Why.
        why: ChainError,
    },
    /// A side's log belongs to another agent than the ticket names.
    #[error("{side} log is {found}'s, but the ticket's {side} is {expected}")]
    WrongAgent {
        /// Which side.
        side: Side,
        /// The ticket's agent for that side.
        expected: SpiffeId,
        /// The log's agent.
        found: SpiffeId,
    },
    /// A side's tree head signature does not verify.
    #[error("{side} log: signed tree head (size {size}) is forged or altered")]
    TreeHead {
        /// Which side.
        side: Side,
        /// The size it claims.
        size: u64,
    },
    /// A side holds no record.
    #[error("{side} log: no record of this migration")]
    NoRecords {
        /// Which side.
        side: Side,
    },
    /// One record is wrong.
    #[error("{side} record {record} (log entry {index}): {problem}")]
    Record {
        /// Which side.
        side: Side,
        /// Position of the record in the side's list.
        record: usize,
        /// Its leaf index in the log.
        index: u64,
        /// What is wrong.
        problem: Box<RecordProblem>,
    },
    /// Neither log holds the bundle's ticket.
    #[error("neither log holds the bundle's ticket")]
    TicketNotLogged,
    /// Two different receipts of one kind.
    #[error("two different {kind:?} receipts for this migration ({first} record {first_record}, {second} record {second_record})")]
    ConflictingReceipts {
        /// The kind.
        kind: ReceiptKind,
        /// Where the first was.
        first: Side,
        /// Its position in that side's list.
        first_record: usize,
        /// Where the second was.
        second: Side,
        /// Its position.
        second_record: usize,
    },
    /// A receipt a started or completed migration must have is absent.
    #[error("the migration {why}, but the bundle has no {kind:?} receipt")]
    MissingReceipt {
        /// The kind.
        kind: ReceiptKind,
        /// Why it is needed.
        why: &'static str,
    },
    /// Two receipts attest different state.
    #[error(
        "{what}: the destination's Ready receipt attests {}, the {other_kind:?} receipt attests {}",
        show(ready),
        show(other)
    )]
    StateMismatch {
        /// `memory root` or `device state`.
        what: &'static str,
        /// What Ready attests.
        ready: Option<Digest>,
        /// The other receipt's kind.
        other_kind: ReceiptKind,
        /// What it attests.
        other: Option<Digest>,
    },
    /// Encoding failed.
    #[error("cannot encode the bundle: {0}")]
    Encode(#[source] postcard::Error),
}

/// Why a bundle cannot be built from the logs given.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No log holds the migration's signed ticket.
    #[error("no log holds the signed ticket of migration {0} (logs written before tickets were logged whole cannot prove it)")]
    NoTicket(MigrationId),
    /// No log of one of the ticket's agents was given.
    #[error("no log of the {side} {agent} was given")]
    MissingLog {
        /// Which side.
        side: Side,
        /// Its agent.
        agent: SpiffeId,
    },
    /// Two logs of one agent were given.
    #[error("two logs of {0} were given")]
    DuplicateLog(SpiffeId),
    /// A record about the migration is not covered by a signed tree head.
    #[error("the {side}'s log has records of this migration after its last signed tree head")]
    Unanchored {
        /// Which side.
        side: Side,
    },
    /// Too many records or bytes for a bundle.
    #[error("the {side}'s log has {what} for this migration, more than a bundle holds")]
    TooLarge {
        /// Which side.
        side: Side,
        /// What is too large.
        what: Oversize,
    },
    /// The bundle does not encode.
    #[error(transparent)]
    Encode(#[from] EvidenceError),
}

/// Why bytes (a record, a bundle) do not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Undecodable {
    /// Postcard refused them.
    #[error("{0}")]
    Postcard(#[from] postcard::Error),
    /// Bytes after the value.
    #[error("trailing bytes")]
    TrailingBytes,
}

/// How a side's ticket acceptance disagrees with the ticket (the values
/// are the log's).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AcceptanceMismatch {
    /// Accepted in another role than the side's. The role as the audit
    /// log wrote it: text from the log under check, which need not name
    /// any role this build knows.
    #[error("accepted as {0}")]
    Role(String),
    /// For another VM.
    #[error("VM {logged}, the ticket's is {ticket}")]
    Vm {
        /// The acceptance's.
        logged: VmName,
        /// The ticket's.
        ticket: VmName,
    },
    /// Signed by another operator.
    #[error("signed by {logged}, the ticket by {ticket}")]
    Operator {
        /// The acceptance's.
        logged: SpiffeId,
        /// The ticket's signer.
        ticket: SpiffeId,
    },
    /// With another peer.
    #[error("peer {logged}, the ticket's is {ticket}")]
    Peer {
        /// The acceptance's.
        logged: SpiffeId,
        /// The ticket's.
        ticket: SpiffeId,
    },
}

/// What is too large for a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Oversize {
    /// A record of this many bytes.
    #[error("a record of {0} bytes")]
    Record(usize),
    /// This many records.
    #[error("{0} records")]
    Records(usize),
}

fn of_migration(m: &Option<MigrationId>) -> String {
    m.map_or_else(String::new, |m| format!(" of migration {m}"))
}

fn show(d: &Option<Digest>) -> String {
    d.map_or_else(|| "nothing".into(), |d| d.to_string())
}
