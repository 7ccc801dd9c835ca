//! The source side of a QEMU migration (see `convoy_protocol::stream` for
//! the message sequence).
//!
//! QEMU does the copying; this driver decides when it may start, carries
//! its channels, and owns the one decision QEMU does not take for us: the
//! handover. The destination's QEMU waits paused (`-S`) until the source
//! has seen the destination's `Ready` receipt agree, byte for byte, with
//! what it sent, and has signed `Sent`; until then any failure cancels the
//! migration and continues the guest here (`migrate_cancel`, then `cont`
//! if QEMU had already stopped it). After the handover the guest is never
//! resumed here: without `Started` the outcome is in doubt and the guest
//! stays paused.
//!
//! The flow is linear (QEMU runs the copy rounds), so it is written as
//! straight async code over the same messages, receipts and audit records
//! as the page engine, rather than as another sans-IO state machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use convoy_protocol::ctl::{
    MigrateRequest, MigrationReport, Outcome, Progress, QemuFigures, VmState,
};
use convoy_protocol::message::{
    Abort, Capabilities, Handover, Manifest, Message, Propose, Reason, VersionRange,
};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::names::{MigrationId, SpiffeId};
use convoy_protocol::page::{MemoryGeometry, PageSize};
use convoy_protocol::receipt::{ticket_digest, Notary, ReceiptKind, SignedReceipt};
use convoy_protocol::stream::{
    self, ChannelDigests, ChannelKind, ChannelOpen, DiskManifest, QemuManifest, StreamsDone, Switch,
};
use quinn::{Connection, SendStream};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::common::{capabilities, digests, ChanEvent, Control};
use super::common::{carry, read_control, Fail};
use crate::backend::qemu::vm::QemuVm;
use crate::engine::error::MigrateError;
use crate::host::Host;
use crate::transport::write_message;

/// Who is at the other end, in messages.
const PEER: &str = "destination";
/// How long a QEMU whose QMP socket failed may take to be seen exiting.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How often QEMU's progress is polled.
const POLL: Duration = Duration::from_millis(20);
/// How long the destination may take to launch its QEMU and accept.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a migration may run before it is cancelled.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long after QEMU's end the channels may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to confirm what it holds.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to start the guest.
const STARTED_TIMEOUT: Duration = Duration::from_secs(30);

/// What a QEMU migration will do, checked before the VM is claimed.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    manifest: QemuManifest,
    /// Disk image paths at the source, when copied.
    disks: Vec<PathBuf>,
}

/// Checks the operator's plan against the VM; nothing is touched.
pub(crate) fn prepare(
    vm: &QemuVm,
    req: &MigrateRequest,
    o: &MigrationPlan,
) -> Result<Prepared, MigrateError> {
    // More than one stream is multifd, for pre-copy only: QEMU 7.2 cannot
    // combine post-copy with multifd, which then uses one channel.
    let multifd_channels = if o.mode == MigrationMode::Precopy && o.streams > 1 {
        o.streams
    } else {
        0
    };
    if o.start_paused {
        return Err(MigrateError::Options(
            "--start-paused is not supported for QEMU VMs yet".into(),
        ));
    }
    if !vm.definition.disks.is_empty() && !o.copy_storage {
        return Err(MigrateError::Options(format!(
            "VM {} has {} disk(s) and Convoy assumes no shared storage: pass --copy-storage",
            req.vm,
            vm.definition.disks.len()
        )));
    }
    let mut disks = Vec::new();
    let mut manifests = Vec::new();
    if o.copy_storage {
        for d in &vm.spec.disks {
            let size = std::fs::metadata(d)
                .map_err(|e| MigrateError::Options(format!("disk {}: {e}", d.display())))?
                .len();
            disks.push(d.clone());
            manifests.push(DiskManifest {
                size,
                format: "raw".into(),
            });
        }
    }
    let manifest = QemuManifest {
        spec: vm.definition.clone(),
        mode: o.mode,
        multifd_channels,
        disks: manifests,
    };
    manifest.validate().map_err(MigrateError::Options)?;
    Ok(Prepared { manifest, disks })
}

/// What the source engine hands back for auditing.
pub(crate) struct Finished {
    pub report: MigrationReport,
    pub phases: Vec<(String, u64)>,
}

/// One outgoing QEMU migration.
pub(crate) struct Run {
    pub host: Arc<Host>,
    pub vm: Arc<QemuVm>,
    pub req: MigrateRequest,
    pub migration: MigrationId,
    pub dest: SpiffeId,
    /// The operator's plan, as the ticket signed it.
    pub plan: MigrationPlan,
    pub prepared: Prepared,
    pub progress: mpsc::Sender<Progress>,
    pub cancel: Arc<tokio::sync::Notify>,
    pub attributes: convoy_protocol::vm::VmAttributes,
    pub started: Instant,
}

/// How the migration went, before the report is written.
struct State {
    phases: Vec<(String, u64)>,
    receipts: Vec<SignedReceipt>,
    channels: Vec<ChannelDigests>,
    qemu_status: String,
    qemu_info: Value,
    stop_at_unix_us: Option<u64>,
    downtime_ms: f64,
    handed_over: bool,
    control_bytes: u64,
    wire_bytes: u64,
    verified: bool,
}

impl Run {
    fn phase(&self, st: &mut State, what: &str) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        st.phases.push((what.to_owned(), ms));
    }

    fn notary(&self) -> Notary {
        let creds = self.host.creds();
        Notary::new(
            Arc::new(creds.identity.clone()),
            Arc::new(creds.trust.clone()),
            Instant::now(),
            crate::trust::authz::now_unix(),
        )
    }

    /// Runs the migration over `conn`, or reports why there is none.
    pub async fn drive(self, conn: Result<Connection, String>) -> Finished {
        let mut st = State {
            phases: Vec::new(),
            receipts: Vec::new(),
            channels: Vec::new(),
            qemu_status: "not started".into(),
            qemu_info: Value::Null,
            stop_at_unix_us: None,
            downtime_ms: 0.0,
            handed_over: false,
            control_bytes: 0,
            wire_bytes: 0,
            verified: false,
        };
        let outcome = match conn {
            Ok(conn) => {
                let o = self.run(&conn, &mut st).await;
                conn.close(crate::transport::close::DONE.into(), b"done");
                let stats = conn.stats();
                st.wire_bytes = stats.udp_tx.bytes + stats.udp_rx.bytes;
                o
            }
            Err(e) => {
                self.host.set_state(&self.req.vm, VmState::Running);
                Outcome::Aborted(format!("cannot reach {}: {e}", self.dest))
            }
        };
        self.finish(st, outcome)
    }

    async fn run(&self, conn: &Connection, st: &mut State) -> Outcome {
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.roll_back(st).await;
                return Outcome::Aborted(format!("link lost: {e}"));
            }
        };
        let (ctl_tx, mut ctl) = mpsc::channel(8);
        let reader = tokio::spawn(read_control(recv, ctl_tx));
        let (chan_tx, mut chans) = mpsc::unbounded_channel();
        let mut acceptors = JoinSet::new();
        let r = self
            .before_handover(
                conn,
                &mut send,
                &mut ctl,
                &chan_tx,
                &mut chans,
                &mut acceptors,
                st,
            )
            .await;
        let outcome = match r {
            Ok(()) => self.handover(&mut send, &mut ctl, st).await,
            Err(Fail {
                reason,
                mut detail,
                tell,
            }) => {
                if tell {
                    let m = Message::Abort(Abort { reason });
                    let _ = write_message(&mut send, &m).await;
                }
                if st.handed_over {
                    // Post-copy already switched: the guest's state is split
                    // between the hosts. Nothing here may resume it.
                    self.host.set_state(&self.req.vm, VmState::InDoubt);
                    self.phase(st, "failed after the post-copy switch: kept paused");
                    if !self.vm.alive().await && !detail.contains("source QEMU") {
                        detail = format!("the source QEMU exited ({detail})");
                    }
                    Outcome::InDoubt(detail)
                } else {
                    let gone = self.roll_back(st).await;
                    if gone && !detail.contains("source QEMU") {
                        detail = format!("the source QEMU exited ({detail})");
                    }
                    Outcome::Aborted(detail)
                }
            }
        };
        acceptors.abort_all();
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        reader.abort();
        outcome
    }

    /// Everything up to the source's commitment: accepted, QEMU's stream
    /// carried, and the destination's `Ready` agreeing with what was sent.
    #[allow(clippy::too_many_arguments)]
    async fn before_handover(
        &self,
        conn: &Connection,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        chan_tx: &mpsc::UnboundedSender<ChanEvent>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        acceptors: &mut JoinSet<()>,
        st: &mut State,
    ) -> Result<(), Fail> {
        let m = &self.prepared.manifest;
        let notary = self.notary();
        let td = ticket_digest(&self.req.ticket);
        let pages = m.spec.memory_mib * 256;
        let memory = MemoryGeometry::new(PageSize::SIZE_4K, pages)
            .map_err(|e| Fail::local(format!("memory geometry: {e}")))?;
        let propose = Message::Propose(Propose {
            versions: VersionRange::OURS,
            capabilities: Capabilities::default(),
            migration: self.migration,
            vm: self.req.vm.clone(),
            attributes: self.attributes.clone(),
            manifest: Manifest {
                memory,
                data_streams: m.channels() as u16,
                qemu: Some(Box::new(m.clone())),
                postcopy: false,
                start_paused: false,
                plan: self.plan.clone(),
                reuse: None,
                disks: Vec::new(),
            },
            ticket: self.req.ticket.clone(),
        });
        st.control_bytes += write_message(send, &propose).await.map_err(Fail::link)? as u64;
        match self.next(ctl, ACCEPT_TIMEOUT, "Accept").await? {
            Message::Accept(a) => {
                notary
                    .check(
                        &a.receipt,
                        &self.dest,
                        ReceiptKind::Accepted,
                        self.migration,
                        td,
                        None,
                    )
                    .map_err(|e| Fail::violation(PEER, format!("Accepted receipt: {e}")))?;
                st.receipts.push(a.receipt);
            }
            Message::Reject(r) => {
                return Err(Fail {
                    detail: format!("refused by the destination: {}", r.reason),
                    reason: r.reason,
                    tell: false,
                })
            }
            other => {
                return Err(Fail::violation(
                    PEER,
                    format!("{} instead of Accept", other.kind()),
                ))
            }
        }
        self.phase(st, "accepted: the destination's QEMU waits");

        // QEMU connects to sockets we own; each connection becomes a stream.
        let out_sock = self.vm.dir().join("migrate-out.sock");
        let migration_listener = listen(&out_sock)?;
        acceptors.spawn(accept_channels(
            migration_listener,
            conn.clone(),
            self.migration,
            (0..=m.multifd_channels)
                .map(ChannelKind::Migration)
                .collect(),
            chan_tx.clone(),
        ));
        let mut opened = 0usize;
        if !self.prepared.disks.is_empty() {
            let nbd_sock = self.vm.dir().join("nbd-out.sock");
            let nbd_listener = listen(&nbd_sock)?;
            acceptors.spawn(accept_channels(
                nbd_listener,
                conn.clone(),
                self.migration,
                (0..self.prepared.disks.len() as u16)
                    .map(ChannelKind::Nbd)
                    .collect(),
                chan_tx.clone(),
            ));
            opened += self.mirror_disks(&nbd_sock, ctl, chans, st).await?;
        }
        self.configure(m).await?;
        self.qmp(
            "migrate",
            json!({ "uri": format!("unix:{}", out_sock.display()) }),
        )
        .await?;
        self.phase(st, "QEMU migrating");
        let begun = Instant::now();
        let total_pages = pages;
        let mut switched = false;
        let info = loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.cancel.notified() => {
                    if !st.handed_over {
                        return Err(Fail::cancelled());
                    }
                    tracing::warn!(migration = %self.migration, "cancel refused: already switched to post-copy");
                }
                c = ctl.recv() => {
                    let m = Fail::from_control(c, PEER)?;
                    return Err(Fail::violation(PEER, format!("unexpected {} during the copy", m.kind())));
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Opened) => opened += 1,
                    Some(ChanEvent::Done(kind, Ok(sp))) => st.channels.push(digests(kind, &sp)),
                    Some(ChanEvent::Done(kind, Err(e))) => return Err(Fail::link(format!("{kind}: {e}"))),
                    Some(ChanEvent::Bad(e)) => return Err(Fail::link(e)),
                    None => {}
                },
            }
            if begun.elapsed() > MIGRATION_TIMEOUT {
                return Err(Fail::local("QEMU's migration took too long"));
            }
            if !self.vm.alive().await {
                return Err(Fail::source_exited());
            }
            let q = self.qmp("query-migrate", Value::Null).await?;
            let status = q["status"].as_str().unwrap_or("").to_owned();
            let ram = &q["ram"];
            let _ = self.progress.try_send(Progress {
                phase: format!("qemu {status}"),
                round: ram["dirty-sync-count"].as_u64().unwrap_or(0) as u32,
                pages_sent: ram["transferred"].as_u64().unwrap_or(0) / 4096,
                remaining_pages: ram["remaining"].as_u64().unwrap_or(0) / 4096,
                total_pages,
                payload_bytes: ram["transferred"].as_u64().unwrap_or(0),
                rate_bytes_per_sec: (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64,
            });
            match status.as_str() {
                "completed" => break q,
                "failed" | "cancelled" => {
                    let why = q["error-desc"].as_str().unwrap_or(&status).to_owned();
                    st.qemu_status = status;
                    return Err(Fail::local(format!(
                        "QEMU's migration {}: {why}",
                        st.qemu_status
                    )));
                }
                "active" if !switched => {
                    let due = match m.mode {
                        MigrationMode::Precopy => false,
                        MigrationMode::Postcopy => true,
                        MigrationMode::Hybrid => match self.plan.postcopy_after_ms {
                            Some(ms) => begun.elapsed() >= Duration::from_millis(u64::from(ms)),
                            // After the first full pass.
                            None => ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
                        },
                    };
                    if due {
                        switched = true;
                        self.switch(send, ctl, st).await?;
                    }
                }
                _ => {}
            }
        };
        st.qemu_status = "completed".into();
        st.qemu_info = info;
        for e in self.vm.take_events().await {
            if e["event"] == "STOP" {
                let t = &e["timestamp"];
                st.stop_at_unix_us = Some(
                    t["seconds"].as_u64().unwrap_or(0) * 1_000_000
                        + t["microseconds"].as_u64().unwrap_or(0),
                );
            }
        }
        self.phase(st, "QEMU finished sending");
        if !self.prepared.disks.is_empty() {
            self.complete_mirrors().await?;
        }
        // Every channel QEMU opened has ended both ways: the digests are final.
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while st.channels.len() < opened {
            match tokio::time::timeout_at(deadline, chans.recv()).await {
                Ok(Some(ChanEvent::Opened)) => opened += 1,
                Ok(Some(ChanEvent::Done(kind, Ok(sp)))) => st.channels.push(digests(kind, &sp)),
                Ok(Some(ChanEvent::Done(kind, Err(e)))) => {
                    return Err(Fail::link(format!("{kind}: {e}")))
                }
                Ok(Some(ChanEvent::Bad(e))) => return Err(Fail::link(e)),
                Ok(None) => break,
                Err(_) => return Err(Fail::local("QEMU's channels did not close")),
            }
        }
        st.channels = stream::canonical(std::mem::take(&mut st.channels));
        let (out_root, back_root) = stream::roots(&st.channels);
        let done = Message::StreamsDone(StreamsDone {
            channels: st.channels.clone(),
        });
        st.control_bytes += write_message(send, &done).await.map_err(Fail::link)? as u64;
        match self.next(ctl, READY_TIMEOUT, "Ready").await? {
            Message::Ready(r) => {
                if r.memory_root != out_root || r.device_digest != back_root {
                    return Err(Fail::new(
                        Reason::RootMismatch,
                        "the destination holds other bytes than were sent",
                    ));
                }
                notary
                    .check(
                        &r.receipt,
                        &self.dest,
                        ReceiptKind::Ready,
                        self.migration,
                        td,
                        Some((out_root, back_root)),
                    )
                    .map_err(|e| Fail::violation(PEER, format!("Ready receipt: {e}")))?;
                st.receipts.push(r.receipt);
                st.verified = true;
            }
            other => {
                return Err(Fail::violation(
                    PEER,
                    format!("{} instead of Ready", other.kind()),
                ))
            }
        }
        self.phase(st, "the destination holds every byte sent");
        Ok(())
    }

    /// Post-copy: commit, have the destination start the guest as soon as
    /// it can, then let QEMU switch.
    async fn switch(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        st: &mut State,
    ) -> Result<(), Fail> {
        let m = Message::Switch(Switch {
            migration: self.migration,
        });
        st.control_bytes += write_message(send, &m).await.map_err(Fail::link)? as u64;
        match self.next(ctl, Duration::from_secs(10), "Switch").await? {
            Message::Switch(s) if s.migration == self.migration => {}
            other => {
                return Err(Fail::violation(
                    PEER,
                    format!("{} instead of Switch", other.kind()),
                ))
            }
        }
        // From the switch on the guest runs only at the destination.
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        st.handed_over = true;
        self.phase(
            st,
            "switched to post-copy: the guest runs at the destination",
        );
        self.qmp("migrate-start-postcopy", Value::Null).await?;
        Ok(())
    }

    /// Commits (precopy) and waits for `Started`.
    async fn handover(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        st: &mut State,
    ) -> Outcome {
        let notary = self.notary();
        let td = ticket_digest(&self.req.ticket);
        let roots = stream::roots(&st.channels);
        // From here the guest must never run here again.
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        st.handed_over = true;
        self.phase(st, "handed over");
        let sent = match notary.sign(
            Instant::now(),
            ReceiptKind::Sent,
            self.migration,
            td,
            Some(roots),
        ) {
            Ok(r) => r,
            Err(e) => {
                // Not sent yet: the guest may still resume here.
                st.handed_over = false;
                let _ = write_message(
                    send,
                    &Message::Abort(Abort {
                        reason: Reason::Internal(e.to_string()),
                    }),
                )
                .await;
                self.roll_back(st).await;
                return Outcome::Aborted(format!("cannot sign the Sent receipt: {e}"));
            }
        };
        st.receipts.push(sent.clone());
        let h = Message::Handover(Handover {
            receipt: sent,
            reuse: None,
        });
        match write_message(send, &h).await {
            Ok(n) => st.control_bytes += n as u64,
            Err(e) => return self.in_doubt(st, format!("link lost at the handover: {e}")),
        }
        let started = match self.next(ctl, STARTED_TIMEOUT, "Started").await {
            Ok(Message::Started(s)) => s,
            Ok(other) => return self.in_doubt(st, format!("{} instead of Started", other.kind())),
            Err(f) => return self.in_doubt(st, f.detail),
        };
        if let Err(e) = notary.check(
            &started.receipt,
            &self.dest,
            ReceiptKind::Started,
            self.migration,
            td,
            Some(roots),
        ) {
            return self.in_doubt(st, format!("Started receipt: {e}"));
        }
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        st.downtime_ms = match (self.prepared.manifest.mode, st.stop_at_unix_us) {
            (MigrationMode::Precopy, Some(stop)) => now_us.saturating_sub(stop) as f64 / 1e3,
            // Post-copy: the guest ran at the destination long before
            // Started; QEMU's own figure is the downtime.
            _ => st.qemu_info["downtime"].as_f64().unwrap_or(0.0),
        };
        st.receipts.push(started.receipt);
        self.phase(st, "started at the destination: QEMU here quit");
        self.host.remove(&self.req.vm);
        self.vm.stop().await;
        Outcome::Completed
    }

    fn in_doubt(&self, st: &mut State, why: String) -> Outcome {
        self.phase(st, "no start confirmed: the guest stays paused here");
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        Outcome::InDoubt(why)
    }

    /// Undoes everything before the handover: QEMU's migration cancelled,
    /// mirrors dropped, the guest running here. Returns true when there is
    /// nothing to resume: the source QEMU is gone.
    async fn roll_back(&self, st: &mut State) -> bool {
        let cancelled = self.vm.execute("migrate_cancel", None).await;
        if cancelled.is_err() && self.vm.exited_within(EXIT_GRACE).await {
            self.host.set_state(&self.req.vm, VmState::Exited);
            self.phase(st, "the source QEMU is gone");
            return true;
        }
        for i in 0..self.prepared.disks.len() {
            let _ = self
                .vm
                .execute(
                    "block-job-cancel",
                    Some(json!({ "device": mirror_job(i), "force": true })),
                )
                .await;
        }
        // The cancel is asynchronous: wait for QEMU to leave its migration.
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match self.vm.execute("query-migrate", None).await {
                Ok(q)
                    if matches!(
                        q["status"].as_str(),
                        Some("active" | "cancelling" | "setup" | "device" | "pre-switchover")
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
        for i in 0..self.prepared.disks.len() {
            let _ = self
                .vm
                .execute("blockdev-del", Some(json!({ "node-name": mirror_node(i) })))
                .await;
        }
        if let Ok(s) = self.vm.execute("query-status", None).await {
            if s["status"] != "running" {
                if let Err(e) = self.vm.execute("cont", None).await {
                    tracing::error!(vm = %self.req.vm, "cannot resume the guest after a failed migration: {e}");
                }
            }
        }
        self.host.set_state(&self.req.vm, VmState::Running);
        self.phase(st, "rolled back: the guest runs here again");
        false
    }

    /// Migration capabilities and parameters for this plan.
    async fn configure(&self, m: &QemuManifest) -> Result<(), Fail> {
        self.qmp(
            "migrate-set-capabilities",
            json!({ "capabilities": capabilities(m) }),
        )
        .await?;
        let mut p = json!({
            "downtime-limit": self.plan.max_downtime_ms,
            "max-bandwidth": self.plan.bandwidth.unwrap_or(UNLIMITED),
        });
        if m.multifd_channels > 0 {
            p["multifd-channels"] = json!(m.multifd_channels);
        }
        self.qmp("migrate-set-parameters", p).await?;
        Ok(())
    }

    /// Starts one mirror per disk into the destination's NBD exports and
    /// waits until each is in sync; returns the channels opened.
    async fn mirror_disks(
        &self,
        nbd_sock: &std::path::Path,
        ctl: &mut mpsc::Receiver<Control>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        st: &mut State,
    ) -> Result<usize, Fail> {
        let mut opened = 0;
        for i in 0..self.prepared.disks.len() {
            self.qmp(
                "blockdev-add",
                json!({
                    "driver": "nbd",
                    "node-name": mirror_node(i),
                    "server": { "type": "unix", "path": nbd_sock.display().to_string() },
                    "export": format!("disk{i}"),
                }),
            )
            .await?;
            self.qmp(
                "blockdev-mirror",
                json!({
                    "job-id": mirror_job(i),
                    // Its drive, or its node when it was adopted so.
                    "device": self.vm.block_devices.get(i).cloned().unwrap_or_else(|| format!("disk{i}")),
                    "target": mirror_node(i),
                    "sync": "full",
                    "auto-dismiss": true,
                }),
            )
            .await?;
        }
        self.phase(st, "mirroring disks");
        let end = Instant::now() + MIGRATION_TIMEOUT;
        let mut last: Option<(Instant, u64)> = None;
        let mut rate = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.cancel.notified() => return Err(Fail::cancelled()),
                c = ctl.recv() => {
                    let m = Fail::from_control(c, PEER)?;
                    return Err(Fail::violation(PEER, format!("unexpected {} while mirroring", m.kind())));
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Opened) => opened += 1,
                    Some(ChanEvent::Done(kind, Ok(_))) => return Err(Fail::link(format!("{kind} ended while mirroring"))),
                    Some(ChanEvent::Done(kind, Err(e))) => return Err(Fail::link(format!("{kind}: {e}"))),
                    Some(ChanEvent::Bad(e)) => return Err(Fail::link(e)),
                    None => {}
                },
            }
            if Instant::now() > end {
                return Err(Fail::local("disk mirrors did not reach sync in time"));
            }
            let jobs = self.qmp("query-block-jobs", Value::Null).await?;
            let jobs = jobs.as_array().cloned().unwrap_or_default();
            // Progress as for memory: bytes mirrored of the disks' total,
            // in 4 KiB units.
            let ours = || {
                jobs.iter().filter(|j| {
                    (0..self.prepared.disks.len()).any(|i| j["device"] == mirror_job(i).as_str())
                })
            };
            let done: u64 = ours().filter_map(|j| j["offset"].as_u64()).sum();
            let len: u64 = ours().filter_map(|j| j["len"].as_u64()).sum();
            let now = Instant::now();
            if let Some((at, before)) = last {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    rate = (done.saturating_sub(before) as f64 / secs) as u64;
                }
            }
            last = Some((now, done));
            let _ = self.progress.try_send(Progress {
                phase: "mirroring disks".into(),
                round: 0,
                pages_sent: done / 4096,
                remaining_pages: len.saturating_sub(done) / 4096,
                total_pages: len / 4096,
                payload_bytes: done,
                rate_bytes_per_sec: rate,
            });
            let mut ready = 0;
            for i in 0..self.prepared.disks.len() {
                match jobs.iter().find(|j| j["device"] == mirror_job(i).as_str()) {
                    Some(j) if j["ready"] == true => ready += 1,
                    Some(j) if j["status"] == "concluded" || j["status"] == "aborting" => {
                        return Err(Fail::local(format!(
                            "the mirror of disk {i} failed: {}",
                            j["error"].as_str().unwrap_or("?")
                        )))
                    }
                    Some(_) => {}
                    None => return Err(Fail::local(format!("the mirror of disk {i} vanished"))),
                }
            }
            if ready == self.prepared.disks.len() {
                break;
            }
        }
        self.phase(st, "disks in sync; memory next");
        Ok(opened)
    }

    /// After memory: the guest is stopped, so the mirrors are complete;
    /// end them without pivoting (the destination owns its copies) and
    /// close the NBD connections.
    async fn complete_mirrors(&self) -> Result<(), Fail> {
        for i in 0..self.prepared.disks.len() {
            self.qmp("block-job-cancel", json!({ "device": mirror_job(i) }))
                .await?;
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = self.qmp("query-block-jobs", Value::Null).await?;
            if jobs.as_array().is_none_or(|j| j.is_empty()) {
                break;
            }
            if Instant::now() > end {
                return Err(Fail::local("disk mirrors did not complete"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for e in self.vm.take_events().await {
            if e["event"] == "BLOCK_JOB_ERROR" {
                return Err(Fail::local(format!("a disk mirror failed: {}", e["data"])));
            }
        }
        for i in 0..self.prepared.disks.len() {
            self.qmp("blockdev-del", json!({ "node-name": mirror_node(i) }))
                .await?;
        }
        Ok(())
    }

    async fn qmp(&self, command: &str, args: Value) -> Result<Value, Fail> {
        let args = (!args.is_null()).then_some(args);
        match self.vm.execute(command, args).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if self.vm.exited_within(EXIT_GRACE).await {
                    Err(Fail::source_exited())
                } else {
                    Err(Fail::local(format!("QEMU: {e}")))
                }
            }
        }
    }

    /// The next control message, within `timeout`; the operator may cancel.
    async fn next(
        &self,
        ctl: &mut mpsc::Receiver<Control>,
        timeout: Duration,
        what: &str,
    ) -> Result<Message, Fail> {
        tokio::select! {
            c = tokio::time::timeout(timeout, ctl.recv()) => match c {
                Err(_) => Err(Fail::new(Reason::Timeout, format!("no {what} from the destination in time"))),
                Ok(c) => Fail::from_control(c, PEER),
            },
            () = self.cancel.notified(), if !matches!(what, "Started") => Err(Fail::cancelled()),
        }
    }

    fn finish(self, st: State, outcome: Outcome) -> Finished {
        let q = &st.qemu_info;
        let ram = &q["ram"];
        let (out_root, _) = stream::roots(&st.channels);
        let payload: u64 = st
            .channels
            .iter()
            .map(|c| c.out_bytes + c.back_bytes)
            .sum::<u64>()
            + st.control_bytes;
        let report = MigrationReport {
            migration: self.migration.to_string(),
            vm: self.req.vm.clone(),
            source: self.host.id.to_string(),
            destination: self.dest.to_string(),
            verified: st.verified,
            converged: st.qemu_status == "completed",
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: st.downtime_ms,
            rounds: ram["dirty-sync-count"].as_u64().unwrap_or(0) as u32,
            memory_bytes: self.prepared.manifest.spec.memory_mib << 20,
            pages_sent: ram["normal"].as_u64().unwrap_or(0)
                + ram["duplicate"].as_u64().unwrap_or(0),
            encodings: Default::default(),
            payload_bytes: payload,
            wire_bytes: st.wire_bytes,
            memory_root: (!st.channels.is_empty()).then_some(out_root),
            counter_at_pause: None,
            receipts: st.receipts,
            convergence: Default::default(),
            postcopy: None,
            disks: Vec::new(),
            disk_blocks_sent: 0,
            qemu: Some(Box::new(QemuFigures {
                mode: self.prepared.manifest.mode,
                status: st.qemu_status,
                total_ms: q["total-time"].as_u64(),
                downtime_ms: q["downtime"].as_u64(),
                transferred_bytes: ram["transferred"].as_u64(),
                multifd_channels: self.prepared.manifest.multifd_channels,
                disks_copied: self.prepared.disks.len() as u16,
                channels: st.channels,
            })),
            outcome,
        };
        Finished {
            report,
            phases: st.phases,
        }
    }
}

/// QEMU's `max-bandwidth` when the operator set no cap (1 TiB/s).
const UNLIMITED: u64 = 1 << 40;

fn mirror_node(i: usize) -> String {
    format!("convoy-mirror-target{i}")
}

fn mirror_job(i: usize) -> String {
    format!("convoy-mirror{i}")
}

fn listen(path: &std::path::Path) -> Result<tokio::net::UnixListener, Fail> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Fail::local(format!("cannot listen on {}: {e}", path.display())))
}

/// Accepts QEMU's connections on `listener`, one per kind in order, and
/// carries each on a new stream to the peer.
async fn accept_channels(
    listener: tokio::net::UnixListener,
    conn: Connection,
    migration: MigrationId,
    kinds: Vec<ChannelKind>,
    events: mpsc::UnboundedSender<ChanEvent>,
) {
    let mut tasks = JoinSet::new();
    for kind in kinds {
        let local = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                let _ = events.send(ChanEvent::Done(kind, Err(e.to_string())));
                break;
            }
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                let _ = events.send(ChanEvent::Done(kind, Err(e.to_string())));
                break;
            }
        };
        let open = Message::ChannelOpen(ChannelOpen { migration, kind });
        if let Err(e) = write_message(&mut send, &open).await {
            let _ = events.send(ChanEvent::Done(kind, Err(e.to_string())));
            break;
        }
        carry(&mut tasks, &events, kind, local, send, recv);
    }
    // The splices live as long as this task: aborting it cuts them all.
    while tasks.join_next().await.is_some() {}
}

impl Fail {
    fn source_exited() -> Fail {
        Fail::local("the source QEMU exited")
    }
}
