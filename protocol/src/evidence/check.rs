//! Checking a bundle offline (the steps in the module docs of
//! [`crate::evidence`]): the ticket, each side's chain, tree head and
//! records, each receipt, and what the records must agree on across sides.

use super::{
    migration_of, AcceptanceMismatch, EvidenceBundle, EvidenceError, EvidenceRecord, RecordProblem,
    Side, Undecodable,
};
use crate::audit::{verify_record, AuditEvent, AuditRecord, SignedTreeHead};
use crate::digest::Digest;
use crate::logtree::{log_leaf, verify_inclusion};
use crate::names::{MigrationId, SpiffeId};
use crate::receipt::{ticket_digest, Receipt, ReceiptKind, SignedReceipt};
use crate::signed::{chain_in_bounds, ChainError, ChainVerifier, MalformedEnvelope};
use crate::ticket::{Ticket, TicketError, VerifiedTicket};

/// What one side's verified evidence says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SideSummary {
    /// The agent.
    pub agent: SpiffeId,
    /// Records in the bundle.
    pub records: usize,
    /// The signed tree head the records are proven in.
    pub head: SignedTreeHead,
    /// Whether the log holds the ticket's acceptance.
    pub accepted: bool,
    /// The receipt kinds in the log, in log order.
    pub receipts: Vec<ReceiptKind>,
    /// The outcomes the log recorded.
    pub outcomes: Vec<String>,
    /// Refusals the log recorded about the migration.
    pub refusals: Vec<String>,
    /// Policy decisions the log recorded about the migration.
    pub decisions: Vec<String>,
    /// Phase changes the log recorded, in order.
    pub phases: Vec<String>,
}

/// A verified bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BundleSummary {
    /// The migration.
    pub migration: MigrationId,
    /// The operator's ticket and who signed it.
    pub ticket: VerifiedTicket,
    /// The ticket's digest, as receipts name it.
    pub ticket_digest: Digest,
    /// The source's side.
    pub source: SideSummary,
    /// The destination's side.
    pub destination: SideSummary,
    /// Whether the VM started at the destination (a `Started` receipt).
    pub started: bool,
    /// The memory root the receipts attest, if any does.
    pub memory_root: Option<Digest>,
    /// The device-state digest the receipts attest, if any does.
    pub device: Option<Digest>,
}

impl EvidenceBundle {
    /// Verifies the bundle offline (see the module docs).
    pub fn check(&self, verifier: &dyn ChainVerifier) -> Result<BundleSummary, EvidenceError> {
        Checker::new(self, verifier)?.run()
    }
}

/// Decodes and verifies a bundle file with only `verifier` (the CA
/// bundle).
pub fn check_bundle(
    bytes: &[u8],
    verifier: &dyn ChainVerifier,
) -> Result<BundleSummary, EvidenceError> {
    EvidenceBundle::decode(bytes)?.check(verifier)
}

/// A receipt found in a side, checked.
struct FoundReceipt {
    receipt: Receipt,
    signature: Vec<u8>,
    side: Side,
    record: usize,
}

struct Checker<'a> {
    bundle: &'a EvidenceBundle,
    verifier: &'a dyn ChainVerifier,
    verified: VerifiedTicket,
    digest: Digest,
}

impl<'a> Checker<'a> {
    /// Checks the ticket.
    fn new(
        bundle: &'a EvidenceBundle,
        verifier: &'a dyn ChainVerifier,
    ) -> Result<Self, EvidenceError> {
        // When it was used: the time an agent logged it (the record is
        // checked below, with the rest of its log; a forged time fails
        // there), else its issue time. Not now: it has most likely
        // expired since. Its approvals are checked at their own times.
        let (body, _): (Ticket, _) =
            postcard::take_from_bytes(&bundle.ticket.body).map_err(|e| {
                EvidenceError::Ticket(TicketError::Malformed(MalformedEnvelope::Body(e)))
            })?;
        let used = logged_at(bundle)
            .unwrap_or(body.issued_at)
            .clamp(body.issued_at, body.expires_at.max(body.issued_at));
        let verified = bundle
            .ticket
            .verify(verifier, used, 0)
            .map_err(EvidenceError::Ticket)?;
        if verified.ticket.id != bundle.migration {
            return Err(EvidenceError::TicketMigration {
                bundle: bundle.migration,
                ticket: verified.ticket.id,
            });
        }
        Ok(Checker {
            bundle,
            verifier,
            digest: ticket_digest(&bundle.ticket),
            verified,
        })
    }

    fn run(self) -> Result<BundleSummary, EvidenceError> {
        let mut receipts = Vec::new();
        let (source, source_logged) = self.side(Side::Source, &mut receipts)?;
        let (destination, destination_logged) = self.side(Side::Destination, &mut receipts)?;
        if !source_logged && !destination_logged {
            return Err(EvidenceError::TicketNotLogged);
        }
        let (memory_root, device, started) = self.across(&receipts, [&source, &destination])?;
        Ok(BundleSummary {
            migration: self.bundle.migration,
            ticket_digest: self.digest,
            ticket: self.verified,
            source,
            destination,
            started,
            memory_root,
            device,
        })
    }

    /// Checks one side; returns its summary and whether it logged the
    /// ticket.
    fn side(
        &self,
        side: Side,
        receipts: &mut Vec<FoundReceipt>,
    ) -> Result<(SideSummary, bool), EvidenceError> {
        let position = match side {
            Side::Source => 0,
            Side::Destination => 1,
        };
        let Some(ev) = self.bundle.sides.get(position) else {
            return Err(EvidenceError::MissingSide { side });
        };
        let chain_err = |why: ChainError| EvidenceError::Chain { side, why };
        if !chain_in_bounds(&ev.chain) {
            return Err(chain_err(ChainError::OutOfBounds));
        }
        let agent = self
            .verifier
            .verify_chain(&ev.chain, ev.log_created_at_unix)
            .map_err(chain_err)?;
        let expected = side.of(&self.verified.ticket);
        if &agent != expected {
            return Err(EvidenceError::WrongAgent {
                side,
                expected: expected.clone(),
                found: agent,
            });
        }
        let leaf = &ev.chain[0];
        let h = &ev.head;
        h.verify(self.verifier, leaf)
            .map_err(|_| EvidenceError::TreeHead { side, size: h.size })?;
        if ev.records.is_empty() {
            return Err(EvidenceError::NoRecords { side });
        }
        let mut summary = SideSummary {
            agent,
            records: ev.records.len(),
            head: h.clone(),
            accepted: false,
            receipts: Vec::new(),
            outcomes: Vec::new(),
            refusals: Vec::new(),
            decisions: Vec::new(),
            phases: Vec::new(),
        };
        let mut logged = false;
        let mut previous = None;
        for (i, r) in ev.records.iter().enumerate() {
            let at = |problem| EvidenceError::Record {
                side,
                record: i,
                index: r.index,
                problem: Box::new(problem),
            };
            let record = self.record(leaf, h, r).map_err(at)?;
            match record.event {
                AuditEvent::Receipt(sr) => {
                    let receipt = self.receipt(&sr).map_err(at)?;
                    summary.receipts.push(receipt.kind);
                    receipts.push(FoundReceipt {
                        receipt,
                        signature: sr.signature,
                        side,
                        record: i,
                    });
                }
                AuditEvent::Ticket(t) => {
                    if ticket_digest(&t) != self.digest {
                        return Err(at(RecordProblem::OtherTicket));
                    }
                    logged = true;
                }
                AuditEvent::TicketAccepted {
                    vm,
                    operator,
                    peer,
                    role,
                    ..
                } => {
                    let t = &self.verified.ticket;
                    let other = match side {
                        Side::Source => &t.destination,
                        Side::Destination => &t.source,
                    };
                    let wrong = if role != side.to_string() {
                        Some(AcceptanceMismatch::Role(role))
                    } else if vm != t.vm {
                        Some(AcceptanceMismatch::Vm {
                            logged: vm,
                            ticket: t.vm.clone(),
                        })
                    } else if operator != self.verified.signer {
                        Some(AcceptanceMismatch::Operator {
                            logged: operator,
                            ticket: self.verified.signer.clone(),
                        })
                    } else if &peer != other {
                        Some(AcceptanceMismatch::Peer {
                            logged: peer,
                            ticket: other.clone(),
                        })
                    } else {
                        None
                    };
                    if let Some(w) = wrong {
                        return Err(at(RecordProblem::Acceptance(w)));
                    }
                    summary.accepted = true;
                }
                AuditEvent::Outcome { outcome, .. } => summary.outcomes.push(outcome),
                AuditEvent::Phase { phase, .. } => summary.phases.push(phase),
                AuditEvent::Unfinished { phase, epoch, .. } => summary.phases.push(format!(
                    "found unfinished at the agent's start: {phase} (epoch {epoch})"
                )),
                AuditEvent::Resolution {
                    decision,
                    reason,
                    operator,
                    statement,
                    ..
                } => {
                    let on = match statement {
                        Some(st) => {
                            let verdict = self.statement(&st).map_err(at)?;
                            format!(", on the destination's signed {verdict:?}")
                        }
                        None => String::new(),
                    };
                    summary.outcomes.push(format!(
                        "resolved{}: {decision} ({reason}){on}",
                        operator.map(|o| format!(" by {o}")).unwrap_or_default()
                    ));
                }
                AuditEvent::Refused { reason, .. } => summary.refusals.push(reason),
                AuditEvent::Decision {
                    action,
                    permitted,
                    explanation,
                    ..
                } => summary.decisions.push(format!(
                    "{action} {}: {explanation}",
                    if permitted { "permitted" } else { "denied" }
                )),
                // `record` let nothing else through.
                AuditEvent::AgentStarted { .. }
                | AuditEvent::PolicyLoaded { .. }
                | AuditEvent::PolicyRejected { .. }
                | AuditEvent::TornTailCut { .. }
                | AuditEvent::VmAtStart { .. }
                | AuditEvent::Snapshot { .. } => {}
            }
            if let Some(p) = previous.filter(|&p| r.index <= p) {
                return Err(at(RecordProblem::Order {
                    index: r.index,
                    previous: p,
                }));
            }
            previous = Some(r.index);
        }
        Ok((summary, logged))
    }

    /// Checks one record's signature, inclusion, sequence number and
    /// subject.
    fn record(
        &self,
        leaf: &[u8],
        head: &SignedTreeHead,
        r: &EvidenceRecord,
    ) -> Result<AuditRecord, RecordProblem> {
        verify_record(self.verifier, leaf, &r.body, &r.signature)
            .map_err(|_| RecordProblem::Signature)?;
        verify_inclusion(&log_leaf(&r.body), r.index, head.size, &r.proof, &head.root)
            .map_err(RecordProblem::Inclusion)?;
        let (record, rest): (AuditRecord, _) =
            postcard::take_from_bytes(&r.body).map_err(|e| RecordProblem::Undecodable(e.into()))?;
        if !rest.is_empty() {
            return Err(RecordProblem::Undecodable(Undecodable::TrailingBytes));
        }
        if record.seq != r.index {
            return Err(RecordProblem::Seq { seq: record.seq });
        }
        match (&record.event, migration_of(&record.event)) {
            // A receipt of another migration gets its own, precise error.
            (AuditEvent::Receipt(_), _) => {}
            (_, Some(m)) if m == self.bundle.migration => {}
            (e, Some(m)) => {
                return Err(RecordProblem::Unrelated {
                    event: event_name(e),
                    migration: Some(m),
                })
            }
            (e, None) => {
                return Err(RecordProblem::Unrelated {
                    event: event_name(e),
                    migration: None,
                })
            }
        }
        Ok(record)
    }

    /// Checks a receipt found in `side`'s log.
    /// Checks an in-doubt statement a resolution rests on: signed (its
    /// chain valid when it says it was made) by the ticket's destination,
    /// about this migration and ticket. Its verdict.
    fn statement(
        &self,
        st: &crate::indoubt::SignedStatement,
    ) -> Result<crate::indoubt::Verdict, RecordProblem> {
        let (s, signer) = st
            .open_at_claimed(self.verifier, |s| s.at_unix)
            .map_err(|e| RecordProblem::Statement(e.to_string()))?;
        let destination = &self.verified.ticket.destination;
        if &signer != destination {
            return Err(RecordProblem::Statement(format!(
                "signed by {signer}, not the destination {destination}"
            )));
        }
        if s.migration != self.bundle.migration || s.ticket != self.digest {
            return Err(RecordProblem::Statement(
                "about another migration or ticket".into(),
            ));
        }
        Ok(s.verdict)
    }

    fn receipt(&self, sr: &SignedReceipt) -> Result<Receipt, RecordProblem> {
        let v = sr.verify(self.verifier).map_err(RecordProblem::Receipt)?;
        let kind = v.receipt.kind;
        if v.receipt.migration != self.bundle.migration {
            return Err(RecordProblem::ForeignReceipt {
                kind,
                migration: v.receipt.migration,
            });
        }
        if v.receipt.ticket != self.digest {
            return Err(RecordProblem::ReceiptTicket {
                kind,
                named: v.receipt.ticket,
                expected: self.digest,
            });
        }
        let must = match kind {
            ReceiptKind::Sent => Side::Source,
            _ => Side::Destination,
        };
        let expected = must.of(&self.verified.ticket);
        if &v.signer != expected {
            return Err(RecordProblem::ReceiptSigner {
                kind,
                signer: v.signer,
                must,
                expected: expected.clone(),
            });
        }
        Ok(v.receipt)
    }

    /// Checks receipts across both sides: one signed object per kind, the
    /// receipts a started migration needs, and one attested state.
    fn across(
        &self,
        receipts: &[FoundReceipt],
        sides: [&SideSummary; 2],
    ) -> Result<(Option<Digest>, Option<Digest>, bool), EvidenceError> {
        let kinds = [
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started,
        ];
        let mut by_kind: [Option<&FoundReceipt>; 4] = [None; 4];
        for r in receipts {
            let Some(k) = kinds.iter().position(|k| *k == r.receipt.kind) else {
                continue;
            };
            match by_kind[k] {
                None => by_kind[k] = Some(r),
                Some(first) if first.signature == r.signature && first.receipt == r.receipt => {}
                Some(first) => {
                    return Err(EvidenceError::ConflictingReceipts {
                        kind: r.receipt.kind,
                        first: first.side,
                        first_record: first.record,
                        second: r.side,
                        second_record: r.record,
                    })
                }
            }
        }
        let [accepted, ready, sent, started] = by_kind.map(|r| r.map(|r| &r.receipt));
        let said_started = sides
            .iter()
            .flat_map(|s| &s.outcomes)
            .any(|o| o == "completed" || o == "started");
        let why = if started.is_some() {
            Some("started at the destination")
        } else if said_started {
            Some("completed according to a log")
        } else {
            None
        };
        if let Some(why) = why {
            for (kind, r) in [
                (ReceiptKind::Accepted, accepted),
                (ReceiptKind::Ready, ready),
                (ReceiptKind::Sent, sent),
                (ReceiptKind::Started, started),
            ] {
                if r.is_none() {
                    return Err(EvidenceError::MissingReceipt { kind, why });
                }
            }
        }
        if let Some(ready) = ready {
            for other in [sent, started].into_iter().flatten() {
                for (what, a, b) in [
                    ("memory root", ready.memory_root, other.memory_root),
                    ("device state", ready.device, other.device),
                ] {
                    if a != b {
                        return Err(EvidenceError::StateMismatch {
                            what,
                            ready: a,
                            other_kind: other.kind,
                            other: b,
                        });
                    }
                }
            }
        }
        let attested = ready.or(sent).or(started);
        Ok((
            attested.and_then(|r| r.memory_root),
            attested.and_then(|r| r.device),
            started.is_some(),
        ))
    }
}

/// The earliest time an agent's log of the bundle says it recorded the
/// bundle's ticket (unverified here: the records are checked with their
/// logs, and a bundle with a forged one is refused).
fn logged_at(bundle: &EvidenceBundle) -> Option<u64> {
    bundle
        .sides
        .iter()
        .flat_map(|s| &s.records)
        .filter_map(|r| postcard::from_bytes::<AuditRecord>(&r.body).ok())
        .filter_map(|r| match r.event {
            AuditEvent::Ticket(t) if t == bundle.ticket => Some(r.at_unix),
            _ => None,
        })
        .min()
}

fn event_name(e: &AuditEvent) -> &'static str {
    match e {
        AuditEvent::AgentStarted { .. } => "agent start",
        AuditEvent::TicketAccepted { .. } => "ticket acceptance",
        AuditEvent::Refused { .. } => "refusal",
        AuditEvent::Receipt(_) => "receipt",
        AuditEvent::Outcome { .. } => "outcome",
        AuditEvent::Ticket(_) => "ticket",
        AuditEvent::Decision { .. } => "policy decision",
        AuditEvent::PolicyLoaded { .. } => "policy load",
        AuditEvent::PolicyRejected { .. } => "policy refusal",
        AuditEvent::Phase { .. } => "phase change",
        AuditEvent::TornTailCut { .. } => "torn tail cut",
        AuditEvent::Unfinished { .. } => "unfinished migration",
        AuditEvent::VmAtStart { .. } => "VM found at start",
        AuditEvent::Resolution { .. } => "resolution of a migration in doubt",
        AuditEvent::Snapshot { .. } => "snapshot operation",
    }
}
