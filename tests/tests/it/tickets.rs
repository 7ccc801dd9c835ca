//! Operator-signed tickets: every migration needs one, and every way of
//! bending one is refused before any VM state moves. After each refusal the
//! VM still runs exactly once, at the source.

use std::time::Duration;

use convoy_agent::client::ClientError;
use convoy_agent::lab::Lab;
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{CtlErrorKind, Outcome};
use convoy_protocol::message::Message;
use convoy_protocol::names::{AgentName, Role};
use convoy_protocol::ticket::{SignedTicket, Ticket};
use convoy_tests::{
    assert_nothing_moved, assert_unauthorized, migrate, propose_as, sim_spec, ticket,
};

/// Agents a, b and c, with a VM on a.
async fn lab() -> (tempfile::TempDir, Lab) {
    let (dir, lab) = convoy_tests::lab(&["a", "b", "c"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    (dir, lab)
}

/// The request was refused as unauthorized, and nothing moved.
async fn assert_refused(
    lab: &Lab,
    r: Result<convoy_protocol::ctl::MigrationReport, ClientError>,
    why: &str,
) {
    match r {
        Err(ClientError::Agent(e)) => {
            assert_eq!(e.kind, CtlErrorKind::Unauthorized, "{e:?}");
            assert!(
                e.message.contains(why),
                "{:?} does not mention {why:?}",
                e.message
            );
        }
        other => panic!("expected a refusal mentioning {why:?}, got {other:?}"),
    }
    assert_nothing_moved(
        &lab.client("a").await.unwrap(),
        &lab.client("b").await.unwrap(),
    )
    .await;
}

/// Re-signs a modified copy of a request's ticket with `signer`.
fn resign(
    t: &SignedTicket,
    signer: &dyn convoy_protocol::signed::Signer,
    f: impl FnOnce(&mut Ticket),
) -> SignedTicket {
    let mut ticket: Ticket = postcard::from_bytes(&t.body).unwrap();
    f(&mut ticket);
    SignedTicket::sign(&ticket, signer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_tickets_are_refused_at_the_source() {
    let (_dir, lab) = lab().await;
    let a = lab.client("a").await.unwrap();

    // Forged: the body changed after signing.
    let mut req = migrate(&lab, "vm", "a", "b");
    let mut body: Ticket = postcard::from_bytes(&req.ticket.body).unwrap();
    body.plan.max_rounds = 1;
    req.ticket.body = postcard::to_stdvec(&body).unwrap();
    assert_refused(&lab, a.migrate(req, |_| {}).await, "signature").await;

    // Expired, and not yet valid (beyond the 60 s skew).
    let req = migrate(&lab, "vm", "a", "b");
    let mut expired = req.clone();
    expired.ticket = resign(&req.ticket, &lab.operator, |t| {
        t.issued_at -= 3600;
        t.expires_at = t.issued_at + 600;
    });
    assert_refused(&lab, a.migrate(expired, |_| {}).await, "expired").await;
    let mut future = req.clone();
    future.ticket = resign(&req.ticket, &lab.operator, |t| {
        t.issued_at += 3600;
        t.expires_at += 3600;
    });
    assert_refused(&lab, a.migrate(future, |_| {}).await, "not valid until").await;

    // A ticket for another source or another VM. (The plan is the
    // ticket's own: a request carries no options to disagree with it.)
    let other_source = migrate(&lab, "vm", "c", "b");
    let mut r = migrate(&lab, "vm", "a", "b");
    r.ticket = other_source.ticket;
    assert_refused(&lab, a.migrate(r, |_| {}).await, "source").await;
    let mut r = migrate(&lab, "vm", "a", "b");
    r.ticket = resign(&r.ticket, &lab.operator, |t| {
        t.vm = "other".parse().unwrap()
    });
    assert_refused(&lab, a.migrate(r, |_| {}).await, "VM").await;
    let mut r = migrate(&lab, "vm", "a", "b");
    r.to = "c".parse().unwrap();
    assert_refused(&lab, a.migrate(r, |_| {}).await, "destination").await;
    // Every refusal is in the source's signed audit log, with its reason.
    let reasons: Vec<String> = convoy_tests::live_audit_log(&lab, "a")
        .records
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    for why in [
        "signature",
        "expired",
        "not valid until",
        "source",
        "VM",
        "destination",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "no refusal for {why}: {reasons:?}"
        );
    }
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_connected_operator_may_sign_and_only_operators_sign() {
    let (_dir, lab) = lab().await;
    let a = lab.client("a").await.unwrap();
    // Another operator's ticket, presented by ours: refused (the agent
    // acts for whoever is connected, not for whoever signed).
    let mallory: AgentName = "mallory".parse().unwrap();
    lab.pki
        .issue(Role::Operator, &mallory, Duration::from_secs(600))
        .unwrap();
    let m = lab.pki.identity(Role::Operator, &mallory).unwrap();
    let mut r = migrate(&lab, "vm", "a", "b");
    r.ticket = resign(&r.ticket, &m, |_| {});
    assert_refused(
        &lab,
        a.migrate(r, |_| {}).await,
        "signed by spiffe://convoy.internal/operator/mallory",
    )
    .await;
    // An agent's signature is not an operator's.
    let agent_c = lab
        .pki
        .identity(Role::Agent, &"c".parse().unwrap())
        .unwrap();
    let mut r = migrate(&lab, "vm", "a", "b");
    r.ticket = resign(&r.ticket, &agent_c, |_| {});
    assert_refused(&lab, a.migrate(r, |_| {}).await, "signed by").await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_for_another_incarnation_of_the_vm_is_refused_at_the_source() {
    let (_dir, lab) = lab().await;
    let a = lab.client("a").await.unwrap();
    // Signed for the 8 MiB VM a runs now.
    let req = migrate(&lab, "vm", "a", "b");
    // The VM is deleted and another created under its name: bigger, and
    // of another tenant.
    a.vm_delete("vm".parse().unwrap()).await.unwrap();
    let mut spec = sim_spec("vm", 16 << 20, 1000);
    spec.attributes.tenant = "other".into();
    a.vm_create(spec).await.unwrap();
    assert_refused(
        &lab,
        a.migrate(req, |_| {}).await,
        "the ticket was issued for",
    )
    .await;
    convoy_tests::assert_refusals_logged(&lab, "a", &["the ticket was issued for 8388608 bytes"])
        .await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_used_once() {
    let (_dir, lab) = lab().await;
    let a = lab.client("a").await.unwrap();
    let req = migrate(&lab, "vm", "a", "b");
    let r = a.migrate(req.clone(), |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    // Bring the VM back, then replay the first ticket.
    let b = lab.client("b").await.unwrap();
    let back = b
        .migrate(migrate(&lab, "vm", "b", "a"), |_| {})
        .await
        .unwrap();
    assert_eq!(back.outcome, Outcome::Completed);
    assert_refused(&lab, a.migrate(req, |_| {}).await, "replay").await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_checks_the_ticket_against_the_proposing_agent() {
    let (_dir, lab) = lab().await;
    // A fresh, valid ticket for a → b.
    let fresh = || ticket(&lab, "vm", "a", "b");

    // Confused deputy: c carries a ticket the operator issued for a → b.
    let t = fresh();
    assert_unauthorized(&propose_as(&lab, "c", "b", t.clone()).await, "source");
    // The ticket's destination is b, not c.
    assert_unauthorized(&propose_as(&lab, "a", "c", t).await, "destination");
    // A proposal with a forged ticket.
    let mut forged = fresh();
    forged.signature[0] ^= 1;
    assert_unauthorized(&propose_as(&lab, "a", "b", forged).await, "signature");
    // Replayed at the destination: the same valid ticket twice.
    let ok = fresh();
    let first = propose_as(&lab, "a", "b", ok.clone()).await;
    assert!(matches!(first, Message::Accept(_)), "{first:?}");
    assert_unauthorized(&propose_as(&lab, "a", "b", ok).await, "replay");
    // Nothing was left at b by any of these.
    let b_client = lab.client("b").await.unwrap();
    assert!(
        convoy_tests::eventually(Duration::from_secs(35), || async {
            b_client.vm_list().await.unwrap().is_empty()
        })
        .await
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_ticket_stays_used_across_an_agent_restart() {
    let (_dir, mut lab) = lab().await;
    let req = migrate(&lab, "vm", "a", "b");
    let a = lab.client("a").await.unwrap();
    assert_eq!(
        a.migrate(req.clone(), |_| {}).await.unwrap().outcome,
        Outcome::Completed
    );
    a.close().await;
    let b = lab.client("b").await.unwrap();
    let back = b
        .migrate(migrate(&lab, "vm", "b", "a"), |_| {})
        .await
        .unwrap();
    assert_eq!(back.outcome, Outcome::Completed);
    b.close().await;
    // The agent process restarts (its VMs die with it, as in a crash):
    // the replay cache is on disk.
    lab.restart("a").await.unwrap();
    let a = lab.client("a").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    assert_refused(&lab, a.migrate(req, |_| {}).await, "replay").await;
    // A fresh ticket still works after the restart.
    let ok = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Completed);
    lab.shutdown().await;
}
