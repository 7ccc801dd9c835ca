//! `convoyctl audit`: read and verify an agent's audit log offline, with
//! only the CA bundle (`--pki`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use convoy_agent::pki::Pki;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::receipt::SignedReceipt;
use convoy_protocol::ticket::{SignedTicket, Ticket};

use crate::conn::Global;
use crate::render;

/// Audit commands.
#[derive(Subcommand, Debug)]
pub enum Audit {
    /// Verify a whole log: chain, every signature, sequence, tree heads.
    Verify {
        /// The log file (an agent's STATE_DIR/audit.log).
        file: PathBuf,
    },
    /// Verify, then print every record.
    Show {
        /// The log file.
        file: PathBuf,
    },
}

/// Runs an audit command.
pub fn run(g: &Global, c: Audit) -> Result<()> {
    let pki = Pki::open(&g.pki)?;
    let trust = pki.trust()?;
    let (file, show) = match c {
        Audit::Verify { file } => (file, false),
        Audit::Show { file } => (file, true),
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let log =
        verify_log(&bytes, &trust).with_context(|| format!("{} is not intact", file.display()))?;
    let head = log.last_head.as_ref();
    if g.json {
        let records: Vec<serde_json::Value> = log
            .records
            .iter()
            .map(|r| serde_json::json!({ "seq": r.seq, "at_unix": r.at_unix, "event": describe(&r.event) }))
            .collect();
        return render::json(&serde_json::json!({
            "verified": true,
            "agent": log.agent.to_string(),
            "records": if show { serde_json::Value::Array(records) } else { log.records.len().into() },
            "tree_size": head.map(|h| h.size),
            "root": head.map(|h| h.root.to_hex()),
            "unanchored": log.unanchored,
        }));
    }
    if show {
        println!("{:>5}  {:>10}  event", "seq", "time");
        for r in &log.records {
            println!("{:>5}  {:>10}  {}", r.seq, r.at_unix, describe(&r.event));
        }
    }
    println!(
        "verified: {} records by {}, signed tree head size {} root {}{}",
        log.records.len(),
        log.agent,
        head.map_or(0, |h| h.size),
        head.map_or_else(|| "-".into(), |h| h.root.to_hex()[..16].to_string()),
        if log.unanchored > 0 {
            format!(" ({} records after the last head)", log.unanchored)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn describe(e: &AuditEvent) -> String {
    match e {
        AuditEvent::AgentStarted { version } => format!("agent started (version {version})"),
        AuditEvent::TicketAccepted {
            migration,
            vm,
            operator,
            peer,
            role,
        } => {
            format!("ticket {migration} accepted as {role}: {vm} with {peer}, signed by {operator}")
        }
        AuditEvent::Refused {
            migration,
            peer,
            reason,
        } => format!(
            "refused {} from {peer}: {reason}",
            migration.map_or_else(|| "a request".into(), |m| format!("migration {m}"))
        ),
        AuditEvent::Receipt(r) => receipt(r),
        AuditEvent::Ticket(t) => ticket(t),
        AuditEvent::Outcome {
            migration,
            vm,
            outcome,
        } => format!("migration {migration} of {vm}: {outcome}"),
        other => format!("{other:?}"),
    }
}

fn receipt(r: &SignedReceipt) -> String {
    match postcard::from_bytes::<convoy_protocol::receipt::Receipt>(&r.body) {
        Ok(b) => format!("receipt {:?} for {}", b.kind, b.migration),
        Err(_) => "receipt (undecodable)".into(),
    }
}

fn ticket(t: &SignedTicket) -> String {
    match postcard::from_bytes::<Ticket>(&t.body) {
        Ok(b) => format!(
            "ticket {} (signed): {} from {} to {}",
            b.id, b.vm, b.source, b.destination
        ),
        Err(_) => "ticket (undecodable)".into(),
    }
}
