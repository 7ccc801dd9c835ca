//! A [`Query`] as a Cedar request: principal, action, resource, context
//! and the entities it needs.

use cedar_policy::{Context, Entities, Entity, EntityUid, Request};
use convoy_protocol::names::{Role, SpiffeId};
use convoy_protocol::ticket::Ticket;
use serde_json::json;

use super::inventory::{operator_entity, OperatorFacts};
use super::query::{Query, VmFacts};
use super::{report, uid, PolicySet};

impl PolicySet {
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

    pub(super) fn request(&self, q: &Query<'_>) -> Result<(Request, Entities), String> {
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
}
