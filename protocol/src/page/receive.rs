//! The receiver's side of the batch codec: [`StreamReceiver`] checks a
//! stream's batches arrive in order, each page on its stripe's stream and
//! within memory, bounds the payload before it decompresses it, checks
//! every delta, and hands out [`PageData`] to apply.

use thiserror::Error;

use super::batch::{BatchHeader, Compression, RunKind, ZstdError};
use crate::delta::{self, DeltaError};
use crate::geometry::{stream_for, MemoryGeometry, PageIndex};

/// Why a received batch was refused. Every variant is the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Batches on a stream must be numbered 0, 1, 2, … without gaps.
    #[error(
        "stream {stream}: batch {got} arrived, expected {expected} (reordered, duplicated or lost)"
    )]
    OutOfOrder {
        /// Stream index.
        stream: u16,
        /// The sequence number expected.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A run of length zero, or runs that overflow.
    #[error("malformed run list")]
    BadRuns,
    /// A page past the end of guest memory.
    #[error("page {page} is past the end of memory ({count} pages)")]
    PageOutOfRange {
        /// Page.
        page: u64,
        /// Pages in memory.
        count: u64,
    },
    /// More pages than a batch may hold.
    #[error("batch of {0} pages exceeds the limit")]
    TooManyPages(u64),
    /// A page that belongs to another stream.
    #[error("page {page} arrived on stream {stream}, it belongs on stream {expected}")]
    WrongStream {
        /// Page.
        page: u64,
        /// Stream it arrived on.
        stream: u16,
        /// Stream it belongs on.
        expected: u16,
    },
    /// The payload does not hold exactly the pages: too short or too long
    /// for a batch of whole pages, or longer than its pages and deltas.
    #[error("payload of {got} bytes, expected {expected}")]
    PayloadSize {
        /// Expected raw bytes.
        expected: usize,
        /// Raw bytes found.
        got: usize,
    },
    /// The payload is larger than its pages could take (`page_size` a data
    /// page, `2 + page_size / 2` a delta page).
    #[error("payload of {got} bytes, at most {max} possible")]
    PayloadTooLarge {
        /// Most raw bytes the runs allow.
        max: usize,
        /// Raw bytes found.
        got: usize,
    },
    /// The payload ends inside a page or its delta.
    #[error("payload ends inside page {page}")]
    PayloadTruncated {
        /// The page.
        page: u64,
    },
    /// A delta longer than [`crate::page::PageSize::max_delta_bytes`].
    #[error("delta of {len} bytes for page {page}, at most {max} allowed")]
    DeltaTooLong {
        /// The page.
        page: u64,
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A delta that does not fit its page.
    #[error("page {page}: {error}")]
    BadDelta {
        /// The page.
        page: u64,
        /// What is wrong with it.
        #[source]
        error: DeltaError,
    },
    /// zstd refused the payload (corrupt, or larger than declared).
    #[error("zstd payload does not decode: {0}")]
    Zstd(#[from] ZstdError),
    /// A [`RunKind::Retained`] page, but no retained image was agreed on.
    #[error("page {page} sent as retained, but no retained image was agreed on")]
    UnexpectedRetained {
        /// The first page of the run.
        page: u64,
    },
    /// The batch's round is older than one already seen on the stream.
    #[error("round {got} after round {last} on stream {stream}")]
    RoundWentBack {
        /// Stream.
        stream: u16,
        /// Last round seen.
        last: u32,
        /// Round received.
        got: u32,
    },
}

/// Decodes the batches of one data stream, enforcing order and striping.
pub struct StreamReceiver {
    stream: u16,
    streams: u16,
    /// Pages must be on their stripe's stream (not on the fault stream).
    striped: bool,
    geometry: MemoryGeometry,
    next_seq: u64,
    last_round: u32,
    /// [`RunKind::Retained`] pages are accepted (the destination accepted
    /// [`crate::message::Capabilities::REUSE`]).
    retained: bool,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// The pages of one batch, decoded.
#[derive(Debug)]
pub struct DecodedBatch {
    /// Sequence number on its stream.
    pub seq: u64,
    /// Copy round.
    pub round: u32,
    pages: Vec<Decoded>,
    data: bytes::Bytes,
}

/// One page of a decoded batch: its kind and where its bytes are in the
/// payload (empty for a zero page).
#[derive(Debug, Clone, Copy)]
struct Decoded {
    idx: PageIndex,
    kind: RunKind,
    start: usize,
    len: usize,
}

/// What a batch carries for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageData<'a> {
    /// The page is all zero.
    Zero,
    /// The whole page.
    Full(&'a [u8]),
    /// A delta to XOR into the version of the page sent before (checked
    /// against the page size at decode; apply with [`crate::delta::apply`]).
    Delta(&'a [u8]),
    /// Open the page from the image retained for the VM
    /// ([`crate::reuse::RetainedImage::open_into`]); [`PageData::write_to`]
    /// cannot.
    Retained,
}

impl PageData<'_> {
    /// Turns `page`, the staged version of the page, into the new one:
    /// zeroes it, overwrites it, or applies the delta. On error `page` is
    /// unchanged.
    pub fn write_to(self, page: &mut [u8]) -> Result<(), DeltaError> {
        match self {
            PageData::Zero => page.fill(0),
            PageData::Full(b) if b.len() == page.len() => page.copy_from_slice(b),
            PageData::Full(b) => {
                return Err(DeltaError::PageLength {
                    expected: b.len(),
                    got: page.len(),
                })
            }
            PageData::Delta(d) => delta::apply(page, d)?,
            PageData::Retained => return Err(DeltaError::Retained),
        }
        Ok(())
    }
}

impl DecodedBatch {
    /// Each page with what the batch carries for it.
    pub fn pages(&self) -> impl Iterator<Item = (PageIndex, PageData<'_>)> + '_ {
        self.pages.iter().map(move |p| {
            let bytes = &self.data[p.start..p.start + p.len];
            let data = match p.kind {
                RunKind::Zero => PageData::Zero,
                RunKind::Data => PageData::Full(bytes),
                RunKind::Delta => PageData::Delta(bytes),
                RunKind::Retained => PageData::Retained,
            };
            (p.idx, data)
        })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl StreamReceiver {
    /// A receiver for data stream `stream` of `streams`.
    pub fn new(stream: u16, streams: u16, geometry: MemoryGeometry) -> Self {
        StreamReceiver {
            stream,
            streams,
            striped: true,
            geometry,
            next_seq: 0,
            last_round: 0,
            retained: false,
            decompressor: None,
        }
    }

    /// Accepts [`RunKind::Retained`] pages from now on (only after
    /// accepting [`crate::message::Capabilities::REUSE`] for an image this
    /// host holds); without this they are refused.
    pub fn accept_retained(&mut self) {
        self.retained = true;
    }

    /// A receiver for the post-copy fault stream `stream`, whose pages may
    /// be any pages (they are sent in the order the VM asked for them).
    pub fn unstriped(stream: u16, geometry: MemoryGeometry) -> Self {
        StreamReceiver {
            striped: false,
            ..StreamReceiver::new(stream, 1, geometry)
        }
    }

    /// Batches accepted so far.
    pub fn received(&self) -> u64 {
        self.next_seq
    }

    /// Checks and decodes one batch. A raw payload is not copied.
    pub fn receive(
        &mut self,
        header: &BatchHeader,
        payload: &bytes::Bytes,
    ) -> Result<DecodedBatch, BatchError> {
        if header.seq != self.next_seq {
            return Err(BatchError::OutOfOrder {
                stream: self.stream,
                expected: self.next_seq,
                got: header.seq,
            });
        }
        if header.round < self.last_round {
            return Err(BatchError::RoundWentBack {
                stream: self.stream,
                last: self.last_round,
                got: header.round,
            });
        }
        let page = self.geometry.page_size().bytes();
        let max = self.geometry.page_size().max_batch_pages() as u64;
        let count = self.geometry.page_count();
        let mut pages = Vec::new();
        let mut next: u64 = 0;
        let mut total: u64 = 0;
        for run in &header.runs {
            if run.len == 0 {
                return Err(BatchError::BadRuns);
            }
            total += u64::from(run.len);
            if total > max {
                return Err(BatchError::TooManyPages(total));
            }
            let start = next.checked_add(run.gap).ok_or(BatchError::BadRuns)?;
            let end = start
                .checked_add(u64::from(run.len))
                .ok_or(BatchError::BadRuns)?;
            if end > count {
                return Err(BatchError::PageOutOfRange {
                    page: end - 1,
                    count,
                });
            }
            if run.kind == RunKind::Retained && !self.retained {
                return Err(BatchError::UnexpectedRetained { page: start });
            }
            for p in start..end {
                let idx = PageIndex(p);
                let expected = stream_for(idx, self.streams);
                if self.striped && expected != self.stream {
                    return Err(BatchError::WrongStream {
                        page: p,
                        stream: self.stream,
                        expected,
                    });
                }
                pages.push(Decoded {
                    idx,
                    kind: run.kind,
                    start: 0,
                    len: 0,
                });
            }
            next = end;
        }
        let count_of = |kind| pages.iter().filter(|p| p.kind == kind).count();
        let delta_pages = count_of(RunKind::Delta);
        let whole = count_of(RunKind::Data) * page;
        let max_delta = self.geometry.page_size().max_delta_bytes();
        // At most MAX_BATCH_BYTES: a delta page takes less than a page.
        let max = whole + delta_pages * (2 + max_delta);
        let check_size = |got: usize| match delta_pages {
            0 if got != whole => Err(BatchError::PayloadSize {
                expected: whole,
                got,
            }),
            _ if got > max => Err(BatchError::PayloadTooLarge { max, got }),
            _ => Ok(()),
        };
        let data = match header.compression {
            Compression::None => {
                check_size(payload.len())?;
                payload.clone()
            }
            Compression::Zstd => {
                let d = match self.decompressor.as_mut() {
                    Some(d) => d,
                    None => self
                        .decompressor
                        .insert(zstd::bulk::Decompressor::new().map_err(ZstdError::from)?),
                };
                // Bounded: zstd fails rather than write past `max`.
                let out = d.decompress(payload, max).map_err(ZstdError::from)?;
                check_size(out.len())?;
                bytes::Bytes::from(out)
            }
        };
        // Place every page's bytes, checking each delta's length and
        // structure, so that what the caller gets applies cleanly.
        let mut off = 0;
        for p in &mut pages {
            let truncated = BatchError::PayloadTruncated { page: p.idx.0 };
            match p.kind {
                RunKind::Zero | RunKind::Retained => p.start = off,
                RunKind::Data => {
                    if data.len() - off < page {
                        return Err(truncated);
                    }
                    (p.start, p.len) = (off, page);
                }
                RunKind::Delta => {
                    let Some(&[lo, hi]) = data.get(off..off + 2) else {
                        return Err(truncated);
                    };
                    let len = usize::from(u16::from_le_bytes([lo, hi]));
                    if len > max_delta {
                        return Err(BatchError::DeltaTooLong {
                            page: p.idx.0,
                            len,
                            max: max_delta,
                        });
                    }
                    let Some(d) = data.get(off + 2..off + 2 + len) else {
                        return Err(truncated);
                    };
                    delta::check(d, page).map_err(|error| BatchError::BadDelta {
                        page: p.idx.0,
                        error,
                    })?;
                    (p.start, p.len) = (off + 2, len);
                }
            }
            off = p.start + p.len;
        }
        if off != data.len() {
            return Err(BatchError::PayloadSize {
                expected: off,
                got: data.len(),
            });
        }
        self.next_seq += 1;
        self.last_round = header.round;
        Ok(DecodedBatch {
            seq: header.seq,
            round: header.round,
            pages,
            data,
        })
    }
}
