//! What counts as a torn tail: the bytes after the last verifying tree head
//! that a crash in the middle of one append can leave, and nothing else.
//!
//! The agent appends with one write of [`super::append`]'s two entries, a
//! record then its tree head, and one fsync; a crash before the fsync
//! ends keeps some prefix of those bytes. So the tail after the last
//! verifying head is torn only if it is a non-empty *strict prefix* of
//! `record ‖ head` for the next record:
//!
//! - either a record frame cut short, whose length prefix, entry kind,
//!   body length, sequence number (the next one), body (when whole) and
//!   signature length (64) agree with each other as far as they go;
//! - or that record whole, verifying, with the next number, followed by
//!   nothing or by its head frame cut short: kind, size (records + 1),
//!   root (the log's with this record), and a frame length that fits the
//!   head's fields.
//!
//! Everything else is damage and refused: a whole entry that does not
//! verify, a second entry after a headless record, a frame length or a
//! field that no append writes. And because a cut must never drop history
//! a tree head has signed, a tail that holds, at any byte, a frame
//! decoding as a tree head of a later size that the log's key signed is
//! refused too ([`LogFault::HiddenHead`]): that is what lengths edited to
//! swallow the rest of a log would look like. A tail zero-filled by a file
//! system after a power cut (possible with ext4 `data=writeback`) is no
//! prefix of an append and is refused; it needs an operator.

use thiserror::Error;

use super::{check_record, AuditError, AuditRecord, LogEntry, LogFault, Position, TornTail};
use crate::digest::Digest;
use crate::frame::{frame_len, split_frame, FrameError, LEN_PREFIX, MAX_FRAME_LEN};
use crate::logtree::{log_leaf, LogTree};
use crate::signed::{ChainVerifier, SIGNATURE_LEN};

/// Postcard's variant index of [`LogEntry::Record`], its frame's first byte.
const RECORD_TAG: u8 = 1;
/// Postcard's variant index of [`LogEntry::TreeHead`].
const HEAD_TAG: u8 = 2;
/// Postcard's length varint of a [`SIGNATURE_LEN`]-byte signature.
const SIGNATURE_LEN_BYTE: u8 = 0x40;
/// A tree head frame (tag ‖ size ‖ root ‖ time ‖ signature) with the
/// shortest varints…
const MIN_HEAD_FRAME: usize = 1 + 1 + 32 + 1 + 1 + SIGNATURE_LEN;
/// …and with the longest (10 bytes for a `u64`).
const MAX_HEAD_FRAME: usize = 1 + 10 + 32 + 10 + 1 + SIGNATURE_LEN;

/// Why an entry cut short cannot be the rest of an append.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PartialFault {
    /// The frame's length is out of bounds for the entry due.
    #[error("a frame of {declared} bytes (or more) where {min}..={max} are possible")]
    Bounds {
        /// The length declared (a cut prefix: its smallest completion).
        declared: usize,
        /// The shortest possible.
        min: usize,
        /// The longest possible.
        max: usize,
    },
    /// Another kind of entry than the one due.
    #[error("an entry of kind {found} where a {expected} was due")]
    Kind {
        /// The entry's first byte (postcard variant index).
        found: u8,
        /// What was due.
        expected: &'static str,
    },
    /// The frame's length is not what its fields add up to.
    #[error("a frame of {declared} bytes whose fields make {content}")]
    Length {
        /// Declared by the length prefix.
        declared: usize,
        /// Added up from the fields.
        content: usize,
    },
    /// A number that is no varint.
    #[error("a malformed number")]
    Varint,
    /// Not the next record.
    #[error("record {seq} where {expected} was due")]
    Sequence {
        /// The record's number.
        seq: u64,
        /// The next number.
        expected: u64,
    },
    /// The whole record body does not decode.
    #[error("undecodable record: {0}")]
    Record(#[source] postcard::Error),
    /// A tree head over another number of records.
    #[error("tree head of size {size} where {expected} was due")]
    HeadSize {
        /// Its size.
        size: u64,
        /// The records with the one before it.
        expected: u64,
    },
    /// A tree head whose root is not the log's with its record.
    #[error("tree head root does not match the records")]
    HeadRoot,
    /// A signature length that is not [`SIGNATURE_LEN`].
    #[error("a signature length byte {0:#04x}, not {SIGNATURE_LEN}")]
    SignatureLength(u8),
}

/// The bytes after the last verifying tree head, and what precedes them.
pub(super) struct Tail<'a> {
    /// From the end of the last tree head (or header) to the end of file.
    pub(super) bytes: &'a [u8],
    /// Where they start.
    pub(super) at: Position,
    /// Records under the last tree head: the number the torn record has.
    pub(super) seq: u64,
    /// Their leaves.
    pub(super) tree: LogTree,
    /// The log's leaf certificate.
    pub(super) leaf: &'a [u8],
}

impl Tail<'_> {
    /// The torn tail these bytes are, or why they are not one.
    pub(super) fn check(&self, verifier: &dyn ChainVerifier) -> Result<TornTail, AuditError> {
        let whole_record = self.shape(verifier)?;
        if let Some((at, size)) = self.hidden_head(verifier) {
            return Err(self.at.fault(LogFault::HiddenHead {
                at: self.at.offset + at,
                size,
            }));
        }
        Ok(TornTail {
            offset: self.at.offset,
            entry: self.at.entry,
            len: self.bytes.len(),
            whole_record,
        })
    }

    /// Checks that the bytes are a strict prefix of the next append;
    /// returns whether its record is whole.
    fn shape(&self, verifier: &dyn ChainVerifier) -> Result<bool, AuditError> {
        let record_at = self.at;
        let partial = |at: Position| move |f: PartialFault| at.fault(LogFault::Partial(f));
        let (frame, used) = match split_frame(self.bytes) {
            Err(e) => return Err(record_at.fault(LogFault::Frame(e))),
            Ok(None) => {
                partial_record(self.bytes, self.seq).map_err(partial(record_at))?;
                return Ok(false);
            }
            Ok(Some(f)) => f,
        };
        let body = match postcard::from_bytes(frame) {
            Ok(LogEntry::Record { body, signature }) => {
                check_record(verifier, self.leaf, &body, &signature, self.seq)
                    .map_err(|f| record_at.fault(f))?;
                body
            }
            Ok(_) => {
                return Err(record_at.fault(LogFault::Partial(PartialFault::Kind {
                    found: frame.first().copied().unwrap_or_default(),
                    expected: "record",
                })))
            }
            Err(e) => return Err(record_at.fault(LogFault::Entry(e))),
        };
        let head_at = Position {
            entry: record_at.entry + 1,
            offset: record_at.offset + used,
        };
        let rest = &self.bytes[used..];
        match split_frame(rest) {
            Err(e) => Err(head_at.fault(LogFault::Frame(e))),
            Ok(Some(_)) => Err(head_at.fault(LogFault::UnanchoredRecord)),
            Ok(None) => {
                let mut tree = self.tree.clone();
                tree.push(log_leaf(&body));
                partial_head(rest, tree.len(), &tree.root()).map_err(partial(head_at))?;
                Ok(true)
            }
        }
    }

    /// The first byte of the tail where a whole frame decodes as a tree head
    /// of a later size than the last verified one, signed by the log's key,
    /// and its size.
    fn hidden_head(&self, verifier: &dyn ChainVerifier) -> Option<(usize, u64)> {
        (0..self.bytes.len()).find_map(|j| {
            let b = &self.bytes[j..];
            if b.get(LEN_PREFIX) != Some(&HEAD_TAG) {
                return None;
            }
            let (frame, _) = split_frame(b).ok()??;
            if frame.len() > MAX_HEAD_FRAME {
                return None;
            }
            match postcard::from_bytes(frame) {
                Ok(LogEntry::TreeHead(h))
                    if h.size > self.seq && h.verify(verifier, self.leaf).is_ok() =>
                {
                    Some((j, h.size))
                }
                _ => None,
            }
        })
    }
}

/// Checks a record frame cut short (`p` holds its length prefix, or part
/// of it, and fewer bytes than it declares) against record `seq`.
fn partial_record(p: &[u8], seq: u64) -> Result<(), PartialFault> {
    let Some(declared) = declared(p, 1, MAX_FRAME_LEN)? else {
        return Ok(());
    };
    let mut c = Cursor::new(&p[LEN_PREFIX..]);
    if !c.tag(RECORD_TAG, "record")? {
        return Ok(());
    }
    let Some(len) = c.varint()? else {
        return Ok(());
    };
    let content = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(c.pos() + 1 + SIGNATURE_LEN))
        .unwrap_or(usize::MAX);
    if content != declared {
        return Err(PartialFault::Length { declared, content });
    }
    let (body, whole) = c.take(crate::page::saturating_usize(len));
    let found = if whole {
        let r: AuditRecord = postcard::from_bytes(body).map_err(PartialFault::Record)?;
        Some(r.seq)
    } else {
        Cursor::new(body).varint()?
    };
    if let Some(found) = found.filter(|s| *s != seq) {
        return Err(PartialFault::Sequence {
            seq: found,
            expected: seq,
        });
    }
    c.signature_len()
}

/// Checks a tree head frame cut short against a head of `size` records
/// with root `root`.
fn partial_head(p: &[u8], size: u64, root: &Digest) -> Result<(), PartialFault> {
    let Some(declared) = declared(p, MIN_HEAD_FRAME, MAX_HEAD_FRAME)? else {
        return Ok(());
    };
    let mut c = Cursor::new(&p[LEN_PREFIX..]);
    if !c.tag(HEAD_TAG, "tree head")? {
        return Ok(());
    }
    let Some(found) = c.varint()? else {
        return Ok(());
    };
    if found != size {
        return Err(PartialFault::HeadSize {
            size: found,
            expected: size,
        });
    }
    let (got, whole) = c.take(root.as_bytes().len());
    if root.as_bytes().get(..got.len()) != Some(got) {
        return Err(PartialFault::HeadRoot);
    }
    if !whole {
        return Ok(());
    }
    let Some(_at_unix) = c.varint()? else {
        return Ok(());
    };
    let content = c.pos() + 1 + SIGNATURE_LEN;
    if content != declared {
        return Err(PartialFault::Length { declared, content });
    }
    c.signature_len()
}

/// The frame length `p`'s prefix declares, within `min..=max`, or `None`
/// while the prefix is itself cut short (then its smallest completion must
/// not pass `max`).
fn declared(p: &[u8], min: usize, max: usize) -> Result<Option<usize>, PartialFault> {
    let mut prefix = [0u8; LEN_PREFIX];
    let have = p.len().min(LEN_PREFIX);
    prefix[..have].copy_from_slice(&p[..have]);
    let bounds = |declared| PartialFault::Bounds { declared, min, max };
    if have < LEN_PREFIX {
        let least = crate::page::saturating_usize(u64::from(u32::from_be_bytes(prefix)));
        return if least <= max {
            Ok(None)
        } else {
            Err(bounds(least))
        };
    }
    let len = frame_len(prefix).map_err(|e| match e {
        FrameError::Oversized { len, .. } => bounds(len),
        _ => bounds(0),
    })?;
    if !(min..=max).contains(&len) {
        return Err(bounds(len));
    }
    Ok(Some(len))
}

/// Reads the fields of an entry that may be cut short: a read gives
/// `None` once the bytes run out, and there is nothing more to check.
struct Cursor<'a> {
    rest: &'a [u8],
    used: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { rest: b, used: 0 }
    }

    /// Bytes read so far.
    fn pos(&self) -> usize {
        self.used
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        self.used += 1;
        Some(b)
    }

    /// A postcard varint `u64` (LEB128, at most 10 bytes).
    fn varint(&mut self) -> Result<Option<u64>, PartialFault> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(b) = self.byte() else {
                return Ok(None);
            };
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(PartialFault::Varint);
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(v));
            }
        }
        Err(PartialFault::Varint)
    }

    /// Up to `n` bytes, and whether they were all there.
    fn take(&mut self, n: usize) -> (&'a [u8], bool) {
        let k = n.min(self.rest.len());
        let (got, rest) = self.rest.split_at(k);
        self.rest = rest;
        self.used += k;
        (got, k == n)
    }

    /// Whether the entry's kind byte is there; an error if it is another.
    fn tag(&mut self, tag: u8, expected: &'static str) -> Result<bool, PartialFault> {
        match self.byte() {
            None => Ok(false),
            Some(t) if t == tag => Ok(true),
            Some(found) => Err(PartialFault::Kind { found, expected }),
        }
    }

    /// The signature's length, if it is there, must be [`SIGNATURE_LEN`].
    fn signature_len(&mut self) -> Result<(), PartialFault> {
        match self.byte() {
            None | Some(SIGNATURE_LEN_BYTE) => Ok(()),
            Some(b) => Err(PartialFault::SignatureLength(b)),
        }
    }
}

#[cfg(test)]
mod tests;
