//! Building a bundle from verified logs: the ticket from whichever log
//! holds it, each side's records about the migration with their inclusion
//! proofs to that log's last signed tree head.

use super::{
    migration_of, BuildError, EvidenceBundle, EvidenceRecord, Oversize, Side, SideEvidence,
    MAX_RECORD_BODY, MAX_SIDE_RECORDS,
};
use crate::audit::{AuditEvent, VerifiedLog};
use crate::names::MigrationId;
use crate::ticket::Ticket;

/// Builds the bundle of `migration` from verified logs: the ticket from
/// whichever log holds it, each side from the log of the ticket's agent
/// (other logs are ignored), proven against that log's last tree head.
pub fn build_bundle(
    migration: MigrationId,
    logs: &[VerifiedLog],
) -> Result<EvidenceBundle, BuildError> {
    let found = logs
        .iter()
        .flat_map(|l| &l.records)
        .find_map(|r| match &r.event {
            AuditEvent::Ticket(t) => postcard::from_bytes::<Ticket>(&t.body)
                .ok()
                .filter(|body| body.id == migration)
                .map(|body| (t.clone(), body)),
            _ => None,
        });
    let Some((ticket, body)) = found else {
        return Err(BuildError::NoTicket(migration));
    };
    let mut sides = Vec::with_capacity(2);
    for side in Side::BOTH {
        let agent = side.of(&body);
        let mut of_agent = logs.iter().filter(|l| &l.agent == agent);
        let Some(log) = of_agent.next() else {
            return Err(BuildError::MissingLog {
                side,
                agent: agent.clone(),
            });
        };
        if of_agent.next().is_some() {
            return Err(BuildError::DuplicateLog(agent.clone()));
        }
        sides.push(side_evidence(side, log, migration)?);
    }
    let bundle = EvidenceBundle {
        migration,
        ticket,
        sides,
    };
    bundle.encode()?;
    Ok(bundle)
}

fn side_evidence(
    side: Side,
    log: &VerifiedLog,
    migration: MigrationId,
) -> Result<SideEvidence, BuildError> {
    let head = log
        .last_head
        .clone()
        .ok_or(BuildError::Unanchored { side })?;
    let mut records = Vec::new();
    for (index, (r, signed)) in (0u64..).zip(log.records.iter().zip(&log.signed)) {
        if migration_of(&r.event) != Some(migration) {
            continue;
        }
        if index >= head.size {
            return Err(BuildError::Unanchored { side });
        }
        if signed.body.len() > MAX_RECORD_BODY {
            return Err(BuildError::TooLarge {
                side,
                what: Oversize::Record(signed.body.len()),
            });
        }
        let proof = log
            .tree
            .inclusion_proof(index, head.size)
            .map_err(|_| BuildError::Unanchored { side })?;
        records.push(EvidenceRecord {
            index,
            body: signed.body.clone(),
            signature: signed.signature.clone(),
            proof,
        });
    }
    if records.len() > MAX_SIDE_RECORDS {
        return Err(BuildError::TooLarge {
            side,
            what: Oversize::Records(records.len()),
        });
    }
    Ok(SideEvidence {
        chain: log.chain.clone(),
        log_created_at_unix: log.created_at_unix,
        records,
        head,
    })
}
