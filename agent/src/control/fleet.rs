//! `convoyctl fleet ls` and `convoyctl where`: the registry's VMs and
//! agents, each VM shown only when the operator's policy permits
//! `ViewVm` on it (decided here, not audited: a view changes nothing).
//! The reconciliation's findings and the records that do not decode name
//! VMs and agents of every tenant: they, and the agents that own no VM
//! the operator sees, are shown only to an operator who may read this
//! agent's audit log (`ReadAudit`, the admins of the example policies).

use std::collections::BTreeSet;
use std::sync::Arc;

use convoy_protocol::ctl::fleet::{FleetAgent, FleetQuery, FleetView, FleetVm};
use convoy_protocol::ctl::{CtlErrorKind, CtlResponse};
use convoy_protocol::names::SpiffeId;

use super::error;
use crate::host::Host;
use crate::trust::policy::{Query, VmFacts};

pub(super) async fn fleet(host: &Arc<Host>, q: FleetQuery, operator: &SpiffeId) -> CtlResponse {
    let registry = match host.registry() {
        Ok(Some(r)) => r,
        Ok(None) => {
            return error(
                CtlErrorKind::BadRequest,
                "this agent has no registry (start it with --registry)",
            )
        }
        Err(e) => return error(CtlErrorKind::Internal, e.to_string()),
    };
    let contents = match registry.contents().await {
        Ok(c) => c,
        Err(e) => return error(CtlErrorKind::Internal, e.to_string()),
    };
    let alive: BTreeSet<_> = contents.agents.iter().map(|a| a.id.clone()).collect();
    let admin = host
        .decide_unaudited(&Query::ReadAudit {
            operator,
            host: &host.id,
        })
        .permitted;
    let mut view = FleetView::default();
    if admin {
        view.disagreements = registry.disagreements();
        view.disagreements
            .extend(contents.bad.iter().map(|b| format!("a bad record: {b}")));
    }
    for r in contents.vms {
        if q.vm.as_ref().is_some_and(|v| *v != r.vm)
            || q.host.as_ref().is_some_and(|h| h != r.owner.name())
            || q.tenant.as_ref().is_some_and(|t| *t != r.attributes.tenant)
        {
            continue;
        }
        let d = host.decide_unaudited(&Query::ViewVm {
            operator,
            vm: VmFacts {
                name: &r.vm,
                attributes: &r.attributes,
            },
            host: &host.id,
        });
        if !d.permitted {
            view.hidden += 1;
            continue;
        }
        view.vms.push(FleetVm {
            owner_alive: alive.contains(&r.owner),
            vm: r.vm,
            owner: r.owner,
            epoch: r.epoch,
            tenant: r.attributes.tenant,
            security_level: r.attributes.security_level,
            cause: r.cause,
            since_unix: r.since_unix,
        });
    }
    view.vms.sort_by(|a, b| a.vm.cmp(&b.vm));
    let owners: BTreeSet<_> = view.vms.iter().map(|v| v.owner.clone()).collect();
    view.agents = contents
        .agents
        .into_iter()
        .filter(|a| q.host.as_ref().is_none_or(|h| h == a.id.name()))
        .filter(|a| admin || owners.contains(&a.id))
        .map(|a| FleetAgent {
            id: a.id,
            addr: a.addr,
            capacity_bytes: a.capacity_bytes,
            used_bytes: a.used_bytes,
            started_unix: a.started_unix,
        })
        .collect();
    view.agents.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(vm) = &q.vm {
        if view.vms.is_empty() {
            // Absent and hidden look alike: a name is not confirmed to
            // someone who may not see it.
            return error(
                CtlErrorKind::NotFound,
                format!("{vm} is not in the registry, or not one you may see"),
            );
        }
    }
    CtlResponse::Fleet(Box::new(view))
}
