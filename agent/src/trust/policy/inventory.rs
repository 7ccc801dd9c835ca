//! The inventory: operators' tenants and groups, hosts' zones and levels,
//! and the Cedar entities they become.

use std::collections::{BTreeMap, BTreeSet};

use cedar_policy::entities_errors::EntitiesError;
use cedar_policy::{Entities, Entity, Schema};
use convoy_protocol::names::{Role, SpiffeId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

use super::{report, uid};

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

/// Why an inventory is refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// Not JSON of the inventory's shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// An identity under `operators` that is not an operator's.
    #[error("{0} is listed under operators")]
    NotAnOperator(SpiffeId),
    /// An identity under `agents` that is not an agent's.
    #[error("{0} is listed under agents")]
    NotAnAgent(SpiffeId),
    /// Facts that do not make an entity of the schema.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// The entities together do not fit the schema (duplicates, types).
    #[error("{}", report(&**.0))]
    Entities(#[source] Box<EntitiesError>),
}

/// Facts that do not make a Cedar entity of the schema.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EntityError {
    /// An operator.
    #[error("operator {id}: {}", report(&**.source))]
    Operator {
        /// The operator.
        id: SpiffeId,
        /// Cedar's account.
        #[source]
        source: Box<EntitiesError>,
    },
    /// A host.
    #[error("agent {id}: {}", report(&**.source))]
    Agent {
        /// The host.
        id: SpiffeId,
        /// Cedar's account.
        #[source]
        source: Box<EntitiesError>,
    },
    /// A group named in the inventory.
    #[error("group {name}: {}", report(&**.source))]
    Group {
        /// The group, as the inventory names it.
        name: String,
        /// Cedar's account.
        #[source]
        source: Box<EntitiesError>,
    },
    /// A VM (its attributes as the request gave them).
    #[error("{}", report(&**.0))]
    Vm(#[source] Box<EntitiesError>),
}

impl Inventory {
    /// Parses and checks an inventory: roles match their section.
    pub fn parse(text: &str) -> Result<Self, InventoryError> {
        let inv: Inventory = serde_json::from_str(text)?;
        for id in inv.operators.keys() {
            if id.role() != Role::Operator {
                return Err(InventoryError::NotAnOperator(id.clone()));
            }
        }
        for id in inv.agents.keys() {
            if id.role() != Role::Agent {
                return Err(InventoryError::NotAnAgent(id.clone()));
            }
        }
        Ok(inv)
    }
}

pub(super) fn operator_entity(
    id: &SpiffeId,
    f: &OperatorFacts,
    schema: &Schema,
) -> Result<Entity, EntityError> {
    let v = json!({
        "uid": uid("Operator", &id.to_string()),
        "attrs": {
            "name": id.name().as_str(),
            "trust_domain": id.domain().to_string(),
            "tenants": f.tenants,
        },
        "parents": f.groups.iter().map(|g| uid("Group", g)).collect::<Vec<_>>(),
    });
    Entity::from_json_value(v, Some(schema)).map_err(|e| EntityError::Operator {
        id: id.clone(),
        source: Box::new(e),
    })
}

pub(super) fn base_entities(
    inv: &Inventory,
    schema: &Schema,
) -> Result<Vec<Entity>, InventoryError> {
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
            Entity::from_json_value(v, Some(schema)).map_err(|e| EntityError::Agent {
                id: id.clone(),
                source: Box::new(e),
            })?,
        );
        groups.extend(h.groups.iter().cloned());
    }
    for g in groups {
        out.push(
            Entity::from_json_value(
                json!({ "uid": uid("Group", &g), "attrs": {}, "parents": [] }),
                Some(schema),
            )
            .map_err(|e| EntityError::Group {
                name: g.clone(),
                source: Box::new(e),
            })?,
        );
    }
    // Duplicates and type errors surface here rather than at a request.
    Entities::from_entities(out.iter().cloned(), Some(schema))
        .map_err(|e| InventoryError::Entities(Box::new(e)))?;
    Ok(out)
}
