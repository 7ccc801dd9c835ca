//! `Admission` ([`convoy_protocol::ctl::admission`]): whether this agent
//! would let a migration go (it is the ticket's source: `MigrateOut` on
//! the VM here) or come (its destination: `MigrateIn` on the VM as the
//! question describes it, and room for it). The ticket is verified —
//! signature, signer, validity, approvals — but not consumed, and must be
//! the asking operator's own; the decision is not audited (it changes
//! nothing, like a view). The migration itself decides again in full.

use std::sync::Arc;

use convoy_protocol::ctl::admission::{Admission, AdmissionQuery};
use convoy_protocol::ctl::{CtlErrorKind, CtlResponse};
use convoy_protocol::names::SpiffeId;

use super::error;
use crate::host::Host;
use crate::trust::authz::now_unix;
use crate::trust::policy::{Query, VmFacts};

pub(super) fn admission(host: &Arc<Host>, q: &AdmissionQuery, operator: &SpiffeId) -> CtlResponse {
    let auth = host.authority();
    let v = match q
        .ticket
        .verify(&auth.trust, now_unix(), auth.skew.as_secs())
    {
        Ok(v) => v,
        Err(e) => return error(CtlErrorKind::Unauthorized, format!("ticket: {e}")),
    };
    if v.signer != *operator {
        return error(
            CtlErrorKind::Unauthorized,
            format!("the ticket is {}'s, not yours", v.signer),
        );
    }
    let t = &v.ticket;
    let answer =
        |permitted: bool, why: String| CtlResponse::Admission(Admission { permitted, why });
    if t.destination == host.id {
        if host.vms().contains_key(&t.vm) {
            return answer(false, format!("a VM named {} is already here", t.vm));
        }
        let free = host.config.capacity_bytes.saturating_sub(host.used_bytes());
        if q.memory_bytes > free {
            return answer(
                false,
                format!("{} bytes exceed the {free} bytes free here", q.memory_bytes),
            );
        }
        let d = host.decide_unaudited(&Query::MigrateIn {
            operator: &v.signer,
            vm: VmFacts {
                name: &t.vm,
                attributes: &q.attributes,
            },
            source: &t.source,
            destination: &host.id,
            ticket: &v,
        });
        answer(d.permitted, d.explain())
    } else if t.source == host.id {
        let Some(attributes) = host.vms().get(&t.vm).map(|e| e.attributes.clone()) else {
            return error(CtlErrorKind::NotFound, format!("no VM named {} here", t.vm));
        };
        let d = host.decide_unaudited(&Query::MigrateOut {
            operator: &v.signer,
            vm: VmFacts {
                name: &t.vm,
                attributes: &attributes,
            },
            source: &host.id,
            destination: &t.destination,
            ticket: &v,
        });
        answer(d.permitted, d.explain())
    } else {
        error(
            CtlErrorKind::BadRequest,
            format!(
                "the ticket moves {} from {} to {}: neither is this agent",
                t.vm, t.source, t.destination
            ),
        )
    }
}
