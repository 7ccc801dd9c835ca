//! Access-control policies: Cedar ([`cedar_policy`]) policies over operators,
//! agents, VMs and hosts, validated against Convoy's schema
//! (`agent/policy/convoy.cedarschema`) when they are loaded.
//!
//! A [`PolicySet`] is the policies plus an **inventory**: a JSON file that
//! says which tenants and groups each operator belongs to, and each host's
//! zone and security level:
//!
//! ```json
//! {
//!   "operators": { "spiffe://d/operator/alice": { "tenants": ["acme"], "groups": ["admins"] } },
//!   "agents":    { "spiffe://d/agent/a": { "zone": "lab-a", "security_level": 2, "groups": [] } }
//! }
//! ```
//!
//! Rules, stricter than Cedar's own:
//!
//! * **Default deny**: no policy, no permit → deny. An agent started without
//!   a policy denies every action a policy governs.
//! * **Any evaluation error is a deny.** Cedar skips a policy whose
//!   evaluation errors, so a `forbid` that errors would let a request
//!   through; here the whole request is denied and the error is reported.
//! * A request that cannot even be built — an operator or host unknown to
//!   the inventory, attributes that do not fit the schema — is a deny that
//!   says why.
//! * A policy file that does not parse or validate is refused whole: at
//!   start the agent does not start, at reload the old policy stays (see
//!   [`crate::host`]).
//!
//! Operators not in the inventory are still principals, with no tenant and
//! no group (authenticated, but entitled to nothing the policies grant by
//! membership). Hosts must be in the inventory: their zone and level are
//! facts policies rely on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, PolicyId, Request,
    Schema, ValidationMode, Validator,
};
use convoy_protocol::names::{Role, SpiffeId, VmName};
use convoy_protocol::ticket::Ticket;
use convoy_protocol::vm::VmAttributes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

/// The schema policies are validated against.
pub const SCHEMA: &str = include_str!("../../policy/convoy.cedarschema");

/// The example policies shipped in `agent/policy/examples/`, as
/// `(file name, text)`: tenants own their VMs, no security downgrade,
/// migrate-in only from named zones, pinned VMs stay.
pub const EXAMPLES: [(&str, &str); 3] = [
    (
        "tenants.cedar",
        include_str!("../../policy/examples/tenants.cedar"),
    ),
    (
        "security-levels.cedar",
        include_str!("../../policy/examples/security-levels.cedar"),
    ),
    (
        "zones.cedar",
        include_str!("../../policy/examples/zones.cedar"),
    ),
];

/// Largest policy or inventory file read (1 MiB).
const MAX_FILE: u64 = 1 << 20;

/// Why a policy could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file could not be read.
    #[error("{path}: {detail}")]
    Io {
        /// Path.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Cedar syntax.
    #[error("{path}: policy does not parse: {detail}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cedar's diagnostics.
        detail: String,
    },
    /// A policy does not fit the schema.
    #[error("{path}: policy does not validate against the Convoy schema: {detail}")]
    Invalid {
        /// Path.
        path: PathBuf,
        /// Cedar's diagnostics.
        detail: String,
    },
    /// The inventory is malformed.
    #[error("{path}: bad inventory: {detail}")]
    Inventory {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The built-in schema is broken (a bug).
    #[error("built-in schema: {0}")]
    Schema(String),
}

/// Which files a policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFiles {
    /// A `.cedar` file, or a directory whose `*.cedar` files are read in
    /// name order.
    pub policies: PathBuf,
    /// The inventory (JSON).
    pub inventory: PathBuf,
}

impl PolicyFiles {
    /// Every file the policy depends on (for change detection).
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v = policy_paths(&self.policies).unwrap_or_else(|_| vec![self.policies.clone()]);
        v.push(self.inventory.clone());
        v
    }

    /// Size and modification time of every file, to notice edits.
    pub fn stamp(&self) -> Vec<(PathBuf, Option<FileStamp>)> {
        self.paths()
            .into_iter()
            .map(|p| {
                let s = FileStamp::of(&p);
                (p, s)
            })
            .collect()
    }
}

/// What tells a file changed: its size and modification time. The size
/// matters: a file truncated and rewritten within one clock tick keeps its
/// time, and a reload that read it half-written must see it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `p`, `None` when it does not exist.
    pub fn of(p: &Path) -> Option<Self> {
        let m = std::fs::metadata(p).ok()?;
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

fn policy_paths(p: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io = |e: std::io::Error| PolicyError::Io {
        path: p.to_owned(),
        detail: e.to_string(),
    };
    if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![p.to_owned()])
    }
}

fn read_bounded(path: &Path) -> Result<String, PolicyError> {
    let err = |detail: String| PolicyError::Io {
        path: path.to_owned(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE {
        return Err(err(format!(
            "{} bytes, larger than the {MAX_FILE}-byte limit",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

/// One operator in the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorFacts {
    /// Tenants whose VMs the operator acts for.
    #[serde(default)]
    pub tenants: BTreeSet<String>,
    /// Groups (for example `admins`).
    #[serde(default)]
    pub groups: BTreeSet<String>,
}

/// One host in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// Zone (data centre, region, network).
    pub zone: String,
    /// Security level, compared with VMs' levels.
    pub security_level: u8,
    /// Groups.
    #[serde(default)]
    pub groups: BTreeSet<String>,
}

/// Who is who: operators' tenants and groups, hosts' zones and levels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// By SPIFFE ID.
    #[serde(default)]
    pub operators: BTreeMap<SpiffeId, OperatorFacts>,
    /// By SPIFFE ID.
    #[serde(default)]
    pub agents: BTreeMap<SpiffeId, HostFacts>,
}

impl Inventory {
    /// Parses and checks an inventory: roles match their section.
    pub fn parse(text: &str) -> Result<Self, String> {
        let inv: Inventory = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for id in inv.operators.keys() {
            if id.role() != Role::Operator {
                return Err(format!("{id} is listed under operators"));
            }
        }
        for id in inv.agents.keys() {
            if id.role() != Role::Agent {
                return Err(format!("{id} is listed under agents"));
            }
        }
        Ok(inv)
    }
}

/// The actions policies govern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Source side of a migration.
    MigrateOut,
    /// Destination side of a migration.
    MigrateIn,
    /// Creating a VM.
    CreateVm,
    /// Deleting a VM (and wiping its memory).
    DeleteVm,
    /// Pausing or resuming a VM.
    PauseVm,
    /// Aborting a migration.
    Abort,
    /// Reading an agent's audit log.
    ReadAudit,
}

impl Action {
    /// The Cedar action name.
    pub fn name(self) -> &'static str {
        match self {
            Action::MigrateOut => "MigrateOut",
            Action::MigrateIn => "MigrateIn",
            Action::CreateVm => "CreateVm",
            Action::DeleteVm => "DeleteVm",
            Action::PauseVm => "PauseVm",
            Action::Abort => "Abort",
            Action::ReadAudit => "ReadAudit",
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "MigrateOut" => Action::MigrateOut,
            "MigrateIn" => Action::MigrateIn,
            "CreateVm" => Action::CreateVm,
            "DeleteVm" => Action::DeleteVm,
            "PauseVm" => Action::PauseVm,
            "Abort" => Action::Abort,
            "ReadAudit" => Action::ReadAudit,
            other => {
                return Err(format!(
                    "unknown action {other:?} (MigrateOut, MigrateIn, CreateVm, DeleteVm, PauseVm, Abort, ReadAudit)"
                ))
            }
        })
    }
}

/// A VM as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts<'a> {
    /// Name.
    pub name: &'a VmName,
    /// Tenant, level, labels.
    pub attributes: &'a VmAttributes,
}

/// One question for the policy.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Query<'a> {
    /// At the source.
    MigrateOut {
        /// The operator who signed the ticket (and asked).
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        source: &'a SpiffeId,
        /// Where the VM would go.
        destination: &'a SpiffeId,
        /// The verified ticket.
        ticket: &'a Ticket,
    },
    /// At the destination.
    MigrateIn {
        /// The operator who signed the ticket.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// The proposing agent.
        source: &'a SpiffeId,
        /// This agent.
        destination: &'a SpiffeId,
        /// The verified ticket.
        ticket: &'a Ticket,
    },
    /// Creating a VM on `host`.
    CreateVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM to create.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Deleting a VM on `host`.
    DeleteVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Pausing or resuming a VM on `host`.
    PauseVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Aborting the migration of a VM on `host`.
    Abort {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Reading `host`'s audit log.
    ReadAudit {
        /// Who asks.
        operator: &'a SpiffeId,
        /// This agent.
        host: &'a SpiffeId,
    },
}

impl Query<'_> {
    /// The action asked about.
    pub fn action(&self) -> Action {
        match self {
            Query::MigrateOut { .. } => Action::MigrateOut,
            Query::MigrateIn { .. } => Action::MigrateIn,
            Query::CreateVm { .. } => Action::CreateVm,
            Query::DeleteVm { .. } => Action::DeleteVm,
            Query::PauseVm { .. } => Action::PauseVm,
            Query::Abort { .. } => Action::Abort,
            Query::ReadAudit { .. } => Action::ReadAudit,
        }
    }

    /// The operator behind the request (asking, or whose ticket it is).
    pub fn operator(&self) -> &SpiffeId {
        match self {
            Query::MigrateIn { operator, .. }
            | Query::MigrateOut { operator, .. }
            | Query::CreateVm { operator, .. }
            | Query::DeleteVm { operator, .. }
            | Query::PauseVm { operator, .. }
            | Query::Abort { operator, .. }
            | Query::ReadAudit { operator, .. } => operator,
        }
    }

    /// The principal, as text.
    pub fn principal(&self) -> String {
        match self {
            Query::MigrateIn { source, .. } => source.to_string(),
            _ => self.operator().to_string(),
        }
    }

    /// The resource, as text.
    pub fn resource(&self) -> String {
        match self {
            Query::MigrateOut { vm, .. }
            | Query::MigrateIn { vm, .. }
            | Query::CreateVm { vm, .. }
            | Query::DeleteVm { vm, .. }
            | Query::PauseVm { vm, .. }
            | Query::Abort { vm, .. } => format!("vm {}", vm.name),
            Query::ReadAudit { host, .. } => host.to_string(),
        }
    }
}

/// What the policy said, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Allowed?
    pub permitted: bool,
    /// The policies that decided (by `@id`, else Cedar's id): the permits
    /// that allowed, or the forbids that denied; empty for a default deny.
    pub policies: Vec<String>,
    /// The `@reason` annotations of those policies, when present.
    pub reasons: Vec<String>,
    /// Evaluation errors (any of which denies), and why a request could not
    /// be built.
    pub errors: Vec<String>,
}

impl Decision {
    /// The deny of an agent that has no policy.
    pub fn no_policy() -> Self {
        Decision::deny_because(
            "no policy loaded: everything is denied (start the agent with --policy and --inventory)"
                .into(),
        )
    }

    fn deny_because(error: String) -> Self {
        Decision {
            permitted: false,
            policies: vec![],
            reasons: vec![],
            errors: vec![error],
        }
    }

    /// One line: `permitted by [a]`, `denied by [b] (reason)`, `denied: no
    /// policy permits`, `denied: evaluation error: …`.
    pub fn explain(&self) -> String {
        let reasons = if self.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reasons.join("; "))
        };
        if !self.errors.is_empty() {
            return format!("denied: {}", self.errors.join("; "));
        }
        match (self.permitted, self.policies.is_empty()) {
            (true, _) => format!("permitted by [{}]{reasons}", self.policies.join(", ")),
            (false, true) => "denied: no policy permits it (default deny)".into(),
            (false, false) => format!("denied by [{}]{reasons}", self.policies.join(", ")),
        }
    }
}

/// Loaded, validated policies with their inventory.
#[derive(Debug)]
pub struct PolicySet {
    schema: Schema,
    policies: cedar_policy::PolicySet,
    inventory: Inventory,
    /// Entities for every inventory operator, agent and group.
    base: Vec<Entity>,
    digest: String,
    count: usize,
    /// Each policy's text, by the name decisions report.
    texts: BTreeMap<String, String>,
    /// Cedar's policy id → that name.
    names: BTreeMap<String, String>,
}

fn uid(ty: &str, id: &str) -> serde_json::Value {
    json!({ "type": format!("Convoy::{ty}"), "id": id })
}

fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| PolicyError::Schema(format!("{e:?}")))
}

/// Cedar's diagnostics as one line per problem.
fn report(e: &dyn miette_like::Diagnose) -> String {
    e.describe()
}

mod miette_like {
    /// Formats Cedar errors with their help text.
    pub trait Diagnose {
        fn describe(&self) -> String;
    }
    impl<T: std::fmt::Display + miette::Diagnostic> Diagnose for T {
        fn describe(&self) -> String {
            let mut s = self.to_string();
            if let Some(related) = self.related() {
                for r in related {
                    s.push_str("; ");
                    s.push_str(&r.to_string());
                    if let Some(h) = r.help() {
                        s.push_str(&format!(" (help: {h})"));
                    }
                }
            }
            if let Some(h) = self.help() {
                s.push_str(&format!(" (help: {h})"));
            }
            s
        }
    }
}

impl PolicySet {
    /// Reads, parses and validates the policy files and the inventory.
    pub fn load(files: &PolicyFiles) -> Result<Self, PolicyError> {
        let mut sources = Vec::new();
        for p in policy_paths(&files.policies)? {
            sources.push((p.clone(), read_bounded(&p)?));
        }
        if sources.is_empty() {
            return Err(PolicyError::Io {
                path: files.policies.clone(),
                detail: "no .cedar file there".into(),
            });
        }
        let inventory = read_bounded(&files.inventory)?;
        Self::from_sources(&sources, &inventory).map_err(|e| match e {
            PolicyError::Inventory { detail, .. } => PolicyError::Inventory {
                path: files.inventory.clone(),
                detail,
            },
            other => other,
        })
    }

    /// Parses and validates policies given as `(file name, text)` and an
    /// inventory text.
    pub fn from_sources(
        sources: &[(PathBuf, String)],
        inventory: &str,
    ) -> Result<Self, PolicyError> {
        let schema = schema()?;
        let mut policies = cedar_policy::PolicySet::new();
        let mut texts = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut hasher = blake3::Hasher::new();
        for (n, (path, text)) in sources.iter().enumerate() {
            // Length-prefixed (name, text): no two file sets share a digest.
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            for part in [name.as_bytes(), text.as_bytes()] {
                hasher.update(&(part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
            let set = cedar_policy::PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
                path: path.clone(),
                detail: report(&e),
            })?;
            for p in set.policies() {
                let id = PolicyId::new(format!("{n}:{}", p.id()));
                let name = p
                    .annotation("id")
                    .map_or_else(|| format!("{}:{}", path.display(), p.id()), str::to_owned);
                names.insert(id.to_string(), name.clone());
                if texts.insert(name.clone(), p.to_string()).is_some() {
                    return Err(PolicyError::Parse {
                        path: path.clone(),
                        detail: format!("two policies are named @id(\"{name}\")"),
                    });
                }
                policies.add(p.new_id(id)).map_err(|e| PolicyError::Parse {
                    path: path.clone(),
                    detail: report(&e),
                })?;
            }
            if set.templates().next().is_some() {
                return Err(PolicyError::Parse {
                    path: path.clone(),
                    detail: "templates are not supported".into(),
                });
            }
            let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
            if !result.validation_passed() {
                let detail: Vec<String> = result.validation_errors().map(|e| report(e)).collect();
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    detail: detail.join("; "),
                });
            }
        }
        hasher.update(&(inventory.len() as u64).to_be_bytes());
        hasher.update(inventory.as_bytes());
        let inv_err = |detail: String| PolicyError::Inventory {
            path: PathBuf::from("inventory"),
            detail,
        };
        let inventory = Inventory::parse(inventory).map_err(inv_err)?;
        let base = base_entities(&inventory, &schema).map_err(inv_err)?;
        let count = policies.policies().count();
        Ok(PolicySet {
            schema,
            policies,
            inventory,
            base,
            digest: hasher.finalize().to_hex().to_string(),
            count,
            texts,
            names,
        })
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there is no policy (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// A short digest of the files, to tell versions apart in logs.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Every policy's name (`@id`, else `file:policyN`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.texts.keys().map(String::as_str)
    }

    /// The text of the policy a decision names.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.texts.get(name).map(String::as_str)
    }

    /// The inventory.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Decides `q`. Never fails: whatever goes wrong is a deny that says so.
    pub fn decide(&self, q: &Query<'_>) -> Decision {
        match self.request(q) {
            Ok((request, entities)) => self.evaluate(&request, &entities),
            Err(e) => Decision::deny_because(e),
        }
    }

    fn host(&self, id: &SpiffeId) -> Result<serde_json::Value, String> {
        let h = self
            .inventory
            .agents
            .get(id)
            .ok_or_else(|| format!("host {id} is not in the policy inventory"))?;
        Ok(json!({
            "id": id.to_string(),
            "name": id.name().as_str(),
            "zone": h.zone,
            "security_level": h.security_level,
            "trust_domain": id.domain().to_string(),
        }))
    }

    /// The context of both migration actions.
    fn move_context(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        ticket: &Ticket,
    ) -> Result<serde_json::Value, String> {
        Ok(json!({
            "source": self.host(source)?,
            "destination": self.host(destination)?,
            "ticket": Self::ticket(ticket),
        }))
    }

    fn ticket(t: &Ticket) -> serde_json::Value {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        json!({
            "id": t.id.to_string(),
            "issued_at": clamp(t.issued_at),
            "expires_at": clamp(t.expires_at),
            "streams": t.plan.streams,
            "max_downtime_ms": t.plan.max_downtime_ms,
            "max_rounds": t.plan.max_rounds,
            "mode": t.plan.mode.to_string(),
            "copy_storage": t.plan.copy_storage,
            "storage_postcopy": t.plan.storage_postcopy,
            "start_paused": t.plan.start_paused,
            "force_stop": t.plan.force_stop,
        })
    }

    fn vm_entity(&self, vm: &VmFacts<'_>) -> Result<Entity, String> {
        vm.attributes.validate().map_err(|e| e.to_string())?;
        let v = json!({
            "uid": uid("Vm", vm.name.as_str()),
            "attrs": {
                "name": vm.name.as_str(),
                "tenant": vm.attributes.tenant,
                "security_level": vm.attributes.security_level,
            },
            "parents": [],
            "tags": vm.attributes.labels,
        });
        Entity::from_json_value(v, Some(&self.schema)).map_err(|e| report(&e))
    }

    fn request(&self, q: &Query<'_>) -> Result<(Request, Entities), String> {
        let mut extra = Vec::new();
        let (principal, resource, context) = match *q {
            Query::MigrateOut {
                operator,
                vm,
                source,
                destination,
                ticket,
            } => {
                extra.push(self.vm_entity(&vm)?);
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    self.move_context(source, destination, ticket)?,
                )
            }
            Query::MigrateIn {
                operator,
                vm,
                source,
                destination,
                ticket,
            } => {
                extra.push(self.vm_entity(&vm)?);
                let mut context = self.move_context(source, destination, ticket)?;
                context["operator"] = json!({ "__entity": uid("Operator", &operator.to_string()) });
                (
                    uid("Agent", &source.to_string()),
                    uid("Vm", vm.name.as_str()),
                    context,
                )
            }
            Query::CreateVm { operator, vm, host }
            | Query::DeleteVm { operator, vm, host }
            | Query::PauseVm { operator, vm, host }
            | Query::Abort { operator, vm, host } => {
                extra.push(self.vm_entity(&vm)?);
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    json!({ "host": self.host(host)? }),
                )
            }
            Query::ReadAudit { operator, host } => (
                uid("Operator", &operator.to_string()),
                uid("Agent", &host.to_string()),
                json!({ "host": self.host(host)? }),
            ),
        };
        // Operators unknown to the inventory are principals with nothing.
        let op = q.operator();
        if op.role() != Role::Operator {
            return Err(format!("{op} is not an operator"));
        }
        if !self.inventory.operators.contains_key(op) {
            extra.push(operator_entity(
                op,
                &OperatorFacts::default(),
                &self.schema,
            )?);
        }
        if let Query::MigrateIn { source, .. } = q {
            if !self.inventory.agents.contains_key(source) {
                return Err(format!("host {source} is not in the policy inventory"));
            }
        }
        let uid_of = |v: serde_json::Value| -> Result<EntityUid, String> {
            EntityUid::from_json(v).map_err(|e| report(&e))
        };
        let action: EntityUid = uid_of(json!({
            "type": "Convoy::Action",
            "id": q.action().name(),
        }))?;
        let context = Context::from_json_value(context, Some((&self.schema, &action)))
            .map_err(|e| report(&e))?;
        let request = Request::new(
            uid_of(principal)?,
            action,
            uid_of(resource)?,
            context,
            Some(&self.schema),
        )
        .map_err(|e| report(&e))?;
        let entities =
            Entities::from_entities(self.base.iter().cloned().chain(extra), Some(&self.schema))
                .map_err(|e| report(&e))?;
        Ok((request, entities))
    }

    fn evaluate(&self, request: &Request, entities: &Entities) -> Decision {
        let response = Authorizer::new().is_authorized(request, &self.policies, entities);
        let name = |id: &PolicyId| {
            self.names
                .get(&id.to_string())
                .cloned()
                .unwrap_or_else(|| id.to_string())
        };
        let mut policies: Vec<String> = response.diagnostics().reason().map(name).collect();
        policies.sort();
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.policies.annotation(id, "reason").map(str::to_owned))
            .collect();
        reasons.sort();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                    format!(
                        "policy [{}] failed to evaluate: {}",
                        name(pe.policy_id()),
                        report(pe.inner())
                    )
                }
            })
            .collect();
        Decision {
            // Any error denies, even when a permit matched and no forbid did:
            // an erroring forbid might have been the one to deny.
            permitted: response.decision() == CedarDecision::Allow && errors.is_empty(),
            policies,
            reasons,
            errors,
        }
    }
}

fn operator_entity(id: &SpiffeId, f: &OperatorFacts, schema: &Schema) -> Result<Entity, String> {
    let v = json!({
        "uid": uid("Operator", &id.to_string()),
        "attrs": {
            "name": id.name().as_str(),
            "trust_domain": id.domain().to_string(),
            "tenants": f.tenants,
        },
        "parents": f.groups.iter().map(|g| uid("Group", g)).collect::<Vec<_>>(),
    });
    Entity::from_json_value(v, Some(schema)).map_err(|e| format!("operator {id}: {}", report(&e)))
}

fn base_entities(inv: &Inventory, schema: &Schema) -> Result<Vec<Entity>, String> {
    let mut out = Vec::new();
    let mut groups = BTreeSet::new();
    for (id, f) in &inv.operators {
        out.push(operator_entity(id, f, schema)?);
        groups.extend(f.groups.iter().cloned());
    }
    for (id, h) in &inv.agents {
        let v = json!({
            "uid": uid("Agent", &id.to_string()),
            "attrs": {
                "name": id.name().as_str(),
                "zone": h.zone,
                "security_level": h.security_level,
                "trust_domain": id.domain().to_string(),
            },
            "parents": h.groups.iter().map(|g| uid("Group", g)).collect::<Vec<_>>(),
        });
        out.push(
            Entity::from_json_value(v, Some(schema))
                .map_err(|e| format!("agent {id}: {}", report(&e)))?,
        );
        groups.extend(h.groups.iter().cloned());
    }
    for g in groups {
        out.push(
            Entity::from_json_value(
                json!({ "uid": uid("Group", &g), "attrs": {}, "parents": [] }),
                Some(schema),
            )
            .map_err(|e| format!("group {g}: {}", report(&e)))?,
        );
    }
    // Duplicates and type errors surface here rather than at a request.
    Entities::from_entities(out.iter().cloned(), Some(schema)).map_err(|e| report(&e))?;
    Ok(out)
}

/// Paths as a lab or a test writes them: `dir/policies/` and
/// `dir/inventory.json`.
pub fn files_in(dir: &Path) -> PolicyFiles {
    PolicyFiles {
        policies: dir.join("policies"),
        inventory: dir.join("inventory.json"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_protocol::names::MigrationId;

    const INVENTORY: &str = include_str!("../../policy/examples/inventory.json");

    fn id(s: &str) -> SpiffeId {
        format!("spiffe://convoy.example/{s}").parse().unwrap()
    }

    fn set(extra: &[&str]) -> PolicySet {
        let mut sources: Vec<(PathBuf, String)> = EXAMPLES
            .iter()
            .map(|(n, t)| (PathBuf::from(n), (*t).to_owned()))
            .collect();
        for (i, e) in extra.iter().enumerate() {
            sources.push((PathBuf::from(format!("extra{i}.cedar")), (*e).to_owned()));
        }
        PolicySet::from_sources(&sources, INVENTORY).unwrap()
    }

    fn ticket() -> Ticket {
        Ticket {
            id: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            source: id("agent/a"),
            destination: id("agent/b"),
            plan: Default::default(),
            issued_at: 1000,
            expires_at: 2000,
            nonce: [0; 16],
        }
    }

    fn attrs(tenant: &str, level: u8) -> VmAttributes {
        VmAttributes {
            tenant: tenant.into(),
            security_level: level,
            labels: BTreeMap::new(),
        }
    }

    fn out(p: &PolicySet, op: &str, a: &VmAttributes, to: &str) -> Decision {
        let vm: VmName = "vm".parse().unwrap();
        let t = ticket();
        p.decide(&Query::MigrateOut {
            operator: &id(op),
            vm: VmFacts {
                name: &vm,
                attributes: a,
            },
            source: &id("agent/a"),
            destination: &id(to),
            ticket: &t,
        })
    }

    fn into(p: &PolicySet, op: &str, a: &VmAttributes, from: &str, to: &str) -> Decision {
        let vm: VmName = "vm".parse().unwrap();
        let t = ticket();
        p.decide(&Query::MigrateIn {
            operator: &id(op),
            vm: VmFacts {
                name: &vm,
                attributes: a,
            },
            source: &id(from),
            destination: &id(to),
            ticket: &t,
        })
    }

    #[test]
    fn tenants_move_only_their_own_vms() {
        let p = set(&[]);
        let d = out(&p, "operator/alice", &attrs("acme", 1), "agent/b");
        assert!(d.permitted, "{}", d.explain());
        assert_eq!(d.policies, ["tenant-owns-vm"]);
        let d = out(&p, "operator/alice", &attrs("globex", 1), "agent/b");
        assert!(!d.permitted);
        assert!(d.explain().contains("default deny"), "{}", d.explain());
        // Admins may move anything (that no forbid stops).
        let d = out(&p, "operator/root", &attrs("globex", 1), "agent/b");
        assert!(d.permitted, "{}", d.explain());
        // An operator the inventory does not know holds no tenant.
        let d = out(&p, "operator/mallory", &attrs("acme", 1), "agent/b");
        assert!(!d.permitted);
    }

    #[test]
    fn forbid_overrides_permit_and_names_itself() {
        let p = set(&[]);
        // Host c has level 1: a level-2 VM may not go there, even for root.
        let d = out(&p, "operator/root", &attrs("acme", 2), "agent/c");
        assert!(!d.permitted);
        assert_eq!(d.policies, ["no-downgrade"]);
        assert!(
            d.explain().contains("security level is below"),
            "{}",
            d.explain()
        );
        // Pinned VMs stay.
        let mut a = attrs("acme", 1);
        a.labels.insert("pinned".into(), "true".into());
        let d = out(&p, "operator/alice", &a, "agent/b");
        assert_eq!(d.policies, ["pinned-vms-stay"]);
    }

    #[test]
    fn migrate_in_checks_zone_tenant_and_level() {
        let p = set(&[]);
        let d = into(
            &p,
            "operator/alice",
            &attrs("acme", 2),
            "agent/a",
            "agent/b",
        );
        assert!(d.permitted, "{}", d.explain());
        // From the dmz zone: refused.
        let d = into(
            &p,
            "operator/alice",
            &attrs("acme", 1),
            "agent/c",
            "agent/b",
        );
        assert_eq!(d.policies, ["only-from-named-zones"]);
        // Operator of another tenant.
        let d = into(
            &p,
            "operator/alice",
            &attrs("globex", 1),
            "agent/a",
            "agent/b",
        );
        assert!(!d.permitted);
        // A source host the inventory does not know.
        let d = into(
            &p,
            "operator/alice",
            &attrs("acme", 1),
            "agent/x",
            "agent/b",
        );
        assert!(
            d.explain().contains("not in the policy inventory"),
            "{}",
            d.explain()
        );
    }

    #[test]
    fn an_erroring_forbid_denies() {
        // Overflows at evaluation (valid against the schema): Cedar skips
        // it, so its permit-only result would be Allow.
        let p = set(&[r#"@id("overflowing-forbid")
            forbid (principal, action == Convoy::Action::"MigrateOut", resource is Convoy::Vm)
            when { context.ticket.expires_at * 9223372036854775807 > 0 };"#]);
        let d = out(&p, "operator/alice", &attrs("acme", 1), "agent/b");
        assert!(!d.permitted);
        // Cedar alone allowed it: the permit matched.
        assert_eq!(d.policies, ["tenant-owns-vm"]);
        assert!(
            d.explain()
                .contains("[overflowing-forbid] failed to evaluate"),
            "{}",
            d.explain()
        );
    }

    #[test]
    fn bad_policies_and_inventories_are_refused_with_the_file_named() {
        let src = |t: &str| vec![(PathBuf::from("bad.cedar"), t.to_owned())];
        let e = PolicySet::from_sources(&src("permit (principal, action, resource"), INVENTORY)
            .unwrap_err();
        assert!(matches!(e, PolicyError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("bad.cedar"), "{e}");
        // Parses, but an attribute the schema does not have.
        let e = PolicySet::from_sources(
            &src("permit (principal, action, resource is Convoy::Vm) when { resource.owner == \"x\" };"),
            INVENTORY,
        )
        .unwrap_err();
        assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
        // Unknown action.
        let e = PolicySet::from_sources(
            &src("permit (principal, action == Convoy::Action::\"Teleport\", resource);"),
            INVENTORY,
        )
        .unwrap_err();
        assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
        let good = src("permit (principal, action, resource);");
        for inv in [
            "{",
            r#"{"operators": {"spiffe://d/agent/a": {}}}"#,
            r#"{"agents": {"spiffe://d/agent/a": {"zone": "z"}}}"#,
            r#"{"agents": {"spiffe://d/agent/a": {"zone": "z", "security_level": 1, "colour": 1}}}"#,
            r#"{"hosts": {}}"#,
        ] {
            let e = PolicySet::from_sources(&good, inv).unwrap_err();
            assert!(matches!(e, PolicyError::Inventory { .. }), "{inv}: {e}");
        }
    }

    #[test]
    fn unchecked_tag_access_is_refused_at_load() {
        let e = PolicySet::from_sources(
            &[(
                PathBuf::from("tags.cedar"),
                "permit (principal, action, resource is Convoy::Vm) when { resource.getTag(\"env\") == \"prod\" };".into(),
            )],
            INVENTORY,
        )
        .unwrap_err();
        assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
    }

    #[test]
    fn no_policy_denies_everything() {
        let p =
            PolicySet::from_sources(&[(PathBuf::from("empty.cedar"), String::new())], INVENTORY)
                .unwrap();
        assert!(p.is_empty());
        let d = out(&p, "operator/root", &attrs("acme", 1), "agent/b");
        assert!(!d.permitted);
    }
}
