//! The host's state: one `Host` per agent, shared by the server, the
//! operator API and every migration engine — the VM registry and its
//! capacity (kept on disk by [`vmdb`], found again at start by
//! `reattach`), the credentials and policy in force, the audit log, the
//! replay cache, the migration budget ([`budget`]), the images retained
//! for memory reuse ([`retain`]) and the migration journal ([`journal`]).

pub mod bookkeeping;
pub mod budget;
pub(crate) mod fleet;
pub(crate) mod indoubt;
pub mod journal;
pub mod limits;
pub mod pause;
pub(crate) mod reattach;
pub mod retain;
pub mod vmdb;

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use convoy_protocol::ctl::{MigrationReport, VmInfo, VmState};
use convoy_protocol::names::{SpiffeId, VmName};
use quinn::Endpoint;

use crate::backend::VmBackend;
use crate::config::AgentConfig;
use crate::trust::identity::{Identity, TrustBundle};

/// The credentials in force (replaced as a whole on reload).
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    pub identity: Identity,
    pub trust: TrustBundle,
}

/// The VM behind a registry entry, by backend.
#[derive(Debug, Clone)]
pub(crate) enum VmHandle {
    /// A simulated VM, migrated by the page engine.
    Sim(Arc<dyn VmBackend>),
    /// A QEMU VM, migrated as QEMU's own stream.
    Qemu(Arc<crate::backend::qemu::vm::QemuVm>),
    /// A VM the registry holds that the agent cannot drive.
    Lost(Arc<LostVm>),
}

impl VmHandle {
    /// Stops the VM for good: a sim VM's memory is wiped, a QEMU is quit,
    /// what is left of a lost VM removed.
    pub(crate) async fn destroy(self) {
        match self {
            VmHandle::Sim(vm) => vm.destroy(),
            VmHandle::Qemu(q) => q.stop().await,
            VmHandle::Lost(l) => l.clean_up().await,
        }
    }
}

/// A VM the agent's registry holds but that the agent cannot drive,
/// listed as [`VmState::Lost`] until an operator deletes it (which
/// removes what is left of it): a sim VM whose memory and workload lived
/// in an agent process that ended, or a QEMU found again at start that
/// could not be verified (see `reattach`).
#[derive(Debug)]
pub(crate) struct LostVm {
    /// `sim` or `qemu`.
    pub backend: String,
    /// Why, for the operator (logged and audited at start).
    pub reason: String,
    /// A QEMU's record: tried again at the next start; killed, if it still
    /// runs as recorded, when the VM is deleted.
    pub qemu: Option<crate::backend::qemu::vm::QemuVmRecord>,
    /// A sim VM's disk directory, removed when the VM is deleted.
    pub disk_dir: Option<PathBuf>,
    /// Known to run nowhere: a sim VM whose vCPU and memory lived in the
    /// agent process that ended (not one whose helper differs: that one
    /// may still run). A destination may fence such a VM's handoff.
    pub memory_gone: bool,
}

/// One VM known to this agent.
#[derive(Debug)]
pub(crate) struct VmEntry {
    /// The VM; `None` while its place is reserved (an incoming migration,
    /// a VM being created).
    pub handle: Option<VmHandle>,
    pub state: VmState,
    pub bytes: u64,
    pub arrived_from: Option<String>,
    pub counter_at_start: Option<u64>,
    pub attributes: convoy_protocol::vm::VmAttributes,
    /// Distinct for every VM this agent registers: a VM deleted and
    /// re-created under the same name is another incarnation, so a
    /// decision taken on one never applies to the other.
    pub incarnation: u64,
    /// Cancels the outgoing migration in progress.
    pub cancel: Option<Arc<tokio::sync::Notify>>,
    /// Arrived from a host that retained its image: the key to offer it
    /// with when the VM goes back there (memory only).
    pub reuse: Option<crate::host::retain::ArrivalKey>,
}

impl VmEntry {
    pub(crate) fn info(&self, name: &VmName) -> VmInfo {
        VmInfo {
            name: name.clone(),
            backend: match &self.handle {
                Some(VmHandle::Qemu(_)) => "qemu",
                Some(VmHandle::Sim(v)) => v.kind(),
                Some(VmHandle::Lost(l)) => &l.backend,
                None => "sim",
            }
            .into(),
            memory_bytes: self.bytes,
            state: self.state,
            counter: self.sim().map_or(0, |v| v.counter()),
            counter_at_start: self.counter_at_start,
            arrived_from: self.arrived_from.clone(),
            dirty_pages_per_sec: self.sim().map_or(0, |v| v.dirty_rate()),
            attributes: self.attributes.clone(),
            subject: self.subject(),
            service: self.sim().and_then(|v| v.service()),
        }
    }

    /// What a ticket to move this VM binds: `None` while its place is
    /// reserved, or when a QEMU disk's size cannot be read.
    pub(crate) fn subject(&self) -> Option<convoy_protocol::vm::VmSubject> {
        use convoy_protocol::vm::{DiskSubject, VmSubject};
        let (memory_bytes, disks) = match self.handle.as_ref()? {
            VmHandle::Sim(v) => (
                v.geometry().bytes(),
                v.disks()
                    .iter()
                    .map(|d| DiskSubject {
                        name: d.name.to_string(),
                        bytes: d.bytes,
                    })
                    .collect(),
            ),
            VmHandle::Qemu(q) => {
                let mut disks = Vec::new();
                for (name, path) in q.definition.disks.iter().zip(&q.spec.disks) {
                    disks.push(DiskSubject {
                        name: name.clone(),
                        bytes: std::fs::metadata(path).ok()?.len(),
                    });
                }
                (q.definition.memory_mib.saturating_mul(1 << 20), disks)
            }
            VmHandle::Lost(_) => return None,
        };
        Some(VmSubject {
            memory_bytes,
            disks,
            attributes: self.attributes.digest(),
        })
    }

    /// The sim VM, if this is one.
    pub(crate) fn sim(&self) -> Option<&Arc<dyn VmBackend>> {
        match &self.handle {
            Some(VmHandle::Sim(v)) => Some(v),
            _ => None,
        }
    }
}

/// A handle on an agent's VM registry that does not keep the agent alive:
/// what a ticket for one of its VMs must bind (for the in-process lab,
/// which signs tickets without asking over the network).
#[derive(Debug, Clone)]
pub struct VmSubjects(pub(crate) std::sync::Weak<Host>);

impl VmSubjects {
    /// The subject of `vm`, if the agent runs and holds it.
    pub fn subject(&self, vm: &VmName) -> Option<convoy_protocol::vm::VmSubject> {
        self.0.upgrade()?.vms().get(vm)?.subject()
    }
}

/// Shared agent state.
#[derive(Debug)]
pub(crate) struct Host {
    pub config: AgentConfig,
    pub id: SpiffeId,
    /// The QUIC endpoint (UDP): serves, and dials.
    pub endpoint: Endpoint,
    /// Dials peers over QUIC, TCP or both raced, per
    /// [`AgentConfig::transport`].
    pub dialer: crate::transport::Dialer,
    /// The TLS configuration of the TCP listener (swapped when the
    /// credentials are reloaded).
    pub(crate) tcp_tls: std::sync::RwLock<Arc<rustls::ServerConfig>>,
    /// Set when the agent stops: its TCP sessions close.
    pub(crate) tcp_shutdown: tokio::sync::watch::Sender<bool>,
    /// The VM registry; reach it through [`Host::vms`], which writes every
    /// change to `vmdb`.
    pub vms: Mutex<HashMap<VmName, VmEntry>>,
    /// The VM registry on disk.
    pub(crate) vmdb: Option<vmdb::VmDb>,
    pub recent: Mutex<VecDeque<MigrationReport>>,
    pub active: AtomicU32,
    pub replay: crate::trust::authz::ReplayCache,
    pub audit: Option<crate::trust::audit::AuditLog>,
    /// Images retained for VMs that left (memory only).
    pub retained: Arc<Mutex<crate::host::retain::RetainedStore>>,
    /// The base images of sim disks, when there is a directory for them.
    pub bases: Option<Arc<crate::backend::base::BaseImages>>,
    /// The memory budget the migrations share.
    pub budget: Arc<crate::host::budget::MigrationBudget>,
    /// Post-copy migrations that may be resumed on a new connection (their
    /// link broke, or may have): where a new connection's Resume goes.
    pub recoveries: Mutex<HashMap<convoy_protocol::names::MigrationId, Recovery>>,
    /// Page migrations arriving here whose plans spread their streams
    /// over several connections: where a new connection's `Lane` goes.
    pub(crate) lanes: Mutex<HashMap<convoy_protocol::names::MigrationId, LaneWaiter>>,
    pub(crate) creds: std::sync::RwLock<Arc<Creds>>,
    pub(crate) policy: std::sync::RwLock<Option<Arc<crate::trust::policy::PolicySet>>>,
    pub(crate) refusals: Mutex<RefusalWindow>,
    /// Handshakes and connections held open by peers ([`limits`]).
    pub(crate) connections: limits::Connections,
    /// The bookkeeping the incoming migrations hold together.
    pub(crate) bookkeeping: bookkeeping::Bookkeeping,
    /// The next [`VmEntry::incarnation`].
    pub(crate) incarnations: std::sync::atomic::AtomicU64,
    /// What this agent decided about the migrations in progress, on disk
    /// ([`journal`]); written through [`Host::journal`].
    pub journal: Arc<journal::Journal>,
    /// One resolution of a migration in doubt at a time ([`indoubt`]):
    /// the operator's `recover`, the retries after a lost link and the
    /// answers to the other side never decide the same migration twice at
    /// once.
    pub(crate) resolving: tokio::sync::Mutex<()>,
    /// The tasks asking about migrations in doubt ([`indoubt::watch`]),
    /// ended when the agent stops.
    pub(crate) watchers: Mutex<tokio::task::JoinSet<()>>,
    /// This agent's snapshot keys and records.
    pub(crate) snapshots: Snapshots,
    /// Its Prometheus metrics, if served.
    pub(crate) metrics: Option<crate::metrics::Metrics>,
    /// The fleet registry, once reached (only with `config.registry`).
    pub(crate) registry: std::sync::OnceLock<Arc<crate::registry::Registry>>,
}

/// What an agent keeps for snapshots in object storage
/// ([`crate::snapshot`]), in its state directory.
#[derive(Debug)]
pub(crate) struct Snapshots {
    /// Its sealing key (`sealing.key`).
    pub sealing: Arc<crate::snapshot::SealingKeys>,
    /// The newest generation of each lineage it pushed or restored
    /// (`snapshots.redb`).
    pub seen: Arc<crate::snapshot::seen::SeenLineages>,
    /// Where pulls keep their chunks until done (`pulls/`,
    /// [`crate::snapshot::partial`]).
    pub pulls: std::path::PathBuf,
}

/// A page migration arriving here that takes lanes (extra connections of
/// its plan): where they go.
#[derive(Debug)]
pub(crate) struct LaneWaiter {
    /// The agent it came from: the only one whose lanes reach it.
    pub source: SpiffeId,
    /// Bounded by the plan's lanes: a source cannot queue more.
    pub tx: tokio::sync::mpsc::Sender<LaneJoin>,
}

/// A connection whose first message asks to be a lane of a migration,
/// handed to that migration.
#[derive(Debug)]
pub(crate) struct LaneJoin {
    pub conn: crate::transport::Connection,
    pub peer: crate::transport::Peer,
    pub send: crate::transport::SendStream,
    pub lane: convoy_protocol::message::Lane,
}

/// A post-copy migration that may be resumed on a new connection.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// The agent it came from: the only one whose Resume reaches it.
    pub source: SpiffeId,
    /// Where its Resume goes.
    pub tx: tokio::sync::mpsc::UnboundedSender<Reconnection>,
}

/// A new connection whose first message asks to resume a post-copy
/// migration, handed to the migration that waits for it.
pub(crate) struct Reconnection {
    pub conn: crate::transport::Connection,
    pub peer: crate::transport::Peer,
    pub send: crate::transport::SendStream,
    pub recv: crate::transport::RecvStream,
    pub resume: convoy_protocol::message::Resume,
}

/// Refusals an unauthenticated or hostile peer can cause that are recorded
/// per 10 s window; past it, one later record counts those left out.
pub const REFUSALS_PER_WINDOW: u32 = 20;

/// The rate limiter of refusal records. Time is passed in, so its rules
/// are tested without a clock.
#[derive(Debug)]
pub(crate) struct RefusalWindow {
    start: std::time::Instant,
    count: u32,
    suppressed: u64,
}

/// How long one window of refusal records lasts.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

impl RefusalWindow {
    /// A window that starts at `now`.
    pub(crate) fn new(now: std::time::Instant) -> Self {
        RefusalWindow {
            start: now,
            count: 0,
            suppressed: 0,
        }
    }

    /// One more refusal at `now`: `None` when it is left out, or
    /// `Some(n)` to record it with the `n` refusals left out before it.
    pub(crate) fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        if now.duration_since(self.start) > REFUSAL_WINDOW {
            self.start = now;
            self.count = 0;
        }
        self.count += 1;
        if self.count > REFUSALS_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Why a VM could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReserveError {
    Exists,
    NoCapacity,
}

/// The VM registry, locked. A change made through it is written to the
/// registry file when the guard is released (still under the lock), or by
/// [`VmsGuard::commit`], which says whether it could be.
pub(crate) struct VmsGuard<'a> {
    host: &'a Host,
    map: MutexGuard<'a, HashMap<VmName, VmEntry>>,
    /// Borrowed mutably: to be compared with the file.
    touched: bool,
}

impl Deref for VmsGuard<'_> {
    type Target = HashMap<VmName, VmEntry>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl DerefMut for VmsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.touched = true;
        &mut self.map
    }
}

impl VmsGuard<'_> {
    /// Writes the changes now; an error when they could not be made
    /// durable (the change stays in memory: undo it if it must not stand).
    pub(crate) fn commit(mut self) -> Result<(), vmdb::VmDbError> {
        self.touched = false;
        self.host.persist(&self.map)
    }
}

impl Drop for VmsGuard<'_> {
    fn drop(&mut self) {
        if self.touched {
            if let Err(e) = self.host.persist(&self.map) {
                tracing::error!("the VM registry could not be written: {e}");
            }
        }
    }
}

impl Host {
    pub fn vms(&self) -> VmsGuard<'_> {
        // A poisoned lock means a panic elsewhere; the map itself is still
        // consistent (every update is a single insert/remove/field store).
        VmsGuard {
            host: self,
            map: self.vms.lock().unwrap_or_else(|p| p.into_inner()),
            touched: false,
        }
    }

    /// Writes `vms` to the registry file (what changed since the last
    /// write). Once a QEMU VM is on disk, it outlives the agent (unless
    /// the agent destroys its VMs when it stops).
    fn persist(&self, vms: &HashMap<VmName, VmEntry>) -> Result<(), vmdb::VmDbError> {
        let Some(db) = &self.vmdb else {
            return Ok(());
        };
        let disk_root = self.config.disk_dir();
        let records = vms
            .iter()
            .map(|(n, e)| (n.clone(), vmdb::VmRecord::of(n, e, disk_root.as_deref())))
            .collect();
        let durable = db.sync(records, self.incarnations.load(Ordering::Relaxed))?;
        if durable && self.config.on_exit == crate::config::OnExit::LeaveVmsRunning {
            for e in vms.values() {
                if let Some(VmHandle::Qemu(q)) = &e.handle {
                    q.outlive_agent();
                }
            }
        }
        Ok(())
    }

    /// Appends to the audit log (a no-op for an agent without a state
    /// directory). A failed write closes the log: see [`Host::audit_ok`].
    pub fn audit(&self, event: convoy_protocol::audit::AuditEvent) {
        if let Some(m) = &self.metrics {
            m.audited(&event);
        }
        if let Some(log) = &self.audit {
            match log.record(event) {
                Ok(()) => {
                    if let Some(m) = &self.metrics {
                        m.audit_log(log.records(), crate::trust::authz::now_unix());
                    }
                }
                Err(e) => tracing::error!("audit: {e}"),
            }
        }
    }

    /// A handshake the peer gave up on before it finished (see
    /// [`crate::transport::quic_handshake_abandoned`]): not audited, since
    /// the agent refused nothing and every raced dial that TCP wins
    /// leaves one, but counted (`convoy_handshakes_abandoned_total`) and
    /// logged at debug level.
    pub(crate) fn handshake_abandoned(
        &self,
        peer: std::net::SocketAddr,
        kind: crate::transport::Kind,
        why: &dyn std::fmt::Display,
    ) {
        tracing::debug!(%peer, transport = %kind, "handshake abandoned by the peer: {why}");
        if let Some(m) = &self.metrics {
            m.handshake_abandoned(kind);
        }
    }

    /// Records a refusal that an unauthenticated or hostile peer can cause
    /// at will (a refused handshake, garbage on a stream): at most
    /// [`REFUSALS_PER_WINDOW`] per 10 s, then one record counting those
    /// left out, so nobody can fill the disk through the audit log.
    pub fn audit_refusal(&self, peer: String, reason: String) {
        let admitted = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(std::time::Instant::now());
        let Some(suppressed) = admitted else {
            return;
        };
        // The process log gets the same lines at the same rate.
        tracing::warn!(%peer, "refused: {reason}");
        let reason = if suppressed > 0 {
            format!("{reason} ({suppressed} similar refusals before this one were not recorded)")
        } else {
            reason
        };
        self.audit(convoy_protocol::audit::AuditEvent::Refused {
            migration: None,
            peer,
            reason,
        });
    }

    /// Records `step` of the outgoing migration `migration` (see
    /// [`Host::journal`]).
    pub async fn journal_source(
        &self,
        migration: convoy_protocol::names::MigrationId,
        step: convoy_protocol::journal::JournalStep,
    ) -> Result<convoy_protocol::journal::JournalRecord, journal::JournalError> {
        self.journal(journal::JournalChange::Advance {
            migration,
            role: convoy_protocol::journal::JournalRole::Source,
            step,
        })
        .await
    }

    /// Commits `change` to the journal (an fsync, blocking this worker in
    /// place: measured, less pre-copy downtime than a hop to a blocking
    /// thread) and
    /// returns the record as it now stands. On error nothing was
    /// recorded and the decision must not be acted on. When the agent was
    /// told to pause at the point the record marks, this returns only once
    /// a test releases it ([`crate::host::pause::hold`]).
    pub async fn journal(
        &self,
        change: journal::JournalChange,
    ) -> Result<convoy_protocol::journal::JournalRecord, journal::JournalError> {
        let before = change.clone();
        let r = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.journal.apply_and_tell(change))
            }
            _ => self.journal.apply_and_tell(change),
        };
        let r = match r {
            Ok((r, true)) => r,
            Ok((r, false)) => return Ok(r),
            Err(e) => {
                tracing::error!(change = ?before, "journal: {e}");
                return Err(e);
            }
        };
        let dangerous = self.config.dangerous_options();
        if let Some(hook) = &dangerous.journal_hook {
            hook(&r);
        }
        let point = journal::JournalPoint::of(&r).map(crate::host::pause::PausePoint::from);
        if let Some(point) = point.filter(|p| Some(*p) == dangerous.pause_at) {
            crate::host::pause::hold(self, point).await;
        }
        Ok(r)
    }

    /// False once the audit log failed: no new migration may start.
    pub fn audit_ok(&self) -> bool {
        self.audit.as_ref().is_none_or(|l| l.healthy())
    }

    /// Asks the policy in force, and records the decision in the audit log.
    /// Without a policy, everything is denied.
    pub fn decide(
        &self,
        q: &crate::trust::policy::Query<'_>,
        migration: Option<convoy_protocol::names::MigrationId>,
    ) -> crate::trust::policy::Decision {
        let d = self.decide_unaudited(q);
        tracing::info!(
            action = q.action().name(),
            principal = %q.principal(),
            resource = %q.resource(),
            "policy: {}",
            d.explain()
        );
        self.audit(convoy_protocol::audit::AuditEvent::Decision {
            migration,
            action: q.action().name().into(),
            principal: q.principal(),
            resource: q.resource(),
            permitted: d.permitted,
            explanation: d.explain(),
        });
        d
    }

    pub(crate) fn set_policy(&self, p: crate::trust::policy::PolicySet) {
        tracing::info!(policies = p.len(), digest = p.digest(), "policy loaded");
        self.audit(convoy_protocol::audit::AuditEvent::PolicyLoaded {
            digest: p.digest().into(),
            policies: u32::try_from(p.len()).unwrap_or(u32::MAX),
        });
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p));
    }

    /// The credentials in force now.
    pub fn creds(&self) -> Arc<Creds> {
        self.creds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A new mutually authenticated connection to agent `peer` at `addr`
    /// (with the credentials in force now), as a migration dials one.
    pub(crate) async fn dial_agent(
        &self,
        addr: std::net::SocketAddr,
        peer: &SpiffeId,
    ) -> Result<crate::transport::Connection, crate::transport::TransportError> {
        let creds = self.creds();
        self.dialer
            .connect(
                addr,
                peer.clone(),
                crate::transport::ALPN_AGENT,
                &creds.identity,
                &creds.trust,
            )
            .await
    }

    /// Dials agent `peer` at `addr` over `kind` only.
    pub(crate) async fn dial_agent_over(
        &self,
        addr: std::net::SocketAddr,
        peer: &SpiffeId,
        kind: crate::transport::Kind,
    ) -> Result<crate::transport::Connection, crate::transport::TransportError> {
        let creds = self.creds();
        self.dialer
            .connect_over(
                kind,
                addr,
                peer.clone(),
                crate::transport::ALPN_AGENT,
                &creds.identity,
                &creds.trust,
            )
            .await
    }

    /// Registers `migration` as one a new connection from `source` may
    /// resume (its `Resume` arrives on the returned receiver).
    pub(crate) fn await_resumes(
        &self,
        migration: convoy_protocol::names::MigrationId,
        source: SpiffeId,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Reconnection> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.recoveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(migration, Recovery { source, tx });
        rx
    }

    pub fn authority(&self) -> crate::trust::authz::Authority<'_> {
        crate::trust::authz::Authority {
            trust: self.creds().trust.clone(),
            replay: &self.replay,
            skew: self.config.clock_skew,
        }
    }

    pub fn vm_infos(&self) -> Vec<VmInfo> {
        let vms = self.vms();
        let mut v: Vec<VmInfo> = vms.iter().map(|(n, e)| e.info(n)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn vm_info(&self, name: &VmName) -> Option<VmInfo> {
        self.vms().get(name).map(|e| e.info(name))
    }

    /// Guest memory the VMs here hold or have reserved.
    pub fn used_bytes(&self) -> u64 {
        used_of(&self.vms())
    }

    /// Reserves `bytes` of capacity under `name`.
    pub fn reserve(&self, name: &VmName, bytes: u64, state: VmState) -> Result<(), ReserveError> {
        let mut vms = self.vms();
        if vms.contains_key(name) {
            return Err(ReserveError::Exists);
        }
        let used = used_of(&vms);
        if used.saturating_add(bytes) > self.config.capacity_bytes {
            return Err(ReserveError::NoCapacity);
        }
        vms.insert(
            name.clone(),
            VmEntry {
                handle: None,
                state,
                bytes,
                arrived_from: None,
                counter_at_start: None,
                attributes: Default::default(),
                incarnation: self.incarnations.fetch_add(1, Ordering::Relaxed),
                cancel: None,
                reuse: None,
            },
        );
        Ok(())
    }

    pub fn set_state(&self, name: &VmName, state: VmState) {
        if let Some(e) = self.vms().get_mut(name) {
            e.state = state;
        }
    }

    pub fn retained(&self) -> MutexGuard<'_, crate::host::retain::RetainedStore> {
        self.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn remove(&self, name: &VmName) -> Option<VmEntry> {
        self.vms().remove(name)
    }

    pub fn record(&self, report: MigrationReport) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back(report);
        while r.len() > 32 {
            r.pop_front();
        }
    }

    pub fn recent(&self) -> Vec<MigrationReport> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Counts a running migration for as long as it lives.
pub(crate) struct ActiveGuard<'a>(&'a AtomicU32);

impl<'a> ActiveGuard<'a> {
    pub fn new(c: &'a AtomicU32) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(c)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks VM `name` of `host` exited when its QEMU `vm` exits (checked
/// every half second; a QEMU the agent stopped is not reported).
pub(crate) fn watch_qemu(
    host: &Arc<Host>,
    name: &VmName,
    vm: &Arc<crate::backend::qemu::vm::QemuVm>,
) {
    let (host, name) = (host.clone(), name.clone());
    tokio::spawn(vm.clone().watch(Duration::from_millis(500), move || {
        tracing::warn!(vm = %name, "QEMU exited");
        host.set_state(&name, VmState::Exited);
    }));
}

/// Guest memory `vms` hold or have reserved (a lost VM holds none here).
fn used_of(vms: &HashMap<VmName, VmEntry>) -> u64 {
    vms.values()
        .filter(|e| !matches!(e.handle, Some(VmHandle::Lost(_))))
        .map(|e| e.bytes)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_the_window_s_limit_are_counted_in_the_next_record() {
        let t0 = std::time::Instant::now();
        let mut w = RefusalWindow::new(t0);
        for _ in 0..REFUSALS_PER_WINDOW {
            assert_eq!(w.admit(t0), Some(0));
        }
        // Past the limit within the window: left out, and counted.
        for i in 1..=5 {
            assert_eq!(w.admit(t0 + Duration::from_secs(i)), None);
        }
        // The next window records again, first with the five left out.
        let t1 = t0 + REFUSAL_WINDOW + Duration::from_millis(1);
        assert_eq!(w.admit(t1), Some(5));
        assert_eq!(w.admit(t1), Some(0));
    }
}
