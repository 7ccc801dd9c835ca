//! The driver of one outgoing page migration: a short loop around
//! [`Source`] — carry out its actions, report its events, wait for the next
//! input — with one method per [`SourceAction`].

mod link;

use crate::engine::clock;
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::ctl::{MigrationReport, Outcome, VmState};
use convoy_protocol::journal::JournalStep;

use crate::host::pause::EnginePoint;
use crate::transport::{Connection, SendStream};
use convoy_protocol::message::{Capabilities, Manifest, Message};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::page::PageBitmap;
use convoy_protocol::page::PageIndex;
use convoy_protocol::source::{Source, SourceAction, SourceConfig, SourceEvent, SourceSummary};
use tokio::sync::mpsc;

use super::faults::{FaultSlot, Push};
use super::jobs::{EngineEvent, Held, Job, Served, StreamError};
use super::streams::spawn_control_reader;
use super::Run;
use crate::engine::native::pacer::Pacer;
use crate::host::budget::{CacheGrant, Share, Side};
use crate::transport::{write_message, WireError};

/// What one link to the destination carries: the connection, its control
/// stream, the data and fault streams' job queues, and what they report.
struct Wire {
    /// `None` only for a source restarted after the switch, until its
    /// first new link is up.
    conn: Option<Connection>,
    /// Its send window is its share of the agent's budget.
    _share: Option<Share>,
    control: Option<SendStream>,
    ctrl_rx: mpsc::Receiver<Result<Option<Message>, WireError>>,
    events_tx: mpsc::UnboundedSender<EngineEvent>,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    jobs: Vec<std::sync::mpsc::Sender<Job>>,
    /// The link's fault stream, shared with its control reader
    /// ([`super::faults`]).
    faults: Arc<FaultSlot>,
    /// The delta caches' share of the budget, held while the encoders are.
    cache_grant: Option<CacheGrant>,
    /// The round being written: (round, streams done, pages skipped).
    rounds_pending: Option<(u32, u16, u64)>,
    /// Wire bytes of links that broke (recovery), counted once.
    earlier: crate::transport::Carried,
    /// The link's lanes ([`super::lanes`]): its extra connections, each
    /// with its budget share.
    lanes: Vec<(Connection, Share)>,
    /// A link resumed before the switch with lanes to dial: its streams
    /// (delta, post-copy) open with the next pages it sends.
    held_back: Option<(bool, bool)>,
}

impl Wire {
    /// A link's wire: its connection and budget share (if up); no control
    /// stream ([`Wire::listen`]) and no streams open yet.
    fn new(conn: Option<(Connection, Share)>) -> Wire {
        let (events_tx, events) = mpsc::unbounded_channel();
        // Closed: nothing to read before the first link.
        let (_, ctrl_rx) = mpsc::channel(1);
        let (conn, share) = conn.unzip();
        Wire {
            conn,
            _share: share,
            control: None,
            ctrl_rx,
            events_tx,
            events,
            jobs: Vec::new(),
            faults: FaultSlot::new(),
            cache_grant: None,
            rounds_pending: None,
            earlier: crate::transport::Carried::default(),
            lanes: Vec::new(),
            held_back: None,
        }
    }

    /// The link's control stream: `send` for the machine's messages, and
    /// a reader of `recv` with a fault slot of its own (a new link's
    /// faults never go on the old link's stream).
    fn listen(&mut self, send: SendStream, recv: crate::transport::RecvStream) {
        let (ctrl_tx, ctrl_rx) = mpsc::channel(16);
        self.control = Some(send);
        self.ctrl_rx = ctrl_rx;
        self.faults = FaultSlot::new();
        spawn_control_reader(recv, ctrl_tx, self.faults.clone(), self.events_tx.clone());
    }
}

/// The state machine, its link, and the run it drives.
pub(super) struct Driver<'r> {
    run: &'r mut Run,
    sm: Source,
    wire: Wire,
    dest: convoy_protocol::names::SpiffeId,
    plan: MigrationPlan,
    /// One bandwidth cap for every link of the migration.
    pacer: Option<Arc<Pacer>>,
    /// The journal holds our commit: a rollback is a give-back.
    committed: bool,
    /// A decision the journal could not record (the VM was then kept
    /// paused here): the outcome is in doubt whatever the machine says.
    unrecorded: Option<String>,
    /// When it started; its periodic samples (`migrate --plot`).
    began: std::time::Instant,
    tick: tokio::time::Interval,
    last_sample: std::time::Instant,
}

impl<'r> Driver<'r> {
    /// The state machine for `run`'s plan over `conn`, with its control
    /// stream opened (a failure to open it is a lost link).
    pub(super) async fn start(
        run: &'r mut Run,
        conn: Connection,
        dest: convoy_protocol::names::SpiffeId,
    ) -> Driver<'r> {
        let share = run.host.budget.join(&conn, Side::Send);
        let plan = run.plan.clone();
        let mut sm = Source::new(run.config(&plan, &dest));
        if let Some(offer) = &run.retain {
            sm.retain_image(offer.clone());
        }
        let opened = conn.open_bi().await;
        let mut wire = Wire::new(Some((conn, share)));
        sm.start(clock::now());
        match opened {
            Ok((send, recv)) => wire.listen(send, recv),
            Err(e) => sm.handle_link_lost(clock::now(), &e.to_string()),
        }
        Driver::with(run, sm, wire, dest, false)
    }

    /// A driver for `sm`, a source restarted after its post-copy switch
    /// (it asks to dial the destination first; the switch is in the
    /// journal already).
    pub(super) fn restarted(
        run: &'r mut Run,
        sm: Source,
        dest: convoy_protocol::names::SpiffeId,
    ) -> Driver<'r> {
        // No control stream until the first new link.
        Driver::with(run, sm, Wire::new(None), dest, true)
    }

    fn with(
        run: &'r mut Run,
        sm: Source,
        wire: Wire,
        dest: convoy_protocol::names::SpiffeId,
        committed: bool,
    ) -> Driver<'r> {
        let plan = run.plan.clone();
        let mut tick =
            tokio::time::interval(Duration::from_millis(convoy_protocol::ctl::SAMPLE_EVERY_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Driver {
            run,
            sm,
            wire,
            dest,
            pacer: plan.bandwidth.map(|b| Arc::new(Pacer::new(b))),
            plan,
            committed,
            unrecorded: None,
            began: std::time::Instant::now(),
            tick,
            last_sample: std::time::Instant::now(),
        }
    }

    /// Runs the migration to its end and reports it.
    pub(super) async fn run(mut self) -> MigrationReport {
        let summary = loop {
            while let Some(action) = self.sm.poll_action() {
                self.act(action).await;
            }
            // Faults are served as they are read while the machine is in
            // post-copy, and go through it otherwise.
            self.wire.faults.arm(self.sm.serving_faults());
            if let Some(s) = self.events() {
                break s;
            }
            self.wait().await;
        };
        self.report(summary).await
    }

    async fn act(&mut self, action: SourceAction) {
        match action {
            SourceAction::Send(m) => self.send(m).await,
            SourceAction::StartDirtyLog => self.start_dirty_log().await,
            SourceAction::SendPages {
                round,
                pages,
                skip_zero,
            } => self.send_pages(round, pages, skip_zero).await,
            SourceAction::Throttle { percent } => {
                self.run
                    .phase(&format!("auto-converge: guest throttled {percent}%"));
                self.run.vm.set_throttle(percent);
            }
            SourceAction::CollectDirtyLog => {
                let d = self.run.vm.collect_dirty_log();
                self.sm.handle_dirty_log(clock::now(), d);
            }
            SourceAction::PauseVm => {
                self.pause_vm();
                crate::host::pause::at(&self.run.host, EnginePoint::SourceStopCopy).await;
            }
            SourceAction::CommitSwitch => {
                if self.commit("paused and handed over for post-copy").await {
                    self.sm.handle_switch_committed(clock::now());
                }
            }
            SourceAction::ServePages { round, pages } => self.serve_pages(round, pages).await,
            SourceAction::StopFaults => {
                let served = self.wire.faults.stop().await;
                self.sm.handle_faults_stopped(clock::now(), served);
            }
            SourceAction::Reconnect => self.reconnect().await,
            SourceAction::CommitHandover => {
                if self.commit("handed over").await {
                    self.sm.handle_handover_committed(clock::now());
                }
            }
            SourceAction::RollBack => self.roll_back().await,
            SourceAction::DiscardVm => self.discard_vm().await,
        }
    }

    async fn send(&mut self, m: Box<Message>) {
        let Some(c) = self.wire.control.as_mut() else {
            return self.sm.handle_link_lost(clock::now(), "no control stream");
        };
        match write_message(c, &m).await {
            Ok(n) => self.run.control_bytes += n as u64,
            Err(e) => self.sm.handle_link_lost(clock::now(), &e.to_string()),
        }
    }

    async fn send_pages(&mut self, round: u32, pages: PageBitmap, skip_zero: bool) {
        let point = if self.sm.is_switched() {
            EnginePoint::SourcePostcopyPush
        } else if round == 2 {
            EnginePoint::SourceRound2
        } else {
            EnginePoint::SourceStopCopy
        };
        if point != EnginePoint::SourceStopCopy {
            crate::host::pause::at(&self.run.host, point).await;
        }
        if !self.open_held_back().await {
            return;
        }
        let pages = Arc::new(pages);
        self.wire.rounds_pending = Some((round, 0, 0));
        // The first round to a host that holds the image: unchanged pages
        // go as retained.
        let reusing = round == 1
            && skip_zero
            && self
                .sm
                .accepted_capabilities()
                .is_some_and(|c| c.has(Capabilities::REUSE));
        let mut held = Held {
            pages: self
                .run
                .back
                .as_ref()
                .filter(|_| reusing)
                .map(|b| b.leaves.clone()),
            bases: Vec::new(),
            whole: Vec::new(),
        };
        // Disks the destination started from their base: blocks still
        // equal to the base's go as retained.
        if round == 1 && skip_zero && self.sm.accepted_bases().contains(&true) {
            (held.bases, held.whole) = self.run.held_bases(self.sm.accepted_bases()).await;
        }
        let held = (!held.is_empty()).then(|| Arc::new(held));
        // The push after a switch leaves out what the faults carry, and
        // the faults bring after theirs only what the push has not taken.
        let push = self.sm.is_switched().then(|| Push {
            pages: pages.clone(),
            served: Arc::new(Served::new(pages.len())),
        });
        let served = push.as_ref().map(|p| p.served.clone());
        self.wire.faults.set_push(push);
        for j in &self.wire.jobs {
            let _ = j.send(Job {
                round,
                pages: pages.clone(),
                skip_zero,
                delta: !self.sm.is_switched(),
                background: self.sm.is_switched(),
                held: held.clone(),
                served: served.clone(),
            });
        }
        if self.wire.jobs.is_empty() {
            self.sm.handle_link_lost(clock::now(), "no data streams");
        }
    }

    fn pause_vm(&mut self) {
        let run = &mut *self.run;
        run.phase("paused for the final copy");
        run.host.set_state(&run.req.vm, VmState::Paused);
        let since = clock::now();
        let paused = run.vm.pause();
        let dirty = run.vm.collect_dirty_log();
        run.counter_at_pause = Some(run.vm.counter());
        match paused.and_then(|()| run.vm.device_state()) {
            Ok(state) => {
                if let Err(e) = self.sm.handle_paused(clock::now(), since, dirty, state) {
                    tracing::warn!("pause rejected: {e}");
                }
            }
            Err(e) => {
                tracing::error!("cannot pause: {e}");
                self.sm.cancel(clock::now());
            }
        }
    }

    async fn serve_pages(&mut self, round: u32, pages: Vec<PageIndex>) {
        if !self.open_held_back().await {
            return;
        }
        // On a task of its own: the stream may be waiting for credit (a
        // link without a fault stream reports it gone there).
        self.wire
            .faults
            .spawn_serve(round, pages, self.wire.events_tx.clone());
    }

    /// Records the handover (or the switch) in the journal before it is
    /// made: from there the VM never resumes here by itself. When it
    /// cannot be recorded, the state machine is told so (it rolls back)
    /// and `false` is returned.
    async fn commit(&mut self, what: &str) -> bool {
        match self.run.journal(JournalStep::Commit).await {
            Ok(_) => {
                self.committed = true;
                self.run.phase(what);
                self.run.host.set_state(&self.run.req.vm, VmState::InDoubt);
                true
            }
            Err(e) => {
                self.run
                    .phase(&format!("the handover could not be recorded: {e}"));
                self.sm.handle_commit_failed(clock::now(), &e.to_string());
                false
            }
        }
    }

    async fn roll_back(&mut self) {
        // The VM was handed over and the destination gave it back: that
        // is recorded before it resumes here (else it stays paused).
        if self.committed {
            // With a registry, the VM is this agent's again only once the
            // registry says so (and is fenced against the commit).
            let (host, vm, migration) = (&self.run.host, &self.run.req.vm, self.run.migration);
            let back = Some(&self.dest);
            if let Err(e) = crate::host::fleet::reclaim(host, vm, migration, back).await {
                self.run.phase(&format!("given back, but {e}: kept paused"));
                self.unrecorded = Some(format!("given back, but not resumed here: {e}"));
                return;
            }
            if let Err(e) = self.run.journal(JournalStep::Abort).await {
                self.run.phase(&format!(
                    "given back, but that could not be recorded ({e}): kept paused"
                ));
                self.unrecorded = Some(format!("the journal could not record the outcome ({e})"));
                return;
            }
        }
        let run = &mut *self.run;
        // Nothing is retained for a VM that stays.
        run.retain = None;
        run.phase("rolled back: the VM runs here again");
        run.vm.stop_dirty_log();
        run.vm.set_throttle(0);
        if let Err(e) = run.vm.resume() {
            tracing::error!("cannot resume after a failed migration: {e}");
        }
        run.host.set_state(&run.req.vm, VmState::Running);
    }

    async fn discard_vm(&mut self) {
        // Started is on disk before the copy here goes; if it cannot be,
        // the paused copy is kept (in doubt), never wiped unrecorded.
        if let Err(e) = self.run.journal(JournalStep::Start).await {
            self.run.phase(&format!(
                "started at the destination, but that could not be recorded ({e}): copy kept paused"
            ));
            self.unrecorded = Some(format!("the journal could not record the outcome ({e})"));
            return;
        }
        self.run.host.remove(&self.run.req.vm);
        if let Some(offer) = self.run.retain.take() {
            self.run.retain_image(offer).await;
        }
        self.run
            .phase("started at the destination: copy here wiped");
        self.run.vm.destroy();
    }

    /// Passes the state machine's events on; its summary once finished.
    fn events(&mut self) -> Option<Box<SourceSummary>> {
        let mut finished = None;
        while let Some(ev) = self.sm.poll_event() {
            match ev {
                SourceEvent::Progress(p) => {
                    let _ = self.run.progress.try_send(p);
                }
                SourceEvent::Finished(s) => finished = Some(s),
            }
        }
        finished
    }

    /// Waits for the next input: a control message, a stream's report, the
    /// state machine's deadline, or the operator's cancel.
    async fn wait(&mut self) {
        // Here too: the tick (last in the biased select) starves when busy.
        if self.last_sample.elapsed()
            >= Duration::from_millis(convoy_protocol::ctl::SAMPLE_EVERY_MS)
        {
            self.sample();
        }
        let deadline = self.sm.poll_timeout();
        let migration = self.run.migration;
        tokio::select! {
            // The destination's messages first: a Fetch is a vCPU waiting,
            // the batch reports can wait.
            biased;
            m = self.wire.ctrl_rx.recv() => match m {
                Some(Ok(Some(msg))) => {
                    if let Err(e) = self.sm.handle_message(clock::now(), msg) {
                        tracing::warn!(%migration, "destination misbehaved: {e}");
                    }
                }
                Some(Ok(None)) | None => {
                    self.sm.handle_link_lost(clock::now(), "control stream closed");
                }
                Some(Err(e)) => self.sm.handle_link_lost(clock::now(), &e.to_string()),
            },
            ev = self.wire.events.recv() => self.stream_event(ev),
            () = clock::until(deadline) => self.sm.handle_timeout(clock::now()),
            _ = self.tick.tick() => self.sample(),
            () = self.run.cancel.notified() => {
                if self.sm.cancel(clock::now()) {
                    tracing::info!(%migration, "cancelled by the operator");
                } else {
                    tracing::warn!(%migration, "cancel refused: already handed over");
                }
            }
        }
    }

    /// A periodic sample, to the operator's progress (dropped, not
    /// waited for, when they read slowly).
    fn sample(&mut self) {
        self.last_sample = std::time::Instant::now();
        let mut p = self.sm.snapshot();
        p.sample = Some(convoy_protocol::ctl::Sample {
            elapsed_ms: convoy_protocol::units::millis(self.began.elapsed()),
            dirty_pages_per_sec: self.sm.dirty_rate(),
            guest_work: self.run.vm.counter(),
            faults_served: self.sm.faults_served(),
            paused: !self.run.vm.is_running(),
        });
        let _ = self.run.progress.try_send(p);
    }

    /// Tells the machine of the Fetches the control reader served: before
    /// it handles a stream's report (their batches' among them).
    fn count_served_fetches(&mut self) {
        let fetches = self.wire.faults.take_fetches();
        if fetches > 0 {
            self.sm.handle_fetches_served(fetches);
        }
    }

    fn stream_event(&mut self, ev: Option<EngineEvent>) {
        self.count_served_fetches();
        match ev {
            Some(EngineEvent::Sent(b)) => {
                if let Err(e) = self.sm.handle_batch_sent(clock::now(), &b) {
                    tracing::error!("engine bug: {e}");
                    self.sm.cancel(clock::now());
                }
            }
            Some(EngineEvent::RoundDone { round, skipped }) => {
                let streams = self.plan.streams;
                if let Some((r, done, sk)) = self.wire.rounds_pending.as_mut() {
                    if *r == round {
                        *done += 1;
                        *sk += skipped;
                        if *done == streams {
                            let total = *sk;
                            self.wire.rounds_pending = None;
                            self.sm.handle_round_sent(clock::now(), round, total);
                        }
                    }
                }
            }
            Some(EngineEvent::StreamFailed(
                e @ (StreamError::WriterGone | StreamError::Write(_) | StreamError::Lane { .. }),
            )) => self.sm.handle_link_lost(clock::now(), &e.to_string()),
            // Not the link's: a new one would not help.
            Some(EngineEvent::StreamFailed(e)) => {
                self.sm.handle_local_failure(clock::now(), &e.to_string())
            }
            None => self.sm.handle_link_lost(clock::now(), "data streams ended"),
        }
    }

    /// Closes the link and builds the report.
    async fn report(self, summary: Box<SourceSummary>) -> MigrationReport {
        let Driver {
            run,
            sm,
            wire,
            dest,
            unrecorded,
            ..
        } = self;
        let mut summary = summary;
        if let Some(e) = unrecorded {
            // Kept paused here: neither completed nor given back.
            run.host.set_state(&run.req.vm, VmState::InDoubt);
            summary.outcome = Outcome::InDoubt(format!("{e}; the paused copy is kept here"));
        }
        drop(wire.jobs);
        // The encoders are done with their caches: back to the pool.
        drop(wire.cache_grant);
        // Let the last control messages reach the peer, then close.
        if let Some(mut c) = wire.control {
            let _ = c.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.stopped()).await;
        }
        if let Some(c) = &wire.conn {
            c.close(crate::transport::close::DONE.into(), b"done");
        }
        let first_bytes = wire.conn.as_ref().map_or(0, |c| c.stats().wire_bytes());
        let mut lane_bytes = 0;
        for (lane, _) in &wire.lanes {
            lane.close(crate::transport::close::DONE.into(), b"done");
            lane_bytes += lane.stats().wire_bytes();
        }
        let link_bytes = first_bytes + lane_bytes;
        if !wire.lanes.is_empty() {
            run.phase(&format!(
                "lanes carried {lane_bytes} of the last link's {link_bytes} wire bytes"
            ));
        }
        let disks = super::disk_reports(&*run.vm, sm.disk_roots());
        let conns = wire.conn.iter().chain(wire.lanes.iter().map(|(l, _)| l));
        let rtt = summary.convergence.round_trip_us;
        let link = crate::transport::link_report(conns, wire.earlier, rtt);
        if matches!(summary.outcome, Outcome::Aborted(_)) {
            run.host.set_state(&run.req.vm, VmState::Running);
        }
        MigrationReport {
            migration: run.migration.to_string(),
            vm: run.req.vm.clone(),
            source: run.host.id.to_string(),
            destination: dest.to_string(),
            verified: summary.verified,
            converged: summary.converged,
            total_ms: summary.total.as_secs_f64() * 1e3,
            downtime_ms: summary.downtime.map_or(0.0, |d| d.as_secs_f64() * 1e3),
            rounds: summary.rounds,
            memory_bytes: run.vm.geometry().bytes(),
            pages_sent: summary.pages_sent,
            encodings: summary.encodings,
            payload_bytes: summary.payload_bytes + run.control_bytes,
            wire_bytes: wire.earlier.wire_bytes + link_bytes,
            memory_root: summary.memory_root,
            counter_at_pause: run.counter_at_pause,
            receipts: summary.receipts,
            qemu: None,
            convergence: summary.convergence,
            postcopy: summary.postcopy.map(Box::new),
            disks,
            disk_blocks_sent: summary.disk_blocks_sent,
            lanes: u16::try_from(wire.lanes.len()).unwrap_or(u16::MAX),
            link,
            transport: wire.conn.as_ref().map(|c| c.kind().to_string()),
            outcome: summary.outcome,
        }
    }
}

impl Run {
    /// The state machine's configuration for `plan`, to `dest`.
    pub(super) fn config(
        &self,
        plan: &MigrationPlan,
        dest: &convoy_protocol::names::SpiffeId,
    ) -> SourceConfig {
        SourceConfig {
            migration: self.migration,
            vm: self.req.vm.clone(),
            attributes: self.attributes.clone(),
            manifest: Manifest {
                memory: self.vm.geometry(),
                data_streams: plan.streams,
                qemu: None,
                postcopy: false,
                start_paused: plan.start_paused,
                plan: plan.clone(),
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
                    clock::now(),
                    crate::trust::authz::now_unix(),
                )
            },
            // REUSE is dropped by the state machine without an offer.
            capabilities: Capabilities(
                if plan.compression_level > 0 {
                    Capabilities::OURS.0
                } else {
                    Capabilities::DELTA.0 | Capabilities::REUSE.0 | Capabilities::PROBE.0
                } | crate::host::fleet::declared(&self.host).0,
            ),
            accept_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(120),
            started_timeout: Duration::from_secs(30),
            recovery: self.host.config.recovery_window,
            durable_records: self.host.journal.pause_records(),
        }
    }
}
