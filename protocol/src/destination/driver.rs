//! The destination's side of its driver: what it asks the driver to do
//! ([`DestinationAction`]) and how a migration ends ([`DestinationEvent`]).

use crate::digest::Digest;
use crate::message::{Manifest, Message};
use crate::names::{MigrationId, VmName};
use crate::page::PageBitmap;

#[cfg(doc)]
use super::Destination;

/// What the driver must do.
#[derive(Debug)]
#[must_use]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum DestinationAction {
    /// Send on the control stream (a `Ready` once written: call
    /// [`Destination::note_ready_written`], which times the pause).
    Send(Message),
    /// Check the ticket against the connected source, then reserve a
    /// zeroed staging image for the VM, then call
    /// [`Destination::handle_staging_ready`] (or `_failed`).
    PrepareStaging {
        /// VM.
        vm: VmName,
        /// Its manifest.
        manifest: Manifest,
        /// The migration id the source proposed.
        migration: MigrationId,
        /// The operator's ticket, as proposed.
        ticket: crate::ticket::SignedTicket,
        /// The VM's attributes, as proposed (bounds checked), for the
        /// policy.
        attributes: crate::vm::VmAttributes,
    },
    /// Start the VM from staging with this device state, then call
    /// [`Destination::handle_started`] (or, with what the record and the
    /// start took, [`Destination::handle_started_after`]).
    StartVm {
        /// Device state.
        device_state: Vec<u8>,
    },
    /// Drop and wipe the staging image (after a post-copy switch: stop
    /// the VM that runs from it, too).
    DiscardStaging,
    /// Post-copy: make the `owed` pages of staging missing, start the VM
    /// from it on demand paging with this device state, then call
    /// [`Destination::handle_postcopy_started`] (or
    /// [`Destination::handle_start_failed`]). From now on a batch fills
    /// only pages still missing, and reports a leaf only for the pages it
    /// installed: the digest of the bytes installed.
    StartPostcopy {
        /// Device state.
        device_state: Vec<u8>,
        /// Pages whose current version is still to come: over the
        /// memory's pages, or (storage post-copy) over every leaf, disk
        /// blocks after the memory's pages; an owed disk block is fetched
        /// when the guest writes it.
        owed: PageBitmap,
    },
    /// Post-copy: the VM that runs since the switch is verified and handed
    /// over; record it as ours, then call [`Destination::handle_started`].
    TrustVm,
    /// Recovery: the link broke after the switch, or in a pre-copy round.
    /// Drop the connection and its streams (report batches its decoders
    /// still apply with [`Destination::handle_stale_batch_applied`]), keep
    /// the VM (or the staging copy), and
    /// pass the first message of a new connection that carries a Resume
    /// for this migration to [`Destination::handle_resume`] until
    /// [`Destination::poll_timeout`].
    AwaitResume,
}

/// How a destination migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum DestinationEvent {
    /// The VM runs here.
    Started {
        /// The root it was verified against.
        memory_root: Digest,
        /// Our receipts and the source's `Sent`, all verified.
        receipts: Vec<crate::receipt::SignedReceipt>,
    },
    /// Nothing is left here.
    Failed(String),
    /// After a post-copy switch, the migration could not finish: the VM
    /// runs (or waits for pages) here and is kept; the source keeps its
    /// paused copy. Someone must decide.
    InDoubt(String),
}
