//! The tamper-evident audit log format, and its offline verification.
//!
//! An agent's log is a file of length-prefixed frames (the same framing as
//! the wire, [`crate::frame`]), each a postcard [`LogEntry`]:
//!
//! 1. one `Header` with the agent's certificate chain;
//! 2. then, per event, a `Record` — an [`AuditRecord`] (sequence number,
//!    time, event) signed by the agent — followed by a `TreeHead`: the size
//!    and RFC 9162 root ([`crate::logtree`]) of the log so far, signed too.
//!
//! [`verify_log`] checks everything a reader can check alone: the chain, each
//! signature, sequence numbers without gaps, and that every tree head matches
//! the records before it. An edited, deleted, inserted or reordered record,
//! or a cut in the middle of a frame, is reported with the entry index and
//! byte offset where it was found. Removing whole trailing entries leaves a
//! shorter valid log — no append-only log can detect that alone — so the
//! verifier returns the last signed tree head, to compare with one held
//! elsewhere (an evidence bundle, another agent, the operator).
//!
//! # A torn tail
//!
//! An append is one write of a record and its tree head, then one fsync;
//! the step it records goes on only after the fsync. A crash (a kill, a
//! power cut) between the two can leave any prefix of those bytes after
//! the last tree head: a *torn tail*. [`recover_log`] tells it apart from
//! any other damage ([`tail`] says exactly what it accepts) and returns
//! where to cut the file back to the last tree head; [`verify_log`]
//! refuses it ([`LogFault::TornTail`]): a torn log is not a verified log
//! until the agent has cut it and recorded the cut
//! ([`AuditEvent::TornTailCut`]). Nothing a tree head has signed is ever
//! cut: the cut starts at the end of the last verifying head, and bytes
//! after it that hide a verifying head of a later size are corruption.
//!
//! ```text
//! header | record 0 | head 1 | record 1 | head 2 | rec…      <- torn tail
//!                                               ^ cut here (TornTail::offset)
//! ```
//!
//! Records and tree heads are signed statements like tickets and receipts,
//! each kind under its own context ([`RECORD_CONTEXT`], [`HEAD_CONTEXT`]),
//! but not in the [`crate::signed::Signed`] envelope: the log names its
//! signer once, in the header, and a tree head signs a fixed layout, not a
//! postcard body. They share the envelope's context, signing and checking
//! ([`crate::signed::sign_body`], [`crate::signed::verify_in_context`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod tail;

use crate::digest::Digest;
use crate::frame::{split_frame, FrameError};
use crate::logtree::{log_leaf, LogTree};
use crate::names::{MigrationId, SpiffeId, VmName};
use crate::receipt::SignedReceipt;
use crate::signed::{
    chain_in_bounds, sign_body, sign_in_context, verify_in_context, ChainError, ChainVerifier,
    SignError, Signable, SignatureError, Signer,
};
use crate::ticket::SignedTicket;

/// Signatures over records cover this prefix, then the record body.
pub const RECORD_CONTEXT: &[u8] = b"convoy audit record v1\0";
/// Signatures over tree heads cover this prefix, then size ‖ root ‖ time.
pub const HEAD_CONTEXT: &[u8] = b"convoy audit tree head v1\0";

/// Something an agent did or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuditEvent {
    /// The agent started; its log continues.
    AgentStarted {
        /// Crate version.
        version: String,
    },
    /// A ticket was accepted (as source or destination).
    TicketAccepted {
        /// Migration.
        migration: MigrationId,
        /// VM.
        vm: VmName,
        /// The operator who signed it.
        operator: SpiffeId,
        /// The peer agent.
        peer: SpiffeId,
        /// `source` or `destination`.
        role: String,
    },
    /// A request or proposal was refused.
    Refused {
        /// Migration, when known.
        migration: Option<MigrationId>,
        /// Who asked.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A receipt was signed or received.
    Receipt(SignedReceipt),
    /// A migration ended, as this agent saw it.
    Outcome {
        /// Migration.
        migration: MigrationId,
        /// VM.
        vm: VmName,
        /// `completed`, `aborted: …`, `in doubt: …`, `started`, `failed: …`.
        outcome: String,
    },
    /// The operator's signed ticket, whole, recorded right after the
    /// `TicketAccepted` record that accepted it, so that an evidence bundle
    /// ([`crate::evidence`]) can carry it with an inclusion proof. Appended
    /// after the first log format: older logs simply lack it, and their
    /// records still decode (postcard numbers variants in order).
    Ticket(SignedTicket),
    /// A policy decision, permit or deny.
    Decision {
        /// Migration, when the request was one.
        migration: Option<MigrationId>,
        /// Cedar action.
        action: String,
        /// Who asked.
        principal: String,
        /// On what.
        resource: String,
        /// Permitted?
        permitted: bool,
        /// The deciding policies, and any evaluation error.
        explanation: String,
    },
    /// A policy was loaded (at start or reload).
    PolicyLoaded {
        /// Digest of the policy and inventory files.
        digest: String,
        /// Number of policies.
        policies: u32,
    },
    /// A policy reload was refused; the previous policy stays.
    PolicyRejected {
        /// Why.
        reason: String,
    },
    /// A migration changed phase on this agent. Recorded when the
    /// migration ends, in order, with the time since it started here, so
    /// that no fsync falls inside the VM's downtime.
    Phase {
        /// Migration.
        migration: MigrationId,
        /// VM.
        vm: VmName,
        /// What happened (`paused for the final copy`, `handed over`, …).
        phase: String,
        /// Milliseconds since the migration started on this agent.
        after_ms: u64,
    },
    /// At start, the agent cut a torn last append off its log (a crash in
    /// the middle of a write; see the module docs) and kept the bytes in a
    /// file next to the log. Appended after the other variants: older logs
    /// lack it, and their records still decode.
    TornTailCut {
        /// The log's length after the cut: where the torn bytes began.
        offset: u64,
        /// How many bytes were cut.
        bytes: u64,
        /// [`torn_digest`] (plain BLAKE3, as `b3sum` prints it) of the cut
        /// bytes.
        digest: Digest,
    },
    /// At start-up, the agent's journal held this migration unfinished
    /// (in progress when the agent stopped, or in doubt): it is kept for
    /// whoever resolves it. Appended after the first log format.
    Unfinished {
        /// Migration.
        migration: MigrationId,
        /// VM.
        vm: VmName,
        /// `source` or `destination`.
        role: String,
        /// The last decision recorded (`claimed`, `committed`, …).
        phase: String,
        /// The ownership epoch recorded (see `crate::journal`).
        epoch: u64,
    },
    /// At start, what the agent found of a VM its registry held (or of
    /// one it left behind in its runtime directory) and what it did:
    /// re-attached, lost, discarded, cleaned up.
    VmAtStart {
        /// The VM.
        vm: VmName,
        /// What was found and done.
        outcome: String,
    },
    /// A migration left unfinished was resolved, or looked at and left
    /// undecided (`crate::indoubt`): at start, after a lost link, by
    /// `convoyctl recover`, or by an inquiry from the other side. The
    /// statement the decision rests on is kept, so that anyone can check
    /// offline that a resume followed the destination's signed fence.
    Resolution {
        /// Migration.
        migration: MigrationId,
        /// VM.
        vm: VmName,
        /// `source` or `destination`.
        role: String,
        /// What was decided (`resumed here`, `stays paused`, …).
        decision: String,
        /// Why.
        reason: String,
        /// The operator who asked (`convoyctl recover`), if one did.
        operator: Option<String>,
        /// The destination's signed statement, when one was received
        /// (source) or given (destination).
        statement: Option<crate::indoubt::SignedStatement>,
    },
    /// A snapshot was pushed, pulled (restored here), deleted, or this
    /// agent's sealing key enrolled, at the operator's request. Appended
    /// after the first log format.
    Snapshot {
        /// `push`, `pull`, `delete`, `enroll`.
        operation: String,
        /// The operator who asked.
        operator: String,
        /// The URL (never with credentials: URLs carrying any are refused).
        url: String,
        /// The VM, when there is one.
        vm: Option<VmName>,
        /// The manifest object (or, for `enroll`, the statement's object).
        object: String,
        /// The manifest's digest (or the sealing key's id).
        digest: Digest,
    },
}

/// The digest recorded for cut bytes ([`AuditEvent::TornTailCut`]): plain
/// BLAKE3, so that `b3sum` of the kept copy shows the same value.
pub fn torn_digest(bytes: &[u8]) -> Digest {
    Digest(*blake3::hash(bytes).as_bytes())
}

/// One signed entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    /// What happened.
    pub event: AuditEvent,
}

impl Signable for AuditRecord {
    const CONTEXT: &'static [u8] = RECORD_CONTEXT;
    /// Records are not sent in an envelope; a log's frames bound them.
    const MAX_BODY: usize = crate::frame::MAX_FRAME_LEN;
}

/// Checks a record's `signature` over its `body` by the log's `leaf`.
pub(crate) fn verify_record(
    verifier: &dyn ChainVerifier,
    leaf: &[u8],
    body: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    verify_in_context(verifier, leaf, RECORD_CONTEXT, body, signature)
}

/// A frame of the log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LogEntry {
    /// First entry: the agent's certificate chain (DER, leaf first), and
    /// when the log was created (the chain must be valid then).
    Header {
        /// Chain.
        chain: Vec<Vec<u8>>,
        /// Seconds since the Unix epoch.
        at_unix: u64,
    },
    /// A record: postcard [`AuditRecord`] and its signature.
    Record {
        /// Body.
        body: Vec<u8>,
        /// Ed25519 over [`RECORD_CONTEXT`] ‖ body.
        signature: Vec<u8>,
    },
    /// The log's size and root after the records before it.
    TreeHead(SignedTreeHead),
}

/// A signed (size, root, time) of a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    /// Records in the log.
    pub size: u64,
    /// RFC 9162 root over their leaves.
    pub root: Digest,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    /// Ed25519 over [`HEAD_CONTEXT`] ‖ size ‖ root ‖ time.
    pub signature: Vec<u8>,
}

/// What a tree head's signature covers after [`HEAD_CONTEXT`]:
/// size ‖ root ‖ time, big-endian.
pub(crate) fn head_body(size: u64, root: &Digest, at: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(root.as_bytes());
    b.extend_from_slice(&at.to_be_bytes());
    b
}

impl SignedTreeHead {
    /// Signs (size, root, time).
    pub fn sign(
        size: u64,
        root: Digest,
        at_unix: u64,
        signer: &dyn Signer,
    ) -> Result<Self, SignError> {
        let signature = sign_in_context(signer, HEAD_CONTEXT, &head_body(size, &root, at_unix))?;
        Ok(SignedTreeHead {
            size,
            root,
            at_unix,
            signature,
        })
    }

    /// Checks the signature by the log's `leaf`.
    pub fn verify(&self, verifier: &dyn ChainVerifier, leaf: &[u8]) -> Result<(), SignatureError> {
        verify_in_context(
            verifier,
            leaf,
            HEAD_CONTEXT,
            &head_body(self.size, &self.root, self.at_unix),
            &self.signature,
        )
    }
}

/// Why a log does not verify, and where.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("audit log entry {entry} (byte {offset}): {what}")]
pub struct AuditError {
    /// Index of the entry (0 = header).
    pub entry: usize,
    /// Byte offset of the entry in the file.
    pub offset: usize,
    /// What is wrong.
    pub what: LogFault,
}

/// What is wrong with an entry of an audit log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LogFault {
    /// The file ends inside an entry.
    #[error("truncated inside an entry")]
    Truncated,
    /// The entry's frame is bad.
    #[error(transparent)]
    Frame(FrameError),
    /// The entry does not decode.
    #[error("undecodable entry: {0}")]
    Entry(#[source] postcard::Error),
    /// The header's certificate chain is out of bounds.
    #[error("bad certificate chain")]
    ChainOutOfBounds,
    /// The header's certificate chain is refused (boxed: a chain error
    /// is large and rare).
    #[error("header chain: {0}")]
    HeaderChain(#[source] Box<ChainError>),
    /// A header after the first entry.
    #[error("second header")]
    SecondHeader,
    /// The first entry is no header.
    #[error("log does not start with a header")]
    NoHeader,
    /// A record's signature does not verify.
    #[error("record signature invalid (edited?)")]
    RecordSignature(#[source] SignatureError),
    /// A record's body does not decode.
    #[error("undecodable record: {0}")]
    Record(#[source] postcard::Error),
    /// A record out of sequence.
    #[error("record {seq} where {expected} was expected (deleted, inserted or reordered)")]
    Sequence {
        /// The record's number.
        seq: u64,
        /// The number expected.
        expected: u64,
    },
    /// A tree head over another number of records than precede it.
    #[error("tree head of size {size} after {records} records")]
    HeadSize {
        /// The head's size.
        size: u64,
        /// Records before it.
        records: u64,
    },
    /// A tree head whose root is not the records'.
    #[error("tree head root does not match the records")]
    HeadRoot,
    /// A tree head's signature does not verify.
    #[error("tree head signature invalid")]
    HeadSignature(#[source] SignatureError),
    /// No entry at all.
    #[error("empty log")]
    Empty,
    /// A torn last append: bytes after the last tree head that a crash in
    /// the middle of a write leaves ([`recover_log`] says where to cut).
    /// A reader of a running agent's file can see the same while an
    /// append is in progress: a read does not wait for a write.
    #[error(
        "torn last append: {len} bytes after the last tree head, left by a crash in the middle \
         of a write (the agent cuts them at its next start and records the cut), or an append \
         still in progress as the file was read"
    )]
    TornTail {
        /// Bytes from the end of the last tree head to the end of the file.
        len: usize,
    },
    /// A second entry after a record whose tree head is missing: one
    /// append writes one record, then its head, so this is no torn tail.
    #[error("another entry after a record whose tree head is missing (not a torn append)")]
    UnanchoredRecord,
    /// The file ends inside an entry that cannot be the rest of an append.
    #[error("the file ends inside an entry that is not the next append: {0}")]
    Partial(#[source] tail::PartialFault),
    /// The bytes after the last verifying tree head hold a tree head,
    /// signed by the log's key, of a later size: verified history, hidden
    /// by damage before it, that a cut would drop.
    #[error(
        "a signed tree head of size {size} at byte {at} lies after the damage: \
         history after it would be lost, so this is no torn tail"
    )]
    HiddenHead {
        /// Its byte offset in the file.
        at: usize,
        /// Its size.
        size: u64,
    },
}

/// Why an entry cannot be encoded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EntryEncodeError {
    /// Postcard failed.
    #[error("{0}")]
    Postcard(#[from] postcard::Error),
    /// Too long for a frame.
    #[error("{0}")]
    Frame(#[from] crate::frame::FrameError),
}

/// Encodes one entry as a frame.
pub fn encode_entry(e: &LogEntry) -> Result<Vec<u8>, EntryEncodeError> {
    let body = postcard::to_stdvec(e)?;
    let prefix = crate::frame::prefix_for(body.len())?;
    let mut out = prefix.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// The entries that append `event` as record `seq` to a log whose leaves
/// are `tree`: the signed record and the signed tree head after it.
pub fn append(
    tree: &mut LogTree,
    seq: u64,
    at_unix: u64,
    event: AuditEvent,
    signer: &dyn Signer,
) -> Result<[LogEntry; 2], SignError> {
    let record = AuditRecord {
        seq,
        at_unix,
        event,
    };
    let (body, signature) = sign_body(&record, signer)?;
    tree.push(log_leaf(&body));
    let head = SignedTreeHead::sign(tree.len(), tree.root(), at_unix, signer)?;
    Ok([
        LogEntry::Record { body, signature },
        LogEntry::TreeHead(head),
    ])
}

/// A record as it is in the log: its signed body and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// Postcard [`AuditRecord`], as signed.
    pub body: Vec<u8>,
    /// Ed25519 over [`RECORD_CONTEXT`] ‖ body.
    pub signature: Vec<u8>,
}

/// What a valid log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLog {
    /// The agent whose log it is.
    pub agent: SpiffeId,
    /// The header's certificate chain (DER, leaf first).
    pub chain: Vec<Vec<u8>>,
    /// When the log was created (the header's time, at which the chain
    /// was verified).
    pub created_at_unix: u64,
    /// Every record, in order (each under a tree head).
    pub records: Vec<AuditRecord>,
    /// Every record as signed, in the same order as `records` (record `i`
    /// is leaf `i` of `tree`).
    pub signed: Vec<SignedRecord>,
    /// The last signed tree head, if any.
    pub last_head: Option<SignedTreeHead>,
    /// The log tree over every record, to append to.
    pub tree: LogTree,
}

/// A log as read back after a crash ([`recover_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredLog {
    /// Everything up to the end of the last tree head (or of the header),
    /// verified.
    pub log: VerifiedLog,
    /// The torn last append after it, to cut off.
    pub torn: Option<TornTail>,
}

/// Bytes after the last tree head that a crash in the middle of one append
/// leaves ([`tail`] says what qualifies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Where the torn append begins: the end of the last tree head, or of
    /// the header. The file is cut back to this length.
    pub offset: usize,
    /// Index of the entry the append began.
    pub entry: usize,
    /// Bytes from `offset` to the end of the file.
    pub len: usize,
    /// Whether the append's record is whole (and verifies), only its tree
    /// head missing or cut short.
    pub whole_record: bool,
}

/// Where an entry starts: its index and byte offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) entry: usize,
    pub(crate) offset: usize,
}

impl Position {
    pub(crate) fn fault(self, what: LogFault) -> AuditError {
        AuditError {
            entry: self.entry,
            offset: self.offset,
            what,
        }
    }
}

/// The state of a log read entry by entry.
#[derive(Default)]
struct Walk {
    /// The owner and its leaf certificate, once the header verified.
    agent: Option<(SpiffeId, Vec<u8>)>,
    header: (Vec<Vec<u8>>, u64),
    tree: LogTree,
    records: Vec<AuditRecord>,
    signed: Vec<SignedRecord>,
    last_head: Option<SignedTreeHead>,
    /// Where the entry after the last tree head (or the header) starts.
    anchor: Position,
}

impl Walk {
    /// Verifies entries until the end or the first that fails: a frame
    /// cut short gives [`LogFault::Truncated`].
    fn run(bytes: &[u8], verifier: &dyn ChainVerifier) -> (Walk, Result<(), AuditError>) {
        let mut w = Walk::default();
        let mut at = Position {
            entry: 0,
            offset: 0,
        };
        while at.offset < bytes.len() {
            let (frame, used) = match split_frame(&bytes[at.offset..]) {
                Ok(Some(f)) => f,
                Ok(None) => return (w, Err(at.fault(LogFault::Truncated))),
                Err(e) => return (w, Err(at.fault(LogFault::Frame(e)))),
            };
            let step = postcard::from_bytes(frame)
                .map_err(LogFault::Entry)
                .and_then(|e| w.entry(e, verifier));
            if let Err(what) = step {
                return (w, Err(at.fault(what)));
            }
            at.offset += used;
            at.entry += 1;
            if w.agent.is_some() && w.records.len() as u64 == w.anchored() {
                w.anchor = at;
            }
        }
        (w, Ok(()))
    }

    /// Records under the last tree head.
    fn anchored(&self) -> u64 {
        self.last_head.as_ref().map_or(0, |h| h.size)
    }

    fn entry(&mut self, e: LogEntry, verifier: &dyn ChainVerifier) -> Result<(), LogFault> {
        let Some((_, leaf)) = &self.agent else {
            return match e {
                LogEntry::Header { chain, at_unix } => self.header(chain, at_unix, verifier),
                _ => Err(LogFault::NoHeader),
            };
        };
        match e {
            LogEntry::Header { .. } => return Err(LogFault::SecondHeader),
            LogEntry::Record { body, signature } => {
                let r = check_record(verifier, leaf, &body, &signature, self.tree.len())?;
                self.tree.push(log_leaf(&body));
                self.records.push(r);
                self.signed.push(SignedRecord { body, signature });
            }
            LogEntry::TreeHead(h) => {
                if h.size != self.tree.len() {
                    return Err(LogFault::HeadSize {
                        size: h.size,
                        records: self.tree.len(),
                    });
                }
                if h.root != self.tree.root() {
                    return Err(LogFault::HeadRoot);
                }
                h.verify(verifier, leaf).map_err(LogFault::HeadSignature)?;
                self.last_head = Some(h);
            }
        }
        Ok(())
    }

    fn header(
        &mut self,
        chain: Vec<Vec<u8>>,
        at_unix: u64,
        verifier: &dyn ChainVerifier,
    ) -> Result<(), LogFault> {
        if !chain_in_bounds(&chain) {
            return Err(LogFault::ChainOutOfBounds);
        }
        let id = verifier
            .verify_chain(&chain, at_unix)
            .map_err(|e| LogFault::HeaderChain(Box::new(e)))?;
        self.agent = Some((id, chain[0].clone()));
        self.header = (chain, at_unix);
        Ok(())
    }

    /// The log up to its last tree head: a record after it (its head torn
    /// off) is dropped.
    fn into_log(mut self, agent: SpiffeId) -> VerifiedLog {
        let n = crate::page::saturating_usize(self.anchored());
        if self.records.len() > n {
            self.records.truncate(n);
            self.signed.truncate(n);
            self.tree = LogTree::from_leaves(self.tree.leaves()[..n].to_vec());
        }
        VerifiedLog {
            agent,
            chain: self.header.0,
            created_at_unix: self.header.1,
            records: self.records,
            signed: self.signed,
            last_head: self.last_head,
            tree: self.tree,
        }
    }
}

/// Checks a record's signature by `leaf` and that it is record `seq`.
pub(crate) fn check_record(
    verifier: &dyn ChainVerifier,
    leaf: &[u8],
    body: &[u8],
    signature: &[u8],
    seq: u64,
) -> Result<AuditRecord, LogFault> {
    verify_record(verifier, leaf, body, signature).map_err(LogFault::RecordSignature)?;
    let r: AuditRecord = postcard::from_bytes(body).map_err(LogFault::Record)?;
    if r.seq != seq {
        return Err(LogFault::Sequence {
            seq: r.seq,
            expected: seq,
        });
    }
    Ok(r)
}

/// Reads a log that may end in a torn append (see the module docs): the
/// log up to its last tree head, verified, and the torn bytes after it, if
/// any. Any other damage is an error naming the entry and byte.
pub fn recover_log(bytes: &[u8], verifier: &dyn ChainVerifier) -> Result<RecoveredLog, AuditError> {
    let (walk, end) = Walk::run(bytes, verifier);
    let Some((agent, leaf)) = walk.agent.clone() else {
        // No header to cut back to. The agent writes a new log's header
        // before the file gets its name, so no crash leaves a torn one.
        return Err(end.err().unwrap_or(AuditError {
            entry: 0,
            offset: 0,
            what: LogFault::Empty,
        }));
    };
    match end {
        // A whole entry that does not verify is never a torn write.
        Err(e) if e.what != LogFault::Truncated => return Err(e),
        _ if walk.anchor.offset == bytes.len() => {
            return Ok(RecoveredLog {
                log: walk.into_log(agent),
                torn: None,
            })
        }
        _ => {}
    }
    let tail = tail::Tail {
        bytes: &bytes[walk.anchor.offset..],
        at: walk.anchor,
        seq: walk.anchored(),
        tree: LogTree::from_leaves(
            walk.tree.leaves()[..crate::page::saturating_usize(walk.anchored())].to_vec(),
        ),
        leaf: &leaf,
    };
    let torn = tail.check(verifier)?;
    Ok(RecoveredLog {
        log: walk.into_log(agent),
        torn: Some(torn),
    })
}

/// Verifies a whole log file (see the module docs). A torn tail is an
/// error here ([`LogFault::TornTail`], at the entry and byte where it
/// begins); [`recover_log`] accepts it.
pub fn verify_log(bytes: &[u8], verifier: &dyn ChainVerifier) -> Result<VerifiedLog, AuditError> {
    let r = recover_log(bytes, verifier)?;
    match r.torn {
        None => Ok(r.log),
        Some(t) => Err(AuditError {
            entry: t.entry,
            offset: t.offset,
            what: LogFault::TornTail { len: t.len },
        }),
    }
}

/// Byte offsets of each entry of a log (for tests and tools that cut or
/// reorder entries).
pub fn entry_offsets(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut offset = 0;
    while let Ok(Some((_, used))) = split_frame(&bytes[offset..]) {
        out.push((offset, used));
        offset += used;
        if offset >= bytes.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests;
