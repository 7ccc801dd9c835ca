//! What the destination does for each action of its state machine: one
//! method per [`DestinationAction`].

use crate::engine::clock;
use crate::host::pause::EnginePoint;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::transport::SendStream;
use convoy_protocol::ctl::VmState;
use convoy_protocol::destination::{Destination, DestinationAction, StartTimes};
use convoy_protocol::journal::{JournalRecord, JournalRole, JournalStep};
use convoy_protocol::message::{Manifest, Message, Reason};
use convoy_protocol::names::{MigrationId, VmName};
use convoy_protocol::page::PageBitmap;
use convoy_protocol::ticket::SignedTicket;
use convoy_protocol::vm::VmAttributes;
use tokio::sync::mpsc;

use crate::backend::sim::SimVm;
use crate::backend::Staging;
use crate::engine::admission;
use crate::host::journal::JournalChange;
use crate::host::ReserveError;
use crate::transport::write_message;

use super::{Incoming, Reuse};

impl Incoming {
    pub(super) async fn act(
        &mut self,
        sm: &mut Destination,
        send: &mut SendStream,
        a: DestinationAction,
    ) {
        match a {
            DestinationAction::Send(m) => {
                let ready = matches!(m, Message::Ready(_));
                if ready {
                    crate::host::pause::at(&self.host, EnginePoint::DestinationReady).await;
                }
                match write_message(send, &m).await {
                    Ok(_) if ready => sm.note_ready_written(clock::now()),
                    Ok(_) => {}
                    Err(e) => self.link_lost(sm, clock::now(), &e.to_string()),
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
                self.prepare_staging(sm, vm, manifest, migration, ticket, attributes)
                    .await
            }
            DestinationAction::StartVm { device_state } => self.start_vm(sm, device_state).await,
            DestinationAction::StartPostcopy { device_state, owed } => {
                self.start_postcopy(sm, device_state, owed).await
            }
            DestinationAction::TrustVm => self.trust_vm(sm).await,
            DestinationAction::DiscardStaging => self.discard_staging(),
        }
    }

    /// Admission, then capacity and the staging image: accepted, or
    /// refused with what is missing.
    async fn prepare_staging(
        &mut self,
        sm: &mut Destination,
        vm: VmName,
        manifest: Manifest,
        migration: MigrationId,
        ticket: SignedTicket,
        attributes: VmAttributes,
    ) {
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
        // The migrations in progress together (arriving, and sim VMs
        // leaving) stay under the bookkeeping limit (the state machine
        // held this one to it alone).
        let leaves = manifest.leaf_count().unwrap_or(u64::MAX);
        match self.host.bookkeeping.take_leaves(leaves) {
            Ok(grant) => self.bookkeeping = Some(grant),
            Err(refused) => {
                let why = refused.to_string();
                self.host
                    .audit_refusal(self.peer.id.to_string(), why.clone());
                sm.handle_staging_failed(Reason::Unacceptable(why));
                return;
            }
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
                    self.geometry = Some(manifest.leaf_geometry().unwrap_or(manifest.memory));
                    self.streams = manifest.data_streams;
                    self.postcopy = manifest.postcopy;
                    self.start_paused = manifest.start_paused;
                    self.migration = sm.migration();
                    // An offered image held here, for this VM and
                    // geometry: its pages need not be sent.
                    self.reuse = manifest.reuse.clone().and_then(|offer| {
                        let name = self.name.as_ref()?;
                        let image =
                            self.host
                                .retained()
                                .find(name, offer.image, manifest.memory)?;
                        Some(Reuse {
                            image,
                            key: Arc::new(offer.key),
                        })
                    });
                    let held = self.reuse.is_some();
                    // The staging is on disk before the source hears of
                    // it: every migration the source can commit has a
                    // record here to fence.
                    if let Err(e) = self.record_staged(sm).await {
                        self.staging = None;
                        staging.discard();
                        if let Some(n) = self.name.take() {
                            self.host.remove(&n);
                        }
                        sm.handle_staging_failed(Reason::Unacceptable(e));
                        return;
                    }
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
                    sm.handle_staging_ready_holding(clock::now(), held, bases);
                    self.accept_streams();
                    self.accept_lanes(manifest.plan.lanes());
                    // A pre-copy round whose link breaks resumes on a new
                    // connection: one may come from now on.
                    self.accept_resumes();
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

    /// Verified: the VM starts here (pre-copy, or hybrid before a switch).
    async fn start_vm(&mut self, sm: &mut Destination, device_state: Vec<u8>) {
        let (Some(staging), Some(name)) = (self.staging.take(), self.name.clone()) else {
            sm.handle_start_failed("no staging image");
            return;
        };
        for t in self.tasks.drain(..) {
            t.abort();
        }
        // Ours once recorded; unrecorded, it never runs here.
        // Measured work, not deadlines: the real clock (`engine::clock`).
        let recording = std::time::Instant::now();
        if let Err(e) = self.record_handover(sm).await {
            self.staging = Some(staging);
            sm.handle_start_failed(&e);
            return;
        }
        let starting = std::time::Instant::now();
        match staging.clone().start(&device_state, self.start_paused) {
            Ok((vm, resumed_from)) => {
                // The guest runs from here: what follows is not downtime
                // (`confirm_started`). Registering it is a durable write
                // of the VM registry (a new VM), about 0.4 ms measured.
                let running = std::time::Instant::now();
                let times = StartTimes {
                    record: starting.saturating_duration_since(recording),
                    start: running.saturating_duration_since(starting),
                    synced: Duration::ZERO,
                };
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
                self.confirm_started(sm, staging.clone(), running, times)
                    .await;
            }
            Err(e) => {
                self.staging = Some(staging);
                sm.handle_start_failed(&e.to_string());
            }
        }
    }

    /// The switch: the VM runs here on demand paging, its owed pages
    /// asked for on the fault stream.
    async fn start_postcopy(
        &mut self,
        sm: &mut Destination,
        device_state: Vec<u8>,
        owed: PageBitmap,
    ) {
        let (Some(staging), Some(name)) = (self.staging.clone(), self.name.clone()) else {
            sm.handle_start_failed("no staging image");
            return;
        };
        // The VM runs here from the switch: recorded first, or not at all.
        if let Err(e) = self.record_handover(sm).await {
            sm.handle_start_failed(&e);
            return;
        }
        // Faults have their own queue, which the engine serves before
        // other events (`super::next_faults`).
        let (faults_tx, faults_rx) = mpsc::unbounded_channel();
        self.faults = Some(faults_rx);
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
                sm.handle_postcopy_started(clock::now());
            }
            Err(e) => {
                staging.end_postcopy();
                sm.handle_start_failed(&e.to_string());
            }
        }
    }

    /// Every page is in and the root verified: the VM is ours.
    async fn trust_vm(&mut self, sm: &mut Destination) {
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
            Some(s) => {
                let now = std::time::Instant::now(); // measured work, not a deadline
                self.confirm_started(sm, s, now, StartTimes::default())
                    .await;
            }
            None => match self.record_started().await {
                Ok(()) => sm.handle_started(clock::now()),
                Err(e) => sm.handle_start_unconfirmed(&e),
            },
        }
    }

    /// Records in the journal that a copy is staged here, before `Accept`
    /// leaves (or says why it could not be).
    async fn record_staged(&mut self, sm: &Destination) -> Result<(), String> {
        let Some(p) = sm.proposal() else {
            return Err("the staging could not be recorded: no proposal".into());
        };
        // With a registry, only the VM's registered owner may hand it here.
        let declared = p
            .capabilities
            .has(convoy_protocol::message::Capabilities::REGISTRY);
        self.registry = crate::host::fleet::stage(&self.host, &p.vm, &self.peer.id, declared)
            .await
            .map_err(|e| format!("registry: {e}"))?;
        let incarnation = self.host.vms().get(&p.vm).map(|e| e.incarnation);
        let record = JournalRecord::staged(
            p.migration,
            convoy_protocol::receipt::ticket_digest(&p.ticket),
            self.peer.id.clone(),
            p.vm.clone(),
            incarnation,
            crate::trust::authz::now_unix(),
        );
        self.host
            .journal(JournalChange::Begin(record))
            .await
            .map_err(|e| format!("the staging could not be recorded: {e}"))?;
        self.journalled = true;
        Ok(())
    }

    /// Records in the journal that the VM is handed over to us, before it
    /// runs here (or says why it could not be). Refused once the staging
    /// was fenced (an answer to the source's inquiry promised it would
    /// never run here).
    async fn record_handover(&mut self, _sm: &Destination) -> Result<(), String> {
        let Some(migration) = self.migration.filter(|_| self.journalled) else {
            return Err("the handover could not be recorded: no staging record".into());
        };
        self.host
            .journal(JournalChange::Advance {
                migration,
                role: JournalRole::Destination,
                step: JournalStep::Commit,
            })
            .await
            .map_err(|e| format!("the handover could not be recorded: {e}"))?;
        // With a registry, its transaction is the commit point.
        crate::host::fleet::commit(&self.host, self.registry.as_ref(), migration).await?;
        self.phase("handover recorded".into());
        Ok(())
    }

    /// Records in the journal that the VM runs here, before `Started`
    /// tells the source to wipe its copy.
    async fn record_started(&mut self) -> Result<(), String> {
        let Some(migration) = self.migration else {
            return Err("no migration".into());
        };
        let change = JournalChange::Advance {
            migration,
            role: JournalRole::Destination,
            step: JournalStep::Start,
        };
        match self.host.journal(change).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("the start could not be recorded: {e}")),
        }
    }

    /// The VM runs here: its disks, if any, go to stable storage, and the
    /// start is recorded, before we say Started (the source discards its
    /// copy then); the guest runs meanwhile, so that time is not downtime.
    /// A sync or a record that fails leaves the migration in doubt.
    /// `running`: when the guest began to run here; `times`: what its
    /// record and start took (for the pause's parts).
    async fn confirm_started(
        &mut self,
        sm: &mut Destination,
        staging: Arc<SimVm>,
        running: std::time::Instant,
        times: StartTimes,
    ) {
        self.move_vcpu(&staging).await;
        if staging.has_disks() {
            match tokio::task::spawn_blocking(move || staging.sync_disks()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return sm.handle_start_unconfirmed(&e.to_string()),
                Err(e) => return sm.handle_start_unconfirmed(&e.to_string()),
            }
        }
        if let Err(e) = self.record_started().await {
            return sm.handle_start_unconfirmed(&e);
        }
        let synced = running.elapsed();
        sm.handle_started_after(clock::now(), StartTimes { synced, ..times });
    }

    /// The VM runs here with every page in: its vCPU moves to where this
    /// agent runs sim vCPUs (a helper process that outlives the agent),
    /// and the registry records it there, before `Started` lets the source
    /// discard its copy. A move that fails leaves the vCPU on the agent's
    /// thread: the VM runs, and is lost if the agent ends.
    async fn move_vcpu(&mut self, staging: &Arc<SimVm>) {
        let (vm, host) = (staging.clone(), self.host.config.sim_vcpu.clone());
        match tokio::task::spawn_blocking(move || vm.move_vcpu(&host)).await {
            Ok(Ok(())) => {
                if let Some(n) = &self.name {
                    // Written again, now with its helper.
                    let _ = self.host.vms().get_mut(n);
                }
            }
            Ok(Err(e)) => tracing::warn!("the VM stays on the agent's thread: {e}"),
            Err(e) => tracing::warn!("the VM stays on the agent's thread: {e}"),
        }
    }

    /// Staging goes, wiped, and the reservation with it.
    fn discard_staging(&mut self) {
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

/// How often an incoming VM's disks are flushed while they arrive.
const DISK_FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Flushes an incoming VM's disks every [`DISK_FLUSH_EVERY`] until the
/// task is aborted (when the VM starts, or staging is discarded): without
/// it, the sync before Started writes every block that arrived (2.8 s for
/// a 4 GiB disk a quarter full, measured).
fn flush_disks_while_arriving(staging: Arc<SimVm>) -> tokio::task::JoinHandle<()> {
    crate::engine::spawn(async move {
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
