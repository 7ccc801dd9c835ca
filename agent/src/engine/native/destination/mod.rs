//! Drives [`convoy_protocol::destination::Destination`] for one incoming
//! migration.
//!
//! This task owns the state machine and the VM registry entry; a reader
//! task per stream does the (cancel-unsafe) reads; a decoder *thread* per
//! data stream checks each batch with [`StreamReceiver`], writes it into the
//! staging image and hashes the staging pages, then reports the leaves.
//! Staging is wiped on every path but a verified, handed-over start.
//!
//! Post-copy recovery: when the link breaks after the switch, the tasks of
//! that connection are dropped and the migration registers itself in
//! `Host::recoveries`; a new connection whose first message is a
//! `Resume` for it is handed over (see `serve`) and, once the state
//! machine accepts it, becomes the migration's link. Events carry the
//! *epoch* (the number of the link) they came from: a batch that a
//! decoder of a broken link applied late still counts its leaves, nothing
//! else of that link does.

mod actions;
mod lanes;
mod queue;
mod receive;
mod recovery;

use crate::host::LaneJoin;
pub(crate) use lanes::join_lane;
pub(crate) use recovery::{hand_over_resume, refuse_resume};

use crate::engine::clock;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::{Connection, RecvStream, SendStream};
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::VmState;
use convoy_protocol::destination::{
    Destination, DestinationConfig, DestinationError, DestinationEvent,
};
use convoy_protocol::digest::Digest;
use convoy_protocol::journal::{JournalRole, JournalStep};
use convoy_protocol::message::{Capabilities, FaultFigures, Message};
use convoy_protocol::names::{MigrationId, VmName};
use convoy_protocol::page::{MemoryGeometry, PageIndex};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use convoy_protocol::reuse::{RetainedImage, ReuseKey};

use crate::backend::sim::SimVm;
use crate::backend::VmBackend;
use crate::host::Host;
use crate::transport::{read_message, Peer, WireError};

enum Event {
    /// A control message (boxed: a `Propose` is far larger than the rest).
    Control(Result<Option<Box<Message>>, WireError>),
    Opened(u16, RecvStream),
    OpenFailed(OpenFailed),
    Applied {
        stream: u16,
        seq: u64,
        leaves: Vec<(PageIndex, Digest)>,
    },
    Bad(DestinationError),
    StreamEnded,
    /// Post-copy: the VM waits for these pages.
    Faults(Vec<PageIndex>),
}

/// Why the data streams of a link could not all be opened: the link is
/// lost.
#[derive(Debug, thiserror::Error)]
enum OpenFailed {
    /// No further stream was accepted.
    #[error("{0}")]
    Accept(#[source] quinn::ConnectionError),
    /// A stream ended before its opening message.
    #[error("data stream closed")]
    Closed,
    /// A stream's opening message could not be read.
    #[error("{0}")]
    Read(#[source] WireError),
    /// A lane that carries data streams ended.
    #[error("lane {lane} lost: {error}")]
    Lane {
        /// Its number.
        lane: u16,
        /// How it ended.
        #[source]
        error: quinn::ConnectionError,
    },
}

/// The engine's event channel, stamped with the link an event came from.
#[derive(Clone)]
struct Tx {
    epoch: u32,
    tx: mpsc::UnboundedSender<(u32, Event)>,
}

impl Tx {
    /// `Err` when the engine is gone.
    fn send(&self, ev: Event) -> Result<(), ()> {
        self.tx.send((self.epoch, ev)).map_err(|_| ())
    }
}

/// Reads the control stream into the engine's channel.
fn spawn_control_reader(mut recv: RecvStream, tx: Tx) -> JoinHandle<()> {
    crate::engine::spawn(async move {
        loop {
            let r = read_message(&mut recv).await;
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(Event::Control(r.map(|m| m.map(Box::new)))).is_err() || end {
                return;
            }
        }
    })
}

/// Serves a page migration whose first control message, `first`, was
/// read already (a `Propose`, or whatever the source sent instead).
pub(crate) async fn serve(
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    mut send: SendStream,
    recv: RecvStream,
    first: Result<Option<Message>, WireError>,
) {
    let first_ended = !matches!(first, Ok(Some(_)));
    let (raw_tx, mut rx) = mpsc::unbounded_channel::<(u32, Event)>();
    let tx = Tx {
        epoch: 0,
        tx: raw_tx,
    };
    let _ = tx.send(Event::Control(first.map(|m| m.map(Box::new))));
    let mut link_tasks = Vec::new();
    if !first_ended {
        link_tasks.push(spawn_control_reader(recv, tx.clone()));
    }
    let mut run = Incoming {
        host: host.clone(),
        conn: conn.clone(),
        peer,
        tx,
        link_tasks,
        link_threads: Vec::new(),
        dying_threads: Vec::new(),
        dying_tasks: Vec::new(),
        resume_rx: None,
        lanes_rx: None,
        lanes: Vec::new(),
        lanes_allowed: 0,
        unopened: Arc::new(AtomicU16::new(0)),
        all_opened: Arc::new(tokio::sync::Notify::new()),
        staging: None,
        name: None,
        geometry: None,
        streams: 0,
        postcopy: false,
        start_paused: false,
        switched: Arc::new(AtomicBool::new(false)),
        faults: None,
        migration: None,
        reuse: None,
        base_ranges: Arc::new(Vec::new()),
        tasks: Vec::new(),
        bookkeeping: None,
        phases: Vec::new(),
        started: clock::now(),
        journalled: false,
        registry: None,
    };
    let creds = host.creds();
    let mut sm = Destination::new(DestinationConfig {
        max_memory_bytes: host.config.capacity_bytes,
        max_disk_bytes: host.config.disk_capacity_bytes,
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(30),
        peer: run.peer.id.clone(),
        notary: convoy_protocol::receipt::Notary::new(
            Arc::new(creds.identity.clone()),
            Arc::new(creds.trust.clone()),
            clock::now(),
            crate::trust::authz::now_unix(),
        ),
        recovery: host.config.recovery_window,
        silence: host.connections.limits().silence,
        max_bookkeeping_bytes: host.config.max_bookkeeping_bytes,
    });
    let _active = crate::host::ActiveGuard::new(&host.active);
    // Its receive window is its share of the agent's budget.
    let mut _share = host.budget.join(&conn, crate::host::budget::Side::Receive);
    loop {
        while let Some(a) = sm.poll_action() {
            run.act(&mut sm, &mut send, a).await;
        }
        let mut done = false;
        while let Some(ev) = sm.poll_event() {
            let step = match &ev {
                DestinationEvent::Started { .. } => JournalStep::Complete,
                DestinationEvent::Failed(_) => JournalStep::Abort,
                DestinationEvent::InDoubt(_) => JournalStep::Doubt,
            };
            match ev {
                DestinationEvent::Started {
                    memory_root,
                    receipts,
                } => {
                    tracing::info!(
                        peer = %run.peer.id,
                        %memory_root,
                        receipts = receipts.len(),
                        "VM arrived and started"
                    );
                    for r in receipts {
                        host.audit(AuditEvent::Receipt(r));
                    }
                    run.audit_outcome(&sm, "started".into());
                }
                DestinationEvent::Failed(why) => {
                    tracing::warn!(peer = %run.peer.id, "incoming migration failed: {why}");
                    run.audit_outcome(&sm, format!("failed: {why}"));
                }
                DestinationEvent::InDoubt(why) => {
                    // The VM runs (or waits for pages) here since the
                    // switch: kept, never discarded by itself.
                    tracing::error!(peer = %run.peer.id, "post-copy migration in doubt: {why}");
                    if let Some(n) = &run.name {
                        run.host.set_state(n, VmState::InDoubt);
                    }
                    run.staging = None;
                    run.audit_outcome(&sm, format!("in doubt: {why}"));
                }
            }
            // After the audit log has it; a failure leaves the record
            // unfinished, reported at the next start.
            if let Some(migration) = run.migration.filter(|_| run.journalled) {
                let change = crate::host::journal::JournalChange::Advance {
                    migration,
                    role: JournalRole::Destination,
                    step,
                };
                let _ = host.journal(change).await;
            }
            done = true;
        }
        if done || sm.is_finished() {
            break;
        }
        let deadline = sm.poll_timeout();
        let ev = tokio::select! {
            // A vCPU waits on each fault: ask before applying the backlog.
            biased;
            Some(pages) = next_faults(run.faults.as_mut()) => Some(Event::Faults(pages)),
            Some(rc) = async {
                match run.resume_rx.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                // The source may be back before we noticed the old link
                // broke: give that link up first (only for a Resume that
                // will be accepted).
                if !sm.is_recovering() && sm.resume_acceptable(&rc.peer.id, &rc.resume).is_ok() {
                    sm.handle_link_lost(clock::now(), "the source came back on a new connection");
                    while let Some(a) = sm.poll_action() {
                        run.act(&mut sm, &mut send, a).await;
                    }
                }
                if sm.is_recovering() {
                    // Every page the old link's decoders installed has its
                    // leaf reported before the missing set is read.
                    let joined = run.join_dying().await;
                    while let Ok((epoch, ev)) = rx.try_recv() {
                        match ev {
                            Event::Applied { leaves, .. } if epoch != run.tx.epoch => {
                                if let Err(e) = sm.handle_stale_batch_applied(&leaves) {
                                    tracing::warn!(peer = %run.peer.id, "bad batch: {e}");
                                }
                            }
                            // Nothing of the new link exists yet; the rest
                            // of the old one is void.
                            _ => {}
                        }
                    }
                    if !joined && !run.switched.load(Ordering::Acquire) {
                        // Staging could still change under the new link's
                        // pages (and their leaves): not resumed; the
                        // window ends the migration, the VM runs on at the
                        // source.
                        let why = "a decoder of the broken link is still writing staging";
                        recovery::refuse_resume(
                            &run.host,
                            &rc.peer,
                            rc.conn,
                            rc.send,
                            format!("Resume: {why}"),
                            convoy_protocol::message::Reason::Unacceptable(why.into()),
                        );
                        continue;
                    }
                }
                if let Some(new_send) = run.reconnect(&mut sm, rc).await {
                    send = new_send;
                    _share = host.budget.join(&run.conn, crate::host::budget::Side::Receive);
                }
                continue;
            }
            Some(join) = async {
                match run.lanes_rx.as_mut() {
                    Some(l) => l.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                run.add_lane(&sm, join);
                continue;
            }
            ev = rx.recv() => match ev {
                Some((epoch, ev)) if epoch == run.tx.epoch => Some(ev),
                Some((_, Event::Applied { leaves, .. })) => {
                    // Applied by a decoder of a broken link: installed.
                    if let Err(e) = sm.handle_stale_batch_applied(&leaves) {
                        tracing::warn!(peer = %run.peer.id, "bad batch: {e}");
                    }
                    continue;
                }
                // Anything else of a broken link is void.
                Some(_) => continue,
                None => None,
            },
            () = clock::until(deadline) => {
                sm.handle_timeout(clock::now());
                continue;
            }
        };
        let now = clock::now();
        match ev {
            Some(Event::Control(Ok(Some(msg)))) => {
                if matches!(*msg, Message::Finish(_)) {
                    run.report_faults(&mut sm);
                }
                if let Err(e) = sm.handle_message(now, *msg) {
                    tracing::warn!(peer = %run.peer.id, "source misbehaved: {e}");
                }
            }
            Some(Event::Control(Ok(None))) => sm.handle_link_closed(now, "control stream closed"),
            Some(Event::Control(Err(e))) => {
                if let WireError::Decode(d) = e {
                    let _ = sm.handle_bad_input(d.into());
                } else {
                    run.link_lost(&mut sm, now, &e.to_string());
                }
            }
            Some(Event::Opened(stream, recv)) => match sm.handle_stream_opened(stream) {
                Ok(()) => run.spawn_decoder(stream, recv),
                Err(e) => tracing::warn!("bad data stream: {e}"),
            },
            Some(Event::OpenFailed(e)) => run.link_lost(&mut sm, now, &e.to_string()),
            Some(Event::Applied {
                stream,
                seq,
                leaves,
            }) => {
                if let Err(e) = sm.handle_batch_applied(now, stream, seq, &leaves) {
                    tracing::warn!(peer = %run.peer.id, "bad batch: {e}");
                }
            }
            Some(Event::Bad(e)) => {
                let e = sm.handle_bad_input(e);
                tracing::warn!(peer = %run.peer.id, "bad data: {e}");
            }
            Some(Event::StreamEnded) => {}
            Some(Event::Faults(pages)) => sm.request_pages(&pages),
            None => sm.handle_link_lost(now, "engine channel closed"),
        }
    }
    if let Some(m) = run.migration.filter(|_| run.resume_rx.is_some()) {
        host.recoveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&m);
    }
    // Let our last message reach the source, then let it close.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), run.conn.closed()).await;
    run.stop_lanes();
    for t in run.tasks.drain(..).chain(run.link_tasks.drain(..)) {
        t.abort();
    }
}

/// The next post-copy faults: every one already queued, up to one
/// `Fetch`'s worth, asked together (never, without demand paging). Read
/// by the engine itself, not through a task that batches them: one
/// wake-up less between a vCPU's fault and its request.
async fn next_faults(
    faults: Option<&mut mpsc::UnboundedReceiver<PageIndex>>,
) -> Option<Vec<PageIndex>> {
    let Some(faults) = faults else {
        return std::future::pending().await;
    };
    let mut pages = vec![faults.recv().await?];
    while pages.len() < convoy_protocol::message::MAX_FETCH {
        match faults.try_recv() {
            Ok(p) => pages.push(p),
            Err(_) => break,
        }
    }
    Some(pages)
}

/// A retained image being reused, shared with the decoder threads.
#[derive(Clone)]
struct Reuse {
    image: Arc<RetainedImage>,
    key: Arc<ReuseKey>,
}

struct Incoming {
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    tx: Tx,
    /// The tasks of the current link (control reader, stream acceptor,
    /// stream readers): dropped with the link.
    link_tasks: Vec<JoinHandle<()>>,
    /// The decoder threads of the current link.
    link_threads: Vec<std::thread::JoinHandle<()>>,
    /// Decoder threads of broken links, joined before a resume (so that
    /// every page they installed has its leaf reported first).
    dying_threads: Vec<std::thread::JoinHandle<()>>,
    /// Tasks of broken links, aborted and awaited before a resume for the
    /// same reason: the fault stream's applies its frames itself.
    dying_tasks: Vec<JoinHandle<()>>,
    /// Post-copy recovery: where a new connection that resumes this
    /// migration arrives, once the link broke.
    resume_rx: Option<mpsc::UnboundedReceiver<crate::host::Reconnection>>,
    /// Where the plan's extra connections arrive ([`lanes`]), from the
    /// acceptance on, when it has any.
    lanes_rx: Option<mpsc::Receiver<LaneJoin>>,
    /// The lanes of the current link.
    lanes: Vec<lanes::Joined>,
    /// The lanes the plan allows beside the first connection
    /// ([`convoy_protocol::model::MigrationPlan::lanes`]).
    lanes_allowed: u16,
    /// Data streams of the current link not accepted yet, on any of its
    /// connections.
    unopened: Arc<AtomicU16>,
    /// Told when `unopened` reaches 0: the link's acceptors stop.
    all_opened: Arc<tokio::sync::Notify>,
    staging: Option<Arc<SimVm>>,
    name: Option<VmName>,
    geometry: Option<MemoryGeometry>,
    streams: u16,
    /// The manifest announced post-copy: one more (fault) stream.
    postcopy: bool,
    /// The VM stays paused once started (`--start-paused`).
    start_paused: bool,
    /// Set once the VM runs on demand paging: decoders then install pages
    /// only where missing.
    switched: Arc<AtomicBool>,
    /// Post-copy: pages the VM waits for, as its faults come.
    faults: Option<mpsc::UnboundedReceiver<PageIndex>>,
    migration: Option<MigrationId>,
    /// The source offered an image this host retained for the VM: the
    /// image and the key to open its pages with.
    reuse: Option<Reuse>,
    /// The leaves of the disks staged from a base held here: a retained
    /// block there is the base's.
    base_ranges: Arc<Vec<std::ops::Range<u64>>>,
    tasks: Vec<JoinHandle<()>>,
    /// This migration's share of the agent's bookkeeping limit, held
    /// until it ends.
    bookkeeping: Option<crate::host::bookkeeping::BookkeepingGrant>,
    /// Phase changes, audited with the outcome (never inside downtime).
    phases: Vec<(String, u64)>,
    started: Instant,
    /// The journal holds our record of the handover: the outcome goes
    /// there too.
    journalled: bool,
    /// The registry's owner record read at staging (with a registry).
    registry: Option<crate::registry::Expected>,
}

impl Incoming {
    /// The link failed: broken (waited for, within the recovery window),
    /// or closed by the source on purpose (not waited for before a
    /// switch). A source that gives a link up to dial again closes it
    /// with [`crate::transport::close::LINK_LOST`].
    fn link_lost(&self, sm: &mut Destination, now: Instant, detail: &str) {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code != crate::transport::close::LINK_LOST.into() =>
            {
                sm.handle_link_closed(now, detail)
            }
            _ => sm.handle_link_lost(now, detail),
        }
    }

    /// The key the source handed over with the VM, if it retained the
    /// image, with the leaves of the image verified here.
    fn arrival_key(&self, sm: &mut Destination) -> Option<crate::host::retain::ArrivalKey> {
        let offer = sm.take_reuse_key()?;
        let leaves = sm.verified_leaves()?;
        Some(crate::host::retain::ArrivalKey {
            offer,
            holder: self.peer.id.clone(),
            leaves: Arc::new(leaves),
        })
    }

    /// Records the VM started here from staging (its registry entry was
    /// reserved at Propose).
    fn register(&self, name: &VmName, vm: Arc<dyn VmBackend>, resumed_from: u64, state: VmState) {
        if let Some(e) = self.host.vms().get_mut(name) {
            e.counter_at_start = Some(resumed_from);
            e.handle = Some(crate::host::VmHandle::Sim(vm));
            e.state = state;
            e.arrived_from = Some(self.peer.id.to_string());
        }
    }

    /// The VM runs here again: an image retained for it is obsolete.
    fn arrived(&mut self, name: &VmName) {
        self.reuse = None;
        self.host.retained().remove(name);
    }

    fn phase(&mut self, what: String) {
        let ms = convoy_protocol::units::millis(clock::since(self.started));
        self.phases.push((what, ms));
    }

    /// Hands the post-copy fault figures to the state machine for Ready.
    fn report_faults(&self, sm: &mut Destination) {
        if !self.switched.load(Ordering::Acquire) {
            return;
        }
        if let Some(f) = self.staging.as_ref().and_then(|s| s.fault_stats()) {
            sm.set_fault_figures(FaultFigures {
                faults: f.faults,
                median_us: f.median_us,
                p99_us: f.p99_us,
            });
        }
    }

    fn audit_outcome(&mut self, sm: &Destination, outcome: String) {
        match sm.proposal() {
            Some(p) => {
                for (phase, after_ms) in std::mem::take(&mut self.phases) {
                    self.host.audit(AuditEvent::Phase {
                        migration: p.migration,
                        vm: p.vm.clone(),
                        phase,
                        after_ms,
                    });
                }
                self.host.audit(AuditEvent::Outcome {
                    migration: p.migration,
                    vm: p.vm.clone(),
                    outcome,
                })
            }
            // Garbage, a bad proposal or silence before any valid proposal:
            // a refusal, rate-limited like the handshake's.
            None => self.host.audit_refusal(
                self.peer.id.to_string(),
                format!("before any proposal: {outcome}"),
            ),
        }
    }
}
