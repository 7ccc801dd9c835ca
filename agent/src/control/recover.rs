//! `convoyctl recover`: the migrations this agent holds unfinished,
//! resolved by the rules of [`crate::host::indoubt`] (and its
//! store-and-forward handovers, by their claims: `handback::recover`),
//! each one a policy
//! decision (`Recover`, with `force` when the operator resumes a source's
//! copy without the destination's word).

use std::sync::Arc;

use convoy_protocol::ctl::{CtlErrorKind, CtlResponse};
use convoy_protocol::names::{SpiffeId, VmName};

use super::error;
use crate::host::Host;
use crate::trust::policy::{Query, VmFacts};

/// Resolves the unfinished migrations of `vm` (or every one) for
/// `operator`.
pub(super) async fn recover(
    host: &Arc<Host>,
    vm: Option<VmName>,
    force: bool,
    operator: &SpiffeId,
) -> CtlResponse {
    // A VM no longer here (its copy went with the agent, or it never
    // registered) is judged on its name alone.
    let may = |name: &VmName| {
        let attributes = host
            .vms()
            .get(name)
            .map(|e| e.attributes.clone())
            .unwrap_or_default();
        let facts = VmFacts {
            name,
            attributes: &attributes,
        };
        let d = host.decide(
            &Query::Recover {
                operator,
                vm: facts,
                host: &host.id,
                force,
            },
            None,
        );
        if d.permitted {
            Ok(())
        } else {
            Err(format!("policy {}", d.explain()))
        }
    };
    let mut reports =
        match crate::host::indoubt::recover(host, vm.as_ref(), operator, force, &may).await {
            Ok(r) => r,
            Err(e) => return error(CtlErrorKind::Internal, e),
        };
    // And the store-and-forward handovers it holds as their source.
    match super::handback::recover(host, vm.as_ref(), force, may).await {
        Ok(r) => reports.extend(r),
        Err(e) => return error(CtlErrorKind::Internal, e),
    }
    CtlResponse::Recovered(reports)
}
