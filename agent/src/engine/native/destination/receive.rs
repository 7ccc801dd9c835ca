//! Receiving pages and blocks: the data streams accepted, a decoder thread
//! per data stream staging what arrives (or installing it after a
//! post-copy switch, only where still missing), the post-copy fault
//! stream applied on the task that reads it, and disks started from base
//! images.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::transport::RecvStream;
use convoy_protocol::destination::{DestinationError, LocalFailure};
use convoy_protocol::digest::{leaf_digest, zero_leaf, Digest};
use convoy_protocol::message::Message;
use convoy_protocol::page::is_zero;
use convoy_protocol::page::{BatchError, PageData, PageIndex, StreamReceiver};

use crate::backend::sim::SimVm;
use crate::backend::{BackendError, Staging};
use crate::transport::{read_message, WireError};

use super::{Event, Incoming, OpenFailed, Reuse};

/// A failure of this host while staging: the source is not at fault.
#[derive(Debug, thiserror::Error)]
enum StagingFault {
    /// A decoder thread would not start.
    #[error("decoder thread: {0}")]
    DecoderThread(#[source] std::io::Error),
    /// A page or block could not be staged or read back.
    #[error("{0}")]
    Stage(#[source] BackendError),
    /// A page could not be installed after the switch.
    #[error("installing page {page}: {error}")]
    Install {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        error: BackendError,
    },
}

impl From<StagingFault> for Box<Event> {
    fn from(f: StagingFault) -> Box<Event> {
        Box::new(Event::Bad(DestinationError::Staging(LocalFailure::new(f))))
    }
}

impl Incoming {
    /// Accepts the data streams the manifest announced, on the link's
    /// first connection and on its lanes ([`super::lanes`]) together.
    pub(super) fn accept_streams(&mut self) {
        let n = self.streams + u16::from(self.postcopy);
        self.unopened = Arc::new(AtomicU16::new(n));
        self.all_opened = Arc::new(tokio::sync::Notify::new());
        self.spawn_acceptor(self.conn.clone(), None);
    }

    /// Accepts data streams on `conn` (the link's first connection, or
    /// lane `lane`) until the link has all it announced: each stream's
    /// first message must name this migration. The first connection's
    /// end is the link's; a lane's is once it carries a stream (a lane
    /// the source gave up before using it ends alone).
    pub(super) fn spawn_acceptor(&mut self, conn: crate::transport::Connection, lane: Option<u16>) {
        let tx = self.tx.clone();
        let migration = self.migration;
        let (unopened, all_opened) = (self.unopened.clone(), self.all_opened.clone());
        self.link_tasks.push(crate::engine::spawn(async move {
            let mut carried = 0u16;
            loop {
                // Armed before the count is read: the last stream, opened
                // on another connection meanwhile, is not missed.
                let opened = all_opened.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if unopened.load(Ordering::Acquire) == 0 {
                    break;
                }
                let accepted = tokio::select! {
                    r = conn.accept_uni() => r,
                    () = &mut opened => break,
                };
                let mut recv = match accepted {
                    Ok(r) => r,
                    Err(e) => {
                        match lane.filter(|_| carried == 0) {
                            Some(n) => tracing::info!(lane = n, "lane closed unused: {e}"),
                            None => {
                                let _ = tx.send(Event::OpenFailed(match lane {
                                    Some(lane) => OpenFailed::Lane { lane, error: e },
                                    None => OpenFailed::Accept(e),
                                }));
                            }
                        }
                        return;
                    }
                };
                // One more than announced (over several connections) is
                // not read.
                match unopened
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                {
                    Ok(1) => all_opened.notify_waiters(),
                    Ok(_) => {}
                    Err(_) => break,
                }
                carried += 1;
                match read_message(&mut recv).await {
                    Ok(Some(Message::DataStreamOpen(o))) if Some(o.migration) == migration => {
                        let _ = tx.send(Event::Opened(o.stream, recv));
                    }
                    Ok(Some(other)) => {
                        let _ = tx.send(Event::Bad(DestinationError::Unexpected {
                            phase: "opening a data stream",
                            message: other.kind(),
                        }));
                        return;
                    }
                    Ok(None) => {
                        let _ = tx.send(Event::OpenFailed(OpenFailed::Closed));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(match e {
                            WireError::Decode(d) => Event::Bad(d.into()),
                            other => Event::OpenFailed(OpenFailed::Read(other)),
                        });
                        return;
                    }
                }
            }
            // Every stream of the link is open. A lane that carries some
            // is part of the link from here: its loss is the link's (the
            // first connection's is seen by its control stream).
            if let Some(lane) = lane.filter(|_| carried > 0) {
                let error = conn.closed().await;
                let _ = tx.send(Event::OpenFailed(OpenFailed::Lane { lane, error }));
            }
        }));
    }

    /// Starts each incoming disk whose base this host holds (same name,
    /// root and size) as a copy of it; returns, per disk, the base's
    /// leaves when it did (the tree starts from them). A base that cannot
    /// be copied is not held: its blocks then all come.
    pub(super) async fn stage_bases(
        &mut self,
        staging: &Arc<SimVm>,
        manifest: &convoy_protocol::message::Manifest,
    ) -> Vec<Option<Vec<convoy_protocol::digest::Digest>>> {
        let Some(bases) = self.host.bases.clone() else {
            return Vec::new();
        };
        if manifest.disks.iter().all(|d| d.base.is_none()) {
            return Vec::new();
        }
        let (staging, disks) = (staging.clone(), manifest.disks.clone());
        let block = manifest.memory.page_size().bytes();
        let ranges = convoy_protocol::disk::leaf_ranges(manifest.memory, &manifest.disks);
        let staged = tokio::task::spawn_blocking(move || {
            disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let index = d
                        .base
                        .as_ref()
                        .and_then(|b| bases.find(b, d.bytes, block))?;
                    match staging.stage_base(i, &index) {
                        Ok(()) => Some(index.leaves.clone()),
                        Err(e) => {
                            tracing::warn!("cannot start disk {} from its base: {e}", d.name);
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.base_ranges = Arc::new(
            staged
                .iter()
                .zip(ranges)
                .filter(|(held, _)| held.is_some())
                .map(|(_, r)| r)
                .collect(),
        );
        staged
    }

    pub(super) fn spawn_decoder(&mut self, stream: u16, mut recv: RecvStream) {
        let (Some(staging), Some(geometry)) = (self.staging.clone(), self.geometry) else {
            return;
        };
        let faults = stream == self.streams;
        // Retained pages come on the data streams, never on the fault one.
        let reuse = self.reuse.clone().filter(|_| !faults);
        let bases = self.base_ranges.clone();
        let mut rx = if faults {
            // The post-copy fault stream: pages in the order asked.
            StreamReceiver::unstriped(stream, geometry)
        } else {
            StreamReceiver::new(stream, self.streams, geometry)
        };
        if !faults && (reuse.is_some() || !bases.is_empty()) {
            rx.accept_retained();
        }
        let mut applier = Applier {
            stream,
            background: !faults,
            rx,
            staging,
            reuse,
            bases,
            switched: self.switched.clone(),
            scratch: vec![0u8; geometry.page_size().bytes()],
            tx: self.tx.clone(),
            priority: crate::engine::priority::PushPriority::default(),
        };
        let tx = self.tx.clone();
        if faults {
            // A vCPU waits on each of its frames, a page or a few: applied
            // where it is read, without a hand-off to a thread that may
            // wait for a CPU (one wake-up less on the fault's path).
            self.link_tasks.push(crate::engine::spawn(async move {
                while let Some(m) = next_frame(read_message(&mut recv).await, &tx) {
                    if !applier.apply(m) {
                        return;
                    }
                }
            }));
            return;
        }
        // Bounded in bytes, not frames: a source sending only 4 MiB frames
        // holds at most QUEUE_BYTES here per stream, not 32 × 4 MiB. No
        // lock between the reader and the decoder, which may run at
        // `SCHED_IDLE` after a switch (`super::queue`).
        let (feed, mut drain) = super::queue::channel(QUEUE_FRAMES, QUEUE_BYTES as usize);
        let spawned = crate::cpu::spawn(
            std::thread::Builder::new().name(format!("convoy-dec-{stream}")),
            move || {
                // A frame counts against the bounds until it is applied.
                while let Some((m, _taken)) = drain.next() {
                    if !applier.apply(m) {
                        return;
                    }
                }
            },
        );
        if let Ok(handle) = &spawned {
            let mut feed = feed.to(handle.thread().clone());
            self.link_tasks.push(crate::engine::spawn(async move {
                while let Some(m) = next_frame(read_message(&mut recv).await, &tx) {
                    let bytes = queued_bytes(&m) as usize;
                    if !feed.send(m, bytes).await {
                        return;
                    }
                }
            }));
        }
        match spawned {
            Ok(handle) => self.link_threads.push(handle),
            // A local failure, not the link's: never recovered from.
            Err(e) => {
                let _ = self
                    .tx
                    .send(*Box::<Event>::from(StagingFault::DecoderThread(e)));
            }
        }
    }
}

/// The frame a stream's read gave, or `None` once it ended (reported on
/// `tx`: the end, or bytes that do not decode; a broken link is the
/// connection's to report).
fn next_frame(read: Result<Option<Message>, WireError>, tx: &super::Tx) -> Option<Message> {
    match read {
        Ok(Some(m)) => Some(m),
        Ok(None) => {
            let _ = tx.send(Event::StreamEnded);
            None
        }
        Err(WireError::Decode(d)) => {
            let _ = tx.send(Event::Bad(d.into()));
            None
        }
        Err(_) => None,
    }
}

/// One stream's frames into staging: decoded, checked, staged (or
/// installed after a post-copy switch) and reported applied.
struct Applier {
    stream: u16,
    /// A data stream: background to the fault stream after a switch.
    background: bool,
    rx: StreamReceiver,
    staging: Arc<SimVm>,
    reuse: Option<Reuse>,
    bases: Arc<Vec<std::ops::Range<u64>>>,
    switched: Arc<std::sync::atomic::AtomicBool>,
    /// One page.
    scratch: Vec<u8>,
    tx: super::Tx,
    /// How this decoder gives way to the faults after a switch.
    priority: crate::engine::priority::PushPriority,
}

impl Applier {
    /// Applies frame `m`; `false` when the stream must stop (reported on
    /// `tx`).
    fn apply(&mut self, m: Message) -> bool {
        let switched = self.switched.load(Ordering::Acquire);
        // After a post-copy switch a data stream's pages are background
        // to the fault stream's (never lowered): `SCHED_IDLE` where it can
        // come back ([`crate::engine::priority`]). Not with disks: a disk
        // block is written under the lock a guest write and a fault's
        // block wait on, and an idle thread preempted there would hold
        // them; nice + 10 then, as before.
        if self.background && switched {
            if self.staging.has_disks() {
                crate::engine::yield_to_faults();
            } else {
                self.priority.background();
            }
        }
        let Message::PageBatch(header, payload) = m else {
            let _ = self.tx.send(Event::Bad(DestinationError::Unexpected {
                phase: "receiving pages",
                message: m.kind(),
            }));
            return false;
        };
        let batch = match self.rx.receive(&header, &payload) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.tx.send(Event::Bad(e.into()));
                return false;
            }
        };
        let mut leaves = Vec::with_capacity(batch.len());
        let applied = if switched {
            install(&self.staging, &batch, &mut self.scratch, &mut leaves)
        } else {
            stage(
                &self.staging,
                self.reuse.as_ref(),
                &self.bases,
                &batch,
                &mut self.scratch,
                &mut leaves,
            )
        };
        if let Err(e) = applied {
            let _ = self.tx.send(*e);
            return false;
        }
        self.tx
            .send(Event::Applied {
                stream: self.stream,
                seq: batch.seq,
                leaves,
            })
            .is_ok()
    }
}

/// Bytes of decoded frames a data stream may hold before it is applied:
/// two of the largest batches a source sends (1 MiB each; a larger frame,
/// up to the 4 MiB any frame may be, waits for the queue to empty). The
/// receive window, in the agent's migration budget, holds what is not
/// read yet; this queue is outside it, and at 8 MiB a stream ten VMs
/// migrating at once held 160 MiB here.
#[allow(clippy::cast_possible_truncation)] // CAST: MAX_BATCH_BYTES is 1 MiB.
pub(super) const QUEUE_BYTES: u32 = 2 * convoy_protocol::geometry::MAX_BATCH_BYTES as u32;
/// Frames a data stream may hold, whatever their size.
const QUEUE_FRAMES: usize = 32;

/// What a queued frame counts against [`QUEUE_BYTES`]: its payload, at
/// least one byte.
fn queued_bytes(m: &Message) -> u32 {
    match m {
        Message::PageBatch(_, payload) => u32::try_from(payload.len())
            .unwrap_or(QUEUE_BYTES)
            .clamp(1, QUEUE_BYTES),
        _ => 1,
    }
}

/// Before a post-copy switch (and in pre-copy): writes the pages of
/// `batch` to staging and gives each the leaf of what staging then holds.
pub(super) fn stage(
    staging: &SimVm,
    reuse: Option<&Reuse>,
    bases: &[std::ops::Range<u64>],
    batch: &convoy_protocol::page::DecodedBatch,
    scratch: &mut [u8],
    leaves: &mut Vec<(PageIndex, Digest)>,
) -> Result<(), Box<Event>> {
    // A failed write or read here (a disk file) is ours, not the source's.
    let local = |e: BackendError| Box::<Event>::from(StagingFault::Stage(e));
    let memory_pages = crate::backend::VmBackend::geometry(staging).page_count();
    for (idx, data) in batch.pages() {
        // A whole or zero memory page is in staging exactly as it came (a
        // copy into the mapping, which cannot fail or fall short): its
        // leaf is that of the bytes that came, without reading them back.
        if idx.0 < memory_pages {
            match data {
                PageData::Zero => {
                    staging.write_page(idx, None).map_err(local)?;
                    leaves.push((idx, zero_leaf(scratch.len())));
                    continue;
                }
                PageData::Full(bytes) if bytes.len() == scratch.len() => {
                    staging.write_page(idx, Some(bytes)).map_err(local)?;
                    leaves.push((idx, page_leaf(bytes)));
                    continue;
                }
                _ => {}
            }
        }
        match data {
            PageData::Zero => staging.write_page(idx, None).map_err(local)?,
            PageData::Full(bytes) => staging.write_page(idx, Some(bytes)).map_err(local)?,
            // A disk block the staged base holds: it is there already
            // (its leaf, below, is what staging holds).
            PageData::Retained if bases.iter().any(|r| r.contains(&idx.0)) => {}
            // Opened from the image retained here (authenticated, bound to
            // the image and the page); a page that does not open is the
            // source's lie or a tampered image: abort.
            PageData::Retained => {
                let opened = match reuse {
                    Some(r) => r.image.open_into(&r.key, idx, scratch),
                    None => Err(convoy_protocol::reuse::ReuseError::NoSuchPage(idx.0)),
                };
                if let Err(e) = opened {
                    return Err(Box::new(Event::Bad(e.into())));
                }
                staging.write_page(idx, Some(scratch)).map_err(local)?;
            }
            // A delta applies to the version staged before (every version
            // of a page arrives in order on this one stream).
            delta => {
                staging.read_staged(idx, scratch).map_err(local)?;
                if let Err(error) = delta.write_to(scratch) {
                    let bad = BatchError::BadDelta { page: idx.0, error };
                    return Err(Box::new(Event::Bad(bad.into())));
                }
                staging.write_page(idx, Some(scratch)).map_err(local)?;
            }
        }
        // Hash what staging holds (a disk block's file, a delta or a
        // retained page), not what we meant to write.
        staging.read_staged(idx, scratch).map_err(local)?;
        leaves.push((idx, page_leaf(scratch)));
    }
    Ok(())
}

/// Post-copy: installs the pages of `batch` that are still missing, and
/// gives each installed page the leaf of the bytes installed. A page
/// already present (a fault and the push crossed) is left alone.
pub(super) fn install(
    staging: &SimVm,
    batch: &convoy_protocol::page::DecodedBatch,
    scratch: &mut [u8],
    leaves: &mut Vec<(PageIndex, Digest)>,
) -> Result<(), Box<Event>> {
    for (idx, data) in batch.pages() {
        let bytes = match data {
            PageData::Zero => None,
            PageData::Full(b) => Some(b),
            // A delta's base, and a retained page's slot, may have changed
            // since the switch: only whole pages come after it.
            _ => {
                return Err(Box::new(Event::Bad(DestinationError::Unexpected {
                    phase: "post-copy",
                    message: "a delta or retained page",
                })))
            }
        };
        // A local failure: not the source's fault, but the VM cannot get
        // its pages any more.
        let installed = staging
            .install_page(idx, bytes)
            .map_err(|error| StagingFault::Install { page: idx.0, error })?;
        if installed {
            let leaf = match bytes {
                Some(b) => page_leaf(b),
                None => zero_leaf(scratch.len()),
            };
            leaves.push((idx, leaf));
        }
    }
    Ok(())
}

/// The leaf digest of one page, with the zero-page leaf precomputed.
pub(super) fn page_leaf(page: &[u8]) -> Digest {
    if is_zero(page) {
        zero_leaf(page.len())
    } else {
        leaf_digest(page)
    }
}
