//! The fleet registry as an operator sees it (`convoyctl fleet ls`,
//! `convoyctl where`): asked of any agent with a registry, answered from
//! the registry, each VM shown only if the operator's policy lets them see
//! it (`ViewVm`).

use serde::{Deserialize, Serialize};

use crate::names::{AgentName, SpiffeId, VmName};

/// Which VMs to show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetQuery {
    /// Only the VMs owned by this agent.
    pub host: Option<AgentName>,
    /// Only this tenant's VMs.
    pub tenant: Option<String>,
    /// Only this VM (`where`).
    pub vm: Option<VmName>,
}

/// One VM in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetVm {
    /// The VM.
    pub vm: VmName,
    /// The agent that owns it.
    pub owner: SpiffeId,
    /// Whether that agent's liveness record is there (its lease alive).
    pub owner_alive: bool,
    /// The ownership epoch.
    pub epoch: u64,
    /// Its tenant.
    pub tenant: String,
    /// Its security level.
    pub security_level: u8,
    /// Why the record last changed.
    pub cause: String,
    /// When, seconds since the Unix epoch.
    pub since_unix: u64,
}

/// One agent alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAgent {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Its address.
    pub addr: String,
    /// Its memory for VMs, bytes.
    pub capacity_bytes: u64,
    /// In use when it last wrote its record.
    pub used_bytes: u64,
    /// When it started, seconds since the Unix epoch.
    pub started_unix: u64,
}

/// The answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// The VMs shown, by name.
    pub vms: Vec<FleetVm>,
    /// The agents alive, by name (for an operator who may not read the
    /// agent's audit log: those that own a VM shown).
    pub agents: Vec<FleetAgent>,
    /// VMs that matched but the policy does not let this operator see.
    pub hidden: u64,
    /// What the answering agent's reconciliation found (VMs it runs that
    /// the registry gives another, records naming it for VMs it does not
    /// run, records that do not decode); only for an operator who may read
    /// the agent's audit log.
    pub disagreements: Vec<String>,
}
