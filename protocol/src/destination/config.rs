//! What the caller allows a destination: limits, timeouts, the source it
//! expects and the notary that signs ([`DestinationConfig`]).

use std::time::Duration;

use crate::message::Capabilities;

/// Limits and timeouts of the destination.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Largest guest memory accepted.
    pub max_memory_bytes: u64,
    /// Most disk bytes (all disks of the VM together) accepted.
    pub max_disk_bytes: u64,
    /// Features offered.
    pub capabilities: Capabilities,
    /// How long to wait for Handover after Ready.
    pub handover_timeout: Duration,
    /// The connected source (its `Sent` receipt must be its own).
    pub peer: crate::names::SpiffeId,
    /// Signs our receipts and checks the source's.
    pub notary: crate::receipt::Notary,
    /// After a post-copy switch, how long to wait for the source to come
    /// back on a new connection when the link breaks (zero: no recovery).
    pub recovery: Duration,
    /// Before the VM runs here, how long the source may send nothing — no
    /// message, no page batch — before the migration is given up and the
    /// staging copy discarded (zero: no limit). A silent source must not
    /// hold staging memory and disk forever over a connection its
    /// keep-alives hold open.
    pub silence: Duration,
    /// Most bytes the migration's bookkeeping may take here (the Merkle
    /// tree over every page and disk block: [`BOOKKEEPING_PER_LEAF`] a
    /// leaf); a proposal that needs more is refused before anything is
    /// allocated.
    pub max_bookkeeping_bytes: u64,
}

/// What the destination holds per leaf (page or disk block) while a
/// migration is in flight: the leaf's digest and its share of the tree's
/// inner nodes, 32 bytes each.
pub const BOOKKEEPING_PER_LEAF: u64 = 64;
