//! Migrations left unfinished, resolved by the two agents: the rules of
//! [`convoy_protocol::indoubt`] (the reasoning is in SECURITY.md, "Exactly
//! once") applied to this agent's journal, VMs and links.
//!
//! - **The source asks.** A migration the source committed and never saw
//!   `Started` for is in doubt: its VM stays paused here. The source dials
//!   the destination on a new mutually authenticated connection, sends
//!   `Inquire` (migration, ticket digest, epoch) and acts only on a
//!   `Statement` signed by the ticket's destination about that very
//!   question: `RunsHere` → the copy here is discarded; `Fenced` → the VM
//!   resumes here; anything else (no answer, `NeedsPages`, `Unknown`) → it
//!   stays paused, and the source asks again later ([`watch`]: after a
//!   lost link, at start, with a growing pause up to 30 s).
//! - **The destination answers** ([`answer`]) only the agent the
//!   migration came from, about the ticket it came with. Before a
//!   `Fenced` leaves, the fence is in its journal (an abort: the journal
//!   then refuses any later handover), so a `Handover` or `Resume` still in
//!   flight is refused.
//! - **The destination never needs to ask**: a handover in its journal
//!   means the VM runs here (or waits for pages); no handover means the
//!   staging is fenced and discarded.
//! - **At start** ([`at_start`]) each unfinished record is resolved as far
//!   as this side alone can, and the source's doubts are handed to
//!   [`watch`].
//! - **`convoyctl recover`** ([`recover`]) does the same on demand, for
//!   one VM or all, and reports each decision; `--force-resume-here`
//!   resumes a source's copy without the destination's word.
//!
//! Every decision is audited (`AuditEvent::Resolution`, with the signed
//! statement it rests on). Migrations still in progress in this process
//! are left alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{RecoveryDecision, RecoveryReport, VmState};
use convoy_protocol::indoubt::{
    destination_answer, source_decides, DestinationStanding, Held, Inquiry, SignedStatement,
    SourceDecision, SourceStanding, Statement, Undecided, Verdict,
};
use convoy_protocol::journal::{JournalPhase, JournalRecord, JournalRole, JournalStep};
use convoy_protocol::message::Message;
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};

use crate::host::fleet::TakeBack;
use convoy_protocol::signed::Signed;

use super::journal::JournalChange;
use super::{Host, VmHandle};
use crate::transport::{self, read_message, write_message, Peer, ALPN_AGENT};

/// How long one inquiry may take: dial, ask, answer.
const INQUIRY_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause between inquiries about a migration in doubt; it
/// doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between inquiries.
const RETRY_MAX: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------
// The destination: what it holds, and its answers.
// ---------------------------------------------------------------------

/// What this host holds of the VM a record says was handed over to it;
/// `None` when that cannot be said now (the VM is still arriving in this
/// process, or it is listed but cannot be verified): the answer is then
/// `Unknown`, and the source asks again later.
fn held(host: &Host, r: &JournalRecord) -> Option<Held> {
    // A migration running here that takes a Resume from its source (only
    // one with a recovery window registers).
    let waits = host
        .recoveries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&r.migration)
        .is_some_and(|w| w.source == r.peer);
    let vms = host.vms();
    let Some(e) = vms.get(&r.vm) else {
        // Never registered (the agent died between the handover and the
        // start), or its registry forgot it: nothing here can run it.
        return Some(Held::Gone);
    };
    match (&e.handle, e.state) {
        (None, _) => None,
        // A sim VM whose memory lived in an agent process that ended: no
        // copy of it can run here.
        (Some(VmHandle::Lost(l)), _) if l.memory_gone => Some(Held::Gone),
        // A QEMU, or a sim VM's helper, that runs but cannot be verified
        // may be running it.
        (Some(VmHandle::Lost(_)), _) => None,
        (Some(_), VmState::Exited) => Some(Held::Gone),
        // Running by post-copy, or waiting for its source after a broken
        // link: pages are missing, and this migration takes its source's
        // Resume.
        (Some(_), VmState::PostcopyIn | VmState::Recovering) if waits => Some(Held::Waiting),
        // Arriving by post-copy, waiting for its source, or in doubt after
        // the switch: pages may be missing. (A pre-copy start that could
        // not be confirmed is in doubt too, though whole: taken as
        // incomplete, so the source keeps its copy — never the unsafe way.)
        (Some(_), VmState::PostcopyIn | VmState::Recovering | VmState::InDoubt) => {
            Some(Held::Incomplete)
        }
        (Some(_), _) => Some(Held::Complete),
    }
}

/// Whether this process still drives the migration `r` (so nobody else
/// may decide it): a source whose VM is claimed by a migration, a
/// destination whose VM is still arriving.
fn in_progress(host: &Host, r: &JournalRecord) -> bool {
    let vms = host.vms();
    let Some(e) = vms.get(&r.vm) else {
        return false;
    };
    match r.role {
        JournalRole::Source => e.cancel.is_some(),
        JournalRole::Destination => {
            e.handle.is_none()
                || matches!(
                    e.state,
                    VmState::Incoming | VmState::PostcopyIn | VmState::Recovering
                )
        }
    }
}

/// Answers the source's `inquiry` on a connection from agent `peer`: the
/// journal's standing, a fence recorded first when the answer is a new
/// `Fenced`, then the signed statement. Only the agent the migration came
/// from, with its ticket, is answered; anyone else is refused and audited.
pub(crate) async fn answer(
    host: Arc<Host>,
    conn: crate::transport::Connection,
    peer: Peer,
    mut send: crate::transport::SendStream,
    inquiry: Inquiry,
) {
    // No lock: the journal applies the fence atomically, and refuses it
    // once the record moved on.
    let (verdict, vm) = match decide_answer(&host, &peer.id, &inquiry).await {
        Ok(v) => v,
        Err(why) => {
            host.audit_refusal(peer.id.to_string(), why.clone());
            conn.close(transport::close::UNAUTHORIZED.into(), why.as_bytes());
            return;
        }
    };
    let statement = Statement {
        migration: inquiry.migration,
        ticket: inquiry.ticket,
        epoch: inquiry.epoch,
        verdict,
        at_unix: crate::trust::authz::now_unix(),
    };
    let creds = host.creds();
    let signed = match Signed::sign(&statement, &creds.identity) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot sign a statement: {e}");
            conn.close(transport::close::DONE.into(), b"cannot sign");
            return;
        }
    };
    if let Some(vm) = vm {
        host.audit(AuditEvent::Resolution {
            migration: inquiry.migration,
            vm,
            role: JournalRole::Destination.name().into(),
            decision: verdict_name(verdict).into(),
            reason: format!(
                "answered {}'s inquiry about epoch {}",
                peer.id, inquiry.epoch
            ),
            operator: None,
            statement: Some(signed.clone()),
        });
    }
    tracing::info!(migration = %inquiry.migration, peer = %peer.id, ?verdict, "answered an inquiry");
    let _ = write_message(&mut send, &Message::Statement(signed)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// The verdict for `inquiry` from `asker` and the VM it is about (`None`
/// when there is no record), with the fence journalled first where the
/// rules need one; `Err`: refuse the asker.
async fn decide_answer(
    host: &Arc<Host>,
    asker: &SpiffeId,
    inquiry: &Inquiry,
) -> Result<(Verdict, Option<VmName>), String> {
    let record = host
        .journal
        .record(inquiry.migration, JournalRole::Destination)
        .map_err(|e| format!("the journal cannot be read: {e}"))?;
    let Some(r) = record else {
        return Ok((Verdict::Unknown, None));
    };
    if &r.peer != asker {
        return Err(format!(
            "an inquiry about migration {} from {asker}, which it did not come from",
            inquiry.migration
        ));
    }
    if r.ticket != inquiry.ticket {
        return Err(format!(
            "an inquiry about migration {} with another ticket",
            inquiry.migration
        ));
    }
    // The VM still arriving here, or listed but unverified: say nothing
    // that could decide it.
    let mut undecided = false;
    let standing = DestinationStanding::of(Some(&r), || {
        held(host, &r).unwrap_or_else(|| {
            undecided = true;
            Held::Complete
        })
    });
    if undecided {
        return Ok((Verdict::Unknown, Some(r.vm)));
    }
    let a = destination_answer(standing, inquiry);
    if a.fence_first.is_some() {
        // The promise is on disk before it leaves; a failure here means no
        // answer at all.
        fence(host, &r).await?;
        drop_dead_copy(host, &r.vm).await;
    }
    Ok((a.verdict, Some(r.vm)))
}

/// After a fence: a VM listed here only as a lost sim VM whose memory
/// died with an agent is the source's now; what is left of it (its
/// registry entry, its disks) goes.
async fn drop_dead_copy(host: &Host, vm: &VmName) {
    let dead = matches!(
        host.vms().get(vm).and_then(|e| e.handle.clone()),
        Some(VmHandle::Lost(l)) if l.memory_gone
    );
    if dead {
        if let Some(h) = host.remove(vm).and_then(|e| e.handle) {
            h.destroy().await;
        }
    }
}

/// Journals the destination's fence for `r` (an abort: the journal then
/// refuses any handover for it).
async fn fence(host: &Host, r: &JournalRecord) -> Result<(), String> {
    host.journal(JournalChange::Advance {
        migration: r.migration,
        role: JournalRole::Destination,
        step: JournalStep::Abort,
    })
    .await
    .map(|_| ())
    .map_err(|e| format!("the fence could not be recorded: {e}"))
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::RunsHere => "told the source: runs here",
        Verdict::NeedsPages => "told the source: runs here, needs its pages",
        Verdict::AwaitsResume => "told the source: runs here, waits for its pages (resume)",
        Verdict::Fenced => "told the source: fenced, never runs here",
        _ => "told the source: no record",
    }
}

/// Resolves a destination's record as far as this side alone can.
async fn resolve_destination(host: &Arc<Host>, r: &JournalRecord) -> (RecoveryDecision, String) {
    match r.phase {
        JournalPhase::Staged => match fence(host, r).await {
            Ok(()) => (
                RecoveryDecision::Fenced,
                "staged and never handed over: fenced, the staging is discarded, and the source \
                 resumes its copy when it asks"
                    .into(),
            ),
            Err(e) => (RecoveryDecision::StaysPaused, e),
        },
        _ => match held(host, r) {
            None => (
                RecoveryDecision::StaysPaused,
                "handed over, but the VM here cannot be verified now (listed lost or still \
                 arriving)"
                    .into(),
            ),
            Some(Held::Gone) => match fence(host, r).await {
                Ok(()) => {
                    drop_dead_copy(host, &r.vm).await;
                    (
                    RecoveryDecision::Fenced,
                    "handed over, but no copy is left here: fenced, so the source may resume its \
                     own"
                    .into(),
                    )
                }
                Err(e) => (RecoveryDecision::AwaitsSource, e),
            },
            Some(Held::Incomplete | Held::Waiting) => (
                RecoveryDecision::RunsHere,
                "handed over by post-copy: runs here on the pages it has and waits for the source's \
                 reconnection for the rest"
                    .into(),
            ),
            Some(Held::Complete) => run_here(host, r).await,
        },
    }
}

/// A destination that holds the whole VM (running, or as an operator
/// left it) settles its record: the VM is this host's.
async fn run_here(host: &Arc<Host>, r: &JournalRecord) -> (RecoveryDecision, String) {
    for step in settle_steps(r, JournalStep::Complete) {
        if let Err(e) = host
            .journal(JournalChange::Advance {
                migration: r.migration,
                role: r.role,
                step,
            })
            .await
        {
            return (
                RecoveryDecision::RunsHere,
                format!("runs here; its record could not be settled: {e}"),
            );
        }
    }
    (
        RecoveryDecision::RunsHere,
        "handed over and whole here: it runs here".into(),
    )
}

/// The journal steps that take `r` to `end` (`Complete`: through `Start`
/// when it was not recorded yet).
fn settle_steps(r: &JournalRecord, end: JournalStep) -> Vec<JournalStep> {
    match (r.phase, end) {
        (JournalPhase::Committed | JournalPhase::HandedOver, JournalStep::Complete) => {
            vec![JournalStep::Start, JournalStep::Complete]
        }
        _ => vec![end],
    }
}

// ---------------------------------------------------------------------
// The source: asking and acting.
// ---------------------------------------------------------------------

/// Where to reach the destination of `r`: the address the source dialled
/// (kept in its claim), else the agent's `--peer` entry for that name.
fn destination_addr(host: &Host, r: &JournalRecord) -> Result<SocketAddr, String> {
    if let Some(a) = &r.peer_addr {
        return a
            .parse()
            .map_err(|e| format!("the recorded address {a:?} does not parse: {e}"));
    }
    host.config
        .peers
        .get(r.peer.name())
        .copied()
        .ok_or_else(|| format!("no address for {} (give it with --peer)", r.peer))
}

/// Asks the destination of `r` where the migration stands: the opened
/// statement, who signed it, and the statement as received.
async fn ask(
    host: &Arc<Host>,
    r: &JournalRecord,
    inquiry: &Inquiry,
) -> Result<(Statement, SpiffeId, SignedStatement), String> {
    let addr = destination_addr(host, r)?;
    let creds = host.creds();
    let asked = async {
        let conn = host
            .dialer
            .connect(
                addr,
                r.peer.clone(),
                ALPN_AGENT,
                &creds.identity,
                &creds.trust,
            )
            .await
            .map_err(|e| format!("cannot reach {} at {addr}: {e}", r.peer))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("no stream to {}: {e}", r.peer))?;
        write_message(&mut send, &Message::Inquire(inquiry.clone()))
            .await
            .map_err(|e| format!("cannot ask {}: {e}", r.peer))?;
        let _ = send.finish();
        let reply = read_message(&mut recv).await;
        conn.close(transport::close::DONE.into(), b"done");
        match reply {
            Ok(Some(Message::Statement(s))) => Ok(s),
            Ok(Some(other)) => Err(format!("{} answered with {}", r.peer, other.kind())),
            Ok(None) => Err(format!("{} closed without an answer", r.peer)),
            Err(e) => Err(format!("no answer from {}: {e}", r.peer)),
        }
    };
    let signed = tokio::time::timeout(INQUIRY_TIMEOUT, asked)
        .await
        .map_err(|_| {
            format!(
                "{} did not answer within {} s",
                r.peer,
                INQUIRY_TIMEOUT.as_secs()
            )
        })??;
    let (statement, signer) = signed
        .open(&creds.trust, crate::trust::authz::now_unix())
        .map_err(|e| format!("the answer does not verify: {e}"))?;
    Ok((statement, signer, signed))
}

/// Resolves a source's record: resumes the VM if it never left, asks the
/// destination when it is in doubt and acts on the signed answer, or with
/// `force` resumes it without asking.
async fn resolve_source(
    host: &Arc<Host>,
    r: &JournalRecord,
    force: bool,
) -> (RecoveryDecision, String, Option<SignedStatement>) {
    match SourceStanding::of(r) {
        Some(SourceStanding::Claimed) => {
            let why = "claimed and never committed: the destination cannot run it";
            let (d, why) = resume_here(host, r, why, TakeBack::NotNeeded).await;
            (d, why, None)
        }
        Some(SourceStanding::Committed { .. }) if force => {
            let why = "forced by the operator, without the destination's word";
            let (d, why) = resume_here(host, r, why, TakeBack::OwnOnly).await;
            (d, why, None)
        }
        Some(SourceStanding::Committed { epoch }) => {
            let inquiry = Inquiry {
                migration: r.migration,
                ticket: r.ticket,
                epoch,
            };
            let answer = ask(host, r, &inquiry).await;
            let statement = answer.as_ref().ok().map(|(_, _, s)| s.clone());
            let decision =
                source_decides(&inquiry, &r.peer, answer.map(|(s, signer, _)| (s, signer)));
            let (d, why) = match decision {
                SourceDecision::ResumeHere => {
                    let why = "the destination fenced the handoff (signed)";
                    resume_here(host, r, why, TakeBack::GivenBack).await
                }
                SourceDecision::DiscardHere => {
                    discard_here(host, r, "the destination runs it (signed)").await
                }
                SourceDecision::ResumePostcopy => take_up(host, r).await,
                // No answer, with a registry: it says whether the
                // destination committed, even when the peer is gone.
                SourceDecision::StayPaused(Undecided::NoAnswer(why))
                    if host.config.registry.is_some() =>
                {
                    let said = crate::host::fleet::unanswered(host, &r.vm).await;
                    let why = format!("no answer from the destination ({why}); ");
                    match said {
                        Ok(ours) => resume_here(host, r, &(why + &ours), TakeBack::OwnOnly).await,
                        Err(e) => stay_paused(host, r, &(why + &e)),
                    }
                }
                SourceDecision::StayPaused(u) => stay_paused(host, r, &u),
            };
            (d, why, statement)
        }
        // The destination's `Started` is recorded here: only the wipe of
        // the copy was left.
        Some(SourceStanding::Finished) if r.phase == JournalPhase::Started => {
            let (d, why) = discard_here(host, r, "the destination confirmed it started").await;
            (d, why, None)
        }
        Some(SourceStanding::Finished) | None => (
            RecoveryDecision::StaysPaused,
            format!("nothing to decide: the record is {}", r.phase),
            None,
        ),
    }
}

/// The destination waits for the pages it lacks (signed): the migration
/// is taken up again from the paused copy here, or stays paused.
async fn take_up(host: &Arc<Host>, r: &JournalRecord) -> (RecoveryDecision, String) {
    let taken = async {
        let addr = destination_addr(host, r)?;
        crate::engine::outgoing::take_up(host, r, addr).await
    };
    match taken.await {
        Ok(why) => (RecoveryDecision::PostcopyTakenUp, why),
        Err(why) => {
            mark_in_doubt(host, &r.vm);
            (
                RecoveryDecision::StaysPaused,
                format!("the destination waits for its pages, but post-copy cannot be taken up again here: {why}"),
            )
        }
    }
}

/// The VM stays paused here; why.
fn stay_paused(
    host: &Host,
    r: &JournalRecord,
    why: &dyn std::fmt::Display,
) -> (RecoveryDecision, String) {
    mark_in_doubt(host, &r.vm);
    (RecoveryDecision::StaysPaused, why.to_string())
}

/// Lists the source's copy of `vm` in doubt — a VM it holds, not one
/// listed lost (that stays as it is).
fn mark_in_doubt(host: &Host, vm: &VmName) {
    if let Some(e) = host.vms().get_mut(vm) {
        if matches!(e.handle, Some(VmHandle::Sim(_) | VmHandle::Qemu(_))) {
            e.state = VmState::InDoubt;
        }
    }
}

/// Gives the VM back to this host: the journal first (the give-back, or
/// the failed claim), then the VM resumes.
async fn resume_here(
    host: &Arc<Host>,
    r: &JournalRecord,
    why: &str,
    take: TakeBack,
) -> (RecoveryDecision, String) {
    // With a registry, it resumes here only once the registry says it is
    // ours (rewritten so, fencing a commit still on its way).
    if let Err(e) = crate::host::fleet::take_back(host, r, take).await {
        return stay_paused(host, r, &format!("{why}, but {e}"));
    }
    if let Err(e) = host
        .journal(JournalChange::Advance {
            migration: r.migration,
            role: JournalRole::Source,
            step: JournalStep::Abort,
        })
        .await
    {
        return (
            RecoveryDecision::StaysPaused,
            format!("{why}, but the give-back could not be recorded: {e}"),
        );
    }
    let handle = host.vms().get(&r.vm).and_then(|e| e.handle.clone());
    let resumed = match &handle {
        Some(VmHandle::Sim(vm)) => {
            vm.set_throttle(0);
            if vm.is_running() {
                Ok(())
            } else {
                vm.resume().map_err(|e| e.to_string())
            }
        }
        Some(VmHandle::Qemu(q)) => q
            .execute("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Some(VmHandle::Lost(l)) => Err(format!("the VM here is lost: {}", l.reason)),
        None => Err("no copy of the VM is here".into()),
    };
    match resumed {
        Ok(()) => {
            host.set_state(&r.vm, VmState::Running);
            (RecoveryDecision::ResumedHere, why.into())
        }
        Err(e) => {
            // Its record is the source's again: an operator may resume it
            // (`vm resume`) once the cause is fixed.
            if handle.is_some() {
                host.set_state(&r.vm, VmState::Paused);
            }
            (
                RecoveryDecision::StaysPaused,
                format!("{why}; given back here, but it does not resume: {e}"),
            )
        }
    }
}

/// The VM runs at the destination (`why`): the journal first, then the
/// copy here goes.
async fn discard_here(
    host: &Arc<Host>,
    r: &JournalRecord,
    why: &str,
) -> (RecoveryDecision, String) {
    for step in settle_steps(r, JournalStep::Complete) {
        if let Err(e) = host
            .journal(JournalChange::Advance {
                migration: r.migration,
                role: JournalRole::Source,
                step,
            })
            .await
        {
            return (
                RecoveryDecision::StaysPaused,
                format!("it runs at the destination, but that could not be recorded: {e}"),
            );
        }
    }
    if let Some(h) = host.remove(&r.vm).and_then(|e| e.handle) {
        h.destroy().await;
    }
    (
        RecoveryDecision::DiscardedHere,
        format!("{why}: the paused copy here is discarded"),
    )
}

// ---------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------

/// Resolves one unfinished record (this process must not be driving it):
/// the report, and the statement it rests on.
async fn resolve(
    host: &Arc<Host>,
    r: &JournalRecord,
    force: bool,
) -> (RecoveryReport, Option<SignedStatement>) {
    let (decision, reason, statement) = match r.role {
        JournalRole::Source => resolve_source(host, r, force).await,
        JournalRole::Destination => {
            let (d, why) = resolve_destination(host, r).await;
            (d, why, None)
        }
    };
    let report = RecoveryReport {
        migration: r.migration,
        vm: r.vm.clone(),
        role: r.role.name().into(),
        peer: r.peer.to_string(),
        phase: r.phase.name().into(),
        decision,
        reason,
    };
    (report, statement)
}

/// Logs and audits a resolution.
fn audit(
    host: &Host,
    report: &RecoveryReport,
    operator: Option<&SpiffeId>,
    statement: Option<SignedStatement>,
) {
    let RecoveryReport {
        migration,
        vm,
        role,
        decision,
        reason,
        ..
    } = report;
    tracing::info!(
        %migration,
        %vm,
        %role,
        decision = decision.describe(),
        %reason,
        "migration resolution"
    );
    host.audit(AuditEvent::Resolution {
        migration: *migration,
        vm: vm.clone(),
        role: role.clone(),
        decision: decision.describe().into(),
        reason: reason.clone(),
        operator: operator.map(ToString::to_string),
        statement,
    });
}

/// `convoyctl recover`: resolves the unfinished migrations of `vm` (or
/// all) that this process is not driving, one after another; `may` says
/// whether the policy lets `operator` recover a VM (`Err`: why not).
pub(crate) async fn recover(
    host: &Arc<Host>,
    vm: Option<&VmName>,
    operator: &SpiffeId,
    force: bool,
    may: impl Fn(&VmName) -> Result<(), String>,
) -> Result<Vec<RecoveryReport>, String> {
    let _one = host.resolving.lock().await;
    let records = host
        .journal
        .unfinished()
        .map_err(|e| format!("the journal cannot be read: {e}"))?;
    let mut out = Vec::new();
    for r in records {
        if vm.is_some_and(|v| v != &r.vm) {
            continue;
        }
        let left = |reason: String| RecoveryReport {
            migration: r.migration,
            vm: r.vm.clone(),
            role: r.role.name().into(),
            peer: r.peer.to_string(),
            phase: r.phase.name().into(),
            decision: RecoveryDecision::StaysPaused,
            reason,
        };
        if let Err(why) = may(&r.vm) {
            out.push(left(why));
            continue;
        }
        if in_progress(host, &r) {
            out.push(left("in progress in this agent: nothing to recover".into()));
            continue;
        }
        let (report, statement) = resolve(host, &r, force).await;
        audit(host, &report, Some(operator), statement);
        out.push(report);
    }
    Ok(out)
}

/// At start: every unfinished record resolved as far as this side alone
/// can; a source's doubts are asked about in the background until
/// decided.
pub(crate) async fn at_start(host: &Arc<Host>) {
    let records = match host.journal.unfinished() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("the journal cannot be read: {e}");
            return;
        }
    };
    for r in records {
        // The source's doubts need the other side: asked in the
        // background, so that serving does not wait for it.
        if SourceStanding::of(&r).is_some_and(|s| matches!(s, SourceStanding::Committed { .. })) {
            mark_in_doubt(host, &r.vm);
            watch(host.clone(), r.migration, Duration::ZERO);
            continue;
        }
        let _one = host.resolving.lock().await;
        let (report, statement) = resolve(host, &r, false).await;
        audit(host, &report, None, statement);
    }
}

/// Asks about the source's migration `migration`, after `first`, then
/// again and again (after a pause that grows to [`RETRY_MAX`]) until it
/// is decided or someone else settled it. An undecided answer is audited
/// when its reason changes, not at every try.
pub(crate) fn watch(host: Arc<Host>, migration: MigrationId, first: Duration) {
    // Holds the agent only while it asks: the task ends with the agent
    // (`Agent::run` aborts it), and must not keep its state open.
    let weak = Arc::downgrade(&host);
    let task = async move {
        let mut pause = first;
        let mut last = String::new();
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).clamp(RETRY_FIRST, RETRY_MAX);
            let Some(host) = weak.upgrade() else {
                return;
            };
            let _one = host.resolving.lock().await;
            let r = match host.journal.record(migration, JournalRole::Source) {
                Ok(Some(r)) if !r.is_settled() => r,
                _ => return,
            };
            if in_progress(&host, &r) {
                continue;
            }
            let (report, statement) = resolve(&host, &r, false).await;
            let decided = report.decision != RecoveryDecision::StaysPaused;
            if decided || report.reason != last {
                audit(&host, &report, None, statement);
                last = report.reason.clone();
            }
            if decided {
                return;
            }
        }
    };
    host.watchers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .spawn(task);
}
