//! How an agent runs: its configuration ([`AgentConfig`]), the files its
//! credentials come from, the options that weaken guarantees (tests only),
//! and why an agent fails to start ([`AgentError`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::names::{AgentName, SpiffeId, TrustDomain};
use convoy_protocol::page::BatchHeader;
use thiserror::Error;

use crate::transport::{TransportError, Tuning};
use crate::trust::identity::{self, Identity, TrustBundle};
use convoy_protocol::journal::JournalPoint;

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
    /// No state directory: the agent would act unaudited.
    #[error("a state directory is required (--state-dir): without it there is no audit log and used tickets are forgotten at restart")]
    NoStateDir,
    /// Durable state could not be opened.
    #[error("state directory {}: {source}", .path.display())]
    State {
        /// Path.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: StateError,
    },
    /// The policy could not be loaded: the agent does not start without
    /// the one it was given.
    #[error(transparent)]
    Policy(#[from] crate::trust::policy::PolicyError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The identity's trust domain is not the bundle's.
    #[error("identity {id} is not in the trust bundle's domain {domain}")]
    WrongDomain {
        /// Identity.
        id: SpiffeId,
        /// Bundle domain.
        domain: TrustDomain,
    },
}

/// What in the state directory could not be opened.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateError {
    /// The directory could not be made.
    #[error("{0}")]
    Create(#[source] std::io::Error),
    /// The QUIC stateless-reset key.
    #[error(transparent)]
    ResetKey(#[from] crate::transport::ResetKeyError),
    /// The used-ticket database.
    #[error("{0}")]
    ReplayCache(#[source] redb::Error),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] crate::trust::audit::AuditLogError),
    /// The migration journal.
    #[error(transparent)]
    Journal(#[from] crate::host::journal::JournalError),
    /// The VM registry.
    #[error(transparent)]
    VmRegistry(#[from] crate::host::vmdb::VmDbError),
    /// The snapshot sealing key.
    #[error(transparent)]
    Sealing(#[from] Box<crate::snapshot::SealingError>),
    /// The record of snapshot lineages seen.
    #[error("snapshots.redb: {0}")]
    SnapshotsSeen(#[source] redb::Error),
}

/// What becomes of an agent's VMs when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnExit {
    /// They keep running, recorded in the state directory's registry; the
    /// agent finds them again when it starts (`convoy-agent`, SIGTERM and
    /// SIGINT included). Destroying a VM is an operator's `vm delete`.
    #[default]
    LeaveVmsRunning,
    /// The agent destroys them as it stops, and a QEMU it launched dies
    /// with its handle even once recorded: for the in-process lab, whose
    /// VMs must not outlive the demo or test that made them.
    DestroyVms,
}

/// A hook that alters outgoing page batches after the source has hashed
/// them: for tests that prove tampering is caught.
pub type TamperHook = Arc<dyn Fn(u32, &mut BatchHeader, &mut Vec<u8>) + Send + Sync>;

/// A hook that sees every journal record this agent commits, in order:
/// for tests of what is recorded when.
pub type JournalHook = Arc<dyn Fn(&convoy_protocol::journal::JournalRecord) + Send + Sync>;

/// Options that weaken Convoy's guarantees, for tests only.
#[derive(Clone, Default)]
pub struct DangerousOptions {
    pub(crate) tamper: Option<TamperHook>,
    pub(crate) pause_at: Option<crate::host::pause::PausePoint>,
    pub(crate) fail_journal_at: Option<JournalPoint>,
    pub(crate) journal_hook: Option<JournalHook>,
}

impl std::fmt::Debug for DangerousOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DangerousOptions")
            .field("tamper", &self.tamper.is_some())
            .field("pause_at", &self.pause_at)
            .field("fail_journal_at", &self.fail_journal_at)
            .field("journal_hook", &self.journal_hook.is_some())
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

    /// Stops the migration that reaches `point` for ever — right after
    /// its journal record is committed, or at the engine step — logging
    /// `paused at POINT` to the log and to stderr, so that a test can kill
    /// the agent or cut its link there.
    pub fn pause_at(&mut self, point: impl Into<crate::host::pause::PausePoint>) -> &mut Self {
        self.pause_at = Some(point.into());
        self
    }

    /// Makes the journal's file fail from the write of `point`'s record
    /// on, as a dead disk would: nothing from there is recorded.
    pub fn fail_journal_at(&mut self, point: JournalPoint) -> &mut Self {
        self.fail_journal_at = Some(point);
        self
    }

    /// Calls `hook` with every journal record committed.
    pub fn watch_journal(&mut self, hook: JournalHook) -> &mut Self {
        self.journal_hook = Some(hook);
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
    pub(crate) fn stamp(&self) -> Vec<Option<crate::trust::policy::FileStamp>> {
        let m = |p: &PathBuf| crate::trust::policy::FileStamp::of(p);
        let mut v = vec![m(&self.cert), m(&self.key), m(&self.ca)];
        v.push(self.crl.as_ref().and_then(m));
        for f in &self.federation {
            v.push(m(&f.ca));
            v.push(f.crl.as_ref().and_then(m));
        }
        v
    }

    /// The CRL files (ours and the federated domains') that exist now.
    pub(crate) fn crls_present(&self) -> Vec<PathBuf> {
        self.crl
            .iter()
            .chain(self.federation.iter().filter_map(|f| f.crl.as_ref()))
            .filter(|p| p.exists())
            .cloned()
            .collect()
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

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Address to listen on: QUIC on its UDP port, TLS over TCP on the
    /// same TCP port.
    pub listen: SocketAddr,
    /// How this agent dials its peers: QUIC, TCP, or both raced (the
    /// default).
    pub transport: crate::transport::Choice,
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
    pub policy: Option<crate::trust::policy::PolicyFiles>,
    /// QEMU binaries and images operators may use; without it the `qemu`
    /// backend is off.
    pub qemu: Option<crate::backend::qemu::vm::QemuConfig>,
    /// Keep an encrypted image of a VM that leaves, when the VM opts in
    /// (see [`crate::host::retain`]); `None` (the default) keeps nothing.
    pub retain_images: Option<crate::host::retain::RetentionLimits>,
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
    /// [`crate::host::budget`]).
    pub migration_memory: u64,
    /// After a post-copy switch, how long a broken link may stay down
    /// before the migration is in doubt: the source dials the destination
    /// again for this long, the destination keeps the VM waiting for it
    /// (zero: no recovery).
    pub recovery_window: Duration,
    /// Most bytes the bookkeeping of the migrations in progress (arriving,
    /// and sim VMs leaving) may take together
    /// (their Merkle trees, 64 bytes per page or disk block): 2 GiB by
    /// default, 32 Mi leaves, 128 GiB of 4 KiB pages and blocks.
    pub max_bookkeeping_bytes: u64,
    /// Handshakes, connections and connection deadlines
    /// ([`crate::host::limits`]).
    pub limits: crate::host::limits::ConnectionLimits,
    /// What becomes of the VMs when the agent stops: by default they keep
    /// running, and the agent finds them again when it starts.
    pub on_exit: OnExit,
    /// Where sim VMs' vCPUs run: a thread of the agent (the default; the
    /// VM ends with the agent process) or a helper process per VM, which
    /// outlives the agent and is found again when it starts (the
    /// `convoy-agent` binary uses this).
    pub sim_vcpu: crate::backend::sim::SimVcpuHost,
    /// The S3 profiles snapshot buckets are reached with (none: the
    /// standard AWS environment for every bucket).
    pub snapshot_profiles: crate::snapshot::profile::StoreProfiles,
    /// Where Prometheus metrics are served (`None`: nowhere).
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// The fleet registry on etcd (`None`: none; the two-agent protocol
    /// alone settles who runs a VM).
    pub registry: Option<crate::registry::RegistryConfig>,
    dangerous: DangerousOptions,
}

impl AgentConfig {
    /// A configuration with defaults: no peers, 64 GiB capacity.
    pub fn new(listen: SocketAddr, identity: Identity, trust: TrustBundle) -> Self {
        AgentConfig {
            listen,
            transport: crate::transport::Choice::default(),
            identity,
            trust,
            peers: HashMap::new(),
            capacity_bytes: 64 << 30,
            tuning: Tuning::default(),
            clock_skew: crate::trust::authz::DEFAULT_CLOCK_SKEW,
            state_dir: None,
            files: None,
            reload_interval: Duration::from_secs(2),
            policy: None,
            qemu: None,
            retain_images: None,
            disk_dir: None,
            disk_capacity_bytes: 1 << 40,
            base_dir: None,
            migration_memory: crate::host::budget::DEFAULT_MIGRATION_MEMORY,
            recovery_window: Duration::from_secs(60),
            limits: crate::host::limits::ConnectionLimits::default(),
            max_bookkeeping_bytes: 2 << 30,
            on_exit: OnExit::default(),
            sim_vcpu: crate::backend::sim::SimVcpuHost::default(),
            snapshot_profiles: Default::default(),
            metrics: None,
            registry: None,
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

    pub(crate) fn dangerous_options(&self) -> &DangerousOptions {
        &self.dangerous
    }
}
