//! `convoyctl audit`: read and verify an agent's audit log offline, with
//! only the CA bundle (`--pki`); prove a migration with an evidence bundle
//! built from both agents' logs, and check such a bundle offline.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use convoy_agent::trust::identity::TrustBundle;
use convoy_agent::trust::pki::Pki;
use convoy_protocol::audit::{recover_log, verify_log, AuditEvent, TornTail, VerifiedLog};
use convoy_protocol::evidence::{
    build_bundle, check_bundle, BundleSummary, SideSummary, MAX_BUNDLE_LEN,
};
use convoy_protocol::names::{MigrationId, SpiffeId};
use convoy_protocol::receipt::SignedReceipt;
use convoy_protocol::ticket::{SignedTicket, Ticket};

use crate::conn::Global;
use crate::render;

/// Audit commands.
#[derive(Subcommand, Debug)]
pub enum Audit {
    /// Verify a whole log: chain, every signature, sequence, tree heads.
    /// A log that ends in a torn append (a crash in the middle of a write;
    /// the agent cuts it at its next start) is reported as such, with what
    /// verifies before it, and fails.
    Verify {
        /// The log file (an agent's STATE_DIR/audit.log).
        file: PathBuf,
        /// Whose log the file must be (its owner's SPIFFE ID): a log renamed
        /// from another agent, or re-signed under another agent's key, is
        /// refused. (`--agent` names the agent to talk to.)
        #[arg(long, value_name = "SPIFFE_ID")]
        owner: Option<SpiffeId>,
    },
    /// Verify, then print every record.
    Show {
        /// The log file.
        file: PathBuf,
        /// Whose log the file must be (its owner's SPIFFE ID): a log renamed
        /// from another agent, or re-signed under another agent's key, is
        /// refused. (`--agent` names the agent to talk to.)
        #[arg(long, value_name = "SPIFFE_ID")]
        owner: Option<SpiffeId>,
    },
    /// Write an evidence bundle of one migration: the operator's ticket and
    /// both agents' records of it, with inclusion proofs in their signed
    /// logs.
    Prove {
        /// The migration, as convoyctl prints it (its id in hex, or a
        /// unique prefix of it).
        migration: String,
        /// An agent's log: give the source's and the destination's.
        #[arg(long = "log", value_name = "FILE", required = true)]
        logs: Vec<PathBuf>,
        /// Where to write the bundle [default: evidence-MIGRATION.cvb].
        #[arg(short, long, value_name = "OUT")]
        out: Option<PathBuf>,
    },
    /// Verify an evidence bundle offline with only the CA bundle.
    CheckBundle {
        /// The bundle file.
        file: PathBuf,
    },
    /// Download an agent's audit log (--agent) over the operator API
    /// (a `ReadAudit` policy decision), verify it, and write it to OUT.
    Fetch {
        /// Where to write the log.
        #[arg(short, long, value_name = "OUT")]
        out: PathBuf,
    },
    /// Prove that the log now extends an earlier state of itself: an RFC
    /// 9162 consistency proof from its first FROM records to its first TO
    /// (default: all), verified and printed. Give --root (a root seen
    /// earlier, e.g. in an evidence bundle's tree head) to check the log
    /// against it: a log rewritten since then fails.
    Consistency {
        /// The log file.
        file: PathBuf,
        /// The earlier size (records).
        #[arg(long)]
        from: u64,
        /// The later size [default: the whole log].
        #[arg(long)]
        to: Option<u64>,
        /// The root of the earlier size as held elsewhere (hex).
        #[arg(long)]
        root: Option<String>,
        /// Whose log the file must be (its owner's SPIFFE ID): a log renamed
        /// from another agent, or re-signed under another agent's key, is
        /// refused. (`--agent` names the agent to talk to.)
        #[arg(long, value_name = "SPIFFE_ID")]
        owner: Option<SpiffeId>,
    },
}

/// Downloads, verifies and writes an agent's log.
async fn fetch(g: &Global, trust: &TrustBundle, out: &Path) -> Result<()> {
    let cl = crate::conn::client(g).await?;
    let bytes = cl.audit_log().await;
    cl.close().await;
    let mut bytes = bytes?;
    let r = recover_log(&bytes, trust).context("the fetched log is not intact")?;
    // A torn tail in a live agent's log is an append in progress as the
    // log was read: what is written is the log up to its last tree head.
    if let Some(t) = r.torn {
        bytes.truncate(t.offset);
        eprintln!(
            "note: the last {} bytes were an append in progress and are left out",
            t.len
        );
    }
    let log = r.log;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    if g.json {
        return render::json(&serde_json::json!({
            "verified": true,
            "agent": log.agent.to_string(),
            "records": log.records.len(),
            "bytes": bytes.len(),
            "file": out.display().to_string(),
        }));
    }
    println!(
        "fetched and verified: {} records by {} ({} bytes) → {}",
        log.records.len(),
        log.agent,
        bytes.len(),
        out.display()
    );
    Ok(())
}

/// Runs an audit command.
pub async fn run(g: &Global, c: Audit) -> Result<()> {
    let pki = Pki::open(&g.pki)?;
    let trust = pki.trust()?;
    match c {
        Audit::Verify { file, owner } => log(g, &trust, &file, owner.as_ref(), false),
        Audit::Show { file, owner } => log(g, &trust, &file, owner.as_ref(), true),
        Audit::Prove {
            migration,
            logs,
            out,
        } => prove(g, &trust, &migration, &logs, out),
        Audit::CheckBundle { file } => check(g, &trust, &file),
        Audit::Fetch { out } => fetch(g, &trust, &out).await,
        Audit::Consistency {
            file,
            from,
            to,
            root,
            owner,
        } => consistency(g, &trust, &file, owner.as_ref(), from, to, root.as_deref()),
    }
}

fn consistency(
    g: &Global,
    trust: &TrustBundle,
    file: &Path,
    owner: Option<&SpiffeId>,
    from: u64,
    to: Option<u64>,
    held: Option<&str>,
) -> Result<()> {
    use convoy_protocol::logtree::verify_consistency;
    let log = read_log(trust, file, owner)?;
    let to = to.unwrap_or(log.tree.len());
    if from > to || to > log.tree.len() {
        bail!(
            "sizes {from}..{to} do not fit a log of {} records",
            log.tree.len()
        );
    }
    let old_root = match held {
        Some(h) => parse_digest(h)?,
        None => log.tree.root_at(from)?,
    };
    let new_root = log.tree.root_at(to)?;
    let proof = log.tree.consistency_proof(from, to)?;
    verify_consistency(from, &old_root, to, &new_root, &proof).with_context(|| {
        format!(
            "{} does not extend the log of {from} records with root {}: rewritten since?",
            file.display(),
            old_root.to_hex()
        )
    })?;
    let proof_hex: Vec<String> = proof.iter().map(|d| d.to_hex()).collect();
    if g.json {
        return render::json(&serde_json::json!({
            "verified": true,
            "agent": log.agent.to_string(),
            "from": from,
            "old_root": old_root.to_hex(),
            "to": to,
            "new_root": new_root.to_hex(),
            "proof": proof_hex,
        }));
    }
    println!(
        "verified: the log of {} at {to} records (root {}) extends its first {from} records (root {})",
        log.agent,
        &new_root.to_hex()[..16],
        &old_root.to_hex()[..16]
    );
    for (i, p) in proof_hex.iter().enumerate() {
        println!("proof[{i}] {p}");
    }
    Ok(())
}

fn parse_digest(h: &str) -> Result<convoy_protocol::digest::Digest> {
    let h = h.trim();
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{h:?} is not a digest (64 hex digits)");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16)?;
    }
    Ok(convoy_protocol::digest::Digest(out))
}

/// Reads and verifies a log; with `owner`, it must be that agent's.
fn read_log(trust: &TrustBundle, file: &Path, owner: Option<&SpiffeId>) -> Result<VerifiedLog> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let log =
        verify_log(&bytes, trust).with_context(|| format!("{} is not intact", file.display()))?;
    owned_by(file, &log, owner)?;
    Ok(log)
}

/// With `owner`, the log must be that agent's.
fn owned_by(file: &Path, log: &VerifiedLog, owner: Option<&SpiffeId>) -> Result<()> {
    match owner {
        Some(owner) if &log.agent != owner => bail!(
            "{} is the log of {}, not of {owner}",
            file.display(),
            log.agent
        ),
        _ => Ok(()),
    }
}

/// `audit verify` and `audit show`. A torn tail fails (status 1) after
/// what verifies before it is printed: the log is not whole until the
/// agent has cut it and recorded the cut.
fn log(
    g: &Global,
    trust: &TrustBundle,
    file: &Path,
    owner: Option<&SpiffeId>,
    show: bool,
) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let recovered =
        recover_log(&bytes, trust).with_context(|| format!("{} is not intact", file.display()))?;
    let (log, torn_tail) = (recovered.log, recovered.torn);
    owned_by(file, &log, owner)?;
    let head = log.last_head.as_ref();
    if g.json {
        let records: Vec<serde_json::Value> = log
            .records
            .iter()
            .map(|r| serde_json::json!({ "seq": r.seq, "at_unix": r.at_unix, "event": describe(&r.event) }))
            .collect();
        render::json(&serde_json::json!({
            "verified": torn_tail.is_none(),
            "agent": log.agent.to_string(),
            "records": if show { serde_json::Value::Array(records) } else { log.records.len().into() },
            "tree_size": head.map(|h| h.size),
            "root": head.map(|h| h.root.to_hex()),
            "torn_tail": torn_tail.map(|t| serde_json::json!({
                "offset": t.offset,
                "entry": t.entry,
                "bytes": t.len,
                "whole_record": t.whole_record,
            })),
        }))?;
    } else {
        if show {
            println!("{:>5}  {:>10}  event", "seq", "time");
            for r in &log.records {
                println!("{:>5}  {:>10}  {}", r.seq, r.at_unix, describe(&r.event));
            }
        }
        println!(
            "{}: {} records by {}, signed tree head size {} root {}",
            if torn_tail.is_some() {
                "verified up to a torn tail"
            } else {
                "verified"
            },
            log.records.len(),
            log.agent,
            head.map_or(0, |h| h.size),
            head.map_or_else(|| "-".into(), |h| h.root.to_hex()[..16].to_string()),
        );
    }
    match torn_tail {
        Some(t) => Err(torn(file, &t)),
        None => Ok(()),
    }
}

/// What an operator reads about a torn tail.
fn torn(file: &Path, t: &TornTail) -> anyhow::Error {
    anyhow::anyhow!(
        "{} ends in a torn append: {} bytes from byte {} (entry {}) after the last signed tree head{}, \
         left by a crash in the middle of a write; everything before verifies. The agent cuts them \
         off at its next start, keeps them in {}.torn-{}-… and records the cut. If the agent is \
         running, this may be an append in progress as the file was read: run this again, or \
         read the log with `convoyctl audit fetch`",
        file.display(),
        t.len,
        t.offset,
        t.entry,
        if t.whole_record {
            " (a whole record without its head)"
        } else {
            ""
        },
        file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        t.offset
    )
}

fn prove(
    g: &Global,
    trust: &TrustBundle,
    migration: &str,
    files: &[PathBuf],
    out: Option<PathBuf>,
) -> Result<()> {
    let logs = files
        .iter()
        .map(|f| read_log(trust, f, None))
        .collect::<Result<Vec<_>>>()?;
    let id = resolve(migration, &logs)?;
    let bundle = build_bundle(id, &logs).with_context(|| format!("cannot prove migration {id}"))?;
    let bytes = bundle.encode()?;
    // Never hand out evidence that does not check.
    let summary = check_bundle(&bytes, trust)
        .with_context(|| format!("the logs' evidence of migration {id} does not verify"))?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("evidence-{id}.cvb")));
    std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    if g.json {
        let mut v = summary_json(&summary);
        v["file"] = out.display().to_string().into();
        v["bytes"] = bytes.len().into();
        return render::json(&v);
    }
    println!(
        "wrote {} ({} bytes): evidence of migration {id}",
        out.display(),
        bytes.len()
    );
    print_summary(&summary);
    Ok(())
}

fn check(g: &Global, trust: &TrustBundle, file: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_BUNDLE_LEN as u64 + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", file.display()))?;
    let summary = check_bundle(&bytes, trust)
        .with_context(|| format!("{} is not valid evidence", file.display()))?;
    if g.json {
        return render::json(&summary_json(&summary));
    }
    print_summary(&summary);
    Ok(())
}

/// The full hex of a migration id (convoyctl prints its first half).
fn hex(m: &MigrationId) -> String {
    m.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one migration in `logs` whose id starts with `prefix`.
fn resolve(prefix: &str, logs: &[VerifiedLog]) -> Result<MigrationId> {
    let p = prefix.to_ascii_lowercase();
    if p.is_empty() || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{prefix:?} is not a migration id (hex digits, as convoyctl prints it)");
    }
    let known: BTreeSet<[u8; 16]> = logs
        .iter()
        .flat_map(|l| &l.records)
        .filter_map(|r| match &r.event {
            AuditEvent::TicketAccepted { migration, .. }
            | AuditEvent::Outcome { migration, .. }
            | AuditEvent::Refused {
                migration: Some(migration),
                ..
            } => Some(migration.0),
            _ => None,
        })
        .collect();
    let hits: Vec<MigrationId> = known
        .into_iter()
        .map(MigrationId)
        .filter(|m| hex(m).starts_with(&p))
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no migration {prefix} in these logs"),
        many => bail!(
            "{prefix} names {} migrations in these logs: give more digits",
            many.len()
        ),
    }
}

fn side_json(s: &SideSummary) -> serde_json::Value {
    serde_json::json!({
        "agent": s.agent.to_string(),
        "records": s.records,
        "tree_size": s.head.size,
        "root": s.head.root.to_hex(),
        "head_at_unix": s.head.at_unix,
        "accepted": s.accepted,
        "receipts": s.receipts.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>(),
        "outcomes": s.outcomes,
        "refusals": s.refusals,
    })
}

fn summary_json(s: &BundleSummary) -> serde_json::Value {
    let t = &s.ticket.ticket;
    serde_json::json!({
        "verified": true,
        "migration": s.migration.to_string(),
        "migration_id": hex(&s.migration),
        "vm": t.vm.to_string(),
        "operator": s.ticket.signer.to_string(),
        "ticket_digest": s.ticket_digest.to_hex(),
        "approvals": s.ticket.approvals.0.iter().map(|a| serde_json::json!({
            "operator": a.principal.to_string(),
            "role": a.role.map(|r| r.to_string()),
            "key": a.key.to_hex(),
            "approved_at": a.approved_at,
        })).collect::<Vec<_>>(),
        "issued_at": t.issued_at,
        "expires_at": t.expires_at,
        "started": s.started,
        "memory_root": s.memory_root.map(|d| d.to_hex()),
        "device_digest": s.device.map(|d| d.to_hex()),
        "source": side_json(&s.source),
        "destination": side_json(&s.destination),
    })
}

fn print_summary(s: &BundleSummary) {
    let t = &s.ticket.ticket;
    println!(
        "evidence verified: migration {} of {} from {} to {}, {}",
        s.migration,
        t.vm,
        t.source,
        t.destination,
        if s.started {
            "started at the destination"
        } else {
            "not started at the destination"
        }
    );
    println!(
        "  ticket       signed by {}, valid {}..{}, digest {}",
        s.ticket.signer,
        t.issued_at,
        t.expires_at,
        &s.ticket_digest.to_hex()[..16]
    );
    if !s.ticket.approvals.is_empty() {
        let who: Vec<String> = s
            .ticket
            .approvals
            .0
            .iter()
            .map(|a| match a.role {
                Some(r) => format!("{} ({r})", a.principal),
                None => a.principal.to_string(),
            })
            .collect();
        println!(
            "  approvals    {} distinct keys: {}",
            s.ticket.approvals.count(),
            who.join(", ")
        );
    }
    for (name, side) in [("source", &s.source), ("destination", &s.destination)] {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        let receipts: Vec<String> = side.receipts.iter().map(|k| format!("{k:?}")).collect();
        println!(
            "  {name:<12} {}: {} records in its signed tree head (size {}, root {}, at {}); ticket {}; receipts {}; outcome {}{}",
            side.agent,
            side.records,
            side.head.size,
            &side.head.root.to_hex()[..16],
            side.head.at_unix,
            if side.accepted { "accepted" } else { "not accepted" },
            list(&receipts),
            list(&side.outcomes),
            if side.refusals.is_empty() {
                String::new()
            } else {
                format!("; refused: {}", side.refusals.join("; "))
            }
        );
    }
    if let (Some(m), Some(d)) = (s.memory_root, s.device) {
        println!(
            "  state        memory root {}, device state {}, as the receipts attest",
            &m.to_hex()[..16],
            &d.to_hex()[..16]
        );
    }
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
        AuditEvent::Decision {
            migration,
            action,
            principal,
            resource,
            permitted: _,
            explanation,
        } => format!(
            "policy: {action} by {principal} on {resource}{}: {explanation}",
            migration.map_or_else(String::new, |m| format!(" (migration {m})"))
        ),
        AuditEvent::PolicyLoaded { digest, policies } => {
            format!("policy loaded: {policies} policies, digest {digest}")
        }
        AuditEvent::Phase {
            migration,
            vm,
            phase,
            after_ms,
        } => format!("migration {migration} of {vm}: {phase} (+{after_ms} ms)"),
        AuditEvent::PolicyRejected { reason } => {
            format!("policy reload refused, previous policy kept: {reason}")
        }
        AuditEvent::TornTailCut {
            offset,
            bytes,
            digest,
        } => format!(
            "torn last append cut off at start: {bytes} bytes from byte {offset} (BLAKE3 {digest}), \
             kept next to the log as .torn-{offset}-{}",
            &digest.to_hex()[..16]
        ),
        AuditEvent::Unfinished {
            migration,
            vm,
            role,
            phase,
            epoch,
        } => format!(
            "migration {migration} of {vm} found unfinished at start: {role}, {phase}, epoch {epoch}"
        ),
        AuditEvent::VmAtStart { vm, outcome } => format!("at start, VM {vm}: {outcome}"),
        AuditEvent::Resolution {
            migration,
            vm,
            role,
            decision,
            reason,
            operator,
            statement,
        } => format!(
            "migration {migration} of {vm} resolved ({role}){}: {decision} — {reason}{}",
            operator
                .as_ref()
                .map(|o| format!(" at the request of {o}"))
                .unwrap_or_default(),
            if statement.is_some() {
                ", on the destination's signed statement"
            } else {
                ""
            }
        ),
        AuditEvent::Snapshot {
            operation,
            operator,
            url,
            vm,
            object,
            digest,
        } => format!(
            "snapshot {operation}{} at {url}: {object} ({}) at the request of {operator}",
            vm.as_ref().map(|v| format!(" of {v}")).unwrap_or_default(),
            &digest.to_hex()[..16]
        ),
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
            "ticket {} (signed): {} from {} to {}{}",
            b.id,
            b.vm,
            b.source,
            b.destination,
            if b.approvals.is_empty() {
                String::new()
            } else {
                format!(", {} approvals", b.approvals.len())
            }
        ),
        Err(_) => "ticket (undecodable)".into(),
    }
}
