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
//! Records and tree heads are signed statements like tickets and receipts,
//! each kind under its own context ([`RECORD_CONTEXT`], [`HEAD_CONTEXT`]),
//! but not in the [`crate::signed::Signed`] envelope: the log names its
//! signer once, in the header, and a tree head signs a fixed layout, not a
//! postcard body. They share the envelope's context, signing and checking
//! ([`crate::signed::sign_body`], [`crate::signed::verify_in_context`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// At start, what the agent found of a VM its registry held (or of
    /// one it left behind in its runtime directory) and what it did:
    /// re-attached, lost, discarded, cleaned up.
    VmAtStart {
        /// The VM.
        vm: VmName,
        /// What was found and done.
        outcome: String,
    },
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
    /// Every record, in order.
    pub records: Vec<AuditRecord>,
    /// Every record as signed, in the same order as `records` (record `i`
    /// is leaf `i` of `tree`).
    pub signed: Vec<SignedRecord>,
    /// The last signed tree head, if any.
    pub last_head: Option<SignedTreeHead>,
    /// Records after the last tree head (a crash between the two writes).
    pub unanchored: u64,
    /// The log tree over every record, to append to.
    pub tree: LogTree,
}

/// Verifies a whole log file (see the module docs).
pub fn verify_log(bytes: &[u8], verifier: &dyn ChainVerifier) -> Result<VerifiedLog, AuditError> {
    let mut offset = 0;
    let mut entry = 0;
    let err = |entry, offset, what: LogFault| AuditError {
        entry,
        offset,
        what,
    };
    let mut agent: Option<(SpiffeId, Vec<u8>)> = None;
    let mut header = (Vec::new(), 0);
    let mut tree = LogTree::new();
    let mut records = Vec::new();
    let mut signed = Vec::new();
    let mut last_head = None;
    while offset < bytes.len() {
        let (frame, used) = match split_frame(&bytes[offset..]) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(err(entry, offset, LogFault::Truncated)),
            Err(e) => return Err(err(entry, offset, LogFault::Frame(e))),
        };
        let e: LogEntry = match postcard::from_bytes(frame) {
            Ok(e) => e,
            Err(e) => return Err(err(entry, offset, LogFault::Entry(e))),
        };
        match (e, &agent) {
            (LogEntry::Header { chain, at_unix }, None) => {
                if !chain_in_bounds(&chain) {
                    return Err(err(entry, offset, LogFault::ChainOutOfBounds));
                }
                let id = verifier
                    .verify_chain(&chain, at_unix)
                    .map_err(|e| err(entry, offset, LogFault::HeaderChain(Box::new(e))))?;
                agent = Some((id, chain[0].clone()));
                header = (chain, at_unix);
            }
            (LogEntry::Header { .. }, Some(_)) => {
                return Err(err(entry, offset, LogFault::SecondHeader))
            }
            (_, None) => return Err(err(entry, offset, LogFault::NoHeader)),
            (LogEntry::Record { body, signature }, Some((_, leaf))) => {
                verify_record(verifier, leaf, &body, &signature)
                    .map_err(|e| err(entry, offset, LogFault::RecordSignature(e)))?;
                let r: AuditRecord = postcard::from_bytes(&body)
                    .map_err(|e| err(entry, offset, LogFault::Record(e)))?;
                if r.seq != records.len() as u64 {
                    return Err(err(
                        entry,
                        offset,
                        LogFault::Sequence {
                            seq: r.seq,
                            expected: records.len() as u64,
                        },
                    ));
                }
                tree.push(log_leaf(&body));
                records.push(r);
                signed.push(SignedRecord { body, signature });
            }
            (LogEntry::TreeHead(h), Some((_, leaf))) => {
                if h.size != tree.len() {
                    return Err(err(
                        entry,
                        offset,
                        LogFault::HeadSize {
                            size: h.size,
                            records: tree.len(),
                        },
                    ));
                }
                if h.root != tree.root() {
                    return Err(err(entry, offset, LogFault::HeadRoot));
                }
                h.verify(verifier, leaf)
                    .map_err(|e| err(entry, offset, LogFault::HeadSignature(e)))?;
                last_head = Some(h);
            }
        }
        offset += used;
        entry += 1;
    }
    let Some((agent, _)) = agent else {
        return Err(err(0, 0, LogFault::Empty));
    };
    let anchored = last_head.as_ref().map_or(0, |h| h.size);
    Ok(VerifiedLog {
        agent,
        chain: header.0,
        created_at_unix: header.1,
        unanchored: records.len() as u64 - anchored,
        records,
        signed,
        last_head,
        tree,
    })
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
mod tests {
    use super::*;
    use crate::fuzz::InsecureCrypto;

    fn log(n: u64) -> Vec<u8> {
        let c = InsecureCrypto("spiffe://t/agent/a".into());
        let mut bytes = encode_entry(&LogEntry::Header {
            chain: c.chain(),
            at_unix: 1000,
        })
        .unwrap();
        let mut tree = LogTree::new();
        for i in 0..n {
            let event = AuditEvent::Refused {
                migration: None,
                peer: format!("peer {i}"),
                reason: "test".into(),
            };
            for e in append(&mut tree, i, 1000 + i, event, &c).unwrap() {
                bytes.extend(encode_entry(&e).unwrap());
            }
        }
        bytes
    }

    fn verify(b: &[u8]) -> Result<VerifiedLog, AuditError> {
        verify_log(b, &InsecureCrypto("unused".into()))
    }

    #[test]
    fn a_written_log_verifies() {
        let v = verify(&log(5)).unwrap();
        assert_eq!(v.records.len(), 5);
        assert_eq!(v.agent.to_string(), "spiffe://t/agent/a");
        assert_eq!(v.last_head.unwrap().size, 5);
        assert_eq!(v.unanchored, 0);
        // The signed records as written: leaf i of the tree is record i.
        assert_eq!(v.created_at_unix, 1000);
        assert_eq!(v.chain, vec![b"spiffe://t/agent/a".to_vec()]);
        let leaves: Vec<Digest> = v.signed.iter().map(|r| log_leaf(&r.body)).collect();
        assert_eq!(leaves, v.tree.leaves());
    }

    #[test]
    fn edits_deletions_reorderings_and_cuts_are_found_and_located() {
        let good = log(4);
        let at = entry_offsets(&good);
        // Edit a byte inside record 2 (entry 5: header, r0, h0, r1, h1, r2).
        let mut edited = good.clone();
        let (off, len) = at[5];
        edited[off + len - 70] ^= 1;
        let e = verify(&edited).unwrap_err();
        assert_eq!(e.entry, 5, "{e}");
        // Delete record 1 and its head.
        let mut deleted = good[..at[3].0].to_vec();
        deleted.extend_from_slice(&good[at[5].0..]);
        let e = verify(&deleted).unwrap_err();
        assert!(matches!(e.what, LogFault::Sequence { .. }), "{e}");
        // Swap records 1 and 2 (with their heads).
        let mut swapped = good[..at[3].0].to_vec();
        swapped.extend_from_slice(&good[at[5].0..at[7].0]);
        swapped.extend_from_slice(&good[at[3].0..at[5].0]);
        swapped.extend_from_slice(&good[at[7].0..]);
        assert!(verify(&swapped).is_err());
        // Cut inside the last entry.
        let cut = &good[..good.len() - 3];
        let e = verify(cut).unwrap_err();
        assert_eq!(e.what, LogFault::Truncated, "{e}");
        // Whole trailing entries removed: valid, but shorter — visible by
        // comparing the last head with one held elsewhere.
        let shorter = verify(&good[..at[5].0]).unwrap();
        assert_eq!(shorter.last_head.unwrap().size, 2);
    }

    #[test]
    fn a_log_must_start_with_a_header() {
        let good = log(1);
        let at = entry_offsets(&good);
        let e = verify(&good[at[1].0..]).unwrap_err();
        assert_eq!(e.what, LogFault::NoHeader, "{e}");
    }
}
