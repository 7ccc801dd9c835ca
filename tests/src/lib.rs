//! Shared helpers for the cross-crate integration tests in `tests/tests/`:
//! the `it` test binary (one module per topic) and `secrets`.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_agent::lab::Lab;
use convoy_agent::transport::{self, Tuning, ALPN_AGENT};
use convoy_protocol::ctl::{MigrateRequest, SimVmSpec, VmState};
use convoy_protocol::message::{Capabilities, Manifest, Message, Propose, VersionRange};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::Role;
use convoy_protocol::page::{Compression, MemoryGeometry, RunKind};
use convoy_protocol::ticket::{SignedTicket, Ticket};

/// A batch hook that flips bit `mask` of byte `at` in the first raw
/// (uncompressed) batch of data pages whose first run starts at leaf
/// `from` or later (disk blocks follow the memory's pages), once: `armed`
/// is cleared when it did.
pub fn alter_one_raw_batch(
    armed: Arc<AtomicBool>,
    from: u64,
    at: usize,
    mask: u8,
) -> convoy_agent::config::TamperHook {
    Arc::new(move |_round, header, payload| {
        if header.compression == Compression::None
            && header
                .runs
                .first()
                .is_some_and(|r| r.gap >= from && r.kind == RunKind::Data)
            && payload.len() > at
            && armed.swap(false, Ordering::SeqCst)
        {
            payload[at] ^= mask;
        }
    })
}

/// Lab agents `names` in a fresh temporary directory, which lives as long
/// as the returned guard.
pub async fn lab(names: &[&str]) -> (tempfile::TempDir, Lab) {
    lab_with(names, |_, _| {}).await
}

/// [`lab`] with each agent's configuration adjusted by `tweak` (given the
/// agent's name).
pub async fn lab_with(
    names: &[&str],
    tweak: impl Fn(&str, &mut convoy_agent::config::AgentConfig),
) -> (tempfile::TempDir, Lab) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), names, tweak).await.unwrap();
    (dir, lab)
}

/// Agents whose links count as broken after 2 s of silence and that wait
/// `window` for a broken link to come back (post-copy, or a pre-copy
/// round).
pub fn short_links(window: Duration) -> impl Fn(&mut convoy_agent::config::AgentConfig) {
    move |c| {
        c.tuning.idle_timeout = Duration::from_secs(2);
        c.tuning.keep_alive = Duration::from_millis(500);
        c.recovery_window = window;
    }
}

/// Lab agent `agent`'s audit log, read while the agent runs, verified.
///
/// An append is one `write` of a record and its tree head, and a reader
/// can see part of it (a read does not wait for a write in progress): that
/// reads as a torn tail. So a torn tail is read again, for up to 2 s; one
/// that stays is a real one and fails, as does any other fault.
pub fn live_audit_log(lab: &Lab, agent: &str) -> convoy_protocol::audit::VerifiedLog {
    use convoy_protocol::audit::{verify_log, LogFault};
    let path = lab.audit_log(agent);
    let mut tries = 0;
    loop {
        let bytes = std::fs::read(&path).expect("audit log readable");
        match verify_log(&bytes, &lab.trust) {
            Err(e) if matches!(e.what, LogFault::TornTail { .. }) && tries < 200 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.expect("audit log verifies"),
        }
    }
}

/// The phases `agent` audited for its migrations.
pub fn audited_phases(lab: &Lab, agent: &str) -> Vec<String> {
    live_audit_log(lab, agent)
        .records
        .into_iter()
        .filter_map(|r| match r.event {
            convoy_protocol::audit::AuditEvent::Phase { phase, .. } => Some(phase),
            _ => None,
        })
        .collect()
}

/// Asserts that each lab agent audited a phase containing each of its
/// needles.
pub fn assert_phases_audited(lab: &Lab, expected: &[(&str, &[&str])]) {
    for (agent, needles) in expected {
        let phases = audited_phases(lab, agent);
        for n in *needles {
            assert!(
                phases.iter().any(|p| p.contains(n)),
                "{agent}: {n}: {phases:#?}"
            );
        }
    }
}

/// Whether userfaultfd (post-copy) is available. It needs root here; in CI
/// (`CI=true`, as root) its absence is a failure, elsewhere the caller
/// skips, with a message.
pub fn uffd_or_skip() -> bool {
    if convoy_agent::backend::uffd::available() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but userfaultfd is unavailable (post-copy needs root)"
    );
    eprintln!("skipping: userfaultfd unavailable (not root)");
    false
}

/// How many heavy tests run at once. One: when the QEMU tests were a
/// binary of their own, nothing else ran beside them; now a QEMU test runs
/// beside light tests only, never beside another pair of guests, on any
/// number of cores. (Two at once saved at most half a minute of the
/// binary's 2.5-3 min on 2 cores, within the noise of other builds.)
const HEAVY_AT_ONCE: usize = 1;

/// Held by a heavy test (one that boots QEMU guests) for as long as it
/// runs. Every test of the `it` binary shares one process and libtest runs
/// as many at once as there are cores, so heavy tests would otherwise run
/// together and beside every other topic's migrations; at most
/// `HEAVY_AT_ONCE` run at once, light tests beside them. A test that
/// panics gives its permit back.
pub async fn heavy() -> tokio::sync::SemaphorePermit<'static> {
    static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HEAVY_AT_ONCE);
    HEAVY
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// Two agents, `a` and `b`, with a client for each.
pub async fn agents_a_and_b() -> (
    tempfile::TempDir,
    Lab,
    convoy_agent::client::CtlClient,
    convoy_agent::client::CtlClient,
) {
    let (dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    (dir, lab, a, b)
}

/// Closes the clients, then the lab.
pub async fn close(
    lab: Lab,
    a: convoy_agent::client::CtlClient,
    b: convoy_agent::client::CtlClient,
) {
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// Lab agents `a` and `b`, `a` altering its outgoing batches with `hook`.
pub async fn lab_where_a_alters_batches(
    dir: &std::path::Path,
    hook: convoy_agent::config::TamperHook,
) -> Lab {
    Lab::start(dir, &["a", "b"], move |name, cfg| {
        if name == "a" {
            cfg.dangerous().tamper_outgoing_batches(hook.clone());
        }
    })
    .await
    .unwrap()
}

/// A simulated VM spec with mixed content.
pub fn sim_spec(name: &str, bytes: u64, dirty_pages_per_sec: u64) -> SimVmSpec {
    Lab::sim_test_vm(
        name.parse().expect("valid VM name"),
        bytes,
        dirty_pages_per_sec,
    )
}

/// A migration request of `vm` from lab agent `from` to `to`, with a ticket
/// signed by the lab's operator.
pub fn migrate(lab: &Lab, vm: &str, from: &str, to: &str) -> MigrateRequest {
    lab.migrate_request(vm, from, to, MigrationPlan::default())
        .expect("lab agents exist")
}

/// Migrates `vm` from lab agent `from` to `to` by `client` (connected to
/// `from`) with the default plan; the migration must complete, verified.
pub async fn migrated(
    client: &convoy_agent::client::CtlClient,
    lab: &Lab,
    vm: &str,
    from: &str,
    to: &str,
) -> convoy_protocol::ctl::MigrationReport {
    let report = client
        .migrate(migrate(lab, vm, from, to), |_| {})
        .await
        .expect("the migration runs");
    assert_eq!(
        report.outcome,
        convoy_protocol::ctl::Outcome::Completed,
        "{report:?}"
    );
    assert!(report.verified, "{report:?}");
    report
}

/// A ticket for `vm` from lab agent `from` to `to`, signed by the lab's
/// operator, valid for 60 s.
pub fn ticket(lab: &Lab, vm: &str, from: &str, to: &str) -> SignedTicket {
    convoy_agent::trust::authz::issue_ticket(
        &lab.operator,
        &vm.parse().expect("valid VM name"),
        // The VM `propose_as` describes.
        convoy_protocol::vm::VmSubject::plain(8 << 20),
        lab.agent(from).unwrap().id.clone(),
        lab.agent(to).unwrap().id.clone(),
        &MigrationPlan::default(),
        Duration::from_secs(60),
    )
    .unwrap()
}

/// Asserts that nothing moved: the agent of `here` still runs its one VM,
/// and the agent of `there` holds none.
pub async fn assert_nothing_moved(
    here: &convoy_agent::client::CtlClient,
    there: &convoy_agent::client::CtlClient,
) {
    let vms = here.vm_list().await.unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0].state, VmState::Running);
    assert!(there.vm_list().await.unwrap().is_empty());
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Opens an agent-to-agent connection from lab agent `from` to lab agent
/// `to`, as `from` would for a migration (the endpoint must outlive it).
pub async fn connect_as(
    lab: &Lab,
    from: &str,
    to: &str,
) -> (quinn::Endpoint, transport::Connection) {
    let me = lab
        .pki
        .identity(Role::Agent, &from.parse().unwrap())
        .unwrap();
    let target = lab.agent(to).unwrap();
    let ep = transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &Tuning::default()).unwrap();
    let conn = transport::Dialer::new(ep.clone(), lab.transport, Tuning::default())
        .connect(target.addr, target.id.clone(), ALPN_AGENT, &me, &lab.trust)
        .await
        .unwrap();
    (ep, conn)
}

/// Agent `from` proposes a migration to agent `to` directly, with `ticket`.
/// The manifest follows the ticket's plan, so the destination's admission
/// has nothing to refuse in it.
pub async fn propose_as(lab: &Lab, from: &str, to: &str, ticket: SignedTicket) -> Message {
    let manifest = manifest_for(&ticket, 8 << 20);
    propose_manifest_as(lab, from, to, ticket, manifest).await
}

/// A pre-copy sim manifest of `bytes` of memory under `ticket`'s plan
/// (its stream count), no disks.
pub fn manifest_for(ticket: &SignedTicket, bytes: u64) -> Manifest {
    let body: Ticket = postcard::from_bytes(&ticket.body).unwrap();
    Manifest {
        memory: MemoryGeometry::from_bytes(bytes).unwrap(),
        data_streams: body.plan.streams,
        qemu: None,
        postcopy: false,
        start_paused: false,
        plan: body.plan,
        reuse: None,
        disks: Vec::new(),
    }
}

/// The `Propose` of `ticket`'s migration with `manifest`, claiming
/// `attributes` for the VM.
pub fn proposal(
    ticket: SignedTicket,
    manifest: Manifest,
    attributes: convoy_protocol::vm::VmAttributes,
) -> Message {
    let body: Ticket = postcard::from_bytes(&ticket.body).unwrap();
    Message::Propose(Propose {
        versions: VersionRange::OURS,
        capabilities: Capabilities::OURS,
        migration: body.id,
        vm: body.vm,
        attributes,
        manifest,
        ticket,
    })
}

/// [`propose_as`] with a manifest of the caller's.
pub async fn propose_manifest_as(
    lab: &Lab,
    from: &str,
    to: &str,
    ticket: SignedTicket,
    manifest: Manifest,
) -> Message {
    propose_claiming(lab, from, to, ticket, manifest, Default::default()).await
}

/// [`propose_manifest_as`], claiming `attributes` for the VM.
pub async fn propose_claiming(
    lab: &Lab,
    from: &str,
    to: &str,
    ticket: SignedTicket,
    manifest: Manifest,
    attributes: convoy_protocol::vm::VmAttributes,
) -> Message {
    let (ep, conn) = connect_as(lab, from, to).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let propose = proposal(ticket, manifest, attributes);
    transport::write_message(&mut send, &propose).await.unwrap();
    let answer = transport::read_message(&mut recv).await.unwrap().unwrap();
    // Gone on purpose, and said so: an accepted migration's staging is
    // discarded at once (a source that merely goes silent is waited for
    // within the recovery window, as over a broken link).
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    answer
}

/// Asserts the destination refused a proposal as unauthorized, naming `why`.
pub fn assert_unauthorized(answer: &Message, why: &str) {
    assert!(
        matches!(answer, Message::Reject(r) if matches!(&r.reason, convoy_protocol::message::Reason::Unauthorized(s) if s.contains(why))),
        "expected a refusal mentioning {why:?}: {answer:?}"
    );
}

/// The reasons of every refusal (and failed outcome) in lab agent `agent`'s
/// audit log, which must verify.
pub fn refusals_logged(lab: &Lab, agent: &str) -> Vec<String> {
    use convoy_protocol::audit::AuditEvent;
    live_audit_log(lab, agent)
        .records
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Refused { reason, .. } => Some(reason),
            AuditEvent::Outcome { outcome, .. }
                if outcome != "completed" && outcome != "started" =>
            {
                Some(outcome)
            }
            AuditEvent::Decision {
                permitted: false,
                explanation,
                ..
            } => Some(explanation),
            _ => None,
        })
        .collect()
}

/// Waits (up to 5 s) until `agent`'s audit log holds a refusal mentioning
/// each of `needles` (case-insensitively), in any order; panics naming what
/// is missing.
pub async fn assert_refusals_logged(lab: &Lab, agent: &str, needles: &[&str]) {
    let found = eventually(Duration::from_secs(5), || async {
        let got = refusals_logged(lab, agent);
        needles.iter().all(|n| {
            got.iter()
                .any(|r| r.to_lowercase().contains(&n.to_lowercase()))
        })
    })
    .await;
    assert!(
        found,
        "{agent}'s audit log lacks refusals {needles:?}; it has {:#?}",
        refusals_logged(lab, agent)
    );
}

/// The lab's cuttable UDP link (kept in the agent's lab so that the
/// agent's own process tests use it too).
pub use convoy_agent::lab::link::CuttableLink;
