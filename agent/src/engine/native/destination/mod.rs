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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::VmState;
use convoy_protocol::destination::{
    Destination, DestinationAction, DestinationConfig, DestinationError, DestinationEvent,
};
use convoy_protocol::digest::{leaf_digest, zero_leaf, Digest};
use convoy_protocol::message::{Capabilities, FaultFigures, Message, Reason};
use convoy_protocol::names::{MigrationId, VmName};
use convoy_protocol::page::is_zero;
use convoy_protocol::page::{BatchError, MemoryGeometry, PageData, PageIndex, StreamReceiver};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use convoy_protocol::reuse::{RetainedImage, ReuseKey};

use super::admission;
use crate::backend::sim::SimVm;
use crate::backend::{Staging, VmBackend};
use crate::host::{Host, ReserveError};
use crate::transport::{read_message, write_message, Peer, WireError};

enum Event {
    /// A control message (boxed: a `Propose` is far larger than the rest).
    Control(Result<Option<Box<Message>>, WireError>),
    Opened(u16, RecvStream),
    OpenFailed(String),
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

/// Hands a connection whose first message is `resume` to the post-copy
/// migration waiting for it, or refuses it.
async fn hand_over_resume(
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    send: SendStream,
    recv: RecvStream,
    resume: convoy_protocol::message::Resume,
) {
    // Only the agent the migration came from reaches it: anyone else is
    // refused here, without touching the migration.
    let waiting = host
        .recoveries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&resume.migration)
        .filter(|r| r.source == peer.id)
        .map(|r| r.tx.clone());
    let migration = resume.migration;
    let rc = crate::host::Reconnection {
        conn: conn.clone(),
        peer: peer.clone(),
        send,
        recv,
        resume,
    };
    let send = match waiting {
        // The migration's task owns the connection now.
        Some(w) => match w.send(rc) {
            Ok(()) => return,
            // Gone meanwhile: refused below.
            Err(e) => e.0.send,
        },
        None => rc.send,
    };
    tracing::warn!(peer = %peer.id, %migration, "Resume for no waiting migration");
    host.audit_refusal(
        peer.id.to_string(),
        format!("Resume of migration {migration}: no post-copy migration waits for it here"),
    );
    refuse(
        conn,
        send,
        Reason::Unacceptable(format!(
            "no post-copy migration {migration} waits to be resumed here"
        )),
    )
    .await;
}

/// Answers a connection with an Abort, then lets it close (bounded: a
/// peer that reads nothing is dropped after 5 s).
async fn refuse(conn: Connection, mut send: SendStream, reason: Reason) {
    let answer = async {
        let _ = write_message(
            &mut send,
            &Message::Abort(convoy_protocol::message::Abort { reason }),
        )
        .await;
        let _ = send.finish();
        conn.closed().await;
    };
    if tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .is_err()
    {
        conn.close(crate::server::close::DONE.into(), b"refused");
    }
}

/// Reads the control stream into the engine's channel.
fn spawn_control_reader(mut recv: RecvStream, tx: Tx) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let r = read_message(&mut recv).await;
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(Event::Control(r.map(|m| m.map(Box::new)))).is_err() || end {
                return;
            }
        }
    })
}

/// Serves one incoming migration on `conn` from agent `peer`.
pub(crate) async fn serve(host: Arc<Host>, conn: Connection, peer: Peer) {
    let (mut send, mut recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer = %peer.id, "no control stream: {e}");
            return;
        }
    };
    // The first message decides the engine: a QEMU stream migration or
    // page batches.
    let first = match tokio::time::timeout(Duration::from_secs(30), read_message(&mut recv)).await {
        Ok(r) => r,
        Err(_) => {
            host.audit_refusal(peer.id.to_string(), "no proposal in 30 s".into());
            return;
        }
    };
    if let Ok(Some(Message::Propose(p))) = &first {
        if p.manifest.qemu.is_some() {
            let p = p.clone();
            return super::qemu_destination::serve(host, conn, peer, send, recv, p).await;
        }
    }
    if let Ok(Some(Message::Resume(r))) = first {
        return hand_over_resume(host, conn, peer, send, recv, r).await;
    }
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
        resume_rx: None,
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
        phases: Vec::new(),
        started: Instant::now(),
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
            Instant::now(),
            crate::trust::authz::now_unix(),
        ),
        recovery: host.config.recovery_window,
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
            done = true;
        }
        if done || sm.is_finished() {
            break;
        }
        let deadline = sm.poll_timeout();
        let ev = tokio::select! {
            // A vCPU waits on each fault: ask before applying the backlog.
            biased;
            Some(pages) = async {
                match run.faults.as_mut() {
                    Some(f) => f.recv().await,
                    None => std::future::pending().await,
                }
            } => Some(Event::Faults(pages)),
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
                    sm.handle_link_lost(Instant::now(), "the source came back on a new connection");
                    while let Some(a) = sm.poll_action() {
                        run.act(&mut sm, &mut send, a).await;
                    }
                }
                if sm.is_recovering() {
                    // Every page the old link's decoders installed has its
                    // leaf reported before the missing set is read.
                    run.join_dying().await;
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
                }
                if let Some(new_send) = run.reconnect(&mut sm, rc).await {
                    send = new_send;
                    _share = host.budget.join(&run.conn, crate::host::budget::Side::Receive);
                }
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
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            } => {
                sm.handle_timeout(Instant::now());
                continue;
            }
        };
        let now = Instant::now();
        match ev {
            Some(Event::Control(Ok(Some(msg)))) => {
                if matches!(*msg, Message::Finish(_)) {
                    run.report_faults(&mut sm);
                }
                if let Err(e) = sm.handle_message(now, *msg) {
                    tracing::warn!(peer = %run.peer.id, "source misbehaved: {e}");
                }
            }
            Some(Event::Control(Ok(None))) => sm.handle_link_lost(now, "control stream closed"),
            Some(Event::Control(Err(e))) => {
                if let WireError::Decode(d) = e {
                    let _ = sm.handle_bad_input(d.into());
                } else {
                    sm.handle_link_lost(now, &e.to_string());
                }
            }
            Some(Event::Opened(stream, recv)) => match sm.handle_stream_opened(stream) {
                Ok(()) => run.spawn_decoder(stream, recv),
                Err(e) => tracing::warn!("bad data stream: {e}"),
            },
            Some(Event::OpenFailed(e)) => sm.handle_link_lost(now, &e),
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
    for t in run.tasks.drain(..).chain(run.link_tasks.drain(..)) {
        t.abort();
    }
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
    /// Post-copy recovery: where a new connection that resumes this
    /// migration arrives, once the link broke.
    resume_rx: Option<mpsc::UnboundedReceiver<crate::host::Reconnection>>,
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
    /// Post-copy: pages the VM waits for, in Fetch-sized groups.
    faults: Option<mpsc::UnboundedReceiver<Vec<PageIndex>>>,
    migration: Option<MigrationId>,
    /// The source offered an image this host retained for the VM: the
    /// image and the key to open its pages with.
    reuse: Option<Reuse>,
    /// The leaves of the disks staged from a base held here: a retained
    /// block there is the base's.
    base_ranges: Arc<Vec<std::ops::Range<u64>>>,
    tasks: Vec<JoinHandle<()>>,
    /// Phase changes, audited with the outcome (never inside downtime).
    phases: Vec<(String, u64)>,
    started: Instant,
}

impl Incoming {
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
            e.vm = Some(vm);
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
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
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

    /// Post-copy recovery: the link broke. Its tasks go (decoders finish
    /// the batch in hand, reported as stale), the VM stays, and the
    /// migration waits for its source to come back.
    fn await_resume(&mut self) {
        for t in self.link_tasks.drain(..) {
            t.abort();
        }
        // Their readers gone, the decoders end after the batch in hand.
        self.dying_threads.append(&mut self.link_threads);
        self.conn.close(
            crate::server::close::DONE.into(),
            b"link lost, awaiting Resume",
        );
        self.tx.epoch += 1;
        if let Some(n) = &self.name {
            self.host.set_state(n, VmState::Recovering);
        }
        self.phase(
            "link lost after the post-copy switch: the VM waits for the source to reconnect".into(),
        );
        tracing::warn!(peer = %self.peer.id, "post-copy link lost, awaiting the source's Resume");
    }

    /// After the switch: a new connection that resumes this migration may
    /// come (even before this side notices the old link broke); only from
    /// the agent it came from.
    fn accept_resumes(&mut self) {
        if self.resume_rx.is_some() || self.host.config.recovery_window.is_zero() {
            return;
        }
        if let Some(m) = self.migration {
            let (tx, rx) = mpsc::unbounded_channel();
            self.host
                .recoveries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    m,
                    crate::host::Recovery {
                        source: self.peer.id.clone(),
                        tx,
                    },
                );
            self.resume_rx = Some(rx);
        }
    }

    /// Joins the decoders of broken links (each ends after the batch in
    /// hand once its reader is gone).
    async fn join_dying(&mut self) {
        let dying = std::mem::take(&mut self.dying_threads);
        if dying.is_empty() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || {
            for t in dying {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .is_err()
        {
            tracing::warn!(peer = %self.peer.id, "a decoder of the broken link did not end in 10 s");
        }
    }

    /// A new connection asks to resume: on the machine's consent it
    /// becomes the link (its control stream is returned), else it is
    /// refused and closed.
    async fn reconnect(
        &mut self,
        sm: &mut Destination,
        rc: crate::host::Reconnection,
    ) -> Option<SendStream> {
        let crate::host::Reconnection {
            conn,
            peer,
            send,
            recv,
            resume,
        } = rc;
        if let Err(e) = sm.handle_resume(&peer.id, &resume) {
            tracing::warn!(peer = %peer.id, "{e}");
            self.host.audit_refusal(peer.id.to_string(), e.to_string());
            // Answered aside: a peer that reads nothing cannot stall us.
            tokio::spawn(refuse(conn, send, Reason::Unauthorized(e.to_string())));
            return None;
        }
        self.conn = conn;
        self.peer = peer;
        self.link_tasks
            .push(spawn_control_reader(recv, self.tx.clone()));
        self.accept_streams();
        if let Some(n) = &self.name {
            self.host.set_state(n, VmState::PostcopyIn);
        }
        self.phase(format!(
            "link back: resumed on a new connection (recovery {})",
            sm.recoveries()
        ));
        tracing::info!(peer = %self.peer.id, "post-copy migration resumed");
        Some(send)
    }

    async fn act(&mut self, sm: &mut Destination, send: &mut SendStream, a: DestinationAction) {
        match a {
            DestinationAction::Send(m) => {
                if let Err(e) = write_message(send, &m).await {
                    sm.handle_link_lost(Instant::now(), &e.to_string());
                }
            }
            DestinationAction::AwaitResume => self.await_resume(),
            DestinationAction::PrepareStaging {
                vm,
                manifest,
                migration,
                ticket,
                attributes,
            } => {
                // The operator's ticket, the plan it grants and the
                // policy: nothing is reserved for a migration nobody
                // authorized.
                let proposal = admission::Proposal {
                    vm: &vm,
                    migration,
                    manifest: &manifest,
                    ticket: &ticket,
                    attributes: &attributes,
                };
                if let Err(e) = admission::admit(&self.host, &self.peer.id, proposal) {
                    sm.handle_staging_failed(e.reason());
                    return;
                }
                let bytes = manifest.memory.bytes();
                match self.host.reserve(&vm, bytes, VmState::Incoming) {
                    Err(ReserveError::Exists) => sm.handle_staging_failed(Reason::VmExists),
                    Err(ReserveError::NoCapacity) => sm.handle_staging_failed(Reason::NoCapacity),
                    Ok(()) => match SimVm::incoming_with_disks(
                        manifest.memory,
                        &manifest.disks,
                        self.host
                            .config
                            .disk_dir()
                            .as_deref()
                            .map(|d| (d, vm.as_str())),
                    ) {
                        Ok(s) if manifest.postcopy && !crate::backend::uffd::available() => {
                            s.discard();
                            self.host.remove(&vm);
                            sm.handle_staging_failed(Reason::Unacceptable(
                                "post-copy needs userfaultfd on this host (root, or vm.unprivileged_userfaultfd=1)".into(),
                            ));
                        }
                        Ok(staging) => {
                            if let Some(e) = self.host.vms().get_mut(&vm) {
                                e.attributes = attributes;
                            }
                            if staging.has_disks() {
                                self.tasks.push(flush_disks_while_arriving(staging.clone()));
                            }
                            self.staging = Some(staging.clone());
                            self.name = Some(vm);
                            // Batches index memory pages, then disk blocks
                            // (the leaf count was checked at Propose).
                            self.geometry =
                                Some(manifest.leaf_geometry().unwrap_or(manifest.memory));
                            self.streams = manifest.data_streams;
                            self.postcopy = manifest.postcopy;
                            self.start_paused = manifest.start_paused;
                            self.migration = sm.migration();
                            // An offered image held here, for this VM and
                            // geometry: its pages need not be sent.
                            self.reuse = manifest.reuse.clone().and_then(|offer| {
                                let name = self.name.as_ref()?;
                                let image = self.host.retained().find(
                                    name,
                                    offer.image,
                                    manifest.memory,
                                )?;
                                Some(Reuse {
                                    image,
                                    key: Arc::new(offer.key),
                                })
                            });
                            let held = self.reuse.is_some();
                            let bases = self.stage_bases(&staging, &manifest).await;
                            self.phase(format!(
                                "staging reserved ({bytes} bytes){}{}, accepting",
                                if held {
                                    ", reusing the image retained here"
                                } else {
                                    ""
                                },
                                if bases.iter().any(Option::is_some) {
                                    ", disks started from the base images held here"
                                } else {
                                    ""
                                }
                            ));
                            sm.handle_staging_ready_holding(Instant::now(), held, bases);
                            self.accept_streams();
                        }
                        Err(e @ crate::backend::BackendError::Disk(_)) => {
                            self.host.remove(&vm);
                            tracing::warn!("cannot make the VM's disks: {e}");
                            sm.handle_staging_failed(Reason::Unacceptable(e.to_string()));
                        }
                        Err(e) => {
                            self.host.remove(&vm);
                            tracing::warn!("cannot reserve staging memory: {e}");
                            sm.handle_staging_failed(Reason::NoCapacity);
                        }
                    },
                }
            }
            DestinationAction::StartVm { device_state } => {
                let (Some(staging), Some(name)) = (self.staging.take(), self.name.clone()) else {
                    sm.handle_start_failed("no staging image");
                    return;
                };
                for t in self.tasks.drain(..) {
                    t.abort();
                }
                match staging.clone().start(&device_state, self.start_paused) {
                    Ok((vm, resumed_from)) => {
                        let key = self.arrival_key(sm);
                        let state = if self.start_paused {
                            VmState::Paused
                        } else {
                            VmState::Running
                        };
                        self.register(&name, vm, resumed_from, state);
                        if let Some(e) = self.host.vms().get_mut(&name) {
                            e.reuse = key;
                        }
                        self.arrived(&name);
                        self.phase("verified and started here".into());
                        confirm_started(sm, staging.clone()).await;
                    }
                    Err(e) => {
                        self.staging = Some(staging);
                        sm.handle_start_failed(&e.to_string());
                    }
                }
            }
            DestinationAction::StartPostcopy { device_state, owed } => {
                let (Some(staging), Some(name)) = (self.staging.clone(), self.name.clone()) else {
                    sm.handle_start_failed("no staging image");
                    return;
                };
                let (faults_tx, mut faults_rx) = mpsc::unbounded_channel();
                // Faults have their own queue, served before other events.
                let (tx, batched) = mpsc::unbounded_channel();
                self.faults = Some(batched);
                self.tasks.push(tokio::spawn(async move {
                    // Every fault already queued goes in one Fetch.
                    while let Some(p) = faults_rx.recv().await {
                        let mut pages = vec![p];
                        while pages.len() < convoy_protocol::message::MAX_FETCH {
                            match faults_rx.try_recv() {
                                Ok(q) => pages.push(q),
                                Err(_) => break,
                            }
                        }
                        if tx.send(pages).is_err() {
                            return;
                        }
                    }
                }));
                let owed_pages = owed.count();
                let started = staging
                    .begin_postcopy(&owed, faults_tx)
                    .and_then(|()| staging.clone().start(&device_state, false));
                match started {
                    Ok((vm, resumed_from)) => {
                        // Decoders install pages only where missing from now.
                        self.switched.store(true, Ordering::Release);
                        self.accept_resumes();
                        self.register(&name, vm, resumed_from, VmState::PostcopyIn);
                        self.phase(format!(
                            "running here on demand paging, {owed_pages} pages still owed"
                        ));
                        sm.handle_postcopy_started(Instant::now());
                    }
                    Err(e) => {
                        staging.end_postcopy();
                        sm.handle_start_failed(&e.to_string());
                    }
                }
            }
            DestinationAction::TrustVm => {
                // Every page is in and the root verified: paging ends.
                let staged = self.staging.take();
                if let Some(s) = &staged {
                    s.end_postcopy();
                }
                for t in self.tasks.drain(..) {
                    t.abort();
                }
                if let Some(n) = self.name.clone() {
                    let key = self.arrival_key(sm);
                    if let Some(e) = self.host.vms().get_mut(&n) {
                        e.state = VmState::Running;
                        e.reuse = key;
                    }
                    self.arrived(&n);
                }
                self.phase("every page verified: the VM is ours".into());
                // Its disks are complete since the switch.
                match staged {
                    Some(s) => confirm_started(sm, s).await,
                    None => sm.handle_started(Instant::now()),
                }
            }
            DestinationAction::DiscardStaging => {
                if self.staging.is_some() {
                    self.phase("staging discarded and wiped".into());
                }
                for t in self.tasks.drain(..) {
                    t.abort();
                }
                if let Some(s) = self.staging.take() {
                    s.discard();
                }
                if let Some(n) = self.name.take() {
                    self.host.remove(&n);
                }
            }
        }
    }

    /// Accepts the data streams the manifest announced.
    fn accept_streams(&mut self) {
        let conn = self.conn.clone();
        let tx = self.tx.clone();
        let n = self.streams + u16::from(self.postcopy);
        let migration = self.migration;
        self.link_tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                let mut recv = match conn.accept_uni().await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Event::OpenFailed(e.to_string()));
                        return;
                    }
                };
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
                        let _ = tx.send(Event::OpenFailed("data stream closed".into()));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(match e {
                            WireError::Decode(d) => Event::Bad(d.into()),
                            other => Event::OpenFailed(other.to_string()),
                        });
                        return;
                    }
                }
            }
        }));
    }

    /// Starts each incoming disk whose base this host holds (same name,
    /// root and size) as a copy of it; returns, per disk, the base's
    /// leaves when it did (the tree starts from them). A base that cannot
    /// be copied is not held: its blocks then all come.
    async fn stage_bases(
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

    fn spawn_decoder(&mut self, stream: u16, mut recv: RecvStream) {
        let (Some(staging), Some(geometry)) = (self.staging.clone(), self.geometry) else {
            return;
        };
        let (frames_tx, mut frames_rx) = mpsc::channel::<Message>(32);
        let tx = self.tx.clone();
        let switched = self.switched.clone();
        // Retained pages come on the data streams, never on the fault one.
        let reuse = self.reuse.clone().filter(|_| stream < self.streams);
        let bases = self.base_ranges.clone();
        let retained = stream < self.streams && (reuse.is_some() || !bases.is_empty());
        self.link_tasks.push(tokio::spawn(async move {
            loop {
                match read_message(&mut recv).await {
                    Ok(Some(m)) => {
                        if frames_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Event::StreamEnded);
                        return;
                    }
                    Err(WireError::Decode(d)) => {
                        let _ = tx.send(Event::Bad(d.into()));
                        return;
                    }
                    Err(_) => return,
                }
            }
        }));
        let tx = self.tx.clone();
        let streams = self.streams;
        let spawned = std::thread::Builder::new()
            .name(format!("convoy-dec-{stream}"))
            .spawn(move || {
                let mut rx = if stream == streams {
                    // The post-copy fault stream: pages in the order asked.
                    StreamReceiver::unstriped(stream, geometry)
                } else {
                    StreamReceiver::new(stream, streams, geometry)
                };
                if retained {
                    rx.accept_retained();
                }
                let mut scratch = vec![0u8; geometry.page_size().bytes()];
                while let Some(m) = frames_rx.blocking_recv() {
                    let Message::PageBatch(header, payload) = m else {
                        let _ = tx.send(Event::Bad(DestinationError::Unexpected {
                            phase: "receiving pages",
                            message: m.kind(),
                        }));
                        return;
                    };
                    let batch = match rx.receive(&header, &payload) {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Event::Bad(e.into()));
                            return;
                        }
                    };
                    let mut leaves = Vec::with_capacity(batch.len());
                    let applied = if switched.load(Ordering::Acquire) {
                        install(&staging, &batch, &mut scratch, &mut leaves)
                    } else {
                        stage(
                            &staging,
                            reuse.as_ref(),
                            &bases,
                            &batch,
                            &mut scratch,
                            &mut leaves,
                        )
                    };
                    if let Err(e) = applied {
                        let _ = tx.send(*e);
                        return;
                    }
                    if tx
                        .send(Event::Applied {
                            stream,
                            seq: batch.seq,
                            leaves,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            });
        match spawned {
            Ok(handle) => self.link_threads.push(handle),
            // A local failure, not the link's: never recovered from.
            Err(e) => {
                let _ = self.tx.send(Event::Bad(DestinationError::Staging(format!(
                    "decoder thread: {e}"
                ))));
            }
        }
    }
}

/// Before a post-copy switch (and in pre-copy): writes the pages of
/// `batch` to staging and gives each the leaf of what staging then holds.
fn stage(
    staging: &SimVm,
    reuse: Option<&Reuse>,
    bases: &[std::ops::Range<u64>],
    batch: &convoy_protocol::page::DecodedBatch,
    scratch: &mut [u8],
    leaves: &mut Vec<(PageIndex, Digest)>,
) -> Result<(), Box<Event>> {
    // A failed write or read here (a disk file) is ours, not the source's.
    let local = |e: crate::backend::BackendError| {
        Box::new(Event::Bad(DestinationError::Staging(e.to_string())))
    };
    for (idx, data) in batch.pages() {
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
        // Hash what staging holds, not what we meant to write.
        staging.read_staged(idx, scratch).map_err(local)?;
        leaves.push((idx, page_leaf(scratch)));
    }
    Ok(())
}

/// Post-copy: installs the pages of `batch` that are still missing, and
/// gives each installed page the leaf of the bytes installed. A page
/// already present (a fault and the push crossed) is left alone.
fn install(
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
        let installed = staging.install_page(idx, bytes).map_err(|e| {
            Box::new(Event::Bad(DestinationError::Staging(format!(
                "installing page {}: {e}",
                idx.0
            ))))
        })?;
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
fn page_leaf(page: &[u8]) -> Digest {
    if is_zero(page) {
        zero_leaf(page.len())
    } else {
        leaf_digest(page)
    }
}

/// The VM runs here: its disks, if any, go to stable storage before we
/// say Started (the source discards its copy then), and the time that
/// took is not downtime. A sync that fails leaves the migration in doubt.
async fn confirm_started(sm: &mut Destination, staging: Arc<SimVm>) {
    if !staging.has_disks() {
        sm.handle_started(Instant::now());
        return;
    }
    let t = Instant::now();
    match tokio::task::spawn_blocking(move || staging.sync_disks()).await {
        Ok(Ok(())) => sm.handle_started_synced(Instant::now(), t.elapsed()),
        Ok(Err(e)) => sm.handle_start_unconfirmed(&e.to_string()),
        Err(e) => sm.handle_start_unconfirmed(&e.to_string()),
    }
}

/// How often an incoming VM's disks are flushed while they arrive.
const DISK_FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Flushes an incoming VM's disks every [`DISK_FLUSH_EVERY`] until the
/// task is aborted (when the VM starts, or staging is discarded): without
/// it, the sync before Started writes every block that arrived (2.8 s for
/// a 4 GiB disk a quarter full, measured).
fn flush_disks_while_arriving(staging: Arc<SimVm>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(DISK_FLUSH_EVERY).await;
            let s = staging.clone();
            match tokio::task::spawn_blocking(move || s.flush_disks()).await {
                Ok(Ok(())) => {}
                // The sync before Started reports it (the migration is
                // then in doubt).
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(_) => return,
            }
        }
    })
}
