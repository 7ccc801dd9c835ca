//! What a peer may hold open: connections per identity, connections that
//! never ask anything, operator connections left idle, and handshakes from
//! addresses QUIC has not validated. Each refusal reaches the peer as a
//! close code with a reason and the agent's audit log.

use std::time::Duration;

use convoy_agent::config::AgentConfig;
use convoy_agent::host::limits::ConnectionLimits;
use convoy_agent::lab::Lab;
use convoy_protocol::model::MigrationPlan;
use convoy_tests::{assert_refusals_logged, connect_as, migrate, sim_spec};

/// The reason an agent gave when it closed `conn`, once it has.
async fn closed_because(conn: &convoy_agent::transport::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            format!("{}: {}", c.error_code, String::from_utf8_lossy(&c.reason))
        }
        Ok(other) => format!("closed otherwise: {other}"),
        Err(_) => "still open".into(),
    }
}

/// Agents a and b with `tweak`ed connection limits.
async fn lab_limited(dir: &tempfile::TempDir, tweak: impl Fn(&mut ConnectionLimits)) -> Lab {
    Lab::start(dir.path(), &["a", "b"], |_, cfg: &mut AgentConfig| {
        tweak(&mut cfg.limits)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_hold_more_than_its_share_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_limited(&dir, |l| l.per_peer = 2).await;
    let first = lab.client("a").await.unwrap();
    let second = lab.client("a").await.unwrap();
    first.status().await.unwrap();
    second.status().await.unwrap();
    // The third from the same operator is closed with a reason.
    let third = lab.client("a").await.unwrap();
    let e = third.status().await.unwrap_err().to_string();
    assert!(e.contains("too many connections from this identity"), "{e}");
    // Another identity (agent b, as a migration peer) still gets in.
    let (_ep, conn) = connect_as(&lab, "b", "a").await;
    assert!(conn.close_reason().is_none());
    drop(conn);
    // A freed slot is usable again.
    first.close().await;
    let again = convoy_tests::eventually(Duration::from_secs(5), || async {
        match lab.client("a").await {
            Ok(c) => c.status().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(again, "the closed connection's slot came back");
    assert_refusals_logged(&lab, "a", &["connection refused: too many connections"]).await;
    drop((second, third));
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connection_that_asks_nothing_is_closed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_limited(&dir, |l| l.first_message = Duration::from_secs(1)).await;
    // No stream at all.
    let (_ep, conn) = connect_as(&lab, "a", "b").await;
    let why = closed_because(&conn).await;
    assert!(why.contains("no proposal within 1 s"), "{why}");
    // A stream, but no message on it.
    let (_ep2, conn2) = connect_as(&lab, "a", "b").await;
    let (mut send, _recv) = conn2.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    let why = closed_because(&conn2).await;
    assert!(why.contains("no proposal within 1 s"), "{why}");
    assert_refusals_logged(&lab, "b", &["no proposal within 1 s"]).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_operator_connection_is_closed_but_not_while_a_migration_streams() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_limited(&dir, |l| l.idle = Duration::from_secs(1)).await;
    let a = lab.client("a").await.unwrap();
    // 64 MiB (about 29 MB on the wire, compressed) at 8 MB/s: a
    // migration of several idle limits, on one request stream.
    a.vm_create(sim_spec("vm", 64 << 20, 0)).await.unwrap();
    let plan = MigrationPlan {
        bandwidth: Some(8_000_000),
        ..MigrationPlan::default()
    };
    let req = lab.migrate_request("vm", "a", "b", plan).unwrap();
    let report = a.migrate(req, |_| {}).await.unwrap();
    assert_eq!(report.outcome, convoy_protocol::ctl::Outcome::Completed);
    assert!(report.total_ms > 2_000.0, "{} ms", report.total_ms);
    // Nothing asked now: closed after the idle limit, with the reason.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let e = a.status().await.unwrap_err().to_string();
    assert!(e.contains("no request for 1 s"), "{e}");
    assert_refusals_logged(&lab, "a", &["connection closed: no request for 1 s"]).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_handshake_load_clients_prove_their_address_with_a_retry_and_still_get_in() {
    let dir = tempfile::tempdir().unwrap();
    // Every handshake counts as load: each unvalidated client is sent a
    // Retry, which quinn's client answers.
    let lab = lab_limited(&dir, |l| l.retry_above = 0).await;
    let a = lab.client("a").await.unwrap();
    a.status().await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 100)).await.unwrap();
    let report = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(report.outcome, convoy_protocol::ctl::Outcome::Completed);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_silent_after_accept_loses_its_staging() {
    use convoy_agent::transport;
    use convoy_protocol::message::{Message, Reason};
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_limited(&dir, |l| l.silence = Duration::from_secs(1)).await;
    let ticket = convoy_tests::ticket(&lab, "vm", "a", "b");
    let (_ep, conn) = connect_as(&lab, "a", "b").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let manifest = convoy_tests::manifest_for(&ticket, 8 << 20);
    let propose = convoy_tests::proposal(ticket, manifest, Default::default());
    transport::write_message(&mut send, &propose).await.unwrap();
    let accept = transport::read_message(&mut recv).await.unwrap().unwrap();
    assert!(matches!(accept, Message::Accept(_)), "{accept:?}");
    let b = lab.client("b").await.unwrap();
    assert_eq!(b.vm_list().await.unwrap().len(), 1, "staging reserved");
    // Then nothing, on a connection kept open: b gives up, says why, and
    // frees the staging.
    let next = tokio::time::timeout(Duration::from_secs(10), transport::read_message(&mut recv))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&next, Some(Message::Abort(a)) if a.reason == Reason::Timeout),
        "{next:?}"
    );
    let freed = convoy_tests::eventually(Duration::from_secs(5), || async {
        b.vm_list().await.unwrap().is_empty()
    })
    .await;
    assert!(freed, "staging released");
    assert_refusals_logged(&lab, "b", &["the source sent nothing for 1 s"]).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_arriving_together_stay_under_the_bookkeeping_limit() {
    use convoy_agent::transport;
    use convoy_protocol::message::Message;
    // 8 MiB of 4 KiB pages: 2 048 leaves, 128 KiB of bookkeeping each;
    // the agent allows 200 KiB for all of them.
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |_, cfg| {
        cfg.max_bookkeeping_bytes = 200 << 10;
    })
    .await
    .unwrap();
    let propose = |vm: &str| {
        let ticket = convoy_tests::ticket(&lab, vm, "a", "b");
        let manifest = convoy_tests::manifest_for(&ticket, 8 << 20);
        convoy_tests::proposal(ticket, manifest, Default::default())
    };
    // The first is accepted and holds its staging (its connection stays).
    let (_ep, conn) = connect_as(&lab, "a", "b").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    transport::write_message(&mut send, &propose("one"))
        .await
        .unwrap();
    let first = transport::read_message(&mut recv).await.unwrap().unwrap();
    assert!(matches!(first, Message::Accept(_)), "{first:?}");
    // The second alone would fit; with the first it does not.
    let (_ep2, conn2) = connect_as(&lab, "a", "b").await;
    let (mut send2, mut recv2) = conn2.open_bi().await.unwrap();
    transport::write_message(&mut send2, &propose("two"))
        .await
        .unwrap();
    let second = transport::read_message(&mut recv2).await.unwrap().unwrap();
    assert!(
        matches!(&second, Message::Reject(r) if r.reason.to_string().contains("bookkeeping")),
        "{second:?}"
    );
    assert_refusals_logged(&lab, "b", &["the migrations in progress here hold 131072"]).await;
    // Once the first ends, its bookkeeping comes back.
    drop((send, recv));
    conn.close(0u32.into(), b"done");
    let b = lab.client("b").await.unwrap();
    let freed = convoy_tests::eventually(Duration::from_secs(5), || async {
        b.vm_list().await.unwrap().is_empty()
    })
    .await;
    assert!(freed);
    let third = convoy_tests::propose_as(
        &lab,
        "a",
        "b",
        convoy_tests::ticket(&lab, "three", "a", "b"),
    )
    .await;
    assert!(matches!(third, Message::Accept(_)), "{third:?}");
    lab.shutdown().await;
}

/// A sim VM's migration keeps a Merkle tree at the source as well: it
/// counts against the same limit, and a migrate request past it is refused
/// before the VM is claimed (the VM keeps running, nothing is audited as a
/// migration). A VM that fits leaves, and gives the bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_leaving_counts_its_tree_against_the_bookkeeping_limit() {
    use convoy_protocol::ctl::{CtlErrorKind, Outcome, VmState};
    // 8 MiB of 4 KiB pages: 128 KiB of bookkeeping; 32 MiB: 512 KiB.
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |name, cfg| {
        if name == "a" {
            cfg.max_bookkeeping_bytes = 200 << 10;
        }
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("big", 32 << 20, 0)).await.unwrap();
    a.vm_create(sim_spec("small", 8 << 20, 0)).await.unwrap();
    match a.migrate(migrate(&lab, "big", "a", "b"), |_| {}).await {
        Err(convoy_agent::client::ClientError::Agent(e)) => {
            assert_eq!(e.kind, CtlErrorKind::NoCapacity, "{e:?}");
            assert!(e.message.contains("524288 bytes of bookkeeping"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    let list = a.vm_list().await.unwrap();
    assert!(
        list.iter()
            .any(|v| v.name.as_str() == "big" && v.state == VmState::Running),
        "{list:?}"
    );
    for _ in 0..2 {
        // Twice: the first gave its bytes back.
        let r = a
            .migrate(migrate(&lab, "small", "a", "b"), |_| {})
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
        let back = migrate(&lab, "small", "b", "a");
        let b = lab.client("b").await.unwrap();
        let r = b.migrate(back, |_| {}).await.unwrap();
        assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    }
    lab.shutdown().await;
}

/// The credit a client gets at the handshake is an operator's, whoever it
/// turns out to be: a few bidirectional streams and no unidirectional one
/// (QUIC cannot take credit back once granted, and the endpoint grants it
/// before it knows who is calling). An agent authorized to migrate gets a
/// migration's credit afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_grants_an_operators_credit_and_only_agents_get_more() {
    use convoy_agent::transport::{self, HANDSHAKE_STREAMS};
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_limited(&dir, |_| {}).await;
    let a = lab.agent("a").unwrap();
    let tuning = transport::Tuning::default();
    let ep = transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &tuning).unwrap();
    let conn = transport::connect(
        &ep,
        a.addr,
        a.id.clone(),
        transport::ALPN_CTL,
        &lab.operator,
        &lab.trust,
        &tuning,
    )
    .await
    .unwrap();
    let opens = |conn: convoy_agent::transport::Connection, n: u32| async move {
        let mut held = Vec::new();
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        held.len()
    };
    // Opened at once, before the agent has looked at who we are.
    assert_eq!(opens(conn.clone(), 64).await, HANDSHAKE_STREAMS as usize);
    let uni = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
    assert!(
        uni.is_err(),
        "an operator may not open unidirectional streams"
    );
    // An agent, once authorized, may open a migration's streams.
    let (_ep, agent) = connect_as(&lab, "b", "a").await;
    assert_eq!(opens(agent.clone(), 64).await, 64);
    let uni = tokio::time::timeout(Duration::from_secs(5), agent.open_uni()).await;
    assert!(matches!(uni, Ok(Ok(_))), "an agent opens its data streams");
    lab.shutdown().await;
}
