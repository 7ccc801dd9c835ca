//! The agent: its configuration, its VM registry, and the accept loop that
//! hands each authenticated connection to the operator API
//! (`control`) or to an incoming migration
//! ([`crate::engine::destination`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use convoy_protocol::ctl::{MigrationReport, VmInfo, VmState};
use std::path::PathBuf;

use convoy_protocol::names::{AgentName, SpiffeId, TrustDomain, VmName};
use convoy_protocol::page::BatchHeader;
use quinn::Endpoint;
use thiserror::Error;

use crate::backend::VmBackend;
use crate::identity::{self, Identity, TrustBundle};
use crate::transport::{self, TransportError, Tuning, ALPN_AGENT, ALPN_CTL};

/// Agent failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Transport setup.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// TLS setup.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The identity does not name an agent.
    #[error("{0} is not an agent identity (spiffe://<domain>/agent/<name>)")]
    NotAnAgent(SpiffeId),
    /// Durable state could not be opened.
    #[error("state directory {path}: {detail}")]
    State {
        /// Path.
        path: std::path::PathBuf,
        /// What failed.
        detail: String,
    },
    /// The policy could not be loaded: the agent does not start without
    /// the one it was given.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The identity's trust domain is not the bundle's.
    #[error("identity {id} is not in the trust bundle's domain {domain}")]
    WrongDomain {
        /// Identity.
        id: SpiffeId,
        /// Bundle domain.
        domain: String,
    },
}

/// A hook that alters outgoing page batches after the source has hashed
/// them: for tests that prove tampering is caught.
pub type TamperHook = Arc<dyn Fn(u32, &mut BatchHeader, &mut Vec<u8>) + Send + Sync>;

/// Options that weaken Convoy's guarantees, for tests only.
#[derive(Clone, Default)]
pub struct DangerousOptions {
    pub(crate) tamper: Option<TamperHook>,
}

impl std::fmt::Debug for DangerousOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DangerousOptions")
            .field("tamper", &self.tamper.is_some())
            .finish()
    }
}

impl DangerousOptions {
    /// Alters every outgoing page batch with `hook(round, header, payload)`
    /// after its digests were computed, as an attacker on the path would.
    pub fn tamper_outgoing_batches(&mut self, hook: TamperHook) -> &mut Self {
        self.tamper = Some(hook);
        self
    }
}

/// The files an agent's credentials came from, watched for changes so that
/// certificates, keys, the CA bundle and the CRL reload without a restart.
#[derive(Debug, Clone)]
pub struct CredentialFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA bundle.
    pub ca: PathBuf,
    /// CRL (may appear later).
    pub crl: Option<PathBuf>,
    /// Other trust domains trusted for named identities.
    pub federation: Vec<FederationFiles>,
}

/// Another trust domain's CA bundle, trusted for named identities only
/// (see [`TrustBundle::federate`]).
#[derive(Debug, Clone)]
pub struct FederationFiles {
    /// Its trust domain.
    pub domain: TrustDomain,
    /// Its CA bundle (PEM).
    pub ca: PathBuf,
    /// Its CRL, when it publishes one.
    pub crl: Option<PathBuf>,
    /// The identities of that domain we accept (agents and operators).
    pub peers: Vec<SpiffeId>,
}

impl CredentialFiles {
    fn stamp(&self) -> Vec<Option<crate::policy::FileStamp>> {
        let m = |p: &PathBuf| crate::policy::FileStamp::of(p);
        let mut v = vec![m(&self.cert), m(&self.key), m(&self.ca)];
        v.push(self.crl.as_ref().and_then(m));
        for f in &self.federation {
            v.push(m(&f.ca));
            v.push(f.crl.as_ref().and_then(m));
        }
        v
    }

    /// Loads the identity and the CA bundle of `domain`, with the CRL when
    /// its file exists.
    pub fn load(
        &self,
        domain: &TrustDomain,
    ) -> Result<(Identity, TrustBundle), identity::IdentityError> {
        let identity = Identity::load(&self.cert, &self.key)?;
        let mut trust = TrustBundle::load(&self.ca, domain.clone())?;
        if let Some(crl) = self.crl.as_ref().filter(|p| p.exists()) {
            trust = trust.with_crl_file(crl)?;
        }
        for f in &self.federation {
            let mut other = TrustBundle::load(&f.ca, f.domain.clone())?;
            if let Some(crl) = f.crl.as_ref().filter(|p| p.exists()) {
                other = other.with_crl_file(crl)?;
            }
            trust = trust.federate(other, f.peers.iter().cloned())?;
        }
        Ok((identity, trust))
    }
}

/// The credentials in force (replaced as a whole on reload).
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    pub identity: Identity,
    pub trust: TrustBundle,
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Our certificate and key.
    pub identity: Identity,
    /// The CA bundle peers must chain to.
    pub trust: TrustBundle,
    /// Known peers by name.
    pub peers: HashMap<AgentName, SocketAddr>,
    /// Guest memory this agent may hold, all VMs and staging images.
    pub capacity_bytes: u64,
    /// Transport tuning.
    pub tuning: Tuning,
    /// Clock skew tolerated on ticket validity.
    pub clock_skew: Duration,
    /// Directory for durable state (the ticket replay cache). Without one
    /// the agent forgets used tickets when it restarts.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where `identity` and `trust` came from: watched and reloaded.
    pub files: Option<CredentialFiles>,
    /// How often the credential and policy files are checked for changes.
    pub reload_interval: Duration,
    /// Access-control policy and inventory. Without one, every action a
    /// policy governs is denied.
    pub policy: Option<crate::policy::PolicyFiles>,
    /// QEMU binaries and images operators may use; without it the `qemu`
    /// backend is off.
    pub qemu: Option<crate::backend::qemu::vm::QemuConfig>,
    /// Keep an encrypted image of a VM that leaves, when the VM opts in
    /// (see [`crate::retain`]); `None` (the default) keeps nothing.
    pub retain_images: Option<crate::retain::RetentionLimits>,
    /// Where sim VMs' disk files live (one directory per VM); `None`: the
    /// state directory's `disks/`, and without a state directory, sim VMs
    /// cannot have disks.
    pub disk_dir: Option<std::path::PathBuf>,
    /// The most disk bytes one incoming VM may bring (all its disks); an
    /// incoming VM is also refused when its disks do not fit in the free
    /// space of the disk directory.
    pub disk_capacity_bytes: u64,
    /// Base images sim disks may be cloned from, and that incoming disks
    /// cloned from the same base start from (see
    /// [`crate::backend::base`]); `None`: the state directory's `bases/`.
    pub base_dir: Option<std::path::PathBuf>,
    /// What all migrations of this agent may buffer together, bytes (see
    /// [`crate::budget`]).
    pub migration_memory: u64,
    /// After a post-copy switch, how long a broken link may stay down
    /// before the migration is in doubt: the source dials the destination
    /// again for this long, the destination keeps the VM waiting for it
    /// (zero: no recovery).
    pub recovery_window: Duration,
    dangerous: DangerousOptions,
}

impl AgentConfig {
    /// A configuration with defaults: no peers, 64 GiB capacity.
    pub fn new(listen: SocketAddr, identity: Identity, trust: TrustBundle) -> Self {
        AgentConfig {
            listen,
            identity,
            trust,
            peers: HashMap::new(),
            capacity_bytes: 64 << 30,
            tuning: Tuning::default(),
            clock_skew: crate::authz::DEFAULT_CLOCK_SKEW,
            state_dir: None,
            files: None,
            reload_interval: Duration::from_secs(2),
            policy: None,
            qemu: None,
            retain_images: None,
            disk_dir: None,
            disk_capacity_bytes: 1 << 40,
            base_dir: None,
            migration_memory: crate::budget::DEFAULT_MIGRATION_MEMORY,
            recovery_window: Duration::from_secs(60),
            dangerous: DangerousOptions::default(),
        }
    }

    /// The directory of sim VMs' disk files, if there is one.
    pub fn disk_dir(&self) -> Option<std::path::PathBuf> {
        self.disk_dir
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join("disks")))
    }

    /// The base image directory, if there is one.
    pub fn base_dir(&self) -> Option<std::path::PathBuf> {
        self.base_dir
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join("bases")))
    }

    /// Options that weaken guarantees (tests only).
    pub fn dangerous(&mut self) -> &mut DangerousOptions {
        &mut self.dangerous
    }

    pub(crate) fn dangerous_tamper(&self) -> Option<TamperHook> {
        self.dangerous.tamper.clone()
    }
}

/// One VM known to this agent.
#[derive(Debug)]
pub(crate) struct VmEntry {
    pub vm: Option<Arc<dyn VmBackend>>,
    pub state: VmState,
    pub bytes: u64,
    pub arrived_from: Option<String>,
    pub counter_at_start: Option<u64>,
    pub attributes: convoy_protocol::vm::VmAttributes,
    /// Cancels the outgoing migration in progress.
    pub cancel: Option<Arc<tokio::sync::Notify>>,
    /// A QEMU VM (then `vm` is `None`).
    pub qemu: Option<Arc<crate::backend::qemu::vm::QemuVm>>,
    /// Arrived from a host that retained its image: the key to offer it
    /// with when the VM goes back there (memory only).
    pub reuse: Option<crate::retain::ArrivalKey>,
}

impl VmEntry {
    fn info(&self, name: &VmName) -> VmInfo {
        VmInfo {
            name: name.clone(),
            backend: if self.qemu.is_some() {
                "qemu"
            } else {
                self.vm.as_ref().map_or("sim", |v| v.kind())
            }
            .into(),
            memory_bytes: self.bytes,
            state: self.state,
            counter: self.vm.as_ref().map_or(0, |v| v.counter()),
            counter_at_start: self.counter_at_start,
            arrived_from: self.arrived_from.clone(),
            dirty_pages_per_sec: self.vm.as_ref().map_or(0, |v| v.dirty_rate()),
            attributes: self.attributes.clone(),
        }
    }
}

/// Shared agent state.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: AgentConfig,
    pub id: SpiffeId,
    pub endpoint: Endpoint,
    pub vms: Mutex<HashMap<VmName, VmEntry>>,
    pub recent: Mutex<VecDeque<MigrationReport>>,
    pub active: AtomicU32,
    pub replay: crate::authz::ReplayCache,
    pub audit: Option<crate::audit::AuditLog>,
    /// Images retained for VMs that left (memory only).
    pub retained: Arc<Mutex<crate::retain::RetainedStore>>,
    /// The base images of sim disks, when there is a directory for them.
    pub bases: Option<Arc<crate::backend::base::BaseImages>>,
    /// The memory budget the migrations share.
    pub budget: Arc<crate::budget::MigrationBudget>,
    /// Post-copy migrations that may be resumed on a new connection (their
    /// link broke, or may have): where a new connection's Resume goes.
    pub recoveries: Mutex<HashMap<convoy_protocol::names::MigrationId, Recovery>>,
    creds: std::sync::RwLock<Arc<Creds>>,
    policy: std::sync::RwLock<Option<Arc<crate::policy::PolicySet>>>,
    refusals: Mutex<RefusalWindow>,
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
    pub conn: quinn::Connection,
    pub peer: crate::transport::Peer,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub resume: convoy_protocol::message::Resume,
}

/// Refusals an unauthenticated or hostile peer can cause that are recorded
/// per 10 s window; past it, one later record counts those left out.
pub const REFUSALS_PER_WINDOW: u32 = 20;

/// The rate limiter of refusal records.
#[derive(Debug)]
pub(crate) struct RefusalWindow {
    start: std::time::Instant,
    count: u32,
    suppressed: u64,
}

/// Why a VM could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReserveError {
    Exists,
    NoCapacity,
}

impl Inner {
    pub fn vms(&self) -> MutexGuard<'_, HashMap<VmName, VmEntry>> {
        // A poisoned lock means a panic elsewhere; the map itself is still
        // consistent (every update is a single insert/remove/field store).
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to the audit log (a no-op for an agent without a state
    /// directory). A failed write closes the log: see [`Inner::audit_ok`].
    pub fn audit(&self, event: convoy_protocol::audit::AuditEvent) {
        if let Some(log) = &self.audit {
            if let Err(e) = log.record(event) {
                tracing::error!("audit: {e}");
            }
        }
    }

    /// Records a refusal that an unauthenticated or hostile peer can cause
    /// at will (a refused handshake, garbage on a stream): at most
    /// [`REFUSALS_PER_WINDOW`] per 10 s, then one record counting those
    /// left out, so nobody can fill the disk through the audit log.
    pub fn audit_refusal(&self, peer: String, reason: String) {
        let suppressed = {
            let mut w = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if now.duration_since(w.start) > Duration::from_secs(10) {
                w.start = now;
                w.count = 0;
            }
            w.count += 1;
            if w.count > REFUSALS_PER_WINDOW {
                w.suppressed += 1;
                return;
            }
            std::mem::take(&mut w.suppressed)
        };
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

    /// False once the audit log failed: no new migration may start.
    pub fn audit_ok(&self) -> bool {
        self.audit.as_ref().is_none_or(|l| l.healthy())
    }

    /// Asks the policy in force, and records the decision in the audit log.
    /// Without a policy, everything is denied.
    pub fn decide(
        &self,
        q: &crate::policy::Query<'_>,
        migration: Option<convoy_protocol::names::MigrationId>,
    ) -> crate::policy::Decision {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let d = match policy {
            Some(p) => p.decide(q),
            None => crate::policy::Decision::no_policy(),
        };
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

    fn set_policy(&self, p: crate::policy::PolicySet) {
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

    pub fn authority(&self) -> crate::authz::Authority<'_> {
        crate::authz::Authority {
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

    /// Reserves `bytes` of capacity under `name`.
    pub fn reserve(&self, name: &VmName, bytes: u64, state: VmState) -> Result<(), ReserveError> {
        let mut vms = self.vms();
        if vms.contains_key(name) {
            return Err(ReserveError::Exists);
        }
        let used: u64 = vms.values().map(|e| e.bytes).sum();
        if used.saturating_add(bytes) > self.config.capacity_bytes {
            return Err(ReserveError::NoCapacity);
        }
        vms.insert(
            name.clone(),
            VmEntry {
                vm: None,
                state,
                bytes,
                arrived_from: None,
                counter_at_start: None,
                attributes: Default::default(),
                cancel: None,
                qemu: None,
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

    pub fn retained(&self) -> MutexGuard<'_, crate::retain::RetainedStore> {
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

/// A bound agent, ready to run.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
    stamps: Stamps,
}

/// The watched files as they were when the agent loaded them.
#[derive(Debug, Clone)]
struct Stamps {
    creds: Option<Vec<Option<crate::policy::FileStamp>>>,
    policy: Option<Vec<(PathBuf, Option<crate::policy::FileStamp>)>>,
}

impl Agent {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn bind(config: AgentConfig) -> Result<Agent, AgentError> {
        let id = config.identity.id().clone();
        if id.role() != convoy_protocol::names::Role::Agent {
            return Err(AgentError::NotAnAgent(id));
        }
        if id.domain() != config.trust.domain() {
            return Err(AgentError::WrongDomain {
                id,
                domain: config.trust.domain().to_string(),
            });
        }
        let (replay, audit, reset_key) = match &config.state_dir {
            Some(dir) => {
                let err = |detail: String| AgentError::State {
                    path: dir.clone(),
                    detail,
                };
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                let reset_key = transport::ResetKey::load_or_create(&dir.join("quic-reset.key"))
                    .map_err(err)?;
                let replay = crate::authz::ReplayCache::open(&dir.join("state.redb"))
                    .map_err(|e| err(e.to_string()))?;
                let audit = crate::audit::AuditLog::open(
                    &dir.join("audit.log"),
                    &config.identity,
                    &config.trust,
                )
                .map_err(|e| err(e.to_string()))?;
                (replay, Some(audit), reset_key)
            }
            None => {
                tracing::warn!(
                    "no state directory: used tickets are forgotten on restart, and there is no audit log"
                );
                (
                    crate::authz::ReplayCache::in_memory(),
                    None,
                    transport::ResetKey::random()?,
                )
            }
        };
        // Stamps taken before loading: a file changed in between is
        // reloaded by the watchers, never missed.
        let stamps = Stamps {
            creds: config.files.as_ref().map(CredentialFiles::stamp),
            policy: config
                .policy
                .as_ref()
                .map(crate::policy::PolicyFiles::stamp),
        };
        let policy = match &config.policy {
            Some(files) => Some(crate::policy::PolicySet::load(files)?),
            None => {
                tracing::warn!(
                    "no policy: every migration, VM creation, abort and audit read is denied"
                );
                None
            }
        };
        let tls =
            identity::server_config(&config.identity, &config.trust, &[ALPN_AGENT, ALPN_CTL])?;
        let endpoint = transport::endpoint_with_reset_key(
            config.listen,
            Some(tls),
            &config.tuning,
            &reset_key,
        )?;
        let budget = crate::budget::MigrationBudget::new(
            config.migration_memory,
            u64::from(config.tuning.connection_window),
        );
        let bases = config
            .base_dir()
            .map(|d| Arc::new(crate::backend::base::BaseImages::new(d)));
        // Index the bases in the background: hashing a large one at the
        // first migration that names it would delay its Accept.
        if let Some(b) = bases.clone() {
            let _ = std::thread::Builder::new()
                .name("convoy-bases".into())
                .spawn(move || b.index_all(4096));
        }
        let creds = Creds {
            identity: config.identity.clone(),
            trust: config.trust.clone(),
        };
        let agent = Agent {
            stamps,
            inner: Arc::new(Inner {
                policy: std::sync::RwLock::new(None),
                refusals: Mutex::new(RefusalWindow {
                    start: std::time::Instant::now(),
                    count: 0,
                    suppressed: 0,
                }),
                creds: std::sync::RwLock::new(Arc::new(creds)),
                config,
                id,
                endpoint,
                vms: Mutex::new(HashMap::new()),
                recent: Mutex::new(VecDeque::new()),
                active: AtomicU32::new(0),
                replay,
                audit,
                retained: Arc::new(Mutex::new(Default::default())),
                bases,
                budget,
                recoveries: Mutex::new(HashMap::new()),
            }),
        };
        if let Some(p) = policy {
            agent.inner.set_policy(p);
        }
        Ok(agent)
    }

    /// The images this agent retains for VMs that left it (ciphertext
    /// only; see [`crate::retain`]), as a handle that does not keep the
    /// agent alive.
    pub fn retained_images(&self) -> crate::retain::RetainedImages {
        crate::retain::RetainedImages(self.inner.retained.clone())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Our identity.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// Serves until `shutdown` completes, then closes every connection and
    /// destroys the VMs it holds.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let reloader = self
            .inner
            .config
            .files
            .clone()
            .zip(self.stamps.creds.clone())
            .map(|(files, s)| tokio::spawn(reload_loop(self.inner.clone(), files, s)));
        let policy_reloader = self
            .inner
            .config
            .policy
            .clone()
            .zip(self.stamps.policy.clone())
            .map(|(files, s)| tokio::spawn(policy_reload_loop(self.inner.clone(), files, s)));
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                () = &mut shutdown => None,
            };
            let Some(incoming) = incoming else { break };
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(inner, incoming).await {
                    tracing::info!("connection ended: {e}");
                }
            });
        }
        for r in [reloader, policy_reloader].into_iter().flatten() {
            r.abort();
        }
        self.inner
            .endpoint
            .close(0u32.into(), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
        let vms: Vec<VmEntry> = self.inner.vms().drain().map(|(_, e)| e).collect();
        for e in vms {
            if let Some(vm) = e.vm {
                vm.destroy();
            }
            if let Some(q) = e.qemu {
                q.stop().await;
            }
        }
    }
}

/// Binds and runs an agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::bind(config)?.run(shutdown).await;
    Ok(())
}

/// Close codes.
pub(crate) mod close {
    /// The peer is not allowed here.
    pub const UNAUTHORIZED: u32 = 0x10;
    /// Normal end.
    pub const DONE: u32 = 0;
}

async fn serve_connection(
    inner: Arc<Inner>,
    incoming: quinn::Incoming,
) -> Result<(), TransportError> {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, "handshake refused: {e}");
            inner.audit_refusal(remote.to_string(), format!("handshake refused: {e}"));
            return Err(e.into());
        }
    };
    let peer = match transport::authorize_peer(&conn, &inner.creds().trust) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%remote, "refusing peer: {e}");
            inner.audit_refusal(remote.to_string(), e.to_string());
            conn.close(close::UNAUTHORIZED.into(), e.to_string().as_bytes());
            return Err(e);
        }
    };
    tracing::debug!(%remote, peer = %peer.id, "authenticated");
    if peer.alpn == ALPN_CTL {
        crate::control::serve(inner, conn, peer).await;
    } else {
        crate::engine::destination::serve(inner, conn, peer).await;
    }
    Ok(())
}

/// Returns once `now()` differs from `stamp` (checked every `interval`),
/// with `stamp` updated.
async fn changed<S: PartialEq>(interval: Duration, stamp: &mut S, now: impl Fn() -> S) {
    loop {
        tokio::time::sleep(interval).await;
        let s = now();
        if s != *stamp {
            *stamp = s;
            return;
        }
    }
}

/// Reloads certificates, key, CA bundle and CRL when their files change.
/// A bad file keeps the credentials in force and is reported; the agent
/// never runs with none.
async fn reload_loop(
    inner: Arc<Inner>,
    files: CredentialFiles,
    mut stamp: Vec<Option<crate::policy::FileStamp>>,
) {
    loop {
        changed(inner.config.reload_interval, &mut stamp, || files.stamp()).await;
        let domain = inner.creds().trust.domain().clone();
        let creds = match files.load(&domain) {
            Ok((identity, trust)) if identity.id() == &inner.id => Creds { identity, trust },
            Ok((identity, _)) => {
                tracing::error!(
                    new = %identity.id(),
                    "reloaded certificate names another identity; keeping the old one"
                );
                continue;
            }
            Err(e) => {
                tracing::error!("credential reload failed, keeping the old ones: {e}");
                continue;
            }
        };
        let server =
            identity::server_config(&creds.identity, &creds.trust, &[ALPN_AGENT, ALPN_CTL])
                .map_err(TransportError::from)
                .and_then(|tls| transport::quic_server_config(tls, &inner.config.tuning));
        match server {
            Ok(sc) => {
                inner.endpoint.set_server_config(Some(sc));
                *inner.creds.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(creds);
                tracing::info!("credentials reloaded");
            }
            Err(e) => tracing::error!("reloaded credentials unusable, keeping the old ones: {e}"),
        }
    }
}

/// Reloads the policy and inventory when their files change. A file that
/// does not parse or validate keeps the policy in force; the refusal is
/// logged and audited.
async fn policy_reload_loop(
    inner: Arc<Inner>,
    files: crate::policy::PolicyFiles,
    mut stamp: Vec<(PathBuf, Option<crate::policy::FileStamp>)>,
) {
    loop {
        changed(inner.config.reload_interval, &mut stamp, || files.stamp()).await;
        let loaded = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || crate::policy::PolicySet::load(&files)).await
        };
        match loaded {
            Ok(Ok(p)) => inner.set_policy(p),
            Ok(Err(e)) => {
                tracing::error!("policy reload refused, keeping the policy in force: {e}");
                inner.audit(convoy_protocol::audit::AuditEvent::PolicyRejected {
                    reason: e.to_string(),
                });
            }
            Err(e) => tracing::error!("policy reload task failed: {e}"),
        }
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
