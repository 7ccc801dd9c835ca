//! Post-copy: the switch ([`PostcopySwitch`]), the VM running at the
//! destination ([`PostcopyRunning`]), the pages it asks for ([`Fetch`]),
//! and recovery on a new connection ([`Resume`], [`Resumed`]).

use serde::{Deserialize, Serialize};

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
/// the link of a migration broke (after a post-copy switch, or in a
/// pre-copy round): carry on with `migration`.
/// The destination accepts it only from the agent that started the
/// migration (checked on the new connection's mutual TLS) and for the
/// same ticket; it answers [`Resumed`] after the switch and
/// [`PrecopyResumed`] before it. Nothing else can take over a
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

/// Destination → source: a pre-copy migration resumes on this connection.
/// Both sides count data-stream batches from zero again on the new
/// streams. The source sends again only the pages of its current round
/// that are not both reported sent by its driver and in `held`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyResumed {
    /// The last round this side confirmed with [`super::RoundApplied`]
    /// (0: none yet).
    pub confirmed: u32,
    /// Bitmap words (as [`crate::page::PageBitmap::words`]) over every
    /// leaf: the pages installed here since that confirmation.
    pub held: Vec<u64>,
}
