//! What a migration starts with: the versions and capabilities both peers
//! negotiate, the [`Manifest`] of what will be sent, [`Propose`] and its
//! answers ([`Accept`], [`Reject`]), and the [`Reason`] a migration is
//! refused or ended for ([`Abort`]).

use serde::{Deserialize, Serialize};

use crate::names::{MigrationId, VmName};
use crate::page::MemoryGeometry;
use crate::receipt::SignedReceipt;

#[cfg(doc)]
use super::PostcopySwitch;

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
///
/// 4: `Started.pause`, the destination's share of a pre-copy pause.
///
/// 5: `ChannelRead` (tag 27), a stream migration's window per channel: a
/// source paces its QEMU's channels by the destination's reports, which a
/// version-4 destination never sends.
///
/// 6: `StreamsDone` names what the source sent on each channel only
/// ([`crate::stream::ChannelSent`]), once its own side has ended; the way
/// back is checked by the source against `Ready`'s root. A version-5
/// `StreamsDone` (both ways per channel) would be misread.
pub const PROTOCOL_VERSION: u16 = 6;

/// The oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 6;

/// Most data streams one migration may use.
pub const MAX_DATA_STREAMS: u16 = crate::model::MAX_STREAMS;

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
    /// Not negotiated but declared: the source commits through a fleet
    /// registry (`agent::registry`), so the destination must commit
    /// through it too, or refuse; a destination without one that ran the
    /// VM would leave the registry naming the source.
    pub const REGISTRY: Capabilities = Capabilities(8);
    /// The destination answers a [`crate::stream::Probe`] on the control
    /// stream at once, so the source times the control path with probes
    /// instead of `Propose`→`Accept` and `RoundEnd`→`RoundApplied`, which
    /// also hold the destination's work: making the staging, applying what
    /// was still in flight — hundreds of milliseconds on a host busy with
    /// other migrations, which made the handover look too slow for any
    /// pause to meet the target.
    pub const PROBE: Capabilities = Capabilities(16);
    /// Everything this build supports.
    pub const OURS: Capabilities =
        Capabilities(Self::ZSTD.0 | Self::DELTA.0 | Self::REUSE.0 | Self::PROBE.0);

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

/// Either way: the migration is over, unsuccessfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// Why.
    pub reason: Reason,
}
