//! The optional fleet registry on etcd: which agent owns each VM, at which
//! ownership epoch, and which agents are alive (records:
//! [`convoy_protocol::registry`]).
//!
//! With a registry (`--registry`), a migration's commit point is one etcd
//! transaction, made by the destination after it has verified the VM and
//! recorded the handover in its journal, before the VM runs there: compare
//! the owner record's revision with the one read when the VM was staged
//! (owner = the source) and swap in the destination at epoch + 1. The VM
//! starts at the destination only after that transaction succeeded. A
//! source takes a VM back (the migration did not commit) only after its
//! own transaction — owner still itself, epoch + 1 — succeeded: that write
//! also fences any commit still on its way. A registry that cannot be
//! reached at either point leaves the VM paused where it is, in doubt,
//! for `convoyctl recover` once it can be (the resolution takes the same
//! transaction). So the registry, not the peer, settles who runs the VM,
//! even when the peer is gone for good.
//!
//! Without `--registry` nothing here runs and the two-agent protocol of
//! `host::indoubt` is the only rule.
//!
//! The etcd client is behind the `registry` cargo feature (it pulls in
//! gRPC, and protoc to build it); an agent built without it refuses
//! `--registry` with a message that says so.

#[cfg(feature = "registry")]
mod etcd;
mod live;
#[cfg(not(feature = "registry"))]
mod unbuilt;

#[cfg(feature = "registry")]
use etcd::Store;
#[cfg(not(feature = "registry"))]
use unbuilt::Store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::registry::{AgentRecord, OwnerRecord, RecordError};
use convoy_protocol::vm::VmAttributes;
use thiserror::Error;

/// How an agent reaches the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// etcd endpoints (`http://host:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// The prefix of every key ([`convoy_protocol::registry::DEFAULT_PREFIX`]).
    pub prefix: String,
    /// The lease of the agent's liveness record: it is gone this long
    /// after the agent stopped renewing it.
    pub lease_ttl: Duration,
    /// How long one registry operation (a commit with its retries) may
    /// take before its outcome is unknown.
    pub timeout: Duration,
    /// TLS to etcd: its CA and, for client-certificate authentication,
    /// this agent's certificate and key (PEM).
    pub tls: Option<RegistryTls>,
}

/// TLS files for the registry.
#[derive(Debug, Clone)]
pub struct RegistryTls {
    /// The CA that etcd's certificate chains to.
    pub ca: PathBuf,
    /// A client certificate and its key, when etcd asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RegistryConfig {
    /// A configuration with defaults: prefix `/convoy/`, a 10 s lease, a
    /// 5 s operation timeout, no TLS.
    pub fn new(endpoints: Vec<String>) -> Self {
        RegistryConfig {
            endpoints,
            prefix: convoy_protocol::registry::DEFAULT_PREFIX.into(),
            lease_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Why a registry operation did not do what was asked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// etcd did not answer (in time), or answered with an error: the
    /// outcome of a write is unknown.
    #[error("the registry is unreachable: {0}")]
    Unreachable(String),
    /// Connected, but not yet: the agent is still reaching it.
    #[error("the registry is not connected yet")]
    NotConnected,
    /// A record that does not decode.
    #[error("the registry holds a bad record: {0}")]
    BadRecord(#[from] RecordError),
    /// Another agent owns the VM.
    #[error("the registry says {vm} is owned by {owner} (epoch {epoch})")]
    OwnedElsewhere {
        /// The VM.
        vm: VmName,
        /// Its owner.
        owner: SpiffeId,
        /// At this epoch.
        epoch: u64,
    },
    /// No record for the VM.
    #[error("{0} is not in the registry")]
    Unregistered(VmName),
    /// The record changed while it was being removed.
    #[error("{0}'s record changed while it was being removed")]
    Changed(VmName),
    /// The configuration cannot be used (a TLS file, an endpoint).
    #[error("registry configuration: {0}")]
    Config(String),
    /// This build has no etcd client.
    #[error(
        "this agent was built without the registry: build it with `--features convoy-agent/registry`"
    )]
    NotBuilt,
}

/// The owner record a destination read when it staged the VM: what its
/// commit compares against.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    record: OwnerRecord,
    revision: i64,
}

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum Commit {
    /// The destination owns the VM, at this record.
    Committed(OwnerRecord),
    /// The record changed since it was read: the swap did not happen.
    Lost(Option<OwnerRecord>),
    /// No answer within the timeout: it may or may not have happened.
    Unknown(String),
}

/// What the registry holds, read at once.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    /// Every owner record that decodes.
    pub vms: Vec<OwnerRecord>,
    /// Every agent alive.
    pub agents: Vec<AgentRecord>,
    /// Keys whose record does not decode, with why.
    pub bad: Vec<String>,
}

/// A connected registry, for one agent.
pub struct Registry {
    store: Store,
    me: SpiffeId,
    config: RegistryConfig,
    /// What reconciliation found that it would not guess about.
    disagreements: Mutex<Vec<String>>,
    /// The liveness task, ended with the registry.
    live: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("endpoints", &self.config.endpoints)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(t) = self.live.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

fn now_unix() -> u64 {
    crate::trust::authz::now_unix()
}

/// The longest one request may wait before it is tried again: a request
/// sent to a member that died waits for nothing; the next one may go to a
/// member that lives.
const ATTEMPT: Duration = Duration::from_secs(1);

impl Registry {
    /// Connects to the registry as agent `me` (no request is made yet).
    pub async fn connect(config: RegistryConfig, me: SpiffeId) -> Result<Arc<Self>, RegistryError> {
        if config.endpoints.is_empty() {
            return Err(RegistryError::Config("no endpoint".into()));
        }
        let store = Store::connect(&config).await?;
        Ok(Arc::new(Registry {
            store,
            me,
            config,
            disagreements: Mutex::new(Vec::new()),
            live: Mutex::new(None),
        }))
    }

    /// The endpoints it was configured with.
    pub fn endpoints(&self) -> &[String] {
        &self.config.endpoints
    }

    /// The agent this registry speaks for.
    pub(crate) fn me(&self) -> &SpiffeId {
        &self.me
    }

    fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// Runs `op` (given how long it may take) until it answers, again
    /// while the registry is unreachable, within the registry timeout.
    /// Only for requests that may be repeated: reads, and writes whose
    /// compare makes a repeat harmless.
    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match op(left.min(ATTEMPT)).await {
                Err(RegistryError::Unreachable(e)) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(RegistryError::Unreachable(format!(
                            "{e} (tried for {} ms)",
                            self.config.timeout.as_millis()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100).min(left)).await;
                }
                other => return other,
            }
        }
    }

    /// The owner record of `vm` and its revision, if there is one.
    pub(crate) async fn owner(
        &self,
        vm: &VmName,
    ) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
        self.retrying(|t| self.store.get_owner(self.prefix(), vm, t))
            .await
    }

    /// Registers a VM created (or adopted, or restored) here: a new record
    /// at epoch 1, or the record already there when it names this agent.
    /// Refused when another agent owns a VM of that name.
    pub(crate) async fn claim(
        &self,
        vm: &VmName,
        attributes: &VmAttributes,
        cause: &str,
    ) -> Result<OwnerRecord, RegistryError> {
        let record = OwnerRecord {
            vm: vm.clone(),
            owner: self.me.clone(),
            epoch: 1,
            attributes: attributes.clone(),
            cause: cause.into(),
            since_unix: now_unix(),
        };
        match self
            .retrying(|t| self.store.create(self.prefix(), &record, t))
            .await?
        {
            None => Ok(record),
            Some((r, _)) if r.owner == self.me => Ok(r),
            Some((r, _)) => Err(RegistryError::OwnedElsewhere {
                vm: r.vm,
                owner: r.owner,
                epoch: r.epoch,
            }),
        }
    }

    /// Reads `vm`'s record and checks that `owner` owns it: what a
    /// source checks before it proposes a migration and a destination
    /// when it stages one (and later commits against).
    pub(crate) async fn expect_owner(
        &self,
        vm: &VmName,
        owner: &SpiffeId,
    ) -> Result<Expected, RegistryError> {
        match self.owner(vm).await? {
            None => Err(RegistryError::Unregistered(vm.clone())),
            Some((record, revision)) if record.owner == *owner => Ok(Expected { record, revision }),
            Some((r, _)) => Err(RegistryError::OwnedElsewhere {
                vm: r.vm,
                owner: r.owner,
                epoch: r.epoch,
            }),
        }
    }

    /// The commit point of a migration to this agent: swaps the owner to
    /// us at epoch + 1 if the record is still the one `expected` read.
    /// Retried (the compare makes a retry harmless: a swap that already
    /// happened reads back as ours) until the registry timeout.
    pub(crate) async fn commit(&self, expected: &Expected, migration: MigrationId) -> Commit {
        let cause = format!("migrated {migration}");
        let new = OwnerRecord {
            owner: self.me.clone(),
            epoch: expected.record.epoch.saturating_add(1),
            cause: cause.clone(),
            since_unix: now_unix(),
            ..expected.record.clone()
        };
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .store
                .swap(self.prefix(), expected.revision, &new, left.min(ATTEMPT))
                .await
            {
                Ok(None) => return Commit::Committed(new),
                // Our own swap, whose answer was lost, reads back as ours.
                Ok(Some(Some((cur, _)))) if cur.owner == self.me && cur.cause == cause => {
                    return Commit::Committed(cur)
                }
                Ok(Some(cur)) => return Commit::Lost(cur.map(|(r, _)| r)),
                Err(RegistryError::Unreachable(e)) => last = e,
                Err(e) => return Commit::Unknown(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(200).min(left)).await;
        }
        Commit::Unknown(format!(
            "no answer within {} ms: {last}",
            self.config.timeout.as_millis()
        ))
    }

    /// Before a source resumes a VM it had handed over (a migration that
    /// did not commit): the record must still name this agent; it is
    /// rewritten at epoch + 1, which also fences any commit still on its
    /// way. Refused when another agent owns the VM or the registry cannot
    /// say: the VM then stays paused.
    ///
    /// One exception: the record names `given_back_by`, written by this
    /// very migration's commit, and that agent has given the VM back (it
    /// said so, and its journal fences the migration: it never runs it).
    /// Its commit then landed after it had stopped waiting for it; the
    /// record is taken back the same way.
    pub(crate) async fn reclaim(
        &self,
        vm: &VmName,
        migration: MigrationId,
        given_back_by: Option<&SpiffeId>,
    ) -> Result<OwnerRecord, RegistryError> {
        let committed_by_this = format!("migrated {migration}");
        for _ in 0..3 {
            let Some((cur, revision)) = self.owner(vm).await? else {
                return Err(RegistryError::Unregistered(vm.clone()));
            };
            let handed_back =
                given_back_by.is_some_and(|p| *p == cur.owner) && cur.cause == committed_by_this;
            if cur.owner != self.me && !handed_back {
                return Err(RegistryError::OwnedElsewhere {
                    vm: cur.vm,
                    owner: cur.owner,
                    epoch: cur.epoch,
                });
            }
            let new = OwnerRecord {
                owner: self.me.clone(),
                epoch: cur.epoch.saturating_add(1),
                cause: format!("reclaimed {migration}"),
                since_unix: now_unix(),
                ..cur
            };
            match self
                .retrying(|t| self.store.swap(self.prefix(), revision, &new, t))
                .await?
            {
                None => return Ok(new),
                // Changed meanwhile: read it again.
                Some(_) => continue,
            }
        }
        Err(RegistryError::Unreachable(
            "the record kept changing while it was reclaimed".into(),
        ))
    }

    /// A VM deleted here: its record goes, if it is ours. A delete whose
    /// answer was lost reads back as gone: done.
    pub(crate) async fn release(&self, vm: &VmName) -> Result<(), RegistryError> {
        for _ in 0..3 {
            let Some((cur, revision)) = self.owner(vm).await? else {
                return Ok(());
            };
            if cur.owner != self.me {
                return Err(RegistryError::OwnedElsewhere {
                    vm: cur.vm,
                    owner: cur.owner,
                    epoch: cur.epoch,
                });
            }
            match self
                .retrying(|t| self.store.delete_if(self.prefix(), vm, revision, t))
                .await
            {
                Err(RegistryError::Changed(_)) => continue,
                other => return other,
            }
        }
        Err(RegistryError::Changed(vm.clone()))
    }

    /// Every record.
    pub(crate) async fn contents(&self) -> Result<Contents, RegistryError> {
        self.retrying(|t| self.store.list(self.prefix(), t)).await
    }

    /// What reconciliation reported.
    pub fn disagreements(&self) -> Vec<String> {
        self.disagreements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps what a reconciliation found.
    pub(crate) fn set_disagreements(&self, found: Vec<String>) {
        *self.disagreements.lock().unwrap_or_else(|p| p.into_inner()) = found;
    }

    /// Keeps this agent's liveness record (`record` makes it) under a
    /// lease, renewed until the registry is dropped; a lease that expired
    /// (the agent was cut off longer than its TTL) is taken again.
    pub(crate) fn keep_alive(self: &Arc<Self>, record: impl Fn() -> AgentRecord + Send + 'static) {
        let task = tokio::spawn(live::keep_alive(Arc::downgrade(self), record));
        if let Some(old) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    /// Ends the liveness record at once (the agent stops).
    pub(crate) async fn leave(&self) {
        if let Some(t) = self.live.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
        self.store
            .leave(self.prefix(), &self.me, self.config.timeout)
            .await;
    }
}
