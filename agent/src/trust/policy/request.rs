//! A [`Query`] as a Cedar request: principal, action, resource, context
//! and the entities it needs.

use cedar_policy::entities_errors::EntitiesError;
use cedar_policy::entities_json_errors::JsonDeserializationError;
use cedar_policy::{
    Context, ContextJsonError, Entities, Entity, EntityUid, Request, RequestValidationError,
};
use convoy_protocol::names::{Role, SpiffeId};
use convoy_protocol::ticket::approval::ApprovalRole;
use convoy_protocol::ticket::{Ticket, VerifiedTicket};
use convoy_protocol::vm::AttributeError;
use serde_json::json;
use thiserror::Error;

use super::inventory::{operator_entity, EntityError, OperatorFacts};
use super::query::{Query, VmFacts};
use super::{report, uid, PolicySet};

/// Why a question could not be put to the policy (a deny that says why).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Hosts must be in the inventory: policies rely on their facts.
    #[error("host {0} is not in the policy inventory")]
    UnknownHost(SpiffeId),
    /// The operator behind the request is not an operator.
    #[error("{0} is not an operator")]
    NotAnOperator(SpiffeId),
    /// An approval in the tenant role by an operator the inventory does
    /// not list for the VM's tenant.
    #[error(
        "{principal} approved as tenant, but the inventory does not list it for tenant {tenant:?}"
    )]
    NotTheTenant {
        /// The approver.
        principal: SpiffeId,
        /// The VM's tenant.
        tenant: String,
    },
    /// The VM's attributes are out of bounds.
    #[error(transparent)]
    Attributes(#[from] AttributeError),
    /// An entity does not fit the schema.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// An entity reference does not parse.
    #[error("{}", report(&**.0))]
    Uid(#[source] Box<JsonDeserializationError>),
    /// The context does not fit the action's.
    #[error("{}", report(&**.0))]
    Context(#[source] Box<ContextJsonError>),
    /// The request does not fit the schema.
    #[error("{}", report(&**.0))]
    Request(#[source] Box<RequestValidationError>),
    /// The entities together do not fit the schema.
    #[error("{}", report(&**.0))]
    Entities(#[source] Box<EntitiesError>),
}

impl PolicySet {
    fn host(&self, id: &SpiffeId) -> Result<serde_json::Value, RequestError> {
        let h = self
            .inventory
            .agents
            .get(id)
            .ok_or_else(|| RequestError::UnknownHost(id.clone()))?;
        Ok(json!({
            "id": id.to_string(),
            "name": id.name().as_str(),
            "zone": h.zone,
            "security_level": h.security_level,
            "trust_domain": id.domain().to_string(),
        }))
    }

    /// The context of both migration actions. An approval in the tenant
    /// role counts only from an operator the inventory lists for the VM's
    /// tenant (the protocol checks donors' and recipients' trust domains).
    fn move_context(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        ticket: &VerifiedTicket,
        vm: &VmFacts<'_>,
    ) -> Result<serde_json::Value, RequestError> {
        let tenant = &vm.attributes.tenant;
        for a in &ticket.approvals.0 {
            if a.role == Some(ApprovalRole::Tenant)
                && !self
                    .inventory
                    .operators
                    .get(&a.principal)
                    .is_some_and(|o| o.tenants.contains(tenant))
            {
                return Err(RequestError::NotTheTenant {
                    principal: a.principal.clone(),
                    tenant: tenant.clone(),
                });
            }
        }
        let mut t = Self::ticket(&ticket.ticket);
        let approvers: Vec<String> = ticket
            .approvals
            .principals()
            .iter()
            .map(ToString::to_string)
            .collect();
        let roles: Vec<&str> = ticket
            .approvals
            .roles()
            .into_iter()
            .map(ApprovalRole::as_str)
            .collect();
        t["approvers"] = json!(approvers);
        t["approval_roles"] = json!(roles);
        t["approvals"] = json!(ticket.approvals.count());
        Ok(json!({
            "source": self.host(source)?,
            "destination": self.host(destination)?,
            "ticket": t,
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

    fn vm_entity(&self, vm: &VmFacts<'_>) -> Result<Entity, RequestError> {
        vm.attributes.validate()?;
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
        Ok(Entity::from_json_value(v, Some(&self.schema))
            .map_err(|e| EntityError::Vm(Box::new(e)))?)
    }

    pub(super) fn request(&self, q: &Query<'_>) -> Result<(Request, Entities), RequestError> {
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
                    self.move_context(source, destination, ticket, &vm)?,
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
                let mut context = self.move_context(source, destination, ticket, &vm)?;
                context["operator"] = json!({ "__entity": uid("Operator", &operator.to_string()) });
                (
                    uid("Agent", &source.to_string()),
                    uid("Vm", vm.name.as_str()),
                    context,
                )
            }
            Query::CreateVm { operator, vm, host }
            | Query::DeleteVm { operator, vm, host }
            | Query::ViewVm { operator, vm, host }
            | Query::PauseVm { operator, vm, host }
            | Query::Abort { operator, vm, host } => {
                extra.push(self.vm_entity(&vm)?);
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    json!({ "host": self.host(host)? }),
                )
            }
            Query::Recover {
                operator,
                vm,
                host,
                force,
            } => {
                extra.push(self.vm_entity(&vm)?);
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    json!({ "host": self.host(host)?, "force": force }),
                )
            }
            Query::ReadAudit { operator, host } => (
                uid("Operator", &operator.to_string()),
                uid("Agent", &host.to_string()),
                json!({ "host": self.host(host)? }),
            ),
            Query::PushSnapshot {
                operator,
                vm,
                host,
                url,
                recipients,
            } => {
                extra.push(self.vm_entity(&vm)?);
                let recipients: Vec<String> = recipients.iter().map(ToString::to_string).collect();
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    json!({ "host": self.host(host)?, "url": url, "recipients": recipients }),
                )
            }
            Query::PullSnapshot {
                operator,
                vm,
                host,
                url,
                source,
            } => {
                extra.push(self.vm_entity(&vm)?);
                (
                    uid("Operator", &operator.to_string()),
                    uid("Vm", vm.name.as_str()),
                    json!({ "host": self.host(host)?, "url": url, "source": source.to_string() }),
                )
            }
            Query::ManageSnapshots {
                operator,
                host,
                url,
                operation,
            } => (
                uid("Operator", &operator.to_string()),
                uid("Agent", &host.to_string()),
                json!({ "host": self.host(host)?, "url": url, "operation": operation }),
            ),
        };
        // Operators unknown to the inventory are principals with nothing.
        let op = q.operator();
        if op.role() != Role::Operator {
            return Err(RequestError::NotAnOperator(op.clone()));
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
                return Err(RequestError::UnknownHost((*source).clone()));
            }
        }
        let uid_of = |v: serde_json::Value| -> Result<EntityUid, RequestError> {
            EntityUid::from_json(v).map_err(|e| RequestError::Uid(Box::new(e)))
        };
        let action: EntityUid = uid_of(json!({
            "type": "Convoy::Action",
            "id": q.action().name(),
        }))?;
        let context = Context::from_json_value(context, Some((&self.schema, &action)))
            .map_err(|e| RequestError::Context(Box::new(e)))?;
        let request = Request::new(
            uid_of(principal)?,
            action,
            uid_of(resource)?,
            context,
            Some(&self.schema),
        )
        .map_err(|e| RequestError::Request(Box::new(e)))?;
        let entities =
            Entities::from_entities(self.base.iter().cloned().chain(extra), Some(&self.schema))
                .map_err(|e| RequestError::Entities(Box::new(e)))?;
        Ok((request, entities))
    }
}
