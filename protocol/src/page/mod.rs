//! Guest-memory geometry, page sets, and the page-batch codec.
//!
//! Pages travel in *batches*: a [`BatchHeader`] listing the pages as runs of
//! consecutive indexes, each run of one [`RunKind`], followed by a payload,
//! raw or compressed with zstd as one block. A batch is compressed whole
//! because zstd over 64 KiB is both faster per byte and tighter than page by
//! page; a batch that does not shrink goes raw, and a [`Compressor`] that
//! keeps failing backs off so incompressible memory does not pay for
//! compression attempts.
//!
//! The payload holds, in page order:
//!
//! | page kind | bytes in the payload |
//! |---|---|
//! | [`RunKind::Zero`] | none |
//! | [`RunKind::Data`] | the page, `page_size` bytes |
//! | [`RunKind::Delta`] | a `u16` little-endian length `n` (`0..=page_size/2`), then `n` bytes of [`crate::delta`] against the version sent before |
//! | [`RunKind::Retained`] | none: the destination opens the page from the image it retained ([`crate::reuse`]); only when it accepted [`crate::message::Capabilities::REUSE`] |
//!
//! The decoder bounds the payload before it decompresses it (`page_size` a
//! data page, `2 + page_size/2` a delta page), checks every delta's
//! structure, and hands out [`PageData`]; applying a delta to the staged page
//! is the caller's ([`PageData::write_to`]). A delta only makes sense if the
//! destination holds the version it was made against, which the stream
//! ordering below guarantees.
//!
//! Pages are striped over the data streams by [`stream_for`]: every version
//! of a page travels on the same stream, so the per-stream ordering QUIC
//! gives is enough to apply versions in the order they were read.
//!
//! # Parts
//! - geometry ([`crate::geometry`], re-exported here): page sizes,
//!   [`MemoryGeometry`], [`PageIndex`], [`PageBitmap`], striping
//!   ([`stream_for`]) and the size limits; a leaf module that
//!   [`crate::delta`] builds on too.
//! - `batch`: the batch format on the wire ([`BatchHeader`], [`Run`],
//!   [`RunKind`], [`Compression`]) and [`EncodingStats`].
//! - `encode`: the sender's side, [`BatchBuilder`] and [`Compressor`].
//! - `receive`: the receiver's side, [`StreamReceiver`], which enforces
//!   order and striping and bounds every payload before it decodes it.

mod batch;
mod encode;
mod receive;
#[cfg(test)]
mod tests;

pub use crate::geometry::{
    is_zero, saturating_usize, stream_for, GeometryError, MemoryGeometry, PageBitmap, PageIndex,
    PageSize, MAX_BATCH_BYTES, MAX_PAGE_COUNT, STRIPE_PAGES,
};
pub use batch::{BatchHeader, Compression, EncodingStats, Run, RunKind, ZstdError};
pub use encode::{BatchBuilder, BuildError, Compressor, EncodedBatch};
pub use receive::{BatchError, DecodedBatch, PageData, StreamReceiver};
