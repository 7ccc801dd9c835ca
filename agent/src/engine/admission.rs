//! The destination's admission of an incoming migration: one check for
//! every backend (sim page batches and QEMU streams alike), run before
//! anything is reserved.
//!
//! In order, each step refusing with a reason the source is told and the
//! audit log records:
//! 1. the audit log must be writable (fail closed: nothing unaudited);
//! 2. the operator's ticket verifies — chain, signature, validity, nonce —
//!    and names the proposing agent as source, us as destination, the
//!    proposed VM and migration id ([`crate::trust::authz::Authority::at_destination`]);
//! 3. the proposal is exactly what the ticket grants: the plan the source
//!    announces equals the ticket's in every field, and the manifest's
//!    streams, post-copy switch, start-paused flag and disks follow from it
//!    ([`convoy_protocol::admission::admit`]);
//! 4. the destination's policy permits `MigrateIn` for this operator, VM,
//!    source and ticket.
//!
//! Capacity, staging and QEMU launch come after, in each backend's engine.

use convoy_protocol::admission::AdmissionError;
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::message::{Manifest, Reason};
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::ticket::{SignedTicket, VerifiedTicket};
use convoy_protocol::vm::VmAttributes;
use thiserror::Error;

use crate::host::Host;
use crate::trust::authz::AuthzError;
use crate::trust::policy::{Query, VmFacts};

/// What a source proposes, as the destination admits it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proposal<'a> {
    /// The VM.
    pub vm: &'a VmName,
    /// The migration id.
    pub migration: MigrationId,
    /// What will be sent.
    pub manifest: &'a Manifest,
    /// The operator's signed ticket.
    pub ticket: &'a SignedTicket,
    /// The VM's attributes, as the source claims them.
    pub attributes: &'a VmAttributes,
}

/// Why an incoming migration is refused at admission.
#[derive(Debug, Error)]
pub(crate) enum Refused {
    /// The audit log cannot be written: nothing is done unaudited.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// The ticket does not verify or does not name this migration.
    #[error(transparent)]
    Ticket(#[from] AuthzError),
    /// The proposal differs from what the ticket grants.
    #[error(transparent)]
    Plan(#[from] AdmissionError),
    /// The destination's policy forbids it.
    #[error("destination policy {}", .0.explain())]
    Policy(crate::trust::policy::Decision),
}

impl Refused {
    /// What the source is told.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Refused::AuditUnavailable => Reason::Internal(self.to_string()),
            Refused::Ticket(_) | Refused::Plan(_) | Refused::Policy(_) => {
                Reason::Unauthorized(self.to_string())
            }
        }
    }
}

/// Admits `p` from the agent `peer`, or refuses it (audited). Nothing is
/// reserved either way.
pub(crate) fn admit(
    host: &Host,
    peer: &SpiffeId,
    p: Proposal<'_>,
) -> Result<VerifiedTicket, Refused> {
    if !host.audit_ok() {
        return Err(Refused::AuditUnavailable);
    }
    let refused = |e: Refused| {
        tracing::warn!(%peer, "incoming migration refused: {e}");
        host.audit(AuditEvent::Refused {
            migration: Some(p.migration),
            peer: peer.to_string(),
            reason: e.to_string(),
        });
        e
    };
    let v = host
        .authority()
        .at_destination(peer, &host.id, p.vm, p.migration, p.ticket)
        .map_err(|e| refused(e.into()))?;
    convoy_protocol::admission::admit(&v.ticket, p.vm, p.migration, p.manifest, p.attributes)
        .map_err(|e| refused(e.into()))?;
    host.audit(AuditEvent::TicketAccepted {
        migration: p.migration,
        vm: p.vm.clone(),
        operator: v.signer.clone(),
        peer: peer.clone(),
        role: "destination".into(),
    });
    host.audit(AuditEvent::Ticket(p.ticket.clone()));
    let d = host.decide(
        &Query::MigrateIn {
            operator: &v.signer,
            vm: VmFacts {
                name: p.vm,
                attributes: p.attributes,
            },
            source: peer,
            destination: &host.id,
            ticket: &v,
        },
        Some(p.migration),
    );
    if !d.permitted {
        // The decision itself is audited by `decide`.
        tracing::warn!(%peer, "incoming migration denied by policy: {}", d.explain());
        return Err(Refused::Policy(d));
    }
    Ok(v)
}
