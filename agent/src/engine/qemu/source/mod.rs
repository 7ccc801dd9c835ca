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
//!
//! # Layout
//!
//! * `prepare.rs`: the plan checked against the VM, before it is claimed.
//! * Here: the [`Run`], its state, the outcome of a failure (roll back or
//!   in doubt) and the QMP and control-message helpers.
//! * `sequence.rs`: the message sequence, from `Propose` to `Started`, and
//!   the post-copy switch.
//! * `channels.rs`: QEMU's sockets, each connection carried on a stream.
//! * `progress.rs`: QEMU's migration parameters, and its progress polled.
//! * `window.rs`: the send window kept near the link's bandwidth-delay
//!   product, so QEMU's pacing sees the link.
//! * `mirror.rs`: the disk mirrors into the destination's NBD exports.
//! * `recover.rs`: post-copy recovery after the link broke.
//! * `report.rs`: the report handed back for auditing.

mod channels;
mod mirror;
mod prepare;
mod progress;
mod recover;
mod report;
mod sequence;
mod verify;
mod window;

pub(crate) use prepare::{prepare, Prepared};

use crate::engine::clock;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::Connection;
use convoy_protocol::ctl::{MigrateRequest, MigrationReport, Outcome, Progress, VmState};
use convoy_protocol::message::{Abort, Message, Reason};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{MigrationId, SpiffeId};
use convoy_protocol::receipt::{Notary, SignedReceipt};
use convoy_protocol::stream::ChannelDigests;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::common::{read_control, Control, Fail};
use crate::backend::qemu::vm::QemuVm;
use crate::host::Host;
use crate::transport::{write_message, TransportError};
use mirror::{mirror_job, mirror_node};

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
    /// Where the destination was dialled (and is dialled again to
    /// recover).
    pub addr: std::net::SocketAddr,
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
    /// Channels whose way out has ended ([`ChanEvent::Sent`]): what went
    /// out on them, final.
    sent: Vec<convoy_protocol::stream::ChannelSent>,
    qemu_status: String,
    qemu_info: Value,
    /// The highest throttle QEMU applied, percent.
    throttle: u8,
    /// QEMU's last dirty rate, pages per second.
    dirty_rate: u64,
    stop_at_unix_us: Option<u64>,
    /// QEMU's downtime limit from the target ([`Run::downtime_limit`]),
    /// the pass QEMU is in (its `dirty-sync-count`) and the limit the
    /// ramp gave it for that pass, milliseconds.
    limit_ms: u64,
    pass: u64,
    ramped_ms: u64,
    /// Each migration channel's credit, kept by the destination's reads.
    credits: Arc<crate::engine::qemu::pacing::Credits>,
    /// In a pre-copy pause, on the same clock as QEMU's `STOP`: when
    /// `StreamsDone` went, `Ready` came and `Handover` went.
    pause_marks: [Option<u64>; 3],
    /// Where the pause went (pre-copy, once `Started` came).
    pause: convoy_protocol::model::PauseParts,
    downtime_ms: f64,
    handed_over: bool,
    /// The journal holds our commit: a rollback is a give-back.
    committed: bool,
    /// A give-back the journal could not record (the guest was then kept
    /// paused): in doubt, whatever else happened.
    unrecorded: Option<String>,
    control_bytes: u64,
    wire_bytes: u64,
    /// The transport of the connection, once there is one.
    transport: Option<String>,
    verified: bool,
    /// The migration's link now (a recovery replaces it).
    link: Option<Connection>,
    /// Post-copy recoveries made.
    recoveries: u16,
    /// Bytes on the wire of the links that broke.
    earlier_wire: u64,
    /// What QUIC may hold of QEMU's stream unacknowledged.
    window: window::SendWindow,
}

impl Run {
    fn phase(&self, st: &mut State, what: &str) {
        let ms = convoy_protocol::units::millis(clock::since(self.started));
        st.phases.push((what.to_owned(), ms));
    }

    fn notary(&self) -> Notary {
        let creds = self.host.creds();
        Notary::new(
            Arc::new(creds.identity.clone()),
            Arc::new(creds.trust.clone()),
            clock::now(),
            crate::trust::authz::now_unix(),
        )
    }

    /// Runs the migration over `conn`, or reports why there is none.
    pub async fn drive(self, conn: Result<Connection, TransportError>) -> Finished {
        let mut st = State {
            phases: Vec::new(),
            receipts: Vec::new(),
            channels: Vec::new(),
            sent: Vec::new(),
            qemu_status: "not started".into(),
            qemu_info: Value::Null,
            throttle: 0,
            dirty_rate: 0,
            stop_at_unix_us: None,
            limit_ms: 0,
            pass: 0,
            ramped_ms: 0,
            credits: crate::engine::qemu::pacing::Credits::new(),
            pause_marks: [None; 3],
            pause: Default::default(),
            downtime_ms: 0.0,
            handed_over: false,
            committed: false,
            unrecorded: None,
            control_bytes: 0,
            wire_bytes: 0,
            transport: None,
            verified: false,
            link: None,
            recoveries: 0,
            earlier_wire: 0,
            window: window::SendWindow::new(u64::from(self.host.config.tuning.connection_window)),
        };
        let outcome = match conn {
            Ok(conn) => {
                st.transport = Some(conn.kind().to_string());
                st.link = Some(conn.clone());
                let o = self.run(&conn, &mut st).await;
                if let Some(link) = st.link.take() {
                    link.close(crate::transport::close::DONE.into(), b"done");
                    st.wire_bytes = st.earlier_wire + link.stats().wire_bytes();
                }
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
        let reader = crate::engine::spawn(read_control(recv, ctl_tx, Some(st.credits.clone())));
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

    fn in_doubt(&self, st: &mut State, why: String) -> Outcome {
        self.phase(st, "no start confirmed: the guest stays paused here");
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        Outcome::InDoubt(why)
    }

    /// Records `step` of this migration in the journal (see
    /// [`Host::journal_source`]).
    async fn journal(
        &self,
        step: convoy_protocol::journal::JournalStep,
    ) -> Result<convoy_protocol::journal::JournalRecord, crate::host::journal::JournalError> {
        self.host.journal_source(self.migration, step).await
    }

    /// Undoes everything before the handover: QEMU's migration cancelled,
    /// mirrors dropped, the guest running here. Returns true when there is
    /// nothing to resume: the source QEMU is gone. After a commit, the
    /// give-back is journalled first; if it cannot be, the guest stays
    /// paused (in doubt).
    async fn roll_back(&self, st: &mut State) -> bool {
        if st.committed {
            // With a registry, the guest is this agent's again only once
            // the registry still names this agent (and is fenced against a
            // commit on its way). A rollback here may follow a lost echo
            // of the switch, not only the destination's give-back: a
            // record its commit wrote is taken back only on its signed
            // word (`recover`).
            let reclaimed =
                crate::host::fleet::reclaim(&self.host, &self.req.vm, self.migration, None).await;
            if let Err(e) = reclaimed {
                self.host.set_state(&self.req.vm, VmState::InDoubt);
                self.phase(st, &format!("given back, but {e}: kept paused"));
                st.unrecorded = Some(format!("given back, but not resumed here: {e}"));
                return false;
            }
            let back = self
                .journal(convoy_protocol::journal::JournalStep::Abort)
                .await;
            if let Err(e) = back {
                self.host.set_state(&self.req.vm, VmState::InDoubt);
                self.phase(
                    st,
                    "given back, but that could not be recorded: kept paused",
                );
                st.unrecorded = Some(format!("the journal could not record the give-back ({e})"));
                return false;
            }
        }
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
        let end = clock::now() + Duration::from_secs(10);
        while clock::now() < end {
            match self.vm.execute("query-migrate", None).await {
                Ok(q)
                    if matches!(
                        q["status"].as_str(),
                        Some("active" | "cancelling" | "setup" | "device" | "pre-switchover")
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(q) => {
                    if let Some(s) = q["status"].as_str() {
                        s.clone_into(&mut st.qemu_status);
                    }
                    break;
                }
                Err(_) => break,
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
}

impl Fail {
    fn source_exited() -> Fail {
        Fail::local("the source QEMU exited")
    }
}
