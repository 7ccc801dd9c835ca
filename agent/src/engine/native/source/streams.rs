//! The streams of one outgoing page migration: the control stream's
//! reader, and per data stream an encoder thread feeding a writer task,
//! plus the post-copy fault stream, with the jobs they take and the
//! events they report.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use crate::transport::{Connection, SendStream};
use convoy_protocol::message::{DataStreamOpen, Message};
use convoy_protocol::names::MigrationId;
use convoy_protocol::page::BuildError;
use thiserror::Error;
use tokio::sync::mpsc;

use super::encode::{encode_stream, Encoder, LinkRate, Shrink};
use super::faults::{FaultServer, FaultSlot};
use super::jobs::{EngineEvent, Job, Outbox, StreamError, StreamOut, Taken};
use crate::backend::VmBackend;
use crate::config::TamperHook;
use crate::engine::native::pacer::Pacer;
use crate::transport::{read_message, write_message, WireError};

/// Why the data streams could not be opened.
#[derive(Debug, Error)]
pub(super) enum OpenError {
    /// The connection would not open a stream.
    #[error(transparent)]
    Open(#[from] quinn::ConnectionError),
    /// The stream's first message could not be sent.
    #[error(transparent)]
    Announce(#[from] WireError),
    /// The compressor could not be made.
    #[error(transparent)]
    Compressor(#[from] BuildError),
    /// No thread for an encoder.
    #[error("{0}")]
    Thread(#[source] std::io::Error),
}

/// The job queues of the opened streams, and the fault stream.
pub(super) struct OpenedStreams {
    pub(super) data: Vec<std::sync::mpsc::Sender<Job>>,
    pub(super) faults: Option<FaultServer>,
    /// The delta caches' share of the agent's budget, held while they are.
    pub(super) cache: Option<crate::host::budget::CacheGrant>,
}

/// Reads the destination's control stream into `tx`, serving each Fetch
/// itself while `faults` is armed (its batch reported on `events`).
pub(super) fn spawn_control_reader(
    mut recv: crate::transport::RecvStream,
    tx: mpsc::Sender<Result<Option<Message>, WireError>>,
    faults: Arc<FaultSlot>,
    events: mpsc::UnboundedSender<EngineEvent>,
) {
    crate::engine::spawn(async move {
        loop {
            let r = read_message(&mut recv).await;
            if let Ok(Some(Message::Fetch(f))) = &r {
                if faults.serve_fetch(f, &events).await {
                    continue;
                }
            }
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
}

/// How the data streams of one migration are set up.
pub(super) struct StreamSetup {
    pub(super) migration: MigrationId,
    pub(super) streams: u16,
    /// zstd level, 0 for none.
    pub(super) level: i32,
    pub(super) tamper: Option<TamperHook>,
    /// The bandwidth cap, shared by all streams.
    pub(super) pacer: Option<Arc<Pacer>>,
    /// The destination accepted delta-encoded pages.
    pub(super) delta: bool,
    /// Open the post-copy fault stream too.
    pub(super) postcopy: bool,
    /// Adaptive compression (up to `level`).
    pub(super) adaptive: bool,
}

/// The most memory one migration's delta caches may hold, all streams
/// together (a quarter of guest memory when that is less).
pub(super) const DELTA_CACHE_BYTES: u64 = 64 << 20;

/// Encoded batches a stream's encoder may have waiting for its writer: a
/// stripe's batch is at most 256 KiB, so 2 MiB a stream. The connection's
/// send window, in the agent's migration budget, holds what the writer
/// has handed over; this queue is outside the budget, and with 32 (8 MiB
/// a stream) ten VMs migrating at once held 160 MiB here.
const OUT_QUEUE: usize = 8;

/// Opens the data streams, each with its encoder thread and writer task,
/// and for post-copy the fault stream (index `streams`) after them.
/// `conns` is the link's first connection, then its lanes. The fault
/// stream goes on the first; data stream `i` on `conns[i % conns.len()]`,
/// but with post-copy and lanes on the lanes only (`lanes[i %
/// lanes.len()]`), so that faults have the first connection to
/// themselves ([`MigrationPlan::lanes`](convoy_protocol::model::MigrationPlan::lanes)).
pub(super) async fn open_streams(
    conns: &[Connection],
    setup: StreamSetup,
    vm: &Arc<dyn VmBackend>,
    events: &mpsc::UnboundedSender<EngineEvent>,
    budget: &Arc<crate::host::budget::MigrationBudget>,
) -> Result<OpenedStreams, OpenError> {
    let StreamSetup {
        migration,
        streams,
        level,
        tamper,
        pacer,
        delta,
        postcopy,
        adaptive,
    } = setup;
    // From the agent's pool: with many migrations at once, the later ones
    // get smaller caches (or none), not more memory.
    let cache =
        delta.then(|| budget.grant_cache((vm.geometry().bytes() / 4).min(DELTA_CACHE_BYTES)));
    let cache_bytes = cache.as_ref().map_or(0, |c| c.bytes) / u64::from(streams.max(1));
    let mut jobs = Vec::new();
    let Some(first) = conns.first() else {
        return Err(OpenError::Open(quinn::ConnectionError::LocallyClosed));
    };
    let data_conns = match conns {
        [_, lanes @ ..] if postcopy && !lanes.is_empty() => lanes,
        all => all,
    };
    for stream in 0..streams {
        let conn = &data_conns[usize::from(stream) % data_conns.len()];
        let send = open_data_stream(conn, migration, stream).await?;
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
        let (out_tx, out_rx) = mpsc::channel::<StreamOut>(OUT_QUEUE);
        let vm = vm.clone();
        let tamper = tamper.clone();
        let events_enc = events.clone();
        let link = Arc::new(AtomicU64::new(0));
        let link_enc = link.clone();
        let out_tx = Outbox::new(out_tx);
        let encoder = crate::cpu::spawn(
            std::thread::Builder::new().name(format!("convoy-enc-{stream}")),
            move || {
                let enc = Encoder {
                    stream,
                    streams,
                    level,
                    tamper,
                    cache_bytes,
                    adaptive,
                    link: link_enc,
                };
                if let Err(e) = encode_stream(enc, vm, job_rx, out_tx) {
                    let _ = events_enc.send(EngineEvent::StreamFailed(e));
                }
            },
        )
        .map_err(OpenError::Thread)?;
        let taken = Taken::new(encoder.thread().clone());
        spawn_writer(send, (out_rx, taken), pacer.clone(), events.clone(), link);
        jobs.push(job_tx);
    }
    let mut faults = None;
    if postcopy {
        let send = open_data_stream(first, migration, streams).await?;
        // Faults go before the background push whenever both wait.
        let _ = send.set_priority(1);
        let shrink = Shrink::new(level, adaptive, Arc::new(AtomicU64::new(0)))?;
        // A vCPU waits on each fault: sent at once, paid for by the push.
        faults = Some(FaultServer::new(send, streams, vm.clone(), shrink, pacer));
    }
    Ok(OpenedStreams {
        data: jobs,
        faults,
        cache,
    })
}

pub(super) async fn open_data_stream(
    conn: &Connection,
    migration: MigrationId,
    stream: u16,
) -> Result<SendStream, OpenError> {
    let mut send = conn.open_uni().await?;
    write_message(
        &mut send,
        &Message::DataStreamOpen(DataStreamOpen { migration, stream }),
    )
    .await?;
    Ok(send)
}

/// The writer task of one stream: paced frames out, each reported sent;
/// it measures the rate the link takes them at (bytes per second of
/// waiting to send, into `link`, for adaptive compression). It wakes its
/// encoder after each frame it takes (`Outbox`).
pub(super) fn spawn_writer(
    mut send: SendStream,
    (mut out_rx, taken): (mpsc::Receiver<StreamOut>, Taken),
    pacer: Option<Arc<Pacer>>,
    events: mpsc::UnboundedSender<EngineEvent>,
    link: Arc<AtomicU64>,
) {
    crate::engine::spawn(async move {
        let mut rate = LinkRate::new(link);
        while let Some(out) = out_rx.recv().await {
            taken.taken();
            match out {
                StreamOut::Batch {
                    head,
                    payload,
                    info,
                } => {
                    let busy = Instant::now();
                    if let Some(p) = &pacer {
                        p.take(info.frame_bytes).await;
                    }
                    let mut chunks = [head, payload];
                    if let Err(e) = send.write_all_chunks(&mut chunks).await {
                        let _ = events.send(EngineEvent::StreamFailed(StreamError::Write(e)));
                        return;
                    }
                    rate.record(info.frame_bytes, busy.elapsed());
                    let _ = events.send(EngineEvent::Sent(info));
                }
                StreamOut::RoundDone { round, skipped } => {
                    let _ = events.send(EngineEvent::RoundDone { round, skipped });
                }
            }
        }
        let _ = send.finish();
    });
}
