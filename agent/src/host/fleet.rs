//! The host's side of the fleet registry ([`crate::registry`]): reaching
//! it at start, reconciling it with what runs here, and its part in a
//! migration — what the destination reads when it stages the VM and swaps
//! at the commit point, and what a source must win before it resumes a VM
//! it had handed over. Each step is a no-op without a registry.
//!
//! Reconciliation: a VM here that the registry does not know is
//! registered; every other difference — a VM here that the registry says
//! another agent owns, a record naming this agent for a VM that is not
//! here, a record that does not decode — is reported (logged, and shown
//! by `convoyctl fleet ls`), never settled by a guess.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::ctl::VmState;
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::registry::AgentRecord;

use super::Host;
use crate::registry::{Commit, Expected, Registry, RegistryConfig, RegistryError};

impl Host {
    /// The fleet registry: `None` when none is configured, an error while
    /// a configured one has not been reached yet.
    pub(crate) fn registry(
        &self,
    ) -> Result<Option<Arc<crate::registry::Registry>>, crate::registry::RegistryError> {
        if self.config.registry.is_none() {
            return Ok(None);
        }
        self.registry
            .get()
            .cloned()
            .map(Some)
            .ok_or(crate::registry::RegistryError::NotConnected)
    }

    /// What the policy says of `q`, neither logged nor audited: for views
    /// that ask it of many VMs at once and change nothing.
    pub(crate) fn decide_unaudited(
        &self,
        q: &crate::trust::policy::Query<'_>,
    ) -> crate::trust::policy::Decision {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match policy {
            Some(p) => p.decide(q),
            None => crate::trust::policy::Decision::no_policy(),
        }
    }
}

/// Connects `host` to the registry (no request is made: the client
/// connects lazily, so an etcd that is down does not hold the agent's
/// start), keeps the agent's liveness record, and reconciles what runs
/// here in the background (the returned task, until it has once).
pub(crate) async fn attach(
    host: &Arc<Host>,
    config: RegistryConfig,
) -> Option<tokio::task::JoinHandle<()>> {
    let registry = match Registry::connect(config, host.id.clone()).await {
        Ok(r) => r,
        Err(e) => {
            // The flags were checked at start: this is a bad endpoint that
            // parsed, or a TLS file gone since. Every registry operation
            // then fails, and the VMs stay where they are.
            tracing::error!("registry: {e}");
            return None;
        }
    };
    let weak = Arc::downgrade(host);
    let id = host.id.clone();
    let addr = host
        .endpoint
        .local_addr()
        .map_or_else(|_| host.config.listen.to_string(), |a| a.to_string());
    let capacity_bytes = host.config.capacity_bytes;
    let started_unix = crate::trust::authz::now_unix();
    registry.keep_alive(move || AgentRecord {
        id: id.clone(),
        addr: addr.clone(),
        capacity_bytes,
        used_bytes: weak.upgrade().map_or(0, |h| h.used_bytes()),
        started_unix,
    });
    if host.registry.set(registry.clone()).is_err() {
        return None;
    }
    let host = host.clone();
    Some(tokio::spawn(async move {
        loop {
            match reconcile(&host, &registry).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!("registry: not reconciled yet: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }))
}

/// Reconciles the registry with the VMs of `host`; returns the
/// disagreements found (also kept in `registry`).
pub(crate) async fn reconcile(
    host: &Arc<Host>,
    registry: &Registry,
) -> Result<Vec<String>, RegistryError> {
    let contents = registry.contents().await?;
    // One snapshot of the VMs here: every name, with the attributes of
    // the settled ones (one migrating or in doubt is the journal's).
    let here: BTreeMap<_, _> = host
        .vms()
        .iter()
        .map(|(n, e)| {
            let settled = matches!(
                e.state,
                VmState::Running | VmState::Paused | VmState::Exited
            );
            (n.clone(), settled.then(|| e.attributes.clone()))
        })
        .collect();
    let records: BTreeMap<_, _> = contents.vms.iter().map(|r| (r.vm.clone(), r)).collect();
    let mut found = Vec::new();
    let settled = here.iter().filter_map(|(n, a)| a.as_ref().map(|a| (n, a)));
    for (vm, attributes) in settled {
        match records.get(vm) {
            Some(r) if r.owner == *registry.me() => {}
            Some(r) => found.push(format!(
                "{vm} runs here, but the registry says {} owns it (epoch {})",
                r.owner, r.epoch
            )),
            None => match registry.claim(vm, attributes, "reconciled").await {
                Ok(r) => tracing::info!("registry: {vm} registered here (epoch {})", r.epoch),
                // Not a finding: the whole reconciliation runs again.
                Err(e @ RegistryError::Unreachable(_)) => return Err(e),
                Err(e) => found.push(format!("{vm} runs here and could not be registered: {e}")),
            },
        }
    }
    for r in &contents.vms {
        if r.owner == *registry.me() && !here.contains_key(&r.vm) {
            found.push(format!(
                "the registry says {} runs here (epoch {}), but it is not here",
                r.vm, r.epoch
            ));
        }
    }
    for b in &contents.bad {
        found.push(format!("a bad record in the registry: {b}"));
    }
    for f in &found {
        tracing::warn!("registry disagreement: {f}");
    }
    registry.set_disagreements(found.clone());
    Ok(found)
}

/// What a source declares in its proposal: [`Capabilities::REGISTRY`]
/// when it commits through a registry.
///
/// [`Capabilities::REGISTRY`]: convoy_protocol::message::Capabilities::REGISTRY
pub(crate) fn declared(host: &Host) -> convoy_protocol::message::Capabilities {
    if host.config.registry.is_some() {
        convoy_protocol::message::Capabilities::REGISTRY
    } else {
        convoy_protocol::message::Capabilities::default()
    }
}

/// At staging: the registry must say that `source` owns `vm`; what was
/// read is what the commit compares against. A source that commits
/// through a registry (`source_has_registry`, its proposal says so) is
/// refused by a destination without one.
pub(crate) async fn stage(
    host: &Host,
    vm: &VmName,
    source: &SpiffeId,
    source_has_registry: bool,
) -> Result<Option<Expected>, String> {
    let registry = match host.registry() {
        Ok(None) if source_has_registry => {
            return Err(
                "the source commits through a fleet registry and this agent has none \
                 (start it with --registry)"
                    .into(),
            )
        }
        Ok(None) => return Ok(None),
        Ok(Some(r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    registry
        .expect_owner(vm, source)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The commit point, at the destination: `Ok` once the registry names
/// this agent as the owner (the VM may run here), else why not — and
/// then it must not run here.
pub(crate) async fn commit(
    host: &Host,
    expected: Option<&Expected>,
    migration: MigrationId,
) -> Result<(), String> {
    let registry = match host.registry() {
        Ok(None) => return Ok(()),
        Ok(Some(r)) => r,
        Err(e) => return Err(format!("not committed: {e}")),
    };
    let Some(expected) = expected else {
        return Err("not committed: the registry was not read at staging".into());
    };
    match registry.commit(expected, migration).await {
        Commit::Committed(r) => {
            tracing::info!(
                %migration,
                "registry: {} is ours at epoch {}",
                r.vm,
                r.epoch
            );
            Ok(())
        }
        Commit::Lost(now) => Err(match now {
            Some(r) => format!(
                "not committed: the registry's record changed (now {} at epoch {})",
                r.owner, r.epoch
            ),
            None => "not committed: the registry's record is gone".into(),
        }),
        Commit::Unknown(e) => Err(format!("not committed: the registry did not answer ({e})")),
    }
}

/// Before a source resumes `vm` after a handover that did not commit:
/// the registry must still name this agent (or name `given_back_by`, the
/// destination that gave it back, by this migration's own commit), and is
/// rewritten to this agent (epoch + 1), fencing any commit still on its
/// way. `Err`: the VM stays paused.
pub(crate) async fn reclaim(
    host: &Host,
    vm: &VmName,
    migration: MigrationId,
    given_back_by: Option<&SpiffeId>,
) -> Result<(), String> {
    let registry = match host.registry() {
        Ok(None) => return Ok(()),
        Ok(Some(r)) => r,
        Err(e) => return Err(format!("the registry cannot confirm it: {e}")),
    };
    match registry.reclaim(vm, migration, given_back_by).await {
        Ok(r) => {
            tracing::info!(%migration, "registry: {vm} reclaimed here at epoch {}", r.epoch);
            Ok(())
        }
        Err(e) => Err(format!("the registry cannot confirm it: {e}")),
    }
}

/// How a source's resume is squared with the registry (with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TakeBack {
    /// Never committed: the destination cannot have committed either (it
    /// commits only after the handover, which follows the source's).
    NotNeeded,
    /// The record must still name this agent (an operator's force does
    /// not override a destination's commit).
    OwnOnly,
    /// The destination gave the VM back (signed): a record its commit of
    /// this migration wrote is taken back too.
    GivenBack,
}

/// Before a source resumes the VM of its journal record `r`, as `take`
/// says. `Err`: it stays paused.
pub(crate) async fn take_back(
    host: &Host,
    r: &convoy_protocol::journal::JournalRecord,
    take: TakeBack,
) -> Result<(), String> {
    let back = match take {
        TakeBack::NotNeeded => return Ok(()),
        TakeBack::OwnOnly => None,
        TakeBack::GivenBack => Some(&r.peer),
    };
    reclaim(host, &r.vm, r.migration, back).await
}

/// A committed source whose destination does not answer: `Ok` (why) when
/// the registry still names this agent — the destination never passed its
/// commit point, which comes before the VM runs there, so the VM may
/// resume here (after [`take_back`], whose write makes any commit still on
/// its way fail); `Err` (why not) when it names another agent (it
/// committed) or cannot say.
pub(crate) async fn unanswered(host: &Host, vm: &VmName) -> Result<String, String> {
    let registry = match host.registry() {
        Ok(Some(r)) => r,
        Ok(None) => return Err("no registry".into()),
        Err(e) => return Err(e.to_string()),
    };
    match registry.owner(vm).await {
        Ok(Some((rec, _))) if rec.owner == host.id => {
            Ok("the registry still names this agent: the destination never committed".into())
        }
        Ok(Some((rec, _))) => Err(format!(
            "the registry names {} (epoch {}, {}): it committed, so the VM does not resume here",
            rec.owner, rec.epoch, rec.cause
        )),
        Ok(None) => Err("the VM is not in the registry".into()),
        Err(e) => Err(format!("none from the registry either: {e}")),
    }
}
