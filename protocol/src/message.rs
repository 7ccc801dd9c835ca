//! Every message Convoy peers exchange, and its (de)coding.
//!
//! A frame's first byte is a tag naming the message; the body is the
//! message's postcard encoding (for [`Message::PageBatch`], the postcard
//! header followed by the raw payload). Tag 0 is reserved as invalid so that
//! a zeroed buffer never parses; unknown tags, malformed bodies and trailing
//! bytes are typed errors.
//!
//! | tag | message | stream |
//! |-----|---------|--------|
//! | 1 | [`Propose`] | agent control, source → destination, first |
//! | 2 | [`Accept`] | agent control, destination → source |
//! | 3 | [`Reject`] | agent control, destination → source |
//! | 4 | [`Finish`] | agent control, source → destination |
//! | 5 | [`Ready`] | agent control, destination → source |
//! | 6 | `Handover` | agent control, source → destination |
//! | 7 | [`Started`] | agent control, destination → source |
//! | 8 | [`Abort`] | agent control, either way |
//! | 9 | [`crate::stream::StreamsDone`] | agent control, source → destination (stream migrations) |
//! | 10 | [`crate::stream::Switch`] | agent control, both ways (post-copy stream migrations) |
//! | 11 | [`PostcopySwitch`] | agent control, source → destination |
//! | 12 | [`PostcopyRunning`] | agent control, destination → source |
//! | 13 | [`Fetch`] | agent control, destination → source (answered on the fault stream) |
//! | 14 | [`RoundEnd`] | agent control, source → destination |
//! | 15 | [`RoundApplied`] | agent control, destination → source |
//! | 16 | [`DataStreamOpen`] | data stream, first frame |
//! | 17 | page batch | data stream |
//! | 18 | [`crate::stream::ChannelOpen`] | a stream migration's channel, first frame |
//! | 19 | [`Resume`] | agent control of a new connection, source → destination, first |
//! | 20 | [`Resumed`] | agent control, destination → source |
//! | 32 | [`crate::ctl::CtlRequest`] | operator → agent |
//! | 33 | [`crate::ctl::CtlResponse`] | agent → operator |

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use crate::ctl::{CtlRequest, CtlResponse};
use crate::digest::Digest;
use crate::frame::{self, FrameError, LEN_PREFIX};
use crate::names::{MigrationId, VmName};
use crate::page::{BatchHeader, MemoryGeometry};
use crate::receipt::SignedReceipt;

pub use crate::model::FaultFigures;

/// The protocol version this build speaks.
///
/// 2: destination-paced rounds (`RoundEnd`/`RoundApplied`), base images
/// (`Accept.bases`, `DiskGeometry.base`), `Started.synced_ms`, post-copy
/// recovery (`Resume`/`Resumed`) and storage post-copy
/// (`PostcopySwitch.storage`). Builds of version 1 encode some of these
/// messages differently: they are refused at `Propose`, by version, rather
/// than misread.
///
/// 3: the ticket signs the whole [`crate::model::MigrationPlan`] and the
/// manifest announces it (`Manifest.plan`), checked field by field at the
/// destination ([`crate::admission`]).
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// Most data streams one migration may use.
pub const MAX_DATA_STREAMS: u16 = crate::model::MAX_STREAMS;

/// Largest device-state blob (2 MiB; must fit in one frame).
pub const MAX_DEVICE_STATE: usize = 2 << 20;

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest acceptable.
    pub min: u16,
    /// Newest spoken.
    pub max: u16,
}

impl VersionRange {
    /// What this build speaks.
    pub const OURS: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// The highest version both ranges contain.
    pub fn negotiate(self, other: VersionRange) -> Option<u16> {
        let hi = self.max.min(other.max);
        let lo = self.min.max(other.min);
        (lo <= hi && hi != 0).then_some(hi)
    }

    /// Whether `v` is in the range.
    pub fn contains(self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }
}

/// Optional features, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// zstd-compressed page batches.
    pub const ZSTD: Capabilities = Capabilities(1);
    /// Delta-encoded pages in batches ([`crate::page::RunKind::Delta`]).
    /// A source sends them only when the destination accepted this bit.
    pub const DELTA: Capabilities = Capabilities(2);
    /// Memory reuse ([`crate::reuse`]): offered by a source only with a
    /// [`Manifest::reuse`] offer, accepted by a destination only when it
    /// holds that retained image; the source then sends unchanged pages as
    /// [`crate::page::RunKind::Retained`] in its first round.
    pub const REUSE: Capabilities = Capabilities(4);
    /// Everything this build supports.
    pub const OURS: Capabilities = Capabilities(Self::ZSTD.0 | Self::DELTA.0 | Self::REUSE.0);

    /// Bits set in both.
    pub fn intersect(self, o: Capabilities) -> Capabilities {
        Capabilities(self.0 & o.0)
    }

    /// Whether all bits of `o` are set.
    pub fn has(self, o: Capabilities) -> bool {
        self.0 & o.0 == o.0
    }
}

/// What the source announces it will send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Guest memory.
    pub memory: MemoryGeometry,
    /// Data streams the source will open (1..=[`MAX_DATA_STREAMS`]).
    pub data_streams: u16,
    /// For a QEMU VM: its definition and channels; the memory is then
    /// QEMU's stream, not page batches (see [`crate::stream`]).
    pub qemu: Option<Box<crate::stream::QemuManifest>>,
    /// The source may switch to post-copy ([`PostcopySwitch`]): the
    /// destination must be able to run the VM before every page arrived,
    /// and accepts one more data stream, the fault stream (index
    /// `data_streams`), that carries the pages it asks for.
    pub postcopy: bool,
    /// The VM comes back to a host that may hold its last image: the image
    /// and its key (see [`crate::reuse`]). Sent inside TLS to that host
    /// only; the key is worthless to any other.
    pub reuse: Option<Box<crate::reuse::ReuseOffer>>,
    /// A sim VM's disks: their blocks are leaves after the memory's pages
    /// (see [`crate::disk`]). Empty for a VM without disks and for QEMU.
    pub disks: Vec<crate::disk::DiskGeometry>,
    /// The destination keeps the VM paused once it has verified and
    /// started it (pre-copy only: a demand-paged VM must run to fault).
    pub start_paused: bool,
    /// The plan the source runs: the ticket's, which the destination's
    /// admission ([`crate::admission`]) compares field by field.
    pub plan: crate::model::MigrationPlan,
}

impl Manifest {
    /// Memory pages and disk blocks together, once the disks are checked.
    pub fn leaf_count(&self) -> Result<u64, crate::disk::DiskError> {
        crate::disk::check(self.memory, &self.disks)
    }

    /// The geometry of the whole leaf space (memory, then disks): what a
    /// batch's page indexes range over.
    pub fn leaf_geometry(&self) -> Result<MemoryGeometry, crate::disk::DiskError> {
        let n = self.leaf_count()?;
        MemoryGeometry::new(self.memory.page_size(), n)
            .map_err(|_| crate::disk::DiskError::TooLarge(n))
    }
}

/// Source → destination: the first message of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propose {
    /// Versions the source speaks.
    pub versions: VersionRange,
    /// Features the source offers.
    pub capabilities: Capabilities,
    /// Migration id.
    pub migration: MigrationId,
    /// The VM.
    pub vm: VmName,
    /// Its attributes, for the destination's policy (checked there).
    pub attributes: crate::vm::VmAttributes,
    /// What will be sent.
    pub manifest: Manifest,
    /// The operator's signed ticket for this migration.
    pub ticket: crate::ticket::SignedTicket,
}

/// Destination → source: go ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// Chosen version.
    pub version: u16,
    /// Features both sides support.
    pub capabilities: Capabilities,
    /// The destination's signed `Accepted` receipt.
    pub receipt: SignedReceipt,
    /// For each of the manifest's disks, whether this host holds its base
    /// image (same name and root) and starts the disk from it; empty when
    /// none is held ([`crate::disk`]).
    pub bases: Vec<bool>,
}

/// Why a destination refused or a peer aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reason {
    /// No common protocol version.
    UnsupportedVersion,
    /// The manifest is out of the destination's limits.
    Unacceptable(String),
    /// A VM of that name already lives here or is arriving.
    VmExists,
    /// Staging memory could not be reserved.
    NoCapacity,
    /// The pages received do not hash to the announced root.
    RootMismatch,
    /// The peer broke the protocol.
    ProtocolViolation(String),
    /// The operator (or an agent shutting down) cancelled.
    Cancelled,
    /// The peer did not answer in time.
    Timeout,
    /// The ticket or the peer is not authorized for this migration.
    Unauthorized(String),
    /// A local failure (backend, disk).
    Internal(String),
    /// Pre-copy cannot meet the downtime target (the figures are in the
    /// text).
    CannotConverge(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::UnsupportedVersion => f.write_str("no common protocol version"),
            Reason::Unacceptable(s) => write!(f, "unacceptable manifest: {s}"),
            Reason::VmExists => f.write_str("VM already present at the destination"),
            Reason::NoCapacity => f.write_str("destination lacks capacity"),
            Reason::RootMismatch => f.write_str("memory root mismatch"),
            Reason::ProtocolViolation(s) => write!(f, "protocol violation: {s}"),
            Reason::Cancelled => f.write_str("cancelled"),
            Reason::Timeout => f.write_str("timed out"),
            Reason::Unauthorized(s) => write!(f, "not authorized: {s}"),
            Reason::Internal(s) => write!(f, "internal error: {s}"),
            Reason::CannotConverge(s) => f.write_str(s),
        }
    }
}

/// Destination → source: refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Why.
    pub reason: Reason,
}

/// Source → destination: every page has been sent; here is the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    /// Batches sent on each data stream, in stream order.
    pub batches: Vec<u64>,
    /// Copy rounds, the final one included.
    pub rounds: u32,
    /// The paused VM's device state.
    pub device_state: Vec<u8>,
    /// Merkle root over the memory image as paused.
    pub memory_root: Digest,
}

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

/// Largest number of pages in one [`Fetch`].
pub const MAX_FETCH: usize = 16;

/// Source → destination: the VM is paused here and handed over; run it
/// there from its device state while the pages in `owed` are still on
/// their way. Sent only after the source durably recorded the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopySwitch {
    /// Batches sent on each data stream before the switch: the destination
    /// applies exactly these before it runs the VM.
    pub batches: Vec<u64>,
    /// The paused VM's device state.
    pub device_state: Vec<u8>,
    /// Bitmap words (as [`crate::page::PageBitmap::words`]) of the pages
    /// whose current version the destination does not hold yet: over the
    /// memory's pages, or with `storage` over every leaf (the disks' blocks
    /// after the memory's pages).
    pub owed: Vec<u64>,
    /// Storage post-copy: disk blocks are owed too, fetched on demand.
    pub storage: bool,
}

/// Destination → source: the VM runs here now, on demand paging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyRunning {
    /// Switch received to VM running, milliseconds.
    pub start_ms: u32,
}

/// Destination → source: the VM is waiting for these pages; send them on
/// the fault stream first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// At most [`MAX_FETCH`] pages.
    pub pages: Vec<crate::page::PageIndex>,
}

/// Source → destination, the first message on a *new* connection after
/// the link of a post-copy migration broke: carry on with `migration`.
/// The destination accepts it only from the agent that started the
/// migration (checked on the new connection's mutual TLS) and for the
/// same ticket; it answers [`Resumed`]. Nothing else can take over a
/// migration: a different peer or ticket is refused and the migration
/// keeps waiting for its own source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The migration, as proposed.
    pub migration: crate::names::MigrationId,
    /// Digest of the operator's ticket it was proposed with.
    pub ticket: crate::digest::Digest,
}

/// Destination → source: the migration resumes on this connection. Both
/// sides count data-stream batches from zero again on the new streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// Bitmap words (as [`crate::page::PageBitmap::words`]) of the owed
    /// pages the destination has not installed: the source sends these
    /// again, whatever it sent before the link broke.
    pub missing: Vec<u64>,
}

/// Source → destination: every batch of pre-copy round `round` is sent,
/// `batches` per data stream so far. The destination answers
/// [`RoundApplied`] once it has applied as many; only then does the
/// source measure the round and decide whether to pause, so that the
/// pause never waits for data still in flight (up to the send window)
/// and the rate it plans with is the rate the destination applies at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    /// The round.
    pub round: u32,
    /// Batches sent so far on each data stream.
    pub batches: Vec<u64>,
}

/// Destination → source: every batch of round `round` is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundApplied {
    /// The round.
    pub round: u32,
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
    /// Milliseconds from the VM running to its disks being on stable
    /// storage, which this message waited for (the source keeps its copy
    /// until then) but the guest did not: not downtime.
    pub synced_ms: u32,
    /// The destination's signed `Started` receipt.
    pub receipt: SignedReceipt,
}

/// Either way: the migration is over, unsuccessfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// Why.
    pub reason: Reason,
}

/// First frame of every data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStreamOpen {
    /// The migration this stream belongs to.
    pub migration: MigrationId,
    /// Its index, `0..data_streams`.
    pub stream: u16,
}

/// Any Convoy message.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Tag 1.
    Propose(Propose),
    /// Tag 2.
    Accept(Accept),
    /// Tag 3.
    Reject(Reject),
    /// Tag 4.
    Finish(Finish),
    /// Tag 5.
    Ready(Ready),
    /// Tag 6: the source has handed the VM over; start it.
    Handover(Handover),
    /// Tag 7.
    Started(Started),
    /// Tag 8.
    Abort(Abort),
    /// Tag 9.
    StreamsDone(crate::stream::StreamsDone),
    /// Tag 10.
    Switch(crate::stream::Switch),
    /// Tag 11.
    PostcopySwitch(PostcopySwitch),
    /// Tag 12.
    PostcopyRunning(PostcopyRunning),
    /// Tag 13.
    Fetch(Fetch),
    /// Tag 14.
    RoundEnd(RoundEnd),
    /// Tag 15.
    RoundApplied(RoundApplied),
    /// See [`Resume`].
    Resume(Resume),
    /// See [`Resumed`].
    Resumed(Resumed),
    /// Tag 16.
    DataStreamOpen(DataStreamOpen),
    /// Tag 17: a page batch; the payload is carried without a copy.
    PageBatch(BatchHeader, Bytes),
    /// Tag 18.
    ChannelOpen(crate::stream::ChannelOpen),
    /// Tag 32.
    CtlRequest(CtlRequest),
    /// Tag 33.
    CtlResponse(Box<CtlResponse>),
}

/// Message tags.
#[allow(missing_docs)]
pub mod tag {
    pub const INVALID: u8 = 0;
    pub const PROPOSE: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REJECT: u8 = 3;
    pub const FINISH: u8 = 4;
    pub const READY: u8 = 5;
    pub const HANDOVER: u8 = 6;
    pub const STARTED: u8 = 7;
    pub const ABORT: u8 = 8;
    pub const STREAMS_DONE: u8 = 9;
    pub const SWITCH: u8 = 10;
    pub const POSTCOPY_SWITCH: u8 = 11;
    pub const POSTCOPY_RUNNING: u8 = 12;
    pub const FETCH: u8 = 13;
    pub const ROUND_END: u8 = 14;
    pub const ROUND_APPLIED: u8 = 15;
    pub const DATA_STREAM_OPEN: u8 = 16;
    pub const PAGE_BATCH: u8 = 17;
    pub const CHANNEL_OPEN: u8 = 18;
    pub const RESUME: u8 = 19;
    pub const RESUMED: u8 = 20;
    pub const CTL_REQUEST: u8 = 32;
    pub const CTL_RESPONSE: u8 = 33;
}

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame itself is bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Tag 0.
    #[error("tag 0 is reserved as invalid")]
    InvalidTag,
    /// A tag this build does not know.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// The body does not parse as the tagged message.
    #[error("malformed {message}: {detail}")]
    Malformed {
        /// Message kind.
        message: &'static str,
        /// What postcard or a validity check said.
        detail: String,
    },
    /// The body parsed but bytes were left over.
    #[error("{message} followed by {extra} trailing bytes")]
    Trailing {
        /// Message kind.
        message: &'static str,
        /// Bytes left.
        extra: usize,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoding exceeds [`frame::MAX_FRAME_LEN`].
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// postcard failed.
    #[error("postcard: {0}")]
    Postcard(String),
}

impl Message {
    /// The message's tag.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Propose(_) => tag::PROPOSE,
            Message::Accept(_) => tag::ACCEPT,
            Message::Reject(_) => tag::REJECT,
            Message::Finish(_) => tag::FINISH,
            Message::Ready(_) => tag::READY,
            Message::Handover(_) => tag::HANDOVER,
            Message::Started(_) => tag::STARTED,
            Message::Abort(_) => tag::ABORT,
            Message::StreamsDone(_) => tag::STREAMS_DONE,
            Message::Switch(_) => tag::SWITCH,
            Message::PostcopySwitch(_) => tag::POSTCOPY_SWITCH,
            Message::PostcopyRunning(_) => tag::POSTCOPY_RUNNING,
            Message::Fetch(_) => tag::FETCH,
            Message::RoundEnd(_) => tag::ROUND_END,
            Message::RoundApplied(_) => tag::ROUND_APPLIED,
            Message::Resume(_) => tag::RESUME,
            Message::Resumed(_) => tag::RESUMED,
            Message::ChannelOpen(_) => tag::CHANNEL_OPEN,
            Message::DataStreamOpen(_) => tag::DATA_STREAM_OPEN,
            Message::PageBatch(..) => tag::PAGE_BATCH,
            Message::CtlRequest(_) => tag::CTL_REQUEST,
            Message::CtlResponse(_) => tag::CTL_RESPONSE,
        }
    }

    /// A short name for errors and logs.
    pub fn kind(&self) -> &'static str {
        name_of(self.tag())
    }

    /// The whole frame: length prefix, tag, body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![0u8; LEN_PREFIX];
        out.push(self.tag());
        let body = match self {
            Message::Propose(m) => postcard::to_extend(m, out),
            Message::Accept(m) => postcard::to_extend(m, out),
            Message::Reject(m) => postcard::to_extend(m, out),
            Message::Finish(m) => postcard::to_extend(m, out),
            Message::Ready(m) => postcard::to_extend(m, out),
            Message::Handover(m) => postcard::to_extend(m, out),
            Message::Started(m) => postcard::to_extend(m, out),
            Message::Abort(m) => postcard::to_extend(m, out),
            Message::StreamsDone(m) => postcard::to_extend(m, out),
            Message::Switch(m) => postcard::to_extend(m, out),
            Message::PostcopySwitch(m) => postcard::to_extend(m, out),
            Message::PostcopyRunning(m) => postcard::to_extend(m, out),
            Message::Fetch(m) => postcard::to_extend(m, out),
            Message::RoundEnd(m) => postcard::to_extend(m, out),
            Message::RoundApplied(m) => postcard::to_extend(m, out),
            Message::Resume(m) => postcard::to_extend(m, out),
            Message::Resumed(m) => postcard::to_extend(m, out),
            Message::ChannelOpen(m) => postcard::to_extend(m, out),
            Message::DataStreamOpen(m) => postcard::to_extend(m, out),
            Message::PageBatch(h, payload) => postcard::to_extend(h, out).map(|mut o| {
                o.extend_from_slice(payload);
                o
            }),
            Message::CtlRequest(m) => postcard::to_extend(m, out),
            Message::CtlResponse(m) => postcard::to_extend(m.as_ref(), out),
        };
        let mut out = body.map_err(|e| EncodeError::Postcard(e.to_string()))?;
        let prefix = frame::prefix_for(out.len() - LEN_PREFIX)?;
        out[..LEN_PREFIX].copy_from_slice(&prefix);
        Ok(out)
    }

    /// Decodes one frame's tag and body (the length prefix already removed).
    pub fn decode(frame: Bytes) -> Result<Message, DecodeError> {
        let Some((&t, body)) = frame.split_first() else {
            return Err(DecodeError::Frame(FrameError::Empty));
        };
        if frame.len() > frame::MAX_FRAME_LEN {
            return Err(DecodeError::Frame(FrameError::Oversized {
                len: frame.len(),
                max: frame::MAX_FRAME_LEN,
            }));
        }
        Ok(match t {
            tag::INVALID => return Err(DecodeError::InvalidTag),
            tag::PROPOSE => Message::Propose(whole(t, body)?),
            tag::ACCEPT => Message::Accept(whole(t, body)?),
            tag::REJECT => Message::Reject(whole(t, body)?),
            tag::FINISH => {
                let f: Finish = whole(t, body)?;
                // The data streams and, after a post-copy switch, the fault
                // stream.
                if f.batches.len() > usize::from(MAX_DATA_STREAMS) + 1 {
                    return Err(malformed(t, "more streams than allowed"));
                }
                if f.device_state.len() > MAX_DEVICE_STATE {
                    return Err(malformed(t, "device state too large"));
                }
                Message::Finish(f)
            }
            tag::READY => Message::Ready(whole(t, body)?),
            tag::HANDOVER => Message::Handover(whole(t, body)?),
            tag::STARTED => Message::Started(whole(t, body)?),
            tag::ABORT => Message::Abort(whole(t, body)?),
            tag::STREAMS_DONE => {
                let d: crate::stream::StreamsDone = whole(t, body)?;
                if d.channels.len() > crate::stream::MAX_CHANNELS {
                    return Err(malformed(t, "more channels than allowed"));
                }
                Message::StreamsDone(d)
            }
            tag::SWITCH => Message::Switch(whole(t, body)?),
            tag::POSTCOPY_SWITCH => {
                let m: PostcopySwitch = whole(t, body)?;
                if m.batches.len() > usize::from(MAX_DATA_STREAMS) {
                    return Err(malformed(t, "more streams than allowed"));
                }
                if m.device_state.len() > MAX_DEVICE_STATE {
                    return Err(malformed(t, "device state too large"));
                }
                Message::PostcopySwitch(m)
            }
            tag::POSTCOPY_RUNNING => Message::PostcopyRunning(whole(t, body)?),
            tag::ROUND_END => {
                let m: RoundEnd = whole(t, body)?;
                if m.batches.len() > usize::from(MAX_DATA_STREAMS) + 1 {
                    return Err(malformed(t, "more streams than allowed"));
                }
                Message::RoundEnd(m)
            }
            tag::ROUND_APPLIED => Message::RoundApplied(whole(t, body)?),
            tag::RESUME => Message::Resume(whole(t, body)?),
            tag::RESUMED => Message::Resumed(whole(t, body)?),
            tag::FETCH => {
                let m: Fetch = whole(t, body)?;
                if m.pages.is_empty() || m.pages.len() > MAX_FETCH {
                    return Err(malformed(t, "a fetch of 1..=16 pages"));
                }
                Message::Fetch(m)
            }
            tag::CHANNEL_OPEN => Message::ChannelOpen(whole(t, body)?),
            tag::DATA_STREAM_OPEN => Message::DataStreamOpen(whole(t, body)?),
            tag::PAGE_BATCH => {
                let (h, rest): (BatchHeader, &[u8]) =
                    postcard::take_from_bytes(body).map_err(|e| malformed(t, &e.to_string()))?;
                let offset = frame.len() - rest.len();
                Message::PageBatch(h, frame.slice(offset..))
            }
            tag::CTL_REQUEST => Message::CtlRequest(whole(t, body)?),
            tag::CTL_RESPONSE => Message::CtlResponse(Box::new(whole(t, body)?)),
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

/// The name of a tag's message.
pub fn name_of(t: u8) -> &'static str {
    match t {
        tag::PROPOSE => "Propose",
        tag::ACCEPT => "Accept",
        tag::REJECT => "Reject",
        tag::FINISH => "Finish",
        tag::READY => "Ready",
        tag::HANDOVER => "Handover",
        tag::STARTED => "Started",
        tag::ABORT => "Abort",
        tag::STREAMS_DONE => "StreamsDone",
        tag::SWITCH => "Switch",
        tag::POSTCOPY_SWITCH => "PostcopySwitch",
        tag::POSTCOPY_RUNNING => "PostcopyRunning",
        tag::FETCH => "Fetch",
        tag::ROUND_END => "RoundEnd",
        tag::ROUND_APPLIED => "RoundApplied",
        tag::RESUME => "Resume",
        tag::RESUMED => "Resumed",
        tag::CHANNEL_OPEN => "ChannelOpen",
        tag::DATA_STREAM_OPEN => "DataStreamOpen",
        tag::PAGE_BATCH => "PageBatch",
        tag::CTL_REQUEST => "CtlRequest",
        tag::CTL_RESPONSE => "CtlResponse",
        _ => "unknown",
    }
}

fn malformed(t: u8, detail: &str) -> DecodeError {
    DecodeError::Malformed {
        message: name_of(t),
        detail: detail.to_owned(),
    }
}

fn whole<T: DeserializeOwned>(t: u8, body: &[u8]) -> Result<T, DecodeError> {
    let (v, rest) = postcard::take_from_bytes(body).map_err(|e| malformed(t, &e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing {
            message: name_of(t),
            extra: rest.len(),
        });
    }
    Ok(v)
}

/// Encodes the frame head of a page batch (prefix, tag and header) for a
/// payload of `payload_len` bytes that the caller sends right after it, so
/// the payload is never copied.
pub fn encode_batch_head(header: &BatchHeader, payload_len: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; LEN_PREFIX];
    out.push(tag::PAGE_BATCH);
    let mut out =
        postcard::to_extend(header, out).map_err(|e| EncodeError::Postcard(e.to_string()))?;
    let prefix = frame::prefix_for(out.len() - LEN_PREFIX + payload_len)?;
    out[..LEN_PREFIX].copy_from_slice(&prefix);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{Compression, PageSize, Run, RunKind};

    fn propose() -> Message {
        Message::Propose(Propose {
            versions: VersionRange::OURS,
            capabilities: Capabilities::OURS,
            migration: MigrationId([7; 16]),
            vm: "vm1".parse().unwrap(),
            attributes: crate::vm::VmAttributes::default(),
            manifest: Manifest {
                memory: MemoryGeometry::new(PageSize::SIZE_4K, 100).unwrap(),
                data_streams: 2,
                qemu: None,
                postcopy: false,
                start_paused: false,
                plan: crate::model::MigrationPlan::default(),
                reuse: Some(Box::new(crate::reuse::ReuseOffer {
                    image: crate::reuse::RetainedId([4; 16]),
                    key: crate::reuse::ReuseKey::from_bytes([5; 32]),
                })),
                disks: vec![crate::disk::DiskGeometry {
                    name: "root".parse().unwrap(),
                    bytes: 8192,
                    base: Some(crate::disk::BaseRef {
                        name: "debian".parse().unwrap(),
                        root: crate::digest::Digest([6; 32]),
                    }),
                }],
            },
            ticket: crate::ticket::SignedTicket {
                body: vec![1],
                signature: vec![2; 64],
                chain: vec![vec![3]],
            },
        })
    }

    fn strip(frame: Vec<u8>) -> Bytes {
        Bytes::from(frame).slice(LEN_PREFIX..)
    }

    #[test]
    fn round_trips() {
        let header = BatchHeader {
            seq: 3,
            round: 2,
            runs: vec![Run {
                gap: 5,
                len: 1,
                kind: RunKind::Data,
            }],
            compression: Compression::None,
        };
        for m in [
            propose(),
            Message::Handover(Handover {
                receipt: SignedReceipt {
                    body: vec![1],
                    signature: vec![2; 64],
                    chain: vec![],
                },
                reuse: None,
            }),
            Message::Abort(Abort {
                reason: Reason::RootMismatch,
            }),
            Message::PageBatch(header, Bytes::from(vec![1u8; 4096])),
        ] {
            let bytes = m.encode().unwrap();
            assert_eq!(Message::decode(strip(bytes)).unwrap(), m);
        }
    }

    #[test]
    fn bad_input_is_typed() {
        assert_eq!(
            Message::decode(Bytes::from_static(&[0])),
            Err(DecodeError::InvalidTag)
        );
        assert_eq!(
            Message::decode(Bytes::from_static(&[200, 1])),
            Err(DecodeError::UnknownTag(200))
        );
        let mut f = propose().encode().unwrap();
        f.push(0);
        assert!(matches!(
            Message::decode(strip(f)),
            Err(DecodeError::Trailing { extra: 1, .. })
        ));
        let f = propose().encode().unwrap();
        let short = Bytes::from(f[LEN_PREFIX..f.len() - 1].to_vec());
        assert!(matches!(
            Message::decode(short),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(Bytes::from_static(&[tag::HANDOVER, 0, 0, 0, 0, 0])),
            Err(DecodeError::Trailing { .. })
        ));
        // A fault request for no page, or for more than MAX_FETCH.
        for n in [0, MAX_FETCH + 1] {
            let f = Message::Fetch(Fetch {
                pages: (0..n as u64).map(crate::page::PageIndex).collect(),
            })
            .encode()
            .unwrap();
            assert!(
                matches!(
                    Message::decode(strip(f)),
                    Err(DecodeError::Malformed { .. })
                ),
                "{n} pages"
            );
        }
        let ok = Message::Fetch(Fetch {
            pages: vec![crate::page::PageIndex(9)],
        });
        assert_eq!(Message::decode(strip(ok.encode().unwrap())), Ok(ok));
        // A round end over more streams than any migration has.
        let many = Message::RoundEnd(RoundEnd {
            round: 1,
            batches: vec![1; usize::from(MAX_DATA_STREAMS) + 2],
        });
        assert!(matches!(
            Message::decode(strip(many.encode().unwrap())),
            Err(DecodeError::Malformed { .. })
        ));
        for ok in [
            Message::RoundEnd(RoundEnd {
                round: 3,
                batches: vec![4, 5],
            }),
            Message::RoundApplied(RoundApplied { round: 3 }),
            Message::Resume(Resume {
                migration: crate::names::MigrationId([7; 16]),
                ticket: crate::digest::Digest([9; 32]),
            }),
            Message::Resumed(Resumed {
                missing: vec![0b1011, 0],
            }),
        ] {
            assert_eq!(Message::decode(strip(ok.encode().unwrap())), Ok(ok));
        }
    }

    #[test]
    fn invalid_geometry_does_not_decode() {
        // A page size of 3 must be refused while parsing, not later.
        let mut f = propose().encode().unwrap();
        // Find the page-size varint (4096 = 0x80 0x20) and change it to 3.
        let pos = f
            .windows(2)
            .position(|w| w == [0x80, 0x20])
            .expect("page size in encoding");
        f.splice(pos..pos + 2, [3u8]);
        assert!(matches!(
            Message::decode(strip(f)),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn negotiation() {
        let a = VersionRange { min: 1, max: 3 };
        assert_eq!(a.negotiate(VersionRange { min: 2, max: 5 }), Some(3));
        assert_eq!(a.negotiate(VersionRange { min: 4, max: 5 }), None);
    }
}
