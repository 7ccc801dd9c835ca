//! # convoy-protocol
//!
//! The sans-IO core of Convoy: everything that crosses the wire and every
//! decision a migration takes, with no sockets, no async runtime and no
//! clock. Time comes in as an argument (`now`), bytes come in as slices, and
//! the state machines answer with actions for a driver to carry out — the
//! same shape as `quinn-proto`. Everything a hostile peer can send is decoded
//! here, so everything here is fuzzed (`fuzz/`).
//!
//! # Layout
//! - [`frame`]: length-prefixed framing with a hard maximum frame size.
//! - [`message`]: the tagged messages of a migration between agents (tag 0
//!   invalid), version and capability negotiation, typed decode errors.
//! - [`geometry`]: page sizes, memory geometry, page indexes and bitmaps,
//!   striping over streams (a leaf module).
//! - [`page`]: memory geometry (re-exported), page bitmaps, the page-batch codec (zero,
//!   whole and delta pages; raw or zstd), stream striping, and the
//!   per-stream receiver that enforces ordering.
//! - [`delta`]: XBZRLE-style delta encoding of a page against its previous
//!   version, its all-or-nothing apply, and the source's bounded cache of
//!   the versions it sent.
//! - [`adapt`]: adaptive compression, the zstd level of a data stream
//!   chosen from measured compression speed, ratio and link rate.
//! - [`digest`]: BLAKE3 page leaves and the RFC 9162-shaped incremental
//!   Merkle tree whose root the destination checks before a VM may start.
//! - [`audit`]: the signed, tamper-evident audit log format and its
//!   offline verification.
//! - [`evidence`]: evidence bundles — a migration's ticket, both agents'
//!   receipts and log records with inclusion proofs — and their offline
//!   check.
//! - [`logtree`]: the append-only audit Merkle log with RFC 9162 inclusion
//!   and consistency proofs.
//! - [`names`]: VM names, agent names, SPIFFE IDs, migration ids.
//! - [`source`] and [`destination`]: the migration state machines
//!   (pre-copy with convergence control, post-copy, hybrid).
//! - [`stream`]: migrations whose state is an opaque stream (QEMU's):
//!   channels, their digests both ways, and the roots receipts bind.
//! - [`signed`]: the envelope every signed statement travels in
//!   ([`signed::Signed`]), each kind's signing context, and the crypto
//!   behind a small signer/verifier trait pair (a leaf module).
//! - [`ticket`]: operator-signed migration tickets and their verification.
//! - [`receipt`]: signed Accepted/Ready/Sent/Started receipts.
//! - [`reuse`]: memory reuse when a VM comes back — the AES-256-GCM
//!   retained image, its key that travels with the VM, and the offer.
//! - [`ctl`]: the operator protocol spoken by `convoyctl`, a frame type of
//!   its own ([`ctl::CtlMessage`]) in the same framing.
//! - [`model`]: shared vocabulary — the migration mode and the
//!   [`model::MigrationPlan`] the operator's ticket signs.
//! - [`admission`]: the destination's one check of a proposal against
//!   its ticket, for every backend.
//! - [`journal`]: the record an agent keeps durably about a migration in
//!   progress, which decision may follow which, and the ownership epoch.
//! - [`units`]: durations in the whole units reports carry, saturating.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod adapt;
pub mod admission;
mod aead_key;
pub mod audit;
pub mod ctl;
pub mod delta;
pub mod destination;
pub mod digest;
pub mod disk;
pub mod evidence;
pub mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod geometry;
pub mod indoubt;
pub mod journal;
pub mod logtree;
pub mod message;
pub mod model;
pub mod names;
pub mod page;
pub mod receipt;
pub mod registry;
pub mod reuse;
pub mod signed;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod ticket;
pub mod units;
pub mod vm;

pub use message::{DecodeError, Message};
