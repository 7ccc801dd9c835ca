//! Post-copy's faults served where they are read: the control stream's
//! reader takes a `Fetch`, reads the pages from the paused VM, encodes
//! them and writes the batch on the fault stream itself, then tells the
//! driver. Before, a Fetch crossed three hand-offs at the source (reader →
//! driver task → encoder thread → writer task), each a wake-up that waits
//! for a CPU while the push keeps both busy (docs/benchmarks.md, "Where a
//! slow fault waits, hop by hop").
//!
//! The state machine still decides when faults may be served this way
//! ([`Source::serving_faults`](convoy_protocol::source::Source::serving_faults)):
//! the driver arms the link's [`FaultSlot`] with the post-copy round. Once
//! the push is done the machine asks the driver to stop
//! (`SourceAction::StopFaults`) before it sends `Finish`, which counts the
//! fault stream's batches: the slot is disarmed under the lock a Fetch is
//! served under, and the Fetches served meanwhile are waited for. A Fetch
//! read while the slot is disarmed (or naming a page past the end) goes to
//! the machine as before, which answers it with `ServePages` (served on a
//! task of the same slot) or as a violation.
//!
//! Costs: the reader reads no control message while it writes a fault's
//! batch (the fault stream has priority, and after the switch nearly all
//! the destination sends is Fetches); a fault on a disk block reads the
//! disk file on a runtime worker (storage post-copy), as the destination
//! writes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use convoy_protocol::message::Fetch;
use convoy_protocol::page::{BatchBuilder, PageBitmap, PageIndex};
use convoy_protocol::source::{fetch_pages, SentBatch};
use tokio::sync::mpsc;

use super::encode::{frame, LinkRate, Shrink};
use super::jobs::{EngineEvent, Served, StreamError};
use crate::backend::VmBackend;
use crate::engine::native::pacer::Pacer;
use crate::transport::SendStream;

/// The slot's round when it is disarmed.
const DISARMED: u64 = u64::MAX;

/// One link's fault stream, shared by its control reader and its driver.
pub(super) struct FaultSlot {
    /// The post-copy round faults are served in now, or [`DISARMED`].
    armed: AtomicU64,
    /// The push under way after the switch: what it owes, and the pages
    /// taken by it or by the faults.
    push: std::sync::Mutex<Option<Push>>,
    /// The fault stream, once opened.
    server: tokio::sync::Mutex<Option<FaultServer>>,
    /// Fetches served here that the driver has not counted yet: each is
    /// added before its batch's `Sent` is reported, so the driver, taking
    /// them before it handles a `Sent`, counts a Fetch before its batch.
    fetches: AtomicU64,
}

/// A post-copy push, as the faults see it.
#[derive(Clone)]
pub(super) struct Push {
    /// The pages it owes (every leaf's bit).
    pub(super) pages: Arc<PageBitmap>,
    /// Pages the faults served or the push's encoders took ([`Served`]).
    pub(super) served: Arc<Served>,
}

impl FaultSlot {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(FaultSlot {
            armed: AtomicU64::new(DISARMED),
            push: std::sync::Mutex::new(None),
            server: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        })
    }

    /// Faults of `round` may be served as they are read (`None`: not now).
    pub(super) fn arm(&self, round: Option<u32>) {
        self.armed
            .store(round.map_or(DISARMED, u64::from), Ordering::Release);
    }

    /// The push now under way (`None` before the switch).
    pub(super) fn set_push(&self, push: Option<Push>) {
        *self
            .push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = push;
    }

    fn push(&self) -> Option<Push> {
        self.push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The link's fault stream, opened (or `None`: gone with its link).
    pub(super) async fn set_server(&self, server: Option<FaultServer>) {
        *self.server.lock().await = server;
    }

    /// Disarms the slot for good (post-copy's push is done:
    /// [`SourceAction::StopFaults`](convoy_protocol::source::SourceAction::StopFaults)),
    /// waiting for a Fetch being served; returns the Fetches served here
    /// and not yet taken.
    pub(super) async fn stop(&self) -> u64 {
        let _server = self.server.lock().await;
        self.armed.store(DISARMED, Ordering::Release);
        self.take_fetches()
    }

    /// Fetches served here since the last call
    /// ([`Source::handle_fetches_served`](convoy_protocol::source::Source::handle_fetches_served)).
    pub(super) fn take_fetches(&self) -> u64 {
        self.fetches.swap(0, Ordering::Acquire)
    }

    /// On the control reader: serves `f` if the slot is armed, the link
    /// has its fault stream and every page is in range (its batch is
    /// reported on `events`); `false` when the machine must take the
    /// Fetch instead.
    pub(super) async fn serve_fetch(
        &self,
        f: &Fetch,
        events: &mpsc::UnboundedSender<EngineEvent>,
    ) -> bool {
        if self.armed.load(Ordering::Acquire) == DISARMED {
            return false;
        }
        let Some(push) = self.push() else {
            return false;
        };
        // Armed is read again, and the Fetch counted, under the lock that
        // `stop` takes: once it returns, every Fetch served here is in its
        // count or an earlier one.
        let mut server = self.server.lock().await;
        let Ok(round) = u32::try_from(self.armed.load(Ordering::Acquire)) else {
            return false;
        };
        let Some(max) = server.as_ref().map(|s| s.max_pages) else {
            return false;
        };
        // Checked, not claimed: a page claimed is one the push leaves out,
        // so only the pages that go are claimed (below).
        let Ok(pages) = fetch_pages(&f.pages, push.pages.len(), max, |q| {
            push.pages.contains(q) && !push.served.contains(q)
        }) else {
            return false;
        };
        self.fetches.fetch_add(1, Ordering::Release);
        serve(&mut server, round, &pages, Some(&push), events).await;
        true
    }

    /// On a task of its own: serves `pages` for the machine's
    /// `ServePages` (a Fetch read while the slot was disarmed).
    pub(super) fn spawn_serve(
        self: &Arc<Self>,
        round: u32,
        pages: Vec<PageIndex>,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) {
        let slot = self.clone();
        crate::engine::spawn(async move {
            let push = slot.push();
            let mut server = slot.server.lock().await;
            serve(&mut server, round, &pages, push.as_ref(), &events).await;
        });
    }
}

/// Serves `pages` on the slot's stream, marking them taken in `push`; a
/// failure ends the stream (reported on `events`).
async fn serve(
    server: &mut Option<FaultServer>,
    round: u32,
    pages: &[PageIndex],
    push: Option<&Push>,
    events: &mpsc::UnboundedSender<EngineEvent>,
) {
    let Some(s) = server.as_mut() else {
        let _ = events.send(EngineEvent::StreamFailed(StreamError::WriterGone));
        return;
    };
    // Before the push's encoders read them: the push leaves them out.
    if let Some(push) = push {
        for &p in pages {
            push.served.claim(p);
        }
    }
    match s.serve(round, pages).await {
        Ok(sent) => {
            let _ = events.send(EngineEvent::Sent(sent));
        }
        Err(e) => {
            *server = None;
            let _ = events.send(EngineEvent::StreamFailed(e));
        }
    }
}

/// The fault stream of one link and what encodes for it.
pub(super) struct FaultServer {
    send: SendStream,
    /// Its index (after the data streams).
    stream: u16,
    vm: Arc<dyn VmBackend>,
    shrink: Shrink,
    seq: u64,
    /// The bandwidth cap: a fault goes at once, charged to it.
    pacer: Option<Arc<Pacer>>,
    /// The stream's measured rate, for adaptive compression.
    rate: LinkRate,
    max_pages: usize,
}

impl FaultServer {
    pub(super) fn new(
        send: SendStream,
        stream: u16,
        vm: Arc<dyn VmBackend>,
        shrink: Shrink,
        pacer: Option<Arc<Pacer>>,
    ) -> Self {
        let max_pages = vm.geometry().page_size().max_batch_pages();
        let rate = LinkRate::new(shrink.link.clone());
        FaultServer {
            send,
            stream,
            vm,
            shrink,
            seq: 0,
            pacer,
            rate,
            max_pages,
        }
    }

    /// Reads `pages` from the paused VM, encodes them as one batch and
    /// writes it.
    async fn serve(&mut self, round: u32, pages: &[PageIndex]) -> Result<SentBatch, StreamError> {
        let mut b = BatchBuilder::new(self.vm.geometry().page_size());
        for &p in pages {
            let mut failed = None;
            b.push_with(p, |buf| failed = self.vm.read_leaf(p, buf).err())?;
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        let enc = self.shrink.finish(b, self.seq, round)?;
        self.seq += 1;
        let (head, payload, sent) = frame(self.stream, enc)?;
        if let Some(p) = &self.pacer {
            p.charge(sent.frame_bytes);
        }
        let writing = Instant::now();
        self.send.write_all_chunks(&mut [head, payload]).await?;
        self.rate.record(sent.frame_bytes, writing.elapsed());
        Ok(sent)
    }
}
