//! Revocation and expiry: a revoked or expired certificate is refused at
//! the handshake and as a ticket signer, and a CRL takes effect on running
//! agents without a restart.

use std::time::Duration;

use convoy_agent::client::CtlClient;
use convoy_agent::lab::Lab;
use convoy_agent::trust::authz::issue_ticket;
use convoy_protocol::ctl::{Outcome, VmState};
use convoy_protocol::message::Message;
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{AgentName, Role};
use convoy_tests::{
    assert_refusals_logged, assert_unauthorized, eventually, lab, migrate, propose_as, sim_spec,
    ticket,
};

/// Whether `op` can still list VMs on agent `agent`.
async fn can_list(lab: &Lab, agent: &str, op: &convoy_agent::trust::identity::Identity) -> bool {
    let a = lab.agent(agent).unwrap();
    match CtlClient::connect(a.addr, a.id.clone(), op, &lab.trust).await {
        Ok(c) => c.vm_list().await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_is_refused_without_restarting_the_agents() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    let a = (lab.agent("a").unwrap().id.clone(),);
    let b = (lab.agent("b").unwrap().id.clone(),);
    assert!(can_list(&lab, "a", &lab.operator).await);
    // A ticket signed before the revocation.
    let vm = "vm".parse().unwrap();
    let ticket = issue_ticket(
        &lab.operator,
        &vm,
        convoy_protocol::vm::VmSubject::plain(8 << 20),
        a.0.clone(),
        b.0.clone(),
        &MigrationPlan::default(),
        Duration::from_secs(120),
    )
    .unwrap();

    lab.pki
        .revoke(Role::Operator, &"operator".parse().unwrap())
        .unwrap();
    // Each running agent picks up the CRL on its own and refuses the
    // operator at the handshake.
    for agent in ["a", "b"] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                !can_list(&lab, agent, &lab.operator).await
            })
            .await,
            "agent {agent} still accepts the revoked operator"
        );
    }
    // Its tickets are refused too, even when another agent carries them.
    let answer = propose_as(&lab, "a", "b", ticket).await;
    assert_unauthorized(&answer, "revoked");
    // Another operator is unaffected.
    let ops2: AgentName = "ops2".parse().unwrap();
    lab.pki
        .issue(Role::Operator, &ops2, Duration::from_secs(600))
        .unwrap();
    let ops2 = lab.pki.identity(Role::Operator, &ops2).unwrap();
    assert!(can_list(&lab, "a", &ops2).await);
    // Refused at the handshake, or — if the connection raced the CRL
    // reload of the endpoint — right after it: either way, for revocation.
    assert_refusals_logged(&lab, "a", &["revoked"]).await;
    assert_refusals_logged(&lab, "b", &["revoked"]).await;
    // A CRL that disappears un-revokes nobody: the agents keep the last
    // good one, and say so.
    std::fs::remove_file(lab.pki.crl_path()).unwrap();
    assert_refusals_logged(&lab, "a", &["CRL file", "disappeared"]).await;
    assert!(
        !can_list(&lab, "a", &lab.operator).await,
        "a missing CRL un-revoked the operator"
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_can_neither_receive_nor_send() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    lab.pki.revoke(Role::Agent, &"c".parse().unwrap()).unwrap();
    // Give the agents' CRL watchers time to reload.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // a refuses c's (valid, but revoked) server certificate.
    let req = migrate(&lab, "vm", "a", "c");
    let r = a.migrate(req, |_| {}).await.unwrap();
    assert!(matches!(r.outcome, Outcome::Aborted(_)), "{r:?}");
    assert_eq!(r.pages_sent, 0);
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    // b refuses c as a client: c cannot propose anything.
    let b = lab.agent("b").unwrap();
    let ticket = ticket(&lab, "vm", "c", "b");
    let refused = tokio::spawn({
        let b_addr = b.addr;
        let b_id = b.id.clone();
        let me = lab
            .pki
            .identity(Role::Agent, &"c".parse().unwrap())
            .unwrap();
        let trust = lab.trust.clone();
        async move {
            let ep = convoy_agent::transport::endpoint(
                "127.0.0.1:0".parse().unwrap(),
                None,
                &Default::default(),
            )
            .unwrap();
            let Ok(conn) = convoy_agent::transport::connect(
                &ep,
                b_addr,
                b_id,
                convoy_agent::transport::ALPN_AGENT,
                &me,
                &trust,
                &Default::default(),
            )
            .await
            else {
                return true;
            };
            let Ok((mut s, mut r)) = conn.open_bi().await else {
                return true;
            };
            let _ = ticket;
            if convoy_agent::transport::write_message(
                &mut s,
                &Message::Abort(convoy_protocol::message::Abort {
                    reason: convoy_protocol::message::Reason::Cancelled,
                }),
            )
            .await
            .is_err()
            {
                return true;
            }
            !matches!(
                convoy_agent::transport::read_message(&mut r).await,
                Ok(Some(_))
            )
        }
    });
    assert!(refused.await.unwrap(), "b must refuse the revoked agent c");
    assert_refusals_logged(&lab, "b", &["revoked"]).await;
    // A healthy migration still works.
    let ok = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Completed);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    let now = time::OffsetDateTime::now_utc();
    let old: AgentName = "old".parse().unwrap();
    lab.pki
        .issue_between(
            Role::Operator,
            &old,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let old = lab.pki.identity(Role::Operator, &old).unwrap();
    assert!(!can_list(&lab, "a", &old).await, "expired operator");
    let early: AgentName = "early".parse().unwrap();
    lab.pki
        .issue_between(
            Role::Operator,
            &early,
            now + time::Duration::days(1),
            now + time::Duration::days(10),
        )
        .unwrap();
    let early = lab.pki.identity(Role::Operator, &early).unwrap();
    assert!(!can_list(&lab, "a", &early).await, "not yet valid operator");
    // A ticket signed by the expired operator is refused and says why.
    let a = lab.agent("a").unwrap();
    let b = lab.agent("b").unwrap();
    let t = issue_ticket(
        &old,
        &"vm".parse().unwrap(),
        convoy_protocol::vm::VmSubject::plain(8 << 20),
        a.id.clone(),
        b.id.clone(),
        &MigrationPlan::default(),
        Duration::from_secs(60),
    )
    .unwrap();
    let answer = propose_as(&lab, "a", "b", t).await;
    assert_unauthorized(&answer, "expired");
    assert_refusals_logged(&lab, "a", &["handshake refused"]).await;
    assert_refusals_logged(&lab, "b", &["certificate expired"]).await;
    lab.shutdown().await;
}
