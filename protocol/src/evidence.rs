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

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::audit::{
    head_message, AuditEvent, AuditRecord, SignedTreeHead, VerifiedLog, RECORD_CONTEXT,
};
use crate::digest::Digest;
use crate::logtree::{log_leaf, verify_inclusion, ProofError};
use crate::names::{MigrationId, SpiffeId};
use crate::receipt::{ticket_digest, Receipt, ReceiptError, ReceiptKind, SignedReceipt};
use crate::ticket::{
    signed_message, SignedTicket, Ticket, TicketError, TicketVerifier, VerifiedTicket,
    MAX_CERT_LEN, MAX_CHAIN_LEN,
};

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
/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

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

/// The evidence of one migration (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceBundle {
    /// The migration.
    pub migration: MigrationId,
    /// The operator's signed ticket.
    pub ticket: SignedTicket,
    /// The source's evidence, then the destination's.
    #[serde(deserialize_with = "de_sides")]
    pub sides: Vec<SideEvidence>,
}

/// What one agent's log says about the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideEvidence {
    /// The agent's certificate chain, from its log's header (DER, leaf
    /// first).
    #[serde(deserialize_with = "de_chain")]
    pub chain: Vec<Vec<u8>>,
    /// When the log was created (the chain is verified at that time).
    pub log_created_at_unix: u64,
    /// The log's records about the migration, by increasing leaf index.
    #[serde(deserialize_with = "de_records")]
    pub records: Vec<EvidenceRecord>,
    /// The signed tree head every inclusion proof leads to.
    pub head: SignedTreeHead,
}

/// One signed log record and its inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    /// Leaf index in the log (the record's sequence number).
    pub index: u64,
    /// Postcard [`AuditRecord`], as signed.
    #[serde(deserialize_with = "de_body")]
    pub body: Vec<u8>,
    /// Ed25519 over [`RECORD_CONTEXT`] ‖ body.
    #[serde(deserialize_with = "de_signature")]
    pub signature: Vec<u8>,
    /// RFC 9162 inclusion proof of the leaf in the tree head.
    #[serde(deserialize_with = "de_proof")]
    pub proof: Vec<Digest>,
}

thread_local! {
    /// The limit the last bounded decode on this thread ran into. Postcard
    /// drops the messages of serde's custom errors, so the bounded visitor
    /// leaves it here for [`EvidenceBundle::decode`] to report.
    static LIMIT_HIT: Cell<Option<(&'static str, usize)>> = const { Cell::new(None) };
}

/// A sequence of at most `max` elements: refused on its announced length,
/// before anything is allocated for it.
fn bounded<'de, D, T>(d: D, what: &'static str, max: usize) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(&'static str, usize, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {} {}", self.1, self.0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hit = || {
                LIMIT_HIT.with(|c| c.set(Some((self.0, self.1))));
                serde::de::Error::custom(format!("more than {} {}", self.1, self.0))
            };
            let announced = seq.size_hint().unwrap_or(0);
            if announced > self.1 {
                return Err(hit());
            }
            let mut out = Vec::with_capacity(announced);
            while let Some(x) = seq.next_element()? {
                if out.len() == self.1 {
                    return Err(hit());
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V(what, max, PhantomData))
}

fn de_sides<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SideEvidence>, D::Error> {
    bounded(d, "sides", 2)
}
fn de_chain<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
    bounded(d, "certificates in a chain", MAX_CHAIN_LEN)
}
fn de_records<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EvidenceRecord>, D::Error> {
    bounded(d, "records in one side", MAX_SIDE_RECORDS)
}
fn de_body<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounded(d, "bytes in a record body", MAX_RECORD_BODY)
}
fn de_signature<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounded(d, "bytes in a record signature", SIGNATURE_LEN)
}
fn de_proof<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
    bounded(d, "hashes in an inclusion proof", MAX_PROOF_LEN)
}

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
    Undecodable(String),
    /// The record's sequence number is not its leaf index.
    #[error("the record says it is log entry {seq}")]
    Seq {
        /// The record's sequence number.
        seq: u64,
    },
    /// The record is not about this migration.
    #[error("record does not concern this migration ({0})")]
    Unrelated(String),
    /// The receipt in the record does not verify.
    #[error("receipt does not verify: {0}")]
    Receipt(ReceiptError),
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
    Acceptance(String),
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
    /// Larger than [`MAX_BUNDLE_LEN`].
    #[error("evidence bundle is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Does not start with [`BUNDLE_MAGIC`].
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
    Malformed(String),
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
        why: String,
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
    Encode(String),
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
        what: String,
    },
    /// The bundle does not encode.
    #[error(transparent)]
    Encode(#[from] EvidenceError),
}

/// What one side's verified evidence says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SideSummary {
    /// The agent.
    pub agent: SpiffeId,
    /// Records in the bundle.
    pub records: usize,
    /// The signed tree head the records are proven in.
    pub head: SignedTreeHead,
    /// Whether the log holds the ticket's acceptance.
    pub accepted: bool,
    /// The receipt kinds in the log, in log order.
    pub receipts: Vec<ReceiptKind>,
    /// The outcomes the log recorded.
    pub outcomes: Vec<String>,
    /// Refusals the log recorded about the migration.
    pub refusals: Vec<String>,
    /// Policy decisions the log recorded about the migration.
    pub decisions: Vec<String>,
    /// Phase changes the log recorded, in order.
    pub phases: Vec<String>,
}

/// A verified bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BundleSummary {
    /// The migration.
    pub migration: MigrationId,
    /// The operator's ticket and who signed it.
    pub ticket: VerifiedTicket,
    /// The ticket's digest, as receipts name it.
    pub ticket_digest: Digest,
    /// The source's side.
    pub source: SideSummary,
    /// The destination's side.
    pub destination: SideSummary,
    /// Whether the VM started at the destination (a `Started` receipt).
    pub started: bool,
    /// The memory root the receipts attest, if any does.
    pub memory_root: Option<Digest>,
    /// The device-state digest the receipts attest, if any does.
    pub device: Option<Digest>,
}

impl EvidenceBundle {
    /// The file bytes: magic, version, postcard body.
    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        let mut out = BUNDLE_MAGIC.to_vec();
        out.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
        postcard::to_io(self, &mut out).map_err(|e| EvidenceError::Encode(e.to_string()))?;
        if out.len() > MAX_BUNDLE_LEN {
            return Err(EvidenceError::TooLarge {
                len: out.len(),
                max: MAX_BUNDLE_LEN,
            });
        }
        Ok(out)
    }

    /// Decodes a bundle file, within the bounds, with no trailing bytes.
    /// Nothing is verified yet: see [`EvidenceBundle::check`].
    pub fn decode(bytes: &[u8]) -> Result<EvidenceBundle, EvidenceError> {
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(EvidenceError::TooLarge {
                len: bytes.len(),
                max: MAX_BUNDLE_LEN,
            });
        }
        let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(EvidenceError::Magic);
        };
        if magic != &BUNDLE_MAGIC {
            return Err(EvidenceError::Magic);
        }
        let Some((version, body)) = rest.split_first_chunk::<2>() else {
            return Err(EvidenceError::Malformed("no version".into()));
        };
        let version = u16::from_be_bytes(*version);
        if version != BUNDLE_VERSION {
            return Err(EvidenceError::Version(version));
        }
        LIMIT_HIT.with(|c| c.set(None));
        let decoded = postcard::take_from_bytes::<EvidenceBundle>(body);
        let limit = LIMIT_HIT.with(|c| c.take());
        match (decoded, limit) {
            (Ok((b, [])), _) => Ok(b),
            (Ok(_), _) => Err(EvidenceError::Malformed("trailing bytes".into())),
            (Err(_), Some((what, max))) => Err(EvidenceError::Limit { what, max }),
            (Err(e), None) => Err(EvidenceError::Malformed(e.to_string())),
        }
    }

    /// Verifies the bundle offline (see the module docs).
    pub fn check(&self, verifier: &dyn TicketVerifier) -> Result<BundleSummary, EvidenceError> {
        Checker::new(self, verifier)?.run()
    }
}

/// Decodes and verifies a bundle file with only `verifier` (the CA
/// bundle).
pub fn check_bundle(
    bytes: &[u8],
    verifier: &dyn TicketVerifier,
) -> Result<BundleSummary, EvidenceError> {
    EvidenceBundle::decode(bytes)?.check(verifier)
}

/// The migration a record is about, if any; receipts are read without
/// verification.
fn migration_of(e: &AuditEvent) -> Option<MigrationId> {
    match e {
        AuditEvent::TicketAccepted { migration, .. }
        | AuditEvent::Outcome { migration, .. }
        | AuditEvent::Phase { migration, .. } => Some(*migration),
        AuditEvent::Refused { migration, .. } | AuditEvent::Decision { migration, .. } => {
            *migration
        }
        AuditEvent::Receipt(r) => postcard::from_bytes::<Receipt>(&r.body)
            .ok()
            .map(|r| r.migration),
        AuditEvent::Ticket(t) => postcard::from_bytes::<Ticket>(&t.body).ok().map(|t| t.id),
        AuditEvent::AgentStarted { .. }
        | AuditEvent::PolicyLoaded { .. }
        | AuditEvent::PolicyRejected { .. } => None,
    }
}

/// Builds the bundle of `migration` from verified logs: the ticket from
/// whichever log holds it, each side from the log of the ticket's agent
/// (other logs are ignored), proven against that log's last tree head.
pub fn build_bundle(
    migration: MigrationId,
    logs: &[VerifiedLog],
) -> Result<EvidenceBundle, BuildError> {
    let found = logs
        .iter()
        .flat_map(|l| &l.records)
        .find_map(|r| match &r.event {
            AuditEvent::Ticket(t) => postcard::from_bytes::<Ticket>(&t.body)
                .ok()
                .filter(|body| body.id == migration)
                .map(|body| (t.clone(), body)),
            _ => None,
        });
    let Some((ticket, body)) = found else {
        return Err(BuildError::NoTicket(migration));
    };
    let mut sides = Vec::with_capacity(2);
    for side in Side::BOTH {
        let agent = side.of(&body);
        let mut of_agent = logs.iter().filter(|l| &l.agent == agent);
        let Some(log) = of_agent.next() else {
            return Err(BuildError::MissingLog {
                side,
                agent: agent.clone(),
            });
        };
        if of_agent.next().is_some() {
            return Err(BuildError::DuplicateLog(agent.clone()));
        }
        sides.push(side_evidence(side, log, migration)?);
    }
    let bundle = EvidenceBundle {
        migration,
        ticket,
        sides,
    };
    bundle.encode()?;
    Ok(bundle)
}

fn side_evidence(
    side: Side,
    log: &VerifiedLog,
    migration: MigrationId,
) -> Result<SideEvidence, BuildError> {
    let head = log
        .last_head
        .clone()
        .ok_or(BuildError::Unanchored { side })?;
    let mut records = Vec::new();
    for (index, (r, signed)) in (0u64..).zip(log.records.iter().zip(&log.signed)) {
        if migration_of(&r.event) != Some(migration) {
            continue;
        }
        if index >= head.size {
            return Err(BuildError::Unanchored { side });
        }
        if signed.body.len() > MAX_RECORD_BODY {
            return Err(BuildError::TooLarge {
                side,
                what: format!("a record of {} bytes", signed.body.len()),
            });
        }
        let proof = log
            .tree
            .inclusion_proof(index, head.size)
            .map_err(|_| BuildError::Unanchored { side })?;
        records.push(EvidenceRecord {
            index,
            body: signed.body.clone(),
            signature: signed.signature.clone(),
            proof,
        });
    }
    if records.len() > MAX_SIDE_RECORDS {
        return Err(BuildError::TooLarge {
            side,
            what: format!("{} records", records.len()),
        });
    }
    Ok(SideEvidence {
        chain: log.chain.clone(),
        log_created_at_unix: log.created_at_unix,
        records,
        head,
    })
}

/// A receipt found in a side, checked.
struct FoundReceipt {
    receipt: Receipt,
    signature: Vec<u8>,
    side: Side,
    record: usize,
}

struct Checker<'a> {
    bundle: &'a EvidenceBundle,
    verifier: &'a dyn TicketVerifier,
    verified: VerifiedTicket,
    digest: Digest,
}

impl<'a> Checker<'a> {
    /// Checks the ticket.
    fn new(
        bundle: &'a EvidenceBundle,
        verifier: &'a dyn TicketVerifier,
    ) -> Result<Self, EvidenceError> {
        // At its issue time: the ticket was valid when it was used, and has
        // most likely expired since.
        let (body, _): (Ticket, _) = postcard::take_from_bytes(&bundle.ticket.body)
            .map_err(|e| EvidenceError::Ticket(TicketError::Malformed(e.to_string())))?;
        let verified = bundle
            .ticket
            .verify(verifier, body.issued_at, 0)
            .map_err(EvidenceError::Ticket)?;
        if verified.ticket.id != bundle.migration {
            return Err(EvidenceError::TicketMigration {
                bundle: bundle.migration,
                ticket: verified.ticket.id,
            });
        }
        Ok(Checker {
            bundle,
            verifier,
            digest: ticket_digest(&bundle.ticket),
            verified,
        })
    }

    fn run(self) -> Result<BundleSummary, EvidenceError> {
        let mut receipts = Vec::new();
        let (source, source_logged) = self.side(Side::Source, &mut receipts)?;
        let (destination, destination_logged) = self.side(Side::Destination, &mut receipts)?;
        if !source_logged && !destination_logged {
            return Err(EvidenceError::TicketNotLogged);
        }
        let (memory_root, device, started) = self.across(&receipts, [&source, &destination])?;
        Ok(BundleSummary {
            migration: self.bundle.migration,
            ticket_digest: self.digest,
            ticket: self.verified,
            source,
            destination,
            started,
            memory_root,
            device,
        })
    }

    /// Checks one side; returns its summary and whether it logged the
    /// ticket.
    fn side(
        &self,
        side: Side,
        receipts: &mut Vec<FoundReceipt>,
    ) -> Result<(SideSummary, bool), EvidenceError> {
        let position = match side {
            Side::Source => 0,
            Side::Destination => 1,
        };
        let Some(ev) = self.bundle.sides.get(position) else {
            return Err(EvidenceError::MissingSide { side });
        };
        let chain_err = |why: String| EvidenceError::Chain { side, why };
        if ev.chain.is_empty()
            || ev.chain.len() > MAX_CHAIN_LEN
            || ev.chain.iter().any(|c| c.len() > MAX_CERT_LEN)
        {
            return Err(chain_err("chain out of bounds".into()));
        }
        let agent = self
            .verifier
            .verify_chain(&ev.chain, ev.log_created_at_unix)
            .map_err(chain_err)?;
        let expected = side.of(&self.verified.ticket);
        if &agent != expected {
            return Err(EvidenceError::WrongAgent {
                side,
                expected: expected.clone(),
                found: agent,
            });
        }
        let leaf = &ev.chain[0];
        let h = &ev.head;
        self.verifier
            .verify_signature(
                leaf,
                &head_message(h.size, &h.root, h.at_unix),
                &h.signature,
            )
            .map_err(|_| EvidenceError::TreeHead { side, size: h.size })?;
        if ev.records.is_empty() {
            return Err(EvidenceError::NoRecords { side });
        }
        let mut summary = SideSummary {
            agent,
            records: ev.records.len(),
            head: h.clone(),
            accepted: false,
            receipts: Vec::new(),
            outcomes: Vec::new(),
            refusals: Vec::new(),
            decisions: Vec::new(),
            phases: Vec::new(),
        };
        let mut logged = false;
        let mut previous = None;
        for (i, r) in ev.records.iter().enumerate() {
            let at = |problem| EvidenceError::Record {
                side,
                record: i,
                index: r.index,
                problem: Box::new(problem),
            };
            let record = self.record(leaf, h, r).map_err(at)?;
            match record.event {
                AuditEvent::Receipt(sr) => {
                    let receipt = self.receipt(&sr).map_err(at)?;
                    summary.receipts.push(receipt.kind);
                    receipts.push(FoundReceipt {
                        receipt,
                        signature: sr.signature,
                        side,
                        record: i,
                    });
                }
                AuditEvent::Ticket(t) => {
                    if ticket_digest(&t) != self.digest {
                        return Err(at(RecordProblem::OtherTicket));
                    }
                    logged = true;
                }
                AuditEvent::TicketAccepted {
                    vm,
                    operator,
                    peer,
                    role,
                    ..
                } => {
                    let t = &self.verified.ticket;
                    let other = match side {
                        Side::Source => &t.destination,
                        Side::Destination => &t.source,
                    };
                    let wrong = if role != side.to_string() {
                        Some(format!("accepted as {role}"))
                    } else if vm != t.vm {
                        Some(format!("VM {vm}, the ticket's is {}", t.vm))
                    } else if operator != self.verified.signer {
                        Some(format!(
                            "signed by {operator}, the ticket by {}",
                            self.verified.signer
                        ))
                    } else if &peer != other {
                        Some(format!("peer {peer}, the ticket's is {other}"))
                    } else {
                        None
                    };
                    if let Some(w) = wrong {
                        return Err(at(RecordProblem::Acceptance(w)));
                    }
                    summary.accepted = true;
                }
                AuditEvent::Outcome { outcome, .. } => summary.outcomes.push(outcome),
                AuditEvent::Phase { phase, .. } => summary.phases.push(phase),
                AuditEvent::Refused { reason, .. } => summary.refusals.push(reason),
                AuditEvent::Decision {
                    action,
                    permitted,
                    explanation,
                    ..
                } => summary.decisions.push(format!(
                    "{action} {}: {explanation}",
                    if permitted { "permitted" } else { "denied" }
                )),
                // `record` let nothing else through.
                AuditEvent::AgentStarted { .. }
                | AuditEvent::PolicyLoaded { .. }
                | AuditEvent::PolicyRejected { .. } => {}
            }
            if let Some(p) = previous.filter(|&p| r.index <= p) {
                return Err(at(RecordProblem::Order {
                    index: r.index,
                    previous: p,
                }));
            }
            previous = Some(r.index);
        }
        Ok((summary, logged))
    }

    /// Checks one record's signature, inclusion, sequence number and
    /// subject.
    fn record(
        &self,
        leaf: &[u8],
        head: &SignedTreeHead,
        r: &EvidenceRecord,
    ) -> Result<AuditRecord, RecordProblem> {
        self.verifier
            .verify_signature(leaf, &signed_message(RECORD_CONTEXT, &r.body), &r.signature)
            .map_err(|_| RecordProblem::Signature)?;
        verify_inclusion(&log_leaf(&r.body), r.index, head.size, &r.proof, &head.root)
            .map_err(RecordProblem::Inclusion)?;
        let (record, rest): (AuditRecord, _) = postcard::take_from_bytes(&r.body)
            .map_err(|e| RecordProblem::Undecodable(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RecordProblem::Undecodable("trailing bytes".into()));
        }
        if record.seq != r.index {
            return Err(RecordProblem::Seq { seq: record.seq });
        }
        match (&record.event, migration_of(&record.event)) {
            // A receipt of another migration gets its own, precise error.
            (AuditEvent::Receipt(_), _) => {}
            (_, Some(m)) if m == self.bundle.migration => {}
            (e, Some(m)) => {
                return Err(RecordProblem::Unrelated(format!(
                    "{} of migration {m}",
                    event_name(e)
                )))
            }
            (e, None) => return Err(RecordProblem::Unrelated(event_name(e).into())),
        }
        Ok(record)
    }

    /// Checks a receipt found in `side`'s log.
    fn receipt(&self, sr: &SignedReceipt) -> Result<Receipt, RecordProblem> {
        let v = sr.verify(self.verifier).map_err(RecordProblem::Receipt)?;
        let kind = v.receipt.kind;
        if v.receipt.migration != self.bundle.migration {
            return Err(RecordProblem::ForeignReceipt {
                kind,
                migration: v.receipt.migration,
            });
        }
        if v.receipt.ticket != self.digest {
            return Err(RecordProblem::ReceiptTicket {
                kind,
                named: v.receipt.ticket,
                expected: self.digest,
            });
        }
        let must = match kind {
            ReceiptKind::Sent => Side::Source,
            _ => Side::Destination,
        };
        let expected = must.of(&self.verified.ticket);
        if &v.signer != expected {
            return Err(RecordProblem::ReceiptSigner {
                kind,
                signer: v.signer,
                must,
                expected: expected.clone(),
            });
        }
        Ok(v.receipt)
    }

    /// Checks receipts across both sides: one signed object per kind, the
    /// receipts a started migration needs, and one attested state.
    fn across(
        &self,
        receipts: &[FoundReceipt],
        sides: [&SideSummary; 2],
    ) -> Result<(Option<Digest>, Option<Digest>, bool), EvidenceError> {
        let kinds = [
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started,
        ];
        let mut by_kind: [Option<&FoundReceipt>; 4] = [None; 4];
        for r in receipts {
            let Some(k) = kinds.iter().position(|k| *k == r.receipt.kind) else {
                continue;
            };
            match by_kind[k] {
                None => by_kind[k] = Some(r),
                Some(first) if first.signature == r.signature && first.receipt == r.receipt => {}
                Some(first) => {
                    return Err(EvidenceError::ConflictingReceipts {
                        kind: r.receipt.kind,
                        first: first.side,
                        first_record: first.record,
                        second: r.side,
                        second_record: r.record,
                    })
                }
            }
        }
        let [accepted, ready, sent, started] = by_kind.map(|r| r.map(|r| &r.receipt));
        let said_started = sides
            .iter()
            .flat_map(|s| &s.outcomes)
            .any(|o| o == "completed" || o == "started");
        let why = if started.is_some() {
            Some("started at the destination")
        } else if said_started {
            Some("completed according to a log")
        } else {
            None
        };
        if let Some(why) = why {
            for (kind, r) in [
                (ReceiptKind::Accepted, accepted),
                (ReceiptKind::Ready, ready),
                (ReceiptKind::Sent, sent),
                (ReceiptKind::Started, started),
            ] {
                if r.is_none() {
                    return Err(EvidenceError::MissingReceipt { kind, why });
                }
            }
        }
        if let Some(ready) = ready {
            for other in [sent, started].into_iter().flatten() {
                for (what, a, b) in [
                    ("memory root", ready.memory_root, other.memory_root),
                    ("device state", ready.device, other.device),
                ] {
                    if a != b {
                        return Err(EvidenceError::StateMismatch {
                            what,
                            ready: a,
                            other_kind: other.kind,
                            other: b,
                        });
                    }
                }
            }
        }
        let attested = ready.or(sent).or(started);
        Ok((
            attested.and_then(|r| r.memory_root),
            attested.and_then(|r| r.device),
            started.is_some(),
        ))
    }
}

fn show(d: &Option<Digest>) -> String {
    d.map_or_else(|| "nothing".into(), |d| d.to_string())
}

fn event_name(e: &AuditEvent) -> &'static str {
    match e {
        AuditEvent::AgentStarted { .. } => "agent start",
        AuditEvent::TicketAccepted { .. } => "ticket acceptance",
        AuditEvent::Refused { .. } => "refusal",
        AuditEvent::Receipt(_) => "receipt",
        AuditEvent::Outcome { .. } => "outcome",
        AuditEvent::Ticket(_) => "ticket",
        AuditEvent::Decision { .. } => "policy decision",
        AuditEvent::PolicyLoaded { .. } => "policy load",
        AuditEvent::PolicyRejected { .. } => "policy refusal",
        AuditEvent::Phase { .. } => "phase change",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{append, encode_entry, verify_log, LogEntry};
    use crate::fuzz::InsecureCrypto;
    use crate::logtree::LogTree;
    use crate::ticket::TicketSigner;

    const A: &str = "spiffe://t/agent/a";
    const B: &str = "spiffe://t/agent/b";
    const OP: &str = "spiffe://t/operator/alice";

    fn mid(n: u8) -> MigrationId {
        MigrationId([n; 16])
    }

    fn ticket_as(n: u8, signer: &str) -> SignedTicket {
        let t = Ticket {
            id: mid(n),
            vm: "vm".parse().unwrap(),
            source: A.parse().unwrap(),
            destination: B.parse().unwrap(),
            plan: crate::model::MigrationPlan {
                streams: 1,
                ..Default::default()
            },
            issued_at: 1000,
            expires_at: 1300,
            nonce: [n; 16],
        };
        SignedTicket::sign(&t, &InsecureCrypto(signer.into())).unwrap()
    }

    fn ticket(n: u8) -> SignedTicket {
        ticket_as(n, OP)
    }

    /// A receipt of `kind` for migration `n`, attesting memory root `root`.
    fn receipt(kind: ReceiptKind, signer: &str, n: u8, root: u8) -> SignedReceipt {
        let state =
            (kind != ReceiptKind::Accepted).then_some((Digest([root; 32]), Digest([9; 32])));
        let r = Receipt {
            kind,
            migration: mid(n),
            ticket: ticket_digest(&ticket(n)),
            memory_root: state.map(|s| s.0),
            device: state.map(|s| s.1),
            at_unix: 1010,
        };
        SignedReceipt::sign(&r, &InsecureCrypto(signer.into())).unwrap()
    }

    /// What each side logs of migration `n`, with the receipts given.
    fn events(side: Side, n: u8, receipts: &[SignedReceipt]) -> Vec<AuditEvent> {
        let (peer, outcome) = match side {
            Side::Source => (B, "completed"),
            Side::Destination => (A, "started"),
        };
        let mut v = vec![
            AuditEvent::TicketAccepted {
                migration: mid(n),
                vm: "vm".parse().unwrap(),
                operator: OP.parse().unwrap(),
                peer: peer.parse().unwrap(),
                role: side.to_string(),
            },
            AuditEvent::Ticket(ticket(n)),
        ];
        v.extend(receipts.iter().cloned().map(AuditEvent::Receipt));
        v.push(AuditEvent::Outcome {
            migration: mid(n),
            vm: "vm".parse().unwrap(),
            outcome: outcome.into(),
        });
        v
    }

    /// The four honest receipts of migration `n`.
    fn honest(n: u8) -> Vec<SignedReceipt> {
        vec![
            receipt(ReceiptKind::Accepted, B, n, 0),
            receipt(ReceiptKind::Ready, B, n, 7),
            receipt(ReceiptKind::Sent, A, n, 7),
            receipt(ReceiptKind::Started, B, n, 7),
        ]
    }

    /// A verified log of `agent` holding `events` after an agent start.
    fn log(agent: &str, events: Vec<AuditEvent>) -> VerifiedLog {
        let c = InsecureCrypto(agent.into());
        let mut bytes = encode_entry(&LogEntry::Header {
            chain: c.chain(),
            at_unix: 900,
        })
        .unwrap();
        let mut tree = LogTree::new();
        let start = AuditEvent::AgentStarted {
            version: "test".into(),
        };
        for (seq, e) in (0..).zip(std::iter::once(start).chain(events)) {
            for entry in append(&mut tree, seq, 1000 + seq, e, &c).unwrap() {
                bytes.extend(encode_entry(&entry).unwrap());
            }
        }
        verify_log(&bytes, &c).unwrap()
    }

    /// Both logs of migrations `ns`, each with its honest receipts.
    fn logs(ns: &[u8]) -> Vec<VerifiedLog> {
        let of = |side| {
            ns.iter()
                .flat_map(|&n| events(side, n, &honest(n)))
                .collect()
        };
        vec![log(A, of(Side::Source)), log(B, of(Side::Destination))]
    }

    fn check(b: &EvidenceBundle) -> Result<BundleSummary, EvidenceError> {
        check_bundle(&b.encode().unwrap(), &InsecureCrypto("unused".into()))
    }

    /// The problem with record `record` of `side`, or a panic.
    fn problem(
        r: Result<BundleSummary, EvidenceError>,
        side: Side,
        record: usize,
    ) -> RecordProblem {
        match r {
            Err(EvidenceError::Record {
                side: s,
                record: i,
                problem,
                ..
            }) if s == side && i == record => *problem,
            other => panic!("expected a problem in {side} record {record}: {other:?}"),
        }
    }

    /// Position of the record of `kind` in a side's evidence.
    fn position(ev: &SideEvidence, kind: ReceiptKind) -> usize {
        ev.records
            .iter()
            .position(|r| {
                let rec: AuditRecord = postcard::from_bytes(&r.body).unwrap();
                matches!(rec.event, AuditEvent::Receipt(ref s)
                    if postcard::from_bytes::<Receipt>(&s.body).unwrap().kind == kind)
            })
            .unwrap()
    }

    #[test]
    fn a_bundle_from_both_logs_verifies_offline() {
        let logs = logs(&[1, 2]);
        let b = build_bundle(mid(2), &logs).unwrap();
        let bytes = b.encode().unwrap();
        assert_eq!(EvidenceBundle::decode(&bytes).unwrap(), b);
        let s = check(&b).unwrap();
        assert_eq!(s.migration, mid(2));
        assert_eq!(s.ticket.signer.to_string(), OP);
        assert_eq!(s.ticket_digest, ticket_digest(&ticket(2)));
        assert_eq!(s.source.agent.to_string(), A);
        assert_eq!(s.destination.agent.to_string(), B);
        // Acceptance, ticket, four receipts, outcome; migration 1 left out.
        assert_eq!((s.source.records, s.destination.records), (7, 7));
        assert!(s.source.accepted && s.destination.accepted);
        assert_eq!(s.source.outcomes, ["completed"]);
        assert_eq!(s.destination.receipts.len(), 4);
        assert!(s.started);
        assert_eq!(s.memory_root, Some(Digest([7; 32])));
        assert_eq!(s.source.head.size, 15, "agent start and two migrations");
        // Other agents' logs are ignored.
        let mut more = logs.clone();
        more.push(log("spiffe://t/agent/c", vec![]));
        assert_eq!(build_bundle(mid(2), &more).unwrap(), b);
    }

    #[test]
    fn a_receipt_swapped_in_from_another_migration_is_refused() {
        let logs = logs(&[1, 2]);
        let other = build_bundle(mid(2), &logs).unwrap();
        let mut b = build_bundle(mid(1), &logs).unwrap();
        // Validly signed, validly proven in the same log: but migration 2's.
        let at = position(&b.sides[1], ReceiptKind::Ready);
        b.sides[1].records[at] = other.sides[1].records[at].clone();
        assert_eq!(
            problem(check(&b), Side::Destination, at),
            RecordProblem::ForeignReceipt {
                kind: ReceiptKind::Ready,
                migration: mid(2)
            }
        );
    }

    #[test]
    fn a_replaced_ready_receipt_is_refused() {
        // The destination's log holds another Ready than the one the
        // source received and signed Sent for.
        let mut forged = honest(1);
        forged[1] = receipt(ReceiptKind::Ready, B, 1, 8);
        let logs = vec![
            log(A, events(Side::Source, 1, &honest(1))),
            log(B, events(Side::Destination, 1, &forged)),
        ];
        let b = build_bundle(mid(1), &logs).unwrap();
        assert!(matches!(
            check(&b),
            Err(EvidenceError::ConflictingReceipts {
                kind: ReceiptKind::Ready,
                first: Side::Source,
                second: Side::Destination,
                ..
            })
        ));
        // Both logs hold the other Ready: it does not attest what Sent does.
        let logs = vec![
            log(A, events(Side::Source, 1, &forged)),
            log(B, events(Side::Destination, 1, &forged)),
        ];
        let e = check(&build_bundle(mid(1), &logs).unwrap()).unwrap_err();
        assert_eq!(
            e,
            EvidenceError::StateMismatch {
                what: "memory root",
                ready: Some(Digest([8; 32])),
                other_kind: ReceiptKind::Sent,
                other: Some(Digest([7; 32])),
            }
        );
        assert!(e.to_string().contains("Ready receipt attests 0808"), "{e}");
    }

    #[test]
    fn a_receipt_signed_by_the_wrong_side_is_refused() {
        let mut r = honest(1);
        r[2] = receipt(ReceiptKind::Sent, B, 1, 7);
        let logs = vec![
            log(A, events(Side::Source, 1, &r)),
            log(B, events(Side::Destination, 1, &r)),
        ];
        let b = build_bundle(mid(1), &logs).unwrap();
        let at = position(&b.sides[0], ReceiptKind::Sent);
        assert!(matches!(
            problem(check(&b), Side::Source, at),
            RecordProblem::ReceiptSigner {
                kind: ReceiptKind::Sent,
                must: Side::Source,
                ..
            }
        ));
    }

    #[test]
    fn an_edited_record_a_wrong_proof_and_a_forged_head_are_refused() {
        let good = build_bundle(mid(1), &logs(&[1])).unwrap();
        let mut edited = good.clone();
        let body = &mut edited.sides[0].records[2].body;
        let n = body.len();
        body[n - 3] ^= 1;
        assert_eq!(
            problem(check(&edited), Side::Source, 2),
            RecordProblem::Signature
        );

        let mut wrong = good.clone();
        wrong.sides[1].records[1].proof[0].0[0] ^= 1;
        assert_eq!(
            problem(check(&wrong), Side::Destination, 1),
            RecordProblem::Inclusion(ProofError::Mismatch)
        );
        let mut cut = good.clone();
        cut.sides[1].records[1].proof.pop();
        assert_eq!(
            problem(check(&cut), Side::Destination, 1),
            RecordProblem::Inclusion(ProofError::Length)
        );
        let mut moved = good.clone();
        moved.sides[1].records[1].index += 1;
        assert!(matches!(
            problem(check(&moved), Side::Destination, 1),
            RecordProblem::Inclusion(_)
        ));

        let mut forged = good.clone();
        forged.sides[0].head.root.0[0] ^= 1;
        assert_eq!(
            check(&forged),
            Err(EvidenceError::TreeHead {
                side: Side::Source,
                size: good.sides[0].head.size
            })
        );
        let mut shrunk = good.clone();
        shrunk.sides[1].head.size -= 1;
        assert!(matches!(
            check(&shrunk),
            Err(EvidenceError::TreeHead {
                side: Side::Destination,
                ..
            })
        ));
    }

    #[test]
    fn a_missing_or_wrong_side_is_refused() {
        let good = build_bundle(mid(1), &logs(&[1])).unwrap();
        let mut one = good.clone();
        one.sides.truncate(1);
        assert_eq!(
            check(&one),
            Err(EvidenceError::MissingSide {
                side: Side::Destination
            })
        );
        let mut twice = good.clone();
        twice.sides[1] = twice.sides[0].clone();
        let e = check(&twice).unwrap_err();
        assert!(
            matches!(&e, EvidenceError::WrongAgent { side: Side::Destination, found, .. } if found.to_string() == A),
            "{e}"
        );
        let mut empty = good.clone();
        empty.sides[0].records.clear();
        assert_eq!(
            check(&empty),
            Err(EvidenceError::NoRecords { side: Side::Source })
        );
        // Records dropped from both sides: a started VM needs its Sent.
        let mut dropped = good.clone();
        for s in &mut dropped.sides {
            let at = position(s, ReceiptKind::Sent);
            s.records.remove(at);
        }
        assert_eq!(
            check(&dropped),
            Err(EvidenceError::MissingReceipt {
                kind: ReceiptKind::Sent,
                why: "started at the destination"
            })
        );
        assert!(matches!(
            build_bundle(mid(1), &logs(&[1])[..1]),
            Err(BuildError::MissingLog {
                side: Side::Destination,
                ..
            })
        ));
    }

    #[test]
    fn the_ticket_must_be_the_operators_for_this_migration_and_in_a_log() {
        let logs = logs(&[1, 2]);
        let good = build_bundle(mid(1), &logs).unwrap();
        let mut other = good.clone();
        other.ticket = ticket(2);
        assert_eq!(
            check(&other),
            Err(EvidenceError::TicketMigration {
                bundle: mid(1),
                ticket: mid(2)
            })
        );
        let mut agent = good.clone();
        agent.ticket = ticket_as(1, A);
        assert!(matches!(
            check(&agent),
            Err(EvidenceError::Ticket(TicketError::NotAnOperator(_)))
        ));
        let mut unlogged = good.clone();
        for s in &mut unlogged.sides {
            s.records.remove(1);
        }
        assert_eq!(check(&unlogged), Err(EvidenceError::TicketNotLogged));
        // The ticket is needed whole: logs without it cannot prove.
        let old: Vec<VerifiedLog> = [(A, Side::Source), (B, Side::Destination)]
            .into_iter()
            .map(|(agent, side)| {
                let mut e = events(side, 1, &honest(1));
                e.remove(1);
                log(agent, e)
            })
            .collect();
        assert_eq!(
            build_bundle(mid(1), &old),
            Err(BuildError::NoTicket(mid(1)))
        );
    }

    #[test]
    fn bounds_magic_version_and_trailing_bytes_are_checked_before_decoding() {
        let good = build_bundle(mid(1), &logs(&[1])).unwrap();
        let bytes = good.encode().unwrap();
        let v = InsecureCrypto("unused".into());
        let big = vec![0u8; MAX_BUNDLE_LEN + 1];
        assert!(matches!(
            check_bundle(&big, &v),
            Err(EvidenceError::TooLarge { .. })
        ));
        assert_eq!(check_bundle(b"CVY", &v), Err(EvidenceError::Magic));
        let mut version = bytes.clone();
        version[9] = 2;
        assert_eq!(check_bundle(&version, &v), Err(EvidenceError::Version(2)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            check_bundle(&trailing, &v),
            Err(EvidenceError::Malformed(_))
        ));
        assert!(matches!(
            check_bundle(&bytes[..bytes.len() - 1], &v),
            Err(EvidenceError::Malformed(_))
        ));
        // A side announcing more records than allowed is refused on the
        // count, before anything is read or allocated for them.
        let mut many = good.clone();
        let r = many.sides[0].records[0].clone();
        many.sides[0].records = vec![r; MAX_SIDE_RECORDS + 1];
        let mut bytes = BUNDLE_MAGIC.to_vec();
        bytes.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
        bytes.extend(postcard::to_stdvec(&many).unwrap());
        assert_eq!(
            check_bundle(&bytes, &v),
            Err(EvidenceError::Limit {
                what: "records in one side",
                max: MAX_SIDE_RECORDS
            })
        );
        // A record from outside the migration is refused too.
        let logs = logs(&[1]);
        let mut extra = good.clone();
        let start = &logs[0].signed[0];
        extra.sides[0].records.insert(
            0,
            EvidenceRecord {
                index: 0,
                body: start.body.clone(),
                signature: start.signature.clone(),
                proof: logs[0]
                    .tree
                    .inclusion_proof(0, good.sides[0].head.size)
                    .unwrap(),
            },
        );
        assert!(matches!(
            problem(check(&extra), Side::Source, 0),
            RecordProblem::Unrelated(_)
        ));
    }
}
