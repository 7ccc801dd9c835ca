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
//!
//! # Layout
//!
//! * `files.rs`: which files a policy comes from, reading them bounded, and
//!   the stamps that tell a reload they changed.
//! * `inventory.rs`: who is who, and the Cedar entities the inventory makes.
//! * `query.rs`: the actions and the questions asked about them.
//! * `request.rs`: a question as a Cedar request.
//! * `decision.rs`: what the policy said, and why.
//! * Here: the schema, the examples, loading a [`PolicySet`] and deciding.

mod decision;
mod files;
mod inventory;
mod query;
mod request;
#[cfg(test)]
mod tests;

pub use decision::Decision;
pub use files::{files_in, FileStamp, PolicyFiles};
pub use inventory::{EntityError, HostFacts, Inventory, InventoryError, OperatorFacts};
pub use query::{Action, Query, UnknownAction, VmFacts};
pub use request::RequestError;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use cedar_policy::{Entity, PolicyId, Schema, ValidationMode, Validator};
use serde_json::json;
use thiserror::Error;

use files::{policy_paths, read_bounded};
use inventory::base_entities;

/// The schema policies are validated against.
pub const SCHEMA: &str = include_str!("../../../policy/convoy.cedarschema");

/// The example policies shipped in `agent/policy/examples/`, as
/// `(file name, text)`: tenants own their VMs, no security downgrade,
/// migrate-in only from named zones, pinned VMs stay, moves between
/// providers need three approvals.
pub const EXAMPLES: [(&str, &str); 4] = [
    (
        "tenants.cedar",
        include_str!("../../../policy/examples/tenants.cedar"),
    ),
    (
        "security-levels.cedar",
        include_str!("../../../policy/examples/security-levels.cedar"),
    ),
    (
        "zones.cedar",
        include_str!("../../../policy/examples/zones.cedar"),
    ),
    (
        "providers.cedar",
        include_str!("../../../policy/examples/providers.cedar"),
    ),
];

/// Why a policy could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file larger than policies or inventories may be.
    #[error("{}: {len} bytes, larger than the {max}-byte limit", .path.display(), max = files::MAX_FILE)]
    TooLarge {
        /// Path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A policy directory without a policy.
    #[error("{}: no .cedar file there", .path.display())]
    NoPolicyFile {
        /// The directory.
        path: PathBuf,
    },
    /// Cedar syntax.
    #[error("{}: policy does not parse: {}", .path.display(), report(&**.source))]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cedar's diagnostics.
        #[source]
        source: Box<cedar_policy::ParseErrors>,
    },
    /// A policy Cedar would not add to the set.
    #[error("{}: policy does not parse: {}", .path.display(), report(&**.source))]
    Add {
        /// Path.
        path: PathBuf,
        /// Cedar's diagnostics.
        #[source]
        source: Box<cedar_policy::PolicySetError>,
    },
    /// Two policies share an `@id`.
    #[error("{}: policy does not parse: two policies are named @id(\"{name}\")", .path.display())]
    DuplicateName {
        /// Path.
        path: PathBuf,
        /// The `@id` (the policy file's text).
        name: String,
    },
    /// A template, which Convoy does not link.
    #[error("{}: policy does not parse: templates are not supported", .path.display())]
    Template {
        /// Path.
        path: PathBuf,
    },
    /// A policy does not fit the schema.
    #[error(
        "{}: policy does not validate against the Convoy schema: {}",
        .path.display(),
        reports(.errors)
    )]
    Invalid {
        /// Path.
        path: PathBuf,
        /// Cedar's diagnostics.
        errors: Vec<cedar_policy::ValidationError>,
    },
    /// The inventory is malformed.
    #[error("{}: bad inventory: {source}", .path.display())]
    Inventory {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: InventoryError,
    },
    /// The built-in schema is broken (a bug).
    #[error("built-in schema: {0:?}")]
    Schema(#[source] Box<cedar_policy::CedarSchemaError>),
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
        .map_err(|e| PolicyError::Schema(Box::new(e)))
}

/// Cedar's diagnostics as one line per problem.
fn report(e: &dyn miette_like::Diagnose) -> String {
    e.describe()
}

/// Several of Cedar's diagnostics on one line.
fn reports(errors: &[cedar_policy::ValidationError]) -> String {
    let each: Vec<String> = errors.iter().map(|e| report(e)).collect();
    each.join("; ")
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
            return Err(PolicyError::NoPolicyFile {
                path: files.policies.clone(),
            });
        }
        let inventory = read_bounded(&files.inventory)?;
        Self::from_sources(&sources, &inventory).map_err(|e| match e {
            PolicyError::Inventory { source, .. } => PolicyError::Inventory {
                path: files.inventory.clone(),
                source,
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
                source: Box::new(e),
            })?;
            for p in set.policies() {
                let id = PolicyId::new(format!("{n}:{}", p.id()));
                let name = p
                    .annotation("id")
                    .map_or_else(|| format!("{}:{}", path.display(), p.id()), str::to_owned);
                names.insert(id.to_string(), name.clone());
                if texts.insert(name.clone(), p.to_string()).is_some() {
                    return Err(PolicyError::DuplicateName {
                        path: path.clone(),
                        name,
                    });
                }
                policies.add(p.new_id(id)).map_err(|e| PolicyError::Add {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
            }
            if set.templates().next().is_some() {
                return Err(PolicyError::Template { path: path.clone() });
            }
            let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
            if !result.validation_passed() {
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    errors: result.validation_errors().cloned().collect(),
                });
            }
        }
        hasher.update(&(inventory.len() as u64).to_be_bytes());
        hasher.update(inventory.as_bytes());
        let inv_err = |source: InventoryError| PolicyError::Inventory {
            path: PathBuf::from("inventory"),
            source,
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
            Err(e) => Decision::deny_because(e.to_string()),
        }
    }
}
