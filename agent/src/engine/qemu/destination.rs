//! The destination side of a QEMU migration (see `convoy_protocol::stream`
//! for the message sequence).
//!
//! Before anything is reserved: the operator's ticket, then the policy.
//! Then capacity (memory and, for copied disks, room in the image
//! directory), then a QEMU launched from the agent's own allow-lists with
//! `-incoming defer` and `-S`, so that it holds the guest paused until the
//! source has handed over. Every failure before the handover kills that
//! QEMU and removes its files and any disk created for it; the guest then
//! still runs at the source.
//!
//! After a post-copy switch a broken link is waited out for the recovery
//! window (`recover.rs`).

mod channels;
mod recover;

use crate::engine::clock;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::{Connection, SendStream};
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::VmState;
use convoy_protocol::journal::{JournalRecord, JournalRole, JournalStep};
use convoy_protocol::message::{
    Abort, Accept, Capabilities, DestinationPause, Message, Propose, Ready, Reason, Reject,
    Started, VersionRange,
};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::names::{MigrationId, VmName};
use convoy_protocol::receipt::{ticket_digest, Notary, ReceiptKind, SignedReceipt};
use convoy_protocol::stream::{self, ChannelDigests, QemuManifest, Switch};
use convoy_protocol::units::micros32;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::common::{
    capabilities, digests, is_migration_event, read_control, ChanEvent, Control, Fail,
};
use crate::backend::qemu::process::QemuProcess;
use crate::backend::qemu::vm::QemuVm;
use crate::engine::admission;
use crate::host::journal::JournalChange;
use crate::host::{Host, ReserveError};
use crate::transport::{write_message, Peer};
use channels::{accept_channels, AbortOnDrop};

/// How long the whole copy may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to finish loading after the source's end.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the source may take to hand over after `Ready`.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is at the other end, in messages.
const PEER: &str = "source";

struct Incoming {
    host: Arc<Host>,
    peer: Peer,
    migration: MigrationId,
    vm: VmName,
    manifest: QemuManifest,
    ticket_digest: convoy_protocol::digest::Digest,
    notary: Notary,
    started: Instant,
    phases: Vec<(String, u64)>,
    receipts: Vec<SignedReceipt>,
    /// Reserved in the registry under `vm`.
    reserved: bool,
    qemu: Option<Arc<QemuVm>>,
    /// Disks created here for this migration (removed on failure).
    created: Vec<PathBuf>,
    /// Whether the guest may already run here (post-copy switched).
    switched: bool,
    /// The `Accept` to send once admitted.
    accept: Option<Message>,
    /// The journal holds our record of the handover.
    journalled: bool,
    /// The registry's owner record read at staging (with a registry).
    registry: Option<crate::registry::Expected>,
    /// The guest runs here but its start could not be recorded: no
    /// `Started` was sent (in doubt).
    unconfirmed: Option<String>,
    /// After the post-copy switch: where a new connection's `Resume` of
    /// this migration arrives ([`recover`]).
    resume_rx: Option<mpsc::UnboundedReceiver<crate::host::Reconnection>>,
    /// The migration's link now (a recovery replaces it).
    link: Option<Connection>,
    /// Post-copy recoveries made.
    recoveries: u16,
    /// Our share of a pre-copy pause, reported in `Started`.
    share: DestinationPause,
}

/// Serves an incoming QEMU migration whose `Propose` was just read.
pub(crate) async fn serve(
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    mut send: SendStream,
    recv: crate::transport::RecvStream,
    p: Propose,
) {
    let Some(manifest) = p.manifest.qemu.clone().map(|m| *m) else {
        return;
    };
    let creds = host.creds();
    let mut run = Incoming {
        host: host.clone(),
        peer,
        migration: p.migration,
        vm: p.vm.clone(),
        manifest,
        ticket_digest: ticket_digest(&p.ticket),
        notary: Notary::new(
            Arc::new(creds.identity.clone()),
            Arc::new(creds.trust.clone()),
            clock::now(),
            crate::trust::authz::now_unix(),
        ),
        started: clock::now(),
        phases: Vec::new(),
        receipts: Vec::new(),
        reserved: false,
        qemu: None,
        created: Vec::new(),
        switched: false,
        accept: None,
        journalled: false,
        registry: None,
        unconfirmed: None,
        resume_rx: None,
        link: None,
        recoveries: 0,
        share: DestinationPause::default(),
    };
    let _active = crate::host::ActiveGuard::new(&host.active);
    let (ctl_tx, mut ctl) = mpsc::channel(8);
    let reader = crate::engine::spawn(read_control(recv, ctl_tx, None));
    let (outcome, step) = match run.admit(&p).await {
        Err(f) => {
            // Refused before anything ran: a Reject, not an Abort.
            let _ = write_message(&mut send, &Message::Reject(Reject { reason: f.reason })).await;
            run.clean_up().await;
            (format!("refused: {}", f.detail), JournalStep::Abort)
        }
        Ok(()) => match run.receive(&conn, &mut send, &mut ctl).await {
            Ok(()) => match run.unconfirmed.take() {
                Some(why) => (format!("in doubt: {why}"), JournalStep::Doubt),
                None => ("started".to_owned(), JournalStep::Complete),
            },
            Err(f) => {
                if f.tell {
                    let m = Message::Abort(Abort { reason: f.reason });
                    let _ = write_message(&mut send, &m).await;
                }
                if run.switched {
                    // Post-copy: the guest runs (or waits) here and nowhere
                    // else; killing it would lose it.
                    run.phase("failed after the post-copy switch: the guest is kept here");
                    run.register(VmState::InDoubt);
                    (
                        format!("in doubt after the post-copy switch: {}", f.detail),
                        JournalStep::Doubt,
                    )
                } else {
                    run.clean_up().await;
                    (format!("failed: {}", f.detail), JournalStep::Abort)
                }
            }
        },
    };
    tracing::info!(peer = %run.peer.id, vm = %run.vm, "incoming QEMU migration: {outcome}");
    for r in std::mem::take(&mut run.receipts) {
        host.audit(AuditEvent::Receipt(r));
    }
    for (phase, after_ms) in std::mem::take(&mut run.phases) {
        host.audit(AuditEvent::Phase {
            migration: run.migration,
            vm: run.vm.clone(),
            phase,
            after_ms,
        });
    }
    host.audit(AuditEvent::Outcome {
        migration: run.migration,
        vm: run.vm.clone(),
        outcome,
    });
    // After the audit log has it; a failure leaves the record unfinished,
    // reported at the next start.
    if run.journalled {
        let change = JournalChange::Advance {
            migration: run.migration,
            role: JournalRole::Destination,
            step,
        };
        let _ = host.journal(change).await;
    }
    run.stop_waiting_for_resume();
    let _ = send.finish();
    let last = run.link.take().unwrap_or(conn);
    let _ = tokio::time::timeout(Duration::from_secs(2), last.closed()).await;
    reader.abort();
}

impl Incoming {
    fn phase(&mut self, what: &str) {
        let ms = convoy_protocol::units::millis(clock::since(self.started));
        self.phases.push((what.to_owned(), ms));
    }

    /// Ticket, policy, capacity, QEMU waiting: then `Accept`.
    async fn admit(&mut self, p: &Propose) -> Result<(), Fail> {
        if VersionRange::OURS.negotiate(p.versions).is_none() {
            return Err(Fail::new(
                Reason::UnsupportedVersion,
                "no common protocol version",
            ));
        }
        let m = self.manifest.clone();
        let unacceptable = |s: String| Fail::new(Reason::Unacceptable(s.clone()), s);
        m.validate().map_err(|e| unacceptable(e.to_string()))?;
        if m.spec.name != p.vm {
            return Err(unacceptable("the VM definition names another VM".into()));
        }
        if p.manifest.memory.bytes() != m.spec.memory_mib << 20 {
            return Err(unacceptable(
                "memory size and VM definition disagree".into(),
            ));
        }
        if !m.spec.disks.is_empty() && m.disks.is_empty() {
            return Err(unacceptable(
                "the VM has disks but they are not copied (no shared storage here)".into(),
            ));
        }
        // The operator's ticket, the plan it grants and the policy:
        // nothing is reserved for a migration nobody authorized.
        let proposal = admission::Proposal {
            vm: &p.vm,
            migration: p.migration,
            manifest: &p.manifest,
            ticket: &p.ticket,
            attributes: &p.attributes,
        };
        admission::admit(&self.host, &self.peer.id, proposal)
            .map_err(|e| Fail::new(e.reason(), e.to_string()))?;
        let Some(cfg) = self.host.config.qemu.clone() else {
            return Err(unacceptable(
                "this agent has no QEMU backend (--qemu-binary, --image-dir)".into(),
            ));
        };
        // Disks: sizes and formats were checked; now the room, then files.
        let mut disk_paths = Vec::new();
        if !m.disks.is_empty() {
            // (The sum was checked not to overflow by `validate`.)
            let need = m.disk_bytes().unwrap_or(u64::MAX);
            let limit = self.host.config.disk_capacity_bytes;
            if need > limit {
                return Err(unacceptable(format!(
                    "{need} bytes of disks exceeds this agent's limit of {limit}"
                )));
            }
            let free = cfg.free_bytes().map_err(|e| Fail::local(e.to_string()))?;
            if need > free {
                return Err(Fail::new(
                    Reason::NoCapacity,
                    format!("{need} bytes of disks, {free} free in the image directory"),
                ));
            }
            for rel in &m.spec.disks {
                disk_paths.push(cfg.new_disk(rel).map_err(|e| unacceptable(e.to_string()))?);
            }
        }
        match self
            .host
            .reserve(&p.vm, m.spec.memory_mib << 20, VmState::Incoming)
        {
            Ok(()) => self.reserved = true,
            Err(ReserveError::Exists) => {
                return Err(Fail::new(Reason::VmExists, "a VM of that name is here"))
            }
            Err(ReserveError::NoCapacity) => {
                return Err(Fail::new(Reason::NoCapacity, "not enough memory capacity"))
            }
        }
        if let Some(e) = self.host.vms().get_mut(&p.vm) {
            e.attributes = p.attributes.clone();
        }
        for (path, d) in disk_paths.iter().zip(&m.disks) {
            let f = crate::private::create_new(path)
                .map_err(|e| Fail::local(format!("cannot create {}: {e}", path.display())))?;
            self.created.push(path.clone());
            f.set_len(d.size)
                .map_err(|e| Fail::local(format!("cannot size {}: {e}", path.display())))?;
        }
        let mut spec = cfg
            .resolve(&m.spec)
            .map_err(|e| unacceptable(e.to_string()))?;
        // Held paused until the handover.
        spec.extra_args.push("-S".into());
        let dir = crate::private::join_one(&cfg.runtime, p.vm.as_str())
            .map_err(|e| unacceptable(e.to_string()))?;
        let process = QemuProcess::launch(&spec, &dir, true)
            .await
            .map_err(|e| Fail::local(format!("cannot start QEMU: {e}")))?;
        let qvm = QemuVm::adopt(process, m.spec.clone(), spec);
        self.qemu = Some(qvm.clone());
        let q = |c: &'static str, a: Value| {
            let qvm = qvm.clone();
            async move {
                qvm.execute(c, Some(a))
                    .await
                    .map_err(|e| Fail::local(format!("QEMU {c}: {e}")))
            }
        };
        q(
            "migrate-set-capabilities",
            json!({ "capabilities": capabilities(&m) }),
        )
        .await?;
        if m.multifd_channels > 0 {
            q(
                "migrate-set-parameters",
                json!({ "multifd-channels": m.multifd_channels }),
            )
            .await?;
        }
        q(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", dir.join("incoming.sock").display()) }),
        )
        .await?;
        if !m.disks.is_empty() {
            q(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": dir.join("nbd.sock").display().to_string() } } }),
            )
            .await?;
            for i in 0..m.disks.len() {
                q(
                    "block-export-add",
                    json!({
                        "type": "nbd",
                        "id": format!("disk{i}"),
                        "name": format!("disk{i}"),
                        "node-name": format!("convoy-disk{i}"),
                        "writable": true,
                    }),
                )
                .await?;
            }
        }
        let accepted = self
            .notary
            .sign(
                clock::now(),
                ReceiptKind::Accepted,
                self.migration,
                self.ticket_digest,
                None,
            )
            .map_err(|e| Fail::local(e.to_string()))?;
        self.receipts.push(accepted.clone());
        // The staging is on disk before the source hears of it: every
        // migration the source can commit has a record here to fence.
        // With a registry, only the VM's registered owner may hand it here.
        let declared = p
            .capabilities
            .has(convoy_protocol::message::Capabilities::REGISTRY);
        self.registry = crate::host::fleet::stage(&self.host, &self.vm, &self.peer.id, declared)
            .await
            .map_err(|e| Fail::local(format!("registry: {e}")))?;
        self.record_staged()
            .await
            .map_err(|e| Fail::local(format!("the staging could not be recorded: {e}")))?;
        self.accept = Some(Message::Accept(Accept {
            version: VersionRange::OURS
                .negotiate(p.versions)
                .unwrap_or(convoy_protocol::message::PROTOCOL_VERSION),
            capabilities: Capabilities::default(),
            receipt: accepted,
            bases: Vec::new(),
        }));
        self.phase("accepted: QEMU waits, paused, for the stream");
        Ok(())
    }

    /// Carries QEMU's stream until the source's end, checks every byte it
    /// received against what the source says it sent (the way back is the
    /// source's to check, against `Ready`'s root), sends `Ready`, and on
    /// the handover starts the guest.
    async fn receive(
        &mut self,
        conn: &Connection,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
    ) -> Result<(), Fail> {
        let accept = self.accept.take().ok_or_else(|| Fail::local("no Accept"))?;
        write_message(send, &accept).await.map_err(Fail::link)?;
        self.link = Some(conn.clone());
        let qvm = self.qemu.clone().ok_or_else(|| Fail::local("no QEMU"))?;
        let (chan_tx, mut chans) = mpsc::unbounded_channel();
        // What our QEMU has read of each channel, told to the source, which
        // sends each only so far ahead of it.
        let reads = super::pacing::Reads::new();
        let mut acceptors = vec![AbortOnDrop(crate::engine::spawn(accept_channels(
            conn.clone(),
            self.migration,
            self.manifest.clone(),
            qvm.dir().to_owned(),
            chan_tx.clone(),
            reads.clone(),
        )))];
        let mut ours: Vec<ChannelDigests> = Vec::new();
        let deadline = clock::now() + MIGRATION_TIMEOUT;
        // One timer for the whole loop: the other branches wake it often
        // (a read report every 128 KiB), and a sleep made afresh on each
        // pass would never fire while bytes flow.
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let done = loop {
            tokio::select! {
                c = ctl.recv() => match c {
                    Some(Ok(Some(Message::StreamsDone(d)))) => break d,
                    // The source times the handover's round trip.
                    Some(Ok(Some(Message::Probe(p)))) => {
                        write_message(send, &Message::Probe(p)).await.map_err(Fail::link)?;
                    }
                    Some(Ok(Some(Message::Switch(s))))
                        if s.migration == self.migration
                            && self.manifest.mode != MigrationMode::Precopy
                            && !self.switched =>
                    {
                        // Recorded before the guest may run here.
                        self.record_handover()
                            .await
                            .map_err(|e| Fail::local(format!("the switch could not be recorded: {e}")))?;
                        // QEMU starts the guest as soon as the device state
                        // arrives (`cont` while incoming sets autostart).
                        qvm.execute("cont", None)
                            .await
                            .map_err(|e| Fail::local(format!("QEMU cont: {e}")))?;
                        self.switched = true;
                        self.wait_for_resume();
                        self.phase("post-copy switch: the guest runs here from now on");
                        let m = Message::Switch(Switch { migration: self.migration });
                        write_message(send, &m).await.map_err(Fail::link)?;
                    }
                    c if super::recovery::is_loss(&c) && self.recoverable() => {
                        let link = (&mut *send, &mut *ctl, &mut chans, &chan_tx);
                        self.recover(link, &mut ours, &mut acceptors, None, None).await?;
                    }
                    c => {
                        let m = Fail::from_control(c, PEER)?;
                        return Err(Fail::violation(PEER, format!("unexpected {} during the copy", m.kind())));
                    }
                },
                Some(rc) = recover::next_resume(&mut self.resume_rx) => {
                    // The source is back before this side saw the link go.
                    if let Some(rc) = self.resume_first(rc) {
                        let link = (&mut *send, &mut *ctl, &mut chans, &chan_tx);
                        self.recover(link, &mut ours, &mut acceptors, None, Some(rc)).await?;
                    }
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Done(kind, Err(e)))
                        if kind == super::recovery::live_channel(self.recoveries) && self.recoverable() =>
                    {
                        let broken = super::recovery::Broken::from_event(kind, e)
                            .map_err(|e| Fail::local(format!("{kind}: {e}")))?;
                        let link = (&mut *send, &mut *ctl, &mut chans, &chan_tx);
                        self.recover(link, &mut ours, &mut acceptors, Some(broken), None).await?;
                    }
                    ev => channel_event(ev, &mut ours)?,
                },
                () = reads.due_soon() => {
                    for r in reads.take_due() {
                        write_message(send, &Message::ChannelRead(r)).await.map_err(Fail::link)?;
                    }
                }
                _ = check.tick() => {
                    if !qvm.alive().await {
                        return Err(Fail::local("the destination QEMU exited"));
                    }
                    if clock::now() > deadline {
                        return Err(Fail::new(Reason::Timeout, "the migration took too long"));
                    }
                }
            }
        };
        if done.channels.len() > stream::MAX_CHANNELS {
            return Err(Fail::violation(PEER, "too many channels".into()));
        }
        let done_at = clock::now();
        // Every channel the source carried has ended here too.
        let drain = tokio::time::Instant::now() + Duration::from_secs(30);
        while ours.len() < done.channels.len() {
            match tokio::time::timeout_at(drain, chans.recv()).await {
                Ok(ev) => channel_event(ev, &mut ours)?,
                Err(_) => return Err(Fail::local("channels did not end after the source's end")),
            }
        }
        drop(acceptors);
        let drained_at = clock::now();
        self.stop_waiting_for_resume();
        stream::compare(&done.channels, &ours)
            .map_err(|e| Fail::new(Reason::RootMismatch, format!("stream digests differ: {e}")))?;
        let roots = stream::roots(&ours);
        // QEMU has the whole state once its incoming migration completed.
        let end = clock::now() + LOAD_TIMEOUT;
        loop {
            let q = qvm
                .execute("query-migrate", None)
                .await
                .map_err(|e| Fail::local(format!("QEMU query-migrate: {e}")))?;
            match q["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => {
                    return Err(Fail::local(format!(
                        "QEMU could not load the stream: {}",
                        q["error-desc"].as_str().unwrap_or("?")
                    )))
                }
                _ if clock::now() > end => {
                    return Err(Fail::local("QEMU did not finish loading in time"))
                }
                // Asked again when its state changes (inside the downtime:
                // no poll's wait), or after 20 ms.
                _ => {
                    let _ = qvm
                        .next_event(is_migration_event, Duration::from_millis(20))
                        .await;
                }
            }
        }
        if !self.manifest.disks.is_empty() {
            qvm.execute("nbd-server-stop", None)
                .await
                .map_err(|e| Fail::local(format!("QEMU nbd-server-stop: {e}")))?;
        }
        let ready = self
            .notary
            .sign(
                clock::now(),
                ReceiptKind::Ready,
                self.migration,
                self.ticket_digest,
                Some(roots),
            )
            .map_err(|e| Fail::local(e.to_string()))?;
        self.receipts.push(ready.clone());
        let m = Message::Ready(Ready {
            memory_root: roots.0,
            device_digest: roots.1,
            receipt: ready,
            faults: None,
        });
        write_message(send, &m).await.map_err(Fail::link)?;
        // Our share of the pause so far: the channels' last bytes, then
        // QEMU's load, the digests compared and the receipt.
        self.share.drain_us = micros32(drained_at.saturating_duration_since(done_at));
        self.share.check_us = micros32(clock::since(drained_at));
        self.phase("QEMU loaded the stream, every byte compared; waiting for the handover");
        let h = match tokio::time::timeout(HANDOVER_TIMEOUT, ctl.recv()).await {
            Err(_) => return Err(Fail::new(Reason::Timeout, "no Handover in time")),
            Ok(c) => match Fail::from_control(c, PEER)? {
                Message::Handover(h) => h,
                other => {
                    return Err(Fail::violation(
                        PEER,
                        format!("{} instead of Handover", other.kind()),
                    ))
                }
            },
        };
        let handover_at = clock::now();
        self.notary
            .check(
                &h.receipt,
                &self.peer.id,
                ReceiptKind::Sent,
                self.migration,
                self.ticket_digest,
                Some(roots),
            )
            .map_err(|e| Fail::violation(PEER, format!("Sent receipt: {e}")))?;
        self.receipts.push(h.receipt);
        // Signed before the start, so a started guest always has one.
        let started = self
            .notary
            .sign(
                clock::now(),
                ReceiptKind::Started,
                self.migration,
                self.ticket_digest,
                Some(roots),
            )
            .map_err(|e| Fail::local(e.to_string()))?;
        let mut share = self.share;
        let mut starting = clock::now();
        if !self.switched {
            // Ours once recorded; unrecorded, it never runs here.
            let recording = clock::now();
            self.record_handover()
                .await
                .map_err(|e| Fail::local(format!("the handover could not be recorded: {e}")))?;
            share.record_us = micros32(clock::since(recording));
            starting = clock::now();
            qvm.execute("cont", None)
                .await
                .map_err(|e| Fail::local(format!("QEMU cont: {e}")))?;
        }
        let end = clock::now() + Duration::from_secs(10);
        loop {
            let s = qvm
                .execute("query-status", None)
                .await
                .map_err(|e| Fail::local(format!("QEMU query-status: {e}")))?;
            if s["status"] == "running" {
                break;
            }
            if clock::now() > end {
                return Err(Fail::local(format!(
                    "the guest is {} after cont",
                    s["status"]
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.switched {
            // From `cont` to QEMU saying it runs.
            share.start_us = micros32(clock::since(starting));
        }
        self.phase("started here");
        // In the VM registry first, then in the journal: an agent killed
        // between the two finds its guest again at start and runs it (the
        // journal holds the handover); the other way round it would take
        // the running guest for residue.
        self.register(VmState::Running);
        // Recorded before Started tells the source to wipe its copy (the
        // guest runs meanwhile: not downtime).
        let running = clock::now();
        let recorded = self
            .host
            .journal(JournalChange::Advance {
                migration: self.migration,
                role: JournalRole::Destination,
                step: JournalStep::Start,
            })
            .await;
        if let Err(e) = recorded {
            // It runs here, unconfirmed: the source keeps its paused copy.
            self.phase("started here, but that could not be recorded: no Started sent");
            self.host.set_state(&self.vm, VmState::InDoubt);
            self.unconfirmed = Some(format!("started, but that could not be recorded: {e}"));
            return Ok(());
        }
        self.receipts.push(started.clone());
        let m = Message::Started(Started {
            start_ms: u32::try_from(clock::since(handover_at).as_millis()).unwrap_or(u32::MAX),
            // QEMU's disks were flushed by QEMU before it continued; the
            // guest ran while its start was recorded.
            synced_ms: u32::try_from(clock::since(running).as_millis()).unwrap_or(u32::MAX),
            pause: share,
            receipt: started,
        });
        // The guest runs here whatever happens to this message.
        let _ = write_message(send, &m).await;
        Ok(())
    }

    /// Records in the journal that a copy is staged here, before `Accept`
    /// leaves.
    async fn record_staged(&mut self) -> Result<(), crate::host::journal::JournalError> {
        let incarnation = self.host.vms().get(&self.vm).map(|e| e.incarnation);
        let record = JournalRecord::staged(
            self.migration,
            self.ticket_digest,
            self.peer.id.clone(),
            self.vm.clone(),
            incarnation,
            crate::trust::authz::now_unix(),
        );
        self.host.journal(JournalChange::Begin(record)).await?;
        self.journalled = true;
        Ok(())
    }

    /// Records in the journal that the guest is handed over to us, before
    /// it may run here. Refused once the staging was fenced (an answer to
    /// the source's inquiry promised it would never run).
    async fn record_handover(&mut self) -> Result<(), String> {
        self.host
            .journal(JournalChange::Advance {
                migration: self.migration,
                role: JournalRole::Destination,
                step: JournalStep::Commit,
            })
            .await
            .map_err(|e| e.to_string())?;
        // With a registry, its transaction is the commit point.
        crate::host::fleet::commit(&self.host, self.registry.as_ref(), self.migration).await?;
        self.phase("handover recorded");
        Ok(())
    }

    /// Hands the QEMU process to the registry: the VM lives here now.
    fn register(&mut self, state: VmState) {
        let Some(qvm) = self.qemu.take() else { return };
        self.reserved = false;
        self.created.clear();
        if let Some(e) = self.host.vms().get_mut(&self.vm) {
            e.handle = Some(crate::host::VmHandle::Qemu(qvm.clone()));
            e.state = state;
            e.arrived_from = Some(self.peer.id.to_string());
        }
        crate::host::watch_qemu(&self.host, &self.vm, &qvm);
    }

    /// Nothing of the migration stays: QEMU killed, its files and any disk
    /// created for it removed, the reservation dropped.
    async fn clean_up(&mut self) {
        if let Some(q) = self.qemu.take() {
            q.kill().await;
            self.phase("QEMU killed, its files removed");
        }
        for d in self.created.drain(..) {
            let _ = std::fs::remove_file(d);
        }
        if self.reserved {
            self.host.remove(&self.vm);
            self.reserved = false;
        }
    }
}

fn channel_event(ev: Option<ChanEvent>, ours: &mut Vec<ChannelDigests>) -> Result<(), Fail> {
    match ev {
        // (Sent: the source's channels only.)
        Some(ChanEvent::Opened | ChanEvent::Sent(..)) | None => Ok(()),
        Some(ChanEvent::Done(kind, Ok(sp))) => {
            // Here the splice's "out" runs back to the source.
            let swapped = crate::backend::qemu::tunnel::Spliced {
                out: sp.back,
                back: sp.out,
            };
            ours.push(digests(kind, &swapped));
            Ok(())
        }
        Some(ChanEvent::Done(kind, Err(e))) => Err(Fail::local(format!("{kind}: {e}"))),
        Some(ChanEvent::Bad(e)) => Err(Fail::violation(PEER, e.to_string())),
    }
}
