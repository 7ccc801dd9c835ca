//! Drives [`convoy_protocol::source::Source`] for one outgoing migration.
//!
//! Threads and tasks:
//! - this task: the state machine, the control stream's writes, the VM's
//!   dirty log, pause and resume;
//! - one reader task for the control stream (reads are not cancel-safe, so
//!   they never sit in a `select!`);
//! - per data stream, an encoder *thread* (reads guest pages, zero check,
//!   BLAKE3, zstd: CPU work kept off the async workers) feeding a writer
//!   task through a bounded channel, which writes frames with zero-copy
//!   `write_chunks` and reports each batch back here in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::adapt::LevelChooser;
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{
    CtlErrorKind, MigrateRequest, MigrationReport, Outcome, Progress, VmState,
};
use convoy_protocol::delta::PageCache;
use convoy_protocol::message::{
    encode_batch_head, Capabilities, DataStreamOpen, Manifest, Message,
};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::names::{MigrationId, SpiffeId};
use convoy_protocol::page::{stream_for, BatchBuilder, Compressor, PageBitmap, PageIndex};
use convoy_protocol::source::{
    SentBatch, Source, SourceAction, SourceConfig, SourceEvent, Switchover,
};
use quinn::{Connection, SendStream};
use thiserror::Error;
use tokio::sync::mpsc;

use super::pacer::Pacer;
use super::qemu_source;
use crate::backend::VmBackend;
use crate::config::TamperHook;
use crate::host::{ActiveGuard, Host};
use crate::transport::{self, read_message, write_message, ALPN_AGENT};
use crate::trust::policy::{Query, VmFacts};

/// Why a migration could not even begin (the VM was never touched).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// No such VM.
    #[error("no VM named {0} on this agent")]
    NoSuchVm(String),
    /// The VM is not running here (arriving, paused, or already leaving).
    #[error("VM {0} is {1:?}, not running")]
    NotRunning(String, VmState),
    /// No address for the destination.
    #[error("no address known for agent {0}; pass one (NAME@HOST:PORT)")]
    UnknownPeer(String),
    /// Bad options.
    #[error("invalid options: {0}")]
    Options(String),
    /// Migrating to ourselves.
    #[error("the destination is this agent")]
    SelfMigration,
    /// The ticket does not authorize this migration.
    #[error("refused: {0}")]
    Unauthorized(#[from] crate::trust::authz::AuthzError),
    /// The audit log cannot be written: no migration may start.
    #[error("the audit log cannot be written; refusing migrations")]
    AuditUnavailable,
    /// The source's policy denies it.
    #[error("policy {0}")]
    Forbidden(String),
}

impl MigrateError {
    /// The operator-facing kind.
    pub fn kind(&self) -> CtlErrorKind {
        match self {
            MigrateError::NoSuchVm(_) => CtlErrorKind::NotFound,
            MigrateError::Unauthorized(_) => CtlErrorKind::Unauthorized,
            MigrateError::Forbidden(_) => CtlErrorKind::Forbidden,
            _ => CtlErrorKind::BadRequest,
        }
    }
}

/// Largest guest, in 4 KiB pages, that may switch to post-copy: 64 GiB,
/// whose owed-page bitmap fits a frame however dense.
const MAX_POSTCOPY_PAGES: u64 = 64 << 18;

/// Pages per batch: one stripe (128 KiB at 4 KiB pages).
const BATCH_PAGES: usize = convoy_protocol::page::STRIPE_PAGES as usize;

enum StreamOut {
    Batch {
        head: Bytes,
        payload: Bytes,
        info: SentBatch,
    },
    RoundDone {
        round: u32,
        skipped: u64,
    },
}

enum EngineEvent {
    Sent(SentBatch),
    RoundDone { round: u32, skipped: u64 },
    StreamFailed(String),
}

struct Job {
    round: u32,
    pages: Arc<PageBitmap>,
    skip_zero: bool,
    /// Deltas allowed (not after a post-copy switch: the destination's
    /// copy of a page may have changed since).
    delta: bool,
    /// The first round: what the destination holds already.
    held: Option<Arc<Held>>,
}

/// What the destination holds before the first round: the image it
/// retained of the VM (memory), and the bases it started disks from.
#[derive(Default)]
struct Held {
    /// The retained image's leaves, page by page.
    pages: Option<Arc<Vec<convoy_protocol::digest::Digest>>>,
    /// Disks started from a base there: their leaves, and the base's.
    bases: Vec<(std::ops::Range<u64>, Arc<crate::backend::base::BaseIndex>)>,
    /// Disks started from a base there that this host cannot vouch for
    /// (its base is gone or changed): every block goes, zero ones too,
    /// since the destination's blocks are not zero.
    whole: Vec<std::ops::Range<u64>>,
}

/// What the destination holds of one leaf.
enum HeldLeaf {
    /// A page of the retained image (its leaf, if it has the page).
    Page(Option<convoy_protocol::digest::Digest>),
    /// A block of a base the disk started from there.
    Base(convoy_protocol::digest::Digest),
    /// A block of a disk started from a base there, not known here.
    Unknown,
}

impl Held {
    fn leaf(&self, p: PageIndex) -> Option<HeldLeaf> {
        if self.whole.iter().any(|r| r.contains(&p.0)) {
            return Some(HeldLeaf::Unknown);
        }
        for (r, base) in &self.bases {
            if r.contains(&p.0) {
                let i = usize::try_from(p.0 - r.start).ok()?;
                return base.leaves.get(i).copied().map(HeldLeaf::Base);
            }
        }
        let pages = self.pages.as_ref()?;
        Some(HeldLeaf::Page(pages.get(p.0 as usize).copied()))
    }

    fn is_empty(&self) -> bool {
        self.pages.is_none() && self.bases.is_empty() && self.whole.is_empty()
    }
}

/// Pages to serve on the fault stream, as one batch.
struct FaultJob {
    round: u32,
    pages: Vec<PageIndex>,
}

/// The job queues of the opened streams.
struct OpenedStreams {
    data: Vec<std::sync::mpsc::Sender<Job>>,
    faults: Option<std::sync::mpsc::Sender<FaultJob>>,
    /// The delta caches' share of the agent's budget, held while they are.
    cache: Option<crate::host::budget::CacheGrant>,
}

/// Migrates `req.vm` to `req.to`, reporting progress on `progress`.
pub(crate) async fn migrate(
    host: Arc<Host>,
    req: MigrateRequest,
    caller: SpiffeId,
    progress: mpsc::Sender<Progress>,
) -> Result<MigrationReport, MigrateError> {
    if &req.to == host.id.name()
        && host
            .creds()
            .trust
            .federated_peer(convoy_protocol::names::Role::Agent, &req.to)
            .is_none()
    {
        return Err(MigrateError::SelfMigration);
    }
    if !host.audit_ok() {
        return Err(MigrateError::AuditUnavailable);
    }
    // Nothing is touched before the operator's ticket checks out.
    let ticket = match host.authority().at_source(&caller, &host.id, &req) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(operator = %caller, "migration refused: {e}");
            host.audit(AuditEvent::Refused {
                migration: None,
                peer: caller.to_string(),
                reason: e.to_string(),
            });
            return Err(e.into());
        }
    };
    // The plan is the ticket's: what the operator signed is what runs.
    let opts = &ticket.ticket.plan;
    if opts.streams == 0 || opts.streams > convoy_protocol::message::MAX_DATA_STREAMS {
        return Err(MigrateError::Options("streams must be 1..=16".into()));
    }
    if !(0..=19).contains(&opts.compression_level) {
        return Err(MigrateError::Options(
            "compression level must be 0..=19".into(),
        ));
    }
    if opts.max_rounds == 0 {
        return Err(MigrateError::Options(
            "max rounds must be at least 1".into(),
        ));
    }
    // The destination is the one the operator signed for: its full SPIFFE
    // ID, in our trust domain or a federated one (checked in `at_source`).
    let dest_id = ticket.ticket.destination.clone();
    host.audit(AuditEvent::TicketAccepted {
        migration: ticket.ticket.id,
        vm: req.vm.clone(),
        operator: ticket.signer.clone(),
        peer: dest_id.clone(),
        role: "source".into(),
    });
    host.audit(AuditEvent::Ticket(req.ticket.clone()));
    // The policy, before anything is touched.
    let attributes = host
        .vms()
        .get(&req.vm)
        .map(|e| e.attributes.clone())
        .ok_or_else(|| MigrateError::NoSuchVm(req.vm.to_string()))?;
    let decision = host.decide(
        &Query::MigrateOut {
            operator: &ticket.signer,
            vm: VmFacts {
                name: &req.vm,
                attributes: &attributes,
            },
            source: &host.id,
            destination: &dest_id,
            ticket: &ticket.ticket,
        },
        Some(ticket.ticket.id),
    );
    if !decision.permitted {
        return Err(MigrateError::Forbidden(decision.explain()));
    }
    let addr = match &req.to_addr {
        Some(a) => a
            .parse()
            .map_err(|_| MigrateError::Options(format!("bad address {a:?}")))?,
        None => *host
            .config
            .peers
            .get(&req.to)
            .ok_or_else(|| MigrateError::UnknownPeer(req.to.to_string()))?,
    };
    // Claim the VM: only a running VM may leave, and only once at a time.
    let cancel = Arc::new(tokio::sync::Notify::new());
    let claimed = {
        let mut vms = host.vms();
        let entry = vms
            .get_mut(&req.vm)
            .ok_or_else(|| MigrateError::NoSuchVm(req.vm.to_string()))?;
        let claimed = match (&entry.vm, &entry.qemu, entry.state) {
            (_, Some(q), VmState::Running) => {
                if opts.storage_postcopy {
                    return Err(MigrateError::Options(
                        "--storage-postcopy is for sim VMs: a QEMU VM's disks are mirrored before \
                         the switch (--copy-storage)"
                            .into(),
                    ));
                }
                Claimed::Qemu(q.clone(), Box::new(qemu_source::prepare(q, &req, opts)?))
            }
            (Some(vm), None, VmState::Running) => {
                let disks = vm.disks().len();
                if opts.copy_storage && disks == 0 {
                    return Err(MigrateError::Options(format!(
                        "VM {} has no disks to copy",
                        req.vm
                    )));
                }
                if disks > 0 && !opts.copy_storage {
                    return Err(MigrateError::Options(format!(
                        "VM {} has {disks} disk(s) and Convoy assumes no shared storage: pass --copy-storage",
                        req.vm
                    )));
                }
                if opts.start_paused && opts.mode != MigrationMode::Precopy {
                    return Err(MigrateError::Options(
                        "--start-paused is for pre-copy (a demand-paged VM must run to fault its pages in)"
                            .into(),
                    ));
                }
                if opts.storage_postcopy && (disks == 0 || opts.mode == MigrationMode::Precopy) {
                    return Err(MigrateError::Options(
                        "--storage-postcopy fetches disk blocks on demand after a post-copy \
                         switch: it needs disks and --mode postcopy or hybrid"
                            .into(),
                    ));
                }
                if disks > 0 && opts.mode == MigrationMode::Postcopy && !opts.storage_postcopy {
                    return Err(MigrateError::Options(
                        "disk blocks are paged on demand only with --storage-postcopy: with disks, \
                         pass it, or use --mode precopy or hybrid (pre-copy rounds move the disks, \
                         the blocks left go at the switch, memory is paged on demand)"
                            .into(),
                    ));
                }
                // The owed bitmap travels in one frame: over the memory's
                // pages, or with storage post-copy over every leaf.
                let owed_leaves = if opts.storage_postcopy {
                    convoy_protocol::disk::check(vm.geometry(), &vm.disks()).unwrap_or(u64::MAX)
                } else {
                    vm.geometry().page_count()
                };
                if opts.mode != MigrationMode::Precopy && owed_leaves > MAX_POSTCOPY_PAGES {
                    return Err(MigrateError::Options(format!(
                        "post-copy and hybrid move guests of up to {} GiB of memory (and disks, \
                         with --storage-postcopy): the owed-page bitmap travels in one frame",
                        MAX_POSTCOPY_PAGES >> 18
                    )));
                }
                Claimed::Sim(vm.clone())
            }
            (_, _, s) => return Err(MigrateError::NotRunning(req.vm.to_string(), s)),
        };
        entry.state = VmState::MigratingOut;
        entry.cancel = Some(cancel.clone());
        // Going back to the host that retained its image: offer the key
        // to that host only.
        let back = entry.reuse.clone().filter(|r| r.holder == dest_id);
        (claimed, back)
    };
    let (claimed, back) = claimed;
    let _active = ActiveGuard::new(&host.active);
    let migration = ticket.ticket.id;
    let started = Instant::now();
    tracing::info!(%migration, vm = %req.vm, to = %dest_id, "migration starting");
    let creds = host.creds();
    let conn = transport::connect(
        &host.endpoint,
        addr,
        dest_id.clone(),
        ALPN_AGENT,
        &creds.identity,
        &creds.trust,
        &host.config.tuning,
    )
    .await;
    let vm = match claimed {
        Claimed::Sim(vm) => vm,
        Claimed::Qemu(qvm, prepared) => {
            let run = qemu_source::Run {
                host: host.clone(),
                vm: qvm,
                req: req.clone(),
                migration,
                dest: dest_id.clone(),
                plan: opts.clone(),
                prepared: *prepared,
                progress,
                cancel,
                attributes,
                started,
            };
            let done = run.drive(conn.map_err(|e| e.to_string())).await;
            return Ok(finish(&host, &req, migration, done.phases, done.report));
        }
    };

    // Retention where the VM leaves: the agent allows it and the VM opts in.
    let retain = match host.config.retain_images {
        Some(_) if attributes.retain_on_leave() => crate::host::retain::fresh_offer(),
        _ => None,
    };
    // A retained image holds memory only (disks travel by their own
    // rules: whole, or over a base the destination holds).
    let back = back.filter(|b| b.leaves.len() as u64 == vm.geometry().page_count());
    let mut run = Run {
        host: host.clone(),
        back,
        retain,
        vm: vm.clone(),
        req: req.clone(),
        plan: opts.clone(),
        migration,
        progress,
        counter_at_pause: None,
        control_bytes: 0,
        cancel,
        attributes,
        phases: Vec::new(),
        started,
        addr,
    };
    let report = match conn {
        Ok(conn) => run.drive(conn, dest_id.clone()).await,
        Err(e) => {
            host.set_state(&req.vm, VmState::Running);
            run.report_without_link(
                dest_id.clone(),
                started,
                format!("cannot reach {dest_id}: {e}"),
            )
        }
    };
    let phases = std::mem::take(&mut run.phases);
    Ok(finish(&host, &req, migration, phases, report))
}

/// The VM a migration claimed.
enum Claimed {
    Sim(Arc<dyn VmBackend>),
    Qemu(
        Arc<crate::backend::qemu::vm::QemuVm>,
        Box<qemu_source::Prepared>,
    ),
}

/// Audits a finished migration (phases, receipts, outcome) and records it.
fn finish(
    host: &Arc<Host>,
    req: &MigrateRequest,
    migration: MigrationId,
    phases: Vec<(String, u64)>,
    report: MigrationReport,
) -> MigrationReport {
    if let Some(e) = host.vms().get_mut(&req.vm) {
        e.cancel = None;
    }
    tracing::info!(%migration, outcome = ?report.outcome, "migration finished");
    for (phase, after_ms) in phases {
        host.audit(AuditEvent::Phase {
            migration,
            vm: req.vm.clone(),
            phase,
            after_ms,
        });
    }
    for r in &report.receipts {
        host.audit(AuditEvent::Receipt(r.clone()));
    }
    host.audit(AuditEvent::Outcome {
        migration,
        vm: req.vm.clone(),
        outcome: match &report.outcome {
            Outcome::Completed => "completed".into(),
            Outcome::Aborted(w) => format!("aborted: {w}"),
            Outcome::InDoubt(w) => format!("in doubt: {w}"),
            other => format!("{other:?}"),
        },
    });
    host.record(report.clone());
    report
}

struct Run {
    host: Arc<Host>,
    vm: Arc<dyn VmBackend>,
    req: MigrateRequest,
    /// The operator's plan, as the ticket signed it.
    plan: MigrationPlan,
    migration: MigrationId,
    progress: mpsc::Sender<Progress>,
    counter_at_pause: Option<u64>,
    control_bytes: u64,
    cancel: Arc<tokio::sync::Notify>,
    attributes: convoy_protocol::vm::VmAttributes,
    /// Phase changes, audited when the migration ends.
    phases: Vec<(String, u64)>,
    started: Instant,
    /// The VM goes back to a host that retained its image: the key and the
    /// leaves of that image.
    back: Option<crate::host::retain::ArrivalKey>,
    /// Keep the image here after Started, sealed under this key (sent in
    /// Handover, then forgotten).
    retain: Option<convoy_protocol::reuse::ReuseOffer>,
    /// The destination's address (dialled again for post-copy recovery).
    addr: std::net::SocketAddr,
}

/// A new link to the destination: the connection and its control stream.
struct Link {
    conn: Connection,
    send: SendStream,
    recv: quinn::RecvStream,
}

impl Run {
    /// Seals the paused image under `offer`'s key (then dropped, zeroized)
    /// and keeps it within the agent's limits.
    async fn retain_image(&mut self, offer: convoy_protocol::reuse::ReuseOffer) {
        let Some(limits) = self.host.config.retain_images else {
            return;
        };
        let vm = self.vm.clone();
        let name = self.req.vm.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let geometry = vm.geometry();
            convoy_protocol::reuse::RetainedImage::seal(
                offer.image,
                name,
                geometry,
                &offer.key,
                |p, buf| vm.read_page(p, buf),
            )
        })
        .await;
        match sealed {
            Ok(Ok(image)) => {
                let bytes = image.bytes();
                self.host.retained().insert(image, limits);
                self.phase(&format!("image retained here, encrypted ({bytes} bytes)"));
            }
            Ok(Err(e)) => tracing::warn!("cannot retain the image: {e}"),
            Err(e) => tracing::warn!("cannot retain the image: {e}"),
        }
    }

    /// The bases of the disks whose base the destination holds (`held`,
    /// per disk), with their leaves, where this host's base is still the
    /// one the manifest named (same root); and the leaves of the others,
    /// which go whole, zero blocks included (the destination's copy of
    /// the base is not zero there).
    #[allow(clippy::type_complexity)]
    async fn held_bases(
        &self,
        held: &[bool],
    ) -> (
        Vec<(std::ops::Range<u64>, Arc<crate::backend::base::BaseIndex>)>,
        Vec<std::ops::Range<u64>>,
    ) {
        let disks = self.vm.disks();
        let memory = self.vm.geometry();
        let ranges = convoy_protocol::disk::leaf_ranges(memory, &disks);
        let wanted: Vec<_> = disks
            .into_iter()
            .zip(ranges)
            .zip(held)
            .filter(|(_, h)| **h)
            .map(|((d, r), _)| (r, d.base, d.bytes))
            .collect();
        // If the lookup itself fails, every held disk goes whole.
        let all: Vec<_> = wanted.iter().map(|(r, ..)| r.clone()).collect();
        let bases = self.host.bases.clone();
        let block = memory.page_size().bytes();
        let split = tokio::task::spawn_blocking(move || {
            let (mut found, mut whole) = (Vec::new(), Vec::new());
            for (r, base, bytes) in wanted {
                let index = bases
                    .as_ref()
                    .zip(base)
                    .and_then(|(bases, base)| bases.find(&base, bytes, block));
                match index {
                    Some(i) => found.push((r, i)),
                    None => whole.push(r),
                }
            }
            (found, whole)
        })
        .await;
        split.unwrap_or((Vec::new(), all))
    }

    fn phase(&mut self, what: &str) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.phases.push((what.to_owned(), ms));
    }

    fn report_without_link(
        &self,
        dest: SpiffeId,
        started: Instant,
        why: String,
    ) -> MigrationReport {
        MigrationReport {
            migration: self.migration.to_string(),
            vm: self.req.vm.clone(),
            source: self.host.id.to_string(),
            destination: dest.to_string(),
            outcome: Outcome::Aborted(why),
            verified: false,
            converged: false,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: 0.0,
            rounds: 0,
            memory_bytes: self.vm.geometry().bytes(),
            pages_sent: 0,
            encodings: Default::default(),
            payload_bytes: 0,
            wire_bytes: 0,
            memory_root: None,
            counter_at_pause: None,
            receipts: Vec::new(),
            qemu: None,
            convergence: Default::default(),
            postcopy: None,
            disks: Vec::new(),
            disk_blocks_sent: 0,
        }
    }

    /// Post-copy recovery: dials the destination again until `deadline`,
    /// each attempt a new mutually authenticated connection with a
    /// control stream; `None` when the deadline passed.
    async fn redial(&self, dest: &SpiffeId, deadline: Option<Instant>) -> Option<Link> {
        let deadline = deadline?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let creds = self.host.creds();
            let attempt = async {
                let conn = transport::connect(
                    &self.host.endpoint,
                    self.addr,
                    dest.clone(),
                    ALPN_AGENT,
                    &creds.identity,
                    &creds.trust,
                    &self.host.config.tuning,
                )
                .await
                .map_err(|e| e.to_string())?;
                let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(Link { conn, send, recv })
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(link)) => return Some(link),
                Ok(Err(e)) => tracing::info!(migration = %self.migration, "reconnecting: {e}"),
                Err(_) => return None,
            }
            let pause =
                Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
    }

    async fn drive(&mut self, conn: Connection, dest: SpiffeId) -> MigrationReport {
        let mut conn = conn;
        // Its send window is its share of the agent's budget.
        let mut _share = self
            .host
            .budget
            .join(&conn, crate::host::budget::Side::Send);
        // Bytes of links that broke (post-copy recovery).
        let mut earlier_wire = 0u64;
        let opts = self.plan.clone();
        let geometry = self.vm.geometry();
        let mut sm = Source::new(SourceConfig {
            migration: self.migration,
            vm: self.req.vm.clone(),
            attributes: self.attributes.clone(),
            manifest: Manifest {
                memory: geometry,
                data_streams: opts.streams,
                qemu: None,
                postcopy: false,
                start_paused: opts.start_paused,
                plan: opts.clone(),
                reuse: self.back.as_ref().map(|b| Box::new(b.offer.clone())),
                disks: self.vm.disks(),
            },
            ticket: self.req.ticket.clone(),
            peer: dest.clone(),
            notary: {
                let creds = self.host.creds();
                convoy_protocol::receipt::Notary::new(
                    Arc::new(creds.identity.clone()),
                    Arc::new(creds.trust.clone()),
                    Instant::now(),
                    crate::trust::authz::now_unix(),
                )
            },
            // REUSE is dropped by the state machine without an offer.
            capabilities: if opts.compression_level > 0 {
                Capabilities::OURS
            } else {
                Capabilities(Capabilities::DELTA.0 | Capabilities::REUSE.0)
            },
            max_downtime: Duration::from_millis(u64::from(opts.max_downtime_ms)),
            max_rounds: opts.max_rounds,
            switchover: match opts.mode {
                MigrationMode::Postcopy => Switchover::Immediately,
                MigrationMode::Hybrid => Switchover::Hybrid {
                    after: opts
                        .postcopy_after_ms
                        .map(|ms| Duration::from_millis(u64::from(ms))),
                },
                _ => Switchover::Never,
            },
            auto_converge: opts.auto_converge,
            hold_hot_pages: opts.hold_hot_pages,
            force_stop: opts.force_stop,
            accept_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(120),
            started_timeout: Duration::from_secs(30),
            recovery: self.host.config.recovery_window,
            storage_postcopy: opts.storage_postcopy,
        });
        if let Some(offer) = &self.retain {
            sm.retain_image(offer.clone());
        }
        let (mut events_tx, mut events) = mpsc::unbounded_channel();
        let (ctrl_tx, mut ctrl_rx) = mpsc::channel(16);
        let mut jobs: Vec<std::sync::mpsc::Sender<Job>> = Vec::new();
        let compression = opts.compression_level;
        let mut control: Option<SendStream> = None;
        let mut link_error: Option<String> = None;

        match conn.open_bi().await {
            Ok((send, recv)) => {
                control = Some(send);
                spawn_control_reader(recv, ctrl_tx);
            }
            Err(e) => link_error = Some(e.to_string()),
        }

        sm.start(Instant::now());
        if let Some(e) = link_error.take() {
            sm.handle_link_lost(Instant::now(), &e);
        }
        let mut rounds_pending: Option<(u32, u16, u64)> = None;
        // One bandwidth cap for every link of the migration.
        let pacer = opts.bandwidth.map(|b| Arc::new(Pacer::new(b)));
        let (migration, tamper) = (self.migration, self.host.config.dangerous_tamper());
        let stream_setup = |delta: bool, postcopy: bool| StreamSetup {
            migration,
            streams: opts.streams,
            level: compression,
            tamper: tamper.clone(),
            pacer: pacer.clone(),
            delta,
            postcopy,
            adaptive: opts.adaptive_compression,
        };
        let mut fault_jobs: Option<std::sync::mpsc::Sender<FaultJob>> = None;
        let mut cache_grant = None;
        let summary = loop {
            // Carry out every action.
            while let Some(action) = sm.poll_action() {
                match action {
                    SourceAction::Send(m) => {
                        let r = match control.as_mut() {
                            Some(c) => write_message(c, &m).await.map_err(|e| e.to_string()),
                            None => Err("no control stream".into()),
                        };
                        match r {
                            Ok(n) => self.control_bytes += n as u64,
                            Err(e) => sm.handle_link_lost(Instant::now(), &e),
                        }
                    }
                    SourceAction::StartDirtyLog => {
                        self.vm.start_dirty_log();
                        // Accepted: open the data streams now.
                        let setup = stream_setup(
                            sm.accepted_capabilities()
                                .is_some_and(|c| c.has(Capabilities::DELTA)),
                            opts.mode != MigrationMode::Precopy,
                        );
                        match open_streams(&conn, setup, &self.vm, &events_tx, &self.host.budget)
                            .await
                        {
                            Ok(opened) => {
                                jobs = opened.data;
                                fault_jobs = opened.faults;
                                cache_grant = opened.cache;
                            }
                            Err(e) => sm.handle_link_lost(Instant::now(), &e),
                        }
                    }
                    SourceAction::SendPages {
                        round,
                        pages,
                        skip_zero,
                    } => {
                        let pages = Arc::new(pages);
                        rounds_pending = Some((round, 0, 0));
                        // The first round to a host that holds the image:
                        // unchanged pages go as retained.
                        let reusing = round == 1
                            && skip_zero
                            && sm
                                .accepted_capabilities()
                                .is_some_and(|c| c.has(Capabilities::REUSE));
                        let mut held = Held {
                            pages: self
                                .back
                                .as_ref()
                                .filter(|_| reusing)
                                .map(|b| b.leaves.clone()),
                            bases: Vec::new(),
                            whole: Vec::new(),
                        };
                        // Disks the destination started from their base:
                        // blocks still equal to the base's go as retained.
                        if round == 1 && skip_zero && sm.accepted_bases().contains(&true) {
                            (held.bases, held.whole) = self.held_bases(sm.accepted_bases()).await;
                        }
                        let held = (!held.is_empty()).then(|| Arc::new(held));
                        for j in &jobs {
                            let _ = j.send(Job {
                                round,
                                pages: pages.clone(),
                                skip_zero,
                                delta: !sm.is_switched(),
                                held: held.clone(),
                            });
                        }
                        if jobs.is_empty() {
                            sm.handle_link_lost(Instant::now(), "no data streams");
                        }
                    }
                    SourceAction::Throttle { percent } => {
                        self.phase(&format!("auto-converge: guest throttled {percent}%"));
                        self.vm.set_throttle(percent);
                    }
                    SourceAction::CollectDirtyLog => {
                        let d = self.vm.collect_dirty_log();
                        sm.handle_dirty_log(Instant::now(), d);
                    }
                    SourceAction::PauseVm => {
                        self.phase("paused for the final copy");
                        self.host.set_state(&self.req.vm, VmState::Paused);
                        let paused = self.vm.pause();
                        let dirty = self.vm.collect_dirty_log();
                        self.counter_at_pause = Some(self.vm.counter());
                        match paused.and_then(|()| self.vm.device_state()) {
                            Ok(state) => {
                                if let Err(e) = sm.handle_paused(Instant::now(), dirty, state) {
                                    tracing::warn!("pause rejected: {e}");
                                }
                            }
                            Err(e) => {
                                tracing::error!("cannot pause: {e}");
                                sm.cancel(Instant::now());
                            }
                        }
                    }
                    SourceAction::CommitSwitch => {
                        // From here the VM never resumes here by itself.
                        self.phase("paused and handed over for post-copy");
                        self.host.set_state(&self.req.vm, VmState::InDoubt);
                        sm.handle_switch_committed(Instant::now());
                    }
                    SourceAction::ServePages { round, pages } => {
                        let sent = fault_jobs
                            .as_ref()
                            .is_some_and(|f| f.send(FaultJob { round, pages }).is_ok());
                        if !sent {
                            sm.handle_link_lost(Instant::now(), "no fault stream");
                        }
                    }
                    SourceAction::Reconnect => {
                        self.phase(
                            "link lost after the post-copy switch: dialling the destination again",
                        );
                        tracing::warn!(migration = %self.migration, "post-copy link lost, reconnecting");
                        // The broken link's streams go; what they had sent
                        // is reported first (its leaves stand).
                        jobs.clear();
                        fault_jobs = None;
                        rounds_pending = None;
                        conn.close(crate::server::close::DONE.into(), b"link lost");
                        let (tx, rx) = mpsc::unbounded_channel();
                        drop(std::mem::replace(&mut events_tx, tx));
                        let mut old = std::mem::replace(&mut events, rx);
                        // (A Sent report lost to this bound makes the
                        // destination's Resumed look wrong: in doubt, safely.)
                        let drained = tokio::time::Instant::now() + Duration::from_secs(5);
                        while let Ok(Some(ev)) = tokio::time::timeout_at(drained, old.recv()).await
                        {
                            if let EngineEvent::Sent(b) = ev {
                                if let Err(e) = sm.handle_batch_sent(Instant::now(), &b) {
                                    tracing::error!("engine bug: {e}");
                                }
                            }
                        }
                        let mut resumed = false;
                        while let Some(link) = self.redial(&dest, sm.poll_timeout()).await {
                            // Pages are installed only where missing
                            // there: whole pages, no deltas.
                            let setup = stream_setup(false, true);
                            let opened = open_streams(
                                &link.conn,
                                setup,
                                &self.vm,
                                &events_tx,
                                &self.host.budget,
                            )
                            .await;
                            match opened {
                                Ok(opened) => {
                                    // The broken link's bytes, counted once.
                                    let stats = conn.stats();
                                    earlier_wire += stats.udp_tx.bytes + stats.udp_rx.bytes;
                                    conn = link.conn;
                                    _share = self
                                        .host
                                        .budget
                                        .join(&conn, crate::host::budget::Side::Send);
                                    control = Some(link.send);
                                    let (ctrl_tx, rx) = mpsc::channel(16);
                                    ctrl_rx = rx;
                                    spawn_control_reader(link.recv, ctrl_tx);
                                    jobs = opened.data;
                                    fault_jobs = opened.faults;
                                    resumed = true;
                                    break;
                                }
                                // Broken again at once: dial again.
                                Err(e) => {
                                    tracing::info!(migration = %self.migration, "new link failed: {e}");
                                    link.conn
                                        .close(crate::server::close::DONE.into(), b"link lost");
                                }
                            }
                        }
                        if resumed {
                            self.phase("reconnected: asking the destination to resume");
                            sm.handle_reconnected(Instant::now());
                        } else {
                            // Past the window: in doubt.
                            sm.handle_timeout(Instant::now());
                        }
                    }
                    SourceAction::CommitHandover => {
                        // From here the VM must never resume by itself here.
                        self.phase("handed over");
                        self.host.set_state(&self.req.vm, VmState::InDoubt);
                        sm.handle_handover_committed(Instant::now());
                    }
                    SourceAction::RollBack => {
                        // Nothing is retained for a VM that stays.
                        self.retain = None;
                        self.phase("rolled back: the VM runs here again");
                        self.vm.stop_dirty_log();
                        self.vm.set_throttle(0);
                        if let Err(e) = self.vm.resume() {
                            tracing::error!("cannot resume after a failed migration: {e}");
                        }
                        self.host.set_state(&self.req.vm, VmState::Running);
                    }
                    SourceAction::DiscardVm => {
                        self.host.remove(&self.req.vm);
                        if let Some(offer) = self.retain.take() {
                            self.retain_image(offer).await;
                        }
                        self.phase("started at the destination: copy here wiped");
                        self.vm.destroy();
                    }
                }
            }
            let mut finished = None;
            while let Some(ev) = sm.poll_event() {
                match ev {
                    SourceEvent::Progress(p) => {
                        let _ = self.progress.try_send(p);
                    }
                    SourceEvent::Finished(s) => finished = Some(s),
                }
            }
            if let Some(s) = finished {
                break s;
            }
            let deadline = sm.poll_timeout();
            tokio::select! {
                // The destination's messages first: a Fetch is a vCPU
                // waiting, the batch reports can wait.
                biased;
                m = ctrl_rx.recv() => match m {
                    Some(Ok(Some(msg))) => {
                        if let Err(e) = sm.handle_message(Instant::now(), msg) {
                            tracing::warn!(migration = %self.migration, "destination misbehaved: {e}");
                        }
                    }
                    Some(Ok(None)) | None => sm.handle_link_lost(Instant::now(), "control stream closed"),
                    Some(Err(e)) => sm.handle_link_lost(Instant::now(), &e.to_string()),
                },
                ev = events.recv() => match ev {
                    Some(EngineEvent::Sent(b)) => {
                        if let Err(e) = sm.handle_batch_sent(Instant::now(), &b) {
                            tracing::error!("engine bug: {e}");
                            sm.cancel(Instant::now());
                        }
                    }
                    Some(EngineEvent::RoundDone { round, skipped }) => {
                        if let Some((r, done, sk)) = rounds_pending.as_mut() {
                            if *r == round {
                                *done += 1;
                                *sk += skipped;
                                if *done == opts.streams {
                                    let total = *sk;
                                    rounds_pending = None;
                                    sm.handle_round_sent(Instant::now(), round, total);
                                }
                            }
                        }
                    }
                    Some(EngineEvent::StreamFailed(e)) => sm.handle_link_lost(Instant::now(), &e),
                    None => sm.handle_link_lost(Instant::now(), "data streams ended"),
                },
                () = sleep_until(deadline) => sm.handle_timeout(Instant::now()),
                () = self.cancel.notified() => {
                    if sm.cancel(Instant::now()) {
                        tracing::info!(migration = %self.migration, "cancelled by the operator");
                    } else {
                        tracing::warn!(migration = %self.migration, "cancel refused: already handed over");
                    }
                }
            }
        };
        drop(jobs);
        // The encoders are done with their caches: back to the pool.
        drop(cache_grant);
        // Let the last control messages reach the peer, then close.
        if let Some(mut c) = control {
            let _ = c.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.stopped()).await;
        }
        conn.close(crate::server::close::DONE.into(), b"done");
        let stats = conn.stats();
        let disks = self
            .vm
            .disks()
            .into_iter()
            .zip(sm.disk_roots())
            .map(|(d, root)| convoy_protocol::ctl::DiskReport {
                name: d.name,
                bytes: d.bytes,
                root,
            })
            .collect();
        if matches!(summary.outcome, Outcome::Aborted(_)) {
            self.host.set_state(&self.req.vm, VmState::Running);
        }
        MigrationReport {
            migration: self.migration.to_string(),
            vm: self.req.vm.clone(),
            source: self.host.id.to_string(),
            destination: dest.to_string(),
            verified: summary.verified,
            converged: summary.converged,
            total_ms: summary.total.as_secs_f64() * 1e3,
            downtime_ms: summary.downtime.map_or(0.0, |d| d.as_secs_f64() * 1e3),
            rounds: summary.rounds,
            memory_bytes: geometry.bytes(),
            pages_sent: summary.pages_sent,
            encodings: summary.encodings,
            payload_bytes: summary.payload_bytes + self.control_bytes,
            wire_bytes: earlier_wire + stats.udp_tx.bytes + stats.udp_rx.bytes,
            memory_root: summary.memory_root,
            counter_at_pause: self.counter_at_pause,
            receipts: summary.receipts,
            qemu: None,
            convergence: summary.convergence,
            postcopy: summary.postcopy.map(Box::new),
            disks,
            disk_blocks_sent: summary.disk_blocks_sent,
            outcome: summary.outcome,
        }
    }
}

/// Reads the destination's control stream into `tx`.
fn spawn_control_reader(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Result<Option<Message>, crate::transport::WireError>>,
) {
    tokio::spawn(async move {
        loop {
            let r = read_message(&mut recv).await;
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// How the data streams of one migration are set up.
struct StreamSetup {
    migration: MigrationId,
    streams: u16,
    /// zstd level, 0 for none.
    level: i32,
    tamper: Option<TamperHook>,
    /// The bandwidth cap, shared by all streams.
    pacer: Option<Arc<Pacer>>,
    /// The destination accepted delta-encoded pages.
    delta: bool,
    /// Open the post-copy fault stream too.
    postcopy: bool,
    /// Adaptive compression (up to `level`).
    adaptive: bool,
}

/// The most memory one migration's delta caches may hold, all streams
/// together (a quarter of guest memory when that is less).
const DELTA_CACHE_BYTES: u64 = 64 << 20;

/// Opens the data streams, each with its encoder thread and writer task,
/// and for post-copy the fault stream (index `streams`) after them.
async fn open_streams(
    conn: &Connection,
    setup: StreamSetup,
    vm: &Arc<dyn VmBackend>,
    events: &mpsc::UnboundedSender<EngineEvent>,
    budget: &Arc<crate::host::budget::MigrationBudget>,
) -> Result<OpenedStreams, String> {
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
    for stream in 0..streams {
        let send = open_data_stream(conn, migration, stream).await?;
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
        let (out_tx, out_rx) = mpsc::channel::<StreamOut>(32);
        let vm = vm.clone();
        let tamper = tamper.clone();
        let events_enc = events.clone();
        let link = Arc::new(AtomicU64::new(0));
        let link_enc = link.clone();
        std::thread::Builder::new()
            .name(format!("convoy-enc-{stream}"))
            .spawn(move || {
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
            })
            .map_err(|e| e.to_string())?;
        spawn_writer(send, out_rx, pacer.clone(), events.clone(), link);
        jobs.push(job_tx);
    }
    let mut faults = None;
    if postcopy {
        let send = open_data_stream(conn, migration, streams).await?;
        // Faults go before the background push whenever both wait.
        let _ = send.set_priority(1);
        let (job_tx, job_rx) = std::sync::mpsc::channel::<FaultJob>();
        let (out_tx, out_rx) = mpsc::channel::<StreamOut>(32);
        let vm = vm.clone();
        let events_enc = events.clone();
        let link = Arc::new(AtomicU64::new(0));
        let shrink = Shrink::new(level, adaptive, link.clone())?;
        std::thread::Builder::new()
            .name("convoy-faults".into())
            .spawn(move || {
                if let Err(e) = serve_faults(streams, vm, shrink, job_rx, out_tx) {
                    let _ = events_enc.send(EngineEvent::StreamFailed(e));
                }
            })
            .map_err(|e| e.to_string())?;
        spawn_writer(send, out_rx, pacer, events.clone(), link);
        faults = Some(job_tx);
    }
    Ok(OpenedStreams {
        data: jobs,
        faults,
        cache,
    })
}

async fn open_data_stream(
    conn: &Connection,
    migration: MigrationId,
    stream: u16,
) -> Result<SendStream, String> {
    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
    write_message(
        &mut send,
        &Message::DataStreamOpen(DataStreamOpen { migration, stream }),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(send)
}

/// The writer task of one stream: paced frames out, each reported sent;
/// it measures the rate the link takes them at (bytes per second of
/// waiting to send, into `link`, for adaptive compression).
fn spawn_writer(
    mut send: SendStream,
    mut out_rx: mpsc::Receiver<StreamOut>,
    pacer: Option<Arc<Pacer>>,
    events: mpsc::UnboundedSender<EngineEvent>,
    link: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        let (mut sent, mut waited) = (0.0f64, 0.0f64);
        while let Some(out) = out_rx.recv().await {
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
                        let _ = events.send(EngineEvent::StreamFailed(e.to_string()));
                        return;
                    }
                    // Bytes over time, both decayed: a frame that went at
                    // once (into free buffer space) weighs its little time,
                    // not an enormous rate.
                    sent = sent * 0.9 + info.frame_bytes as f64;
                    waited = waited * 0.9 + busy.elapsed().as_secs_f64();
                    // Nothing until enough time was measured.
                    if waited >= 0.01 {
                        link.store((sent / waited).to_bits(), Ordering::Relaxed);
                    }
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

/// The encoder thread of the post-copy fault stream: each job is one batch
/// of pages of the paused VM.
fn serve_faults(
    stream: u16,
    vm: Arc<dyn VmBackend>,
    mut comp: Shrink,
    jobs: std::sync::mpsc::Receiver<FaultJob>,
    out: mpsc::Sender<StreamOut>,
) -> Result<(), String> {
    let page_size = vm.geometry().page_size();
    let mut seq = 0u64;
    while let Ok(job) = jobs.recv() {
        let mut b = BatchBuilder::new(page_size);
        for p in job.pages {
            let mut failed = None;
            b.push_with(p, |buf| failed = vm.read_leaf(p, buf).err())
                .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e.to_string());
            }
        }
        let enc = comp.finish(b, seq, job.round)?;
        seq += 1;
        emit(&out, stream, job.round, enc, None)?;
    }
    Ok(())
}

/// Frames an encoded batch of `stream` (through the tamper hook, if the
/// agent was built dangerously with one) and hands it to the writer.
fn emit(
    out: &mpsc::Sender<StreamOut>,
    stream: u16,
    round: u32,
    enc: convoy_protocol::page::EncodedBatch,
    tamper: Option<&TamperHook>,
) -> Result<(), String> {
    let mut header = enc.header;
    let mut payload = enc.payload;
    if let Some(t) = tamper {
        t(round, &mut header, &mut payload);
    }
    let head = encode_batch_head(&header, payload.len()).map_err(|e| e.to_string())?;
    let info = SentBatch {
        stream,
        leaves: enc.leaves,
        stats: enc.stats,
        frame_bytes: (head.len() + payload.len()) as u64,
    };
    out.blocking_send(StreamOut::Batch {
        head: Bytes::from(head),
        payload: Bytes::from(payload),
        info,
    })
    .map_err(|_| "writer gone".to_string())
}

/// How one data stream encodes.
struct Encoder {
    stream: u16,
    streams: u16,
    level: i32,
    tamper: Option<TamperHook>,
    /// Bytes of this stream's delta cache; 0 sends no deltas.
    cache_bytes: u64,
    /// Choose the zstd level from measured figures (up to `level`).
    adaptive: bool,
    /// The stream's measured link rate, bytes per second (f64 bits).
    link: Arc<AtomicU64>,
}

/// Compression of one stream's batches, at a fixed or an adaptive level
/// ([`convoy_protocol::adapt`]).
struct Shrink {
    comp: Compressor,
    chooser: Option<LevelChooser>,
    link: Arc<AtomicU64>,
}

impl Shrink {
    fn new(level: i32, adaptive: bool, link: Arc<AtomicU64>) -> Result<Shrink, String> {
        let chooser = (adaptive && level > 0).then(|| LevelChooser::new(level));
        let first = chooser.as_ref().map_or(level, LevelChooser::level);
        Ok(Shrink {
            comp: Compressor::new(first).map_err(|e| e.to_string())?,
            chooser,
            link,
        })
    }

    /// Encodes `b`, at the level the chooser picks, and times it.
    fn finish(
        &mut self,
        b: BatchBuilder,
        seq: u64,
        round: u32,
    ) -> Result<convoy_protocol::page::EncodedBatch, String> {
        let Some(chooser) = self.chooser.as_mut() else {
            return b
                .finish(seq, round, &mut self.comp)
                .map_err(|e| e.to_string());
        };
        chooser.observe_link(f64::from_bits(self.link.load(Ordering::Relaxed)));
        let level = chooser.next_batch();
        if level != self.comp.level() {
            self.comp = Compressor::new(level).map_err(|e| e.to_string())?;
        }
        let input = b.data_bytes();
        let t = Instant::now();
        let enc = b
            .finish(seq, round, &mut self.comp)
            .map_err(|e| e.to_string())?;
        if self.comp.attempted() {
            let output = enc.payload.len().min(input);
            chooser.observe_compression(level, input, output, t.elapsed());
        }
        Ok(enc)
    }
}

/// The encoder thread of one data stream.
fn encode_stream(
    enc: Encoder,
    vm: Arc<dyn VmBackend>,
    jobs: std::sync::mpsc::Receiver<Job>,
    out: mpsc::Sender<StreamOut>,
) -> Result<(), String> {
    let Encoder {
        stream,
        streams,
        level,
        tamper,
        cache_bytes,
        adaptive,
        link,
    } = enc;
    let page_size = vm.geometry().page_size();
    let mut comp = Shrink::new(level, adaptive, link)?;
    // The last version sent of this stream's pages, for deltas. It lives
    // for the whole migration: round 1 fills it.
    let mut cache = (cache_bytes > 0).then(|| {
        PageCache::new(
            usize::try_from(cache_bytes).unwrap_or(usize::MAX),
            page_size,
        )
    });
    let mut seq = 0u64;
    let flush = |b: BatchBuilder, seq: &mut u64, round: u32, comp: &mut Shrink| {
        let enc = comp.finish(b, *seq, round)?;
        *seq += 1;
        emit(&out, stream, round, enc, tamper.as_ref())
    };
    while let Ok(job) = jobs.recv() {
        let mut b = BatchBuilder::with_capacity(page_size, BATCH_PAGES);
        let mut skipped = 0u64;
        for p in job.pages.iter() {
            if stream_for(p, streams) != stream {
                continue;
            }
            // A leaf that cannot be read (a disk file) fails the stream,
            // and so the migration: never sent as zeros.
            let mut failed = None;
            let read = |buf: &mut [u8]| failed = vm.read_leaf(p, buf).err();
            let cache = if job.delta { cache.as_mut() } else { None };
            let held = job.held.as_ref().and_then(|h| h.leaf(p));
            // The destination's block is not zero: a zero one must go.
            let skip_zero = job.skip_zero && !matches!(held, Some(HeldLeaf::Unknown));
            let added = match (held, cache, skip_zero) {
                (Some(HeldLeaf::Base(leaf)), cache, true) => {
                    b.push_over_base_with(p, leaf, cache, read)
                }
                (Some(HeldLeaf::Page(leaf)), cache, true) => {
                    b.push_nonzero_reusing_with(p, leaf, cache, read)
                }
                (_, Some(c), true) => b.push_nonzero_delta_with(p, c, read),
                (_, Some(c), false) => b.push_delta_with(p, c, read).map(|()| true),
                (_, None, true) => b.push_nonzero_with(p, read),
                (_, None, false) => b.push_with(p, read).map(|()| true),
            }
            .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e.to_string());
            }
            if !added {
                skipped += 1;
            }
            if b.pages() >= BATCH_PAGES {
                let full =
                    std::mem::replace(&mut b, BatchBuilder::with_capacity(page_size, BATCH_PAGES));
                flush(full, &mut seq, job.round, &mut comp)?;
            }
        }
        if b.pages() > 0 {
            flush(b, &mut seq, job.round, &mut comp)?;
        }
        out.blocking_send(StreamOut::RoundDone {
            round: job.round,
            skipped,
        })
        .map_err(|_| "writer gone".to_string())?;
    }
    Ok(())
}
