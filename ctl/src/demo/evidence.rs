//! What the trust path of a demo migration left behind, checked offline
//! with only the CA bundle: tickets accepted, policy decisions, receipts,
//! both audit logs and the evidence bundle built from them.

use convoy_agent::lab::Lab;
use convoy_agent::units::format_bytes;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::evidence::{build_bundle, check_bundle};
use convoy_protocol::receipt::SignedReceipt;

/// What the trust path left behind, checked offline with the CA bundle.
pub(crate) struct Evidence {
    pub ticket_verified: bool,
    pub permitted_source: bool,
    pub permitted_destination: bool,
    pub receipts_source: usize,
    pub receipts_destination: usize,
    pub audit_verified: bool,
    /// Size of the evidence bundle built from both logs and checked
    /// offline with only the CA bundle, when that succeeded.
    pub bundle_bytes: Option<usize>,
}

impl Evidence {
    /// Whether every trust check passed.
    pub fn all_good(&self) -> bool {
        self.ticket_verified
            && self.audit_verified
            && self.permitted_source
            && self.permitted_destination
    }

    /// The trust, policy and exactly-once lines of the demo's report.
    pub fn lines(&self, on_a: bool, on_b: bool) -> String {
        format!(
            "trust: operator ticket verified by both agents: {}; receipts verified offline: {} held by a, {} by b; both audit logs verify offline: {}; evidence bundle ({}) checked offline with only the CA certificate: {}\n\
             policy: MigrateOut permitted at a: {}; MigrateIn permitted at b: {} (decisions read back from the signed audit logs)\n\
             exactly once: {} on a, {} on b\n",
            yes(self.ticket_verified),
            self.receipts_source,
            self.receipts_destination,
            yes(self.audit_verified),
            self.bundle_bytes.map_or_else(|| "-".into(), |n| format_bytes(n as u64)),
            yes(self.bundle_bytes.is_some()),
            yes(self.permitted_source),
            yes(self.permitted_destination),
            if on_a { "still present" } else { "gone" },
            if on_b { "running" } else { "absent" },
        )
    }
}

pub(crate) fn evidence(lab: &Lab, migration: &str, receipts: &[SignedReceipt]) -> Evidence {
    let read = |name: &str| {
        std::fs::read(lab.audit_log(name))
            .ok()
            .and_then(|b| verify_log(&b, &lab.trust).ok())
    };
    let (a, b) = (read("a"), read("b"));
    let accepted = |log: &Option<convoy_protocol::audit::VerifiedLog>, as_role: &str| {
        log.as_ref().is_some_and(|l| {
            l.records.iter().any(|r| {
                matches!(&r.event, AuditEvent::TicketAccepted { migration: m, role, .. }
                    if m.to_string() == migration && role == as_role)
            })
        })
    };
    let permitted = |log: &Option<convoy_protocol::audit::VerifiedLog>, what: &str| {
        log.as_ref().is_some_and(|l| {
            l.records.iter().any(|r| {
                matches!(&r.event, AuditEvent::Decision { migration: Some(m), action, permitted: true, .. }
                    if m.to_string() == migration && action == what)
            })
        })
    };
    let ours = |r: &SignedReceipt| {
        r.verify(&lab.trust)
            .is_ok_and(|v| v.receipt.migration.to_string() == migration)
    };
    // The evidence bundle a third party would get: built from both logs,
    // encoded, then checked from its bytes with only the CA bundle.
    let id = a.as_ref().and_then(|l| {
        l.records.iter().find_map(|r| match &r.event {
            AuditEvent::TicketAccepted { migration: m, .. } if m.to_string() == migration => {
                Some(*m)
            }
            _ => None,
        })
    });
    let bundle_bytes = match (id, &a, &b) {
        (Some(id), Some(a), Some(b)) => build_bundle(id, &[a.clone(), b.clone()])
            .ok()
            .and_then(|bundle| bundle.encode().ok())
            .filter(|bytes| check_bundle(bytes, &lab.trust).is_ok_and(|s| s.started))
            .map(|bytes| bytes.len()),
        _ => None,
    };
    Evidence {
        bundle_bytes,
        ticket_verified: accepted(&a, "source") && accepted(&b, "destination"),
        permitted_source: permitted(&a, "MigrateOut"),
        permitted_destination: permitted(&b, "MigrateIn"),
        receipts_source: receipts.iter().filter(|r| ours(r)).count(),
        receipts_destination: b.as_ref().map_or(0, |l| {
            l.records
                .iter()
                .filter(|r| matches!(&r.event, AuditEvent::Receipt(x) if ours(x)))
                .count()
        }),
        audit_verified: a.is_some() && b.is_some() && bundle_bytes.is_some(),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}
