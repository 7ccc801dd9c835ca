//! A hostile (but authenticated) source agent: malformed and out-of-range
//! bytes on the control stream. The destination refuses each with a typed
//! error, reserves nothing, and keeps serving.

use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_agent::transport;
use convoy_protocol::ctl::Outcome;
use convoy_protocol::message::{Message, Reason, VersionRange};
use convoy_tests::{
    assert_refusals_logged, connect_as, eventually, manifest_for, migrate, proposal, sim_spec,
    ticket,
};

/// Sends `bytes` on a fresh control stream from agent a to agent b and
/// returns b's first answer, if any.
async fn send_raw(lab: &Lab, bytes: &[u8], finish: bool) -> Option<Message> {
    let (_ep, conn) = connect_as(lab, "a", "b").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let answer =
        tokio::time::timeout(Duration::from_secs(5), transport::read_message(&mut recv)).await;
    match answer {
        Ok(Ok(Some(m))) => Some(m),
        _ => None,
    }
}

/// The destination answered with a protocol-violation abort naming `what`.
fn violation(answer: &Option<Message>, what: &str) -> bool {
    matches!(answer, Some(Message::Abort(a)) if matches!(&a.reason, Reason::ProtocolViolation(s) if s.contains(what)))
}

fn propose(lab: &Lab, versions: VersionRange, streams: u16, bytes: u64) -> Message {
    let ticket = ticket(lab, "vm", "a", "b");
    let mut manifest = manifest_for(&ticket, bytes);
    manifest.data_streams = streams;
    match proposal(ticket, manifest, Default::default()) {
        Message::Propose(mut p) => {
            p.versions = versions;
            Message::Propose(p)
        }
        other => other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_control_streams_are_refused_and_the_destination_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |name, cfg| {
        if name == "b" {
            cfg.capacity_bytes = 64 << 20;
        }
    })
    .await
    .unwrap();

    // An oversized length prefix: refused before anything is allocated,
    // with a typed error sent back.
    let answer = send_raw(&lab, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], false).await;
    assert!(violation(&answer, "exceeds"), "{answer:?}");
    // Tag 0 and an unknown tag.
    let answer = send_raw(&lab, &[0, 0, 0, 1, 0], true).await;
    assert!(violation(&answer, "tag 0"), "{answer:?}");
    let answer = send_raw(&lab, &[0, 0, 0, 2, 99, 0], true).await;
    assert!(violation(&answer, "unknown message tag 99"), "{answer:?}");
    // An operator's request where a migration message belongs: the
    // operator protocol's tags are unknown to a migration peer.
    let status =
        convoy_protocol::ctl::CtlMessage::Request(convoy_protocol::ctl::CtlRequest::Status);
    let answer = send_raw(&lab, &status.encode().unwrap(), true).await;
    assert!(violation(&answer, "unknown message tag 32"), "{answer:?}");
    // A stream that ends inside a frame.
    let full = propose(&lab, VersionRange::OURS, 2, 8 << 20)
        .encode()
        .unwrap();
    let answer = send_raw(&lab, &full[..full.len() / 2], true).await;
    assert!(
        answer.is_none() || violation(&answer, ""),
        "a truncated proposal must not be accepted: {answer:?}"
    );
    // A version downgrade: only versions this build does not speak.
    let old = VersionRange { min: 0, max: 0 };
    let answer = send_raw(
        &lab,
        &propose(&lab, old, 2, 8 << 20).encode().unwrap(),
        false,
    )
    .await;
    assert!(
        matches!(&answer, Some(Message::Reject(r)) if r.reason == Reason::UnsupportedVersion),
        "{answer:?}"
    );
    // Too many data streams, and more memory than b has room for.
    let answer = send_raw(
        &lab,
        &propose(&lab, VersionRange::OURS, 64, 8 << 20)
            .encode()
            .unwrap(),
        false,
    )
    .await;
    assert!(
        matches!(&answer, Some(Message::Reject(r)) if matches!(r.reason, Reason::Unacceptable(_))),
        "{answer:?}"
    );
    let answer = send_raw(
        &lab,
        &propose(&lab, VersionRange::OURS, 2, 1 << 30)
            .encode()
            .unwrap(),
        false,
    )
    .await;
    assert!(matches!(&answer, Some(Message::Reject(_))), "{answer:?}");

    // Every refusal is in b's audit log.
    assert_refusals_logged(
        &lab,
        "b",
        &[
            "exceeds",
            "tag 0",
            "unknown message tag 99",
            "unknown message tag 32",
            "no common protocol version",
            "data streams",
            "exceeds this agent's limit",
        ],
    )
    .await;

    // Nothing was reserved, and b still serves a real migration.
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.vm_list().await.unwrap().is_empty()
        })
        .await
    );
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    let r = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_for_a_migration_nobody_waits_for_is_refused_and_audited() {
    let (_dir, lab, a, b) = convoy_tests::agents_a_and_b().await;
    let resume = Message::Resume(convoy_protocol::message::Resume {
        migration: convoy_protocol::names::MigrationId([7; 16]),
        ticket: convoy_protocol::digest::Digest([1; 32]),
    });
    let answer = send_raw(&lab, &resume.encode().unwrap(), false).await;
    assert!(
        matches!(&answer, Some(Message::Abort(x)) if matches!(&x.reason, Reason::Unacceptable(s) if s.contains("waits to be resumed"))),
        "{answer:?}"
    );
    assert_refusals_logged(&lab, "b", &["no migration waits"]).await;
    // Nothing was made, and b keeps serving.
    assert!(b.vm_list().await.unwrap().is_empty());
    convoy_tests::close(lab, a, b).await;
}

/// An operator's stream that carries no control request — another message,
/// or bytes that do not decode — is answered with an error saying so, not a
/// silent close, and the refusal is in the agent's audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_operator_requests_get_an_error_and_are_audited() {
    use convoy_protocol::ctl::{CtlErrorKind, CtlMessage, CtlResponse};
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a"], |_, _| {}).await.unwrap();
    let a = lab.agent("a").unwrap();
    let ep = transport::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        None,
        &transport::Tuning::default(),
    )
    .unwrap();
    let conn = transport::connect(
        &ep,
        a.addr,
        a.id.clone(),
        transport::ALPN_CTL,
        &lab.operator,
        &lab.trust,
        &transport::Tuning::default(),
    )
    .await
    .unwrap();
    // A peer message where a control request belongs.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    transport::write_message(
        &mut send,
        &Message::RoundApplied(convoy_protocol::message::RoundApplied { round: 1 }),
    )
    .await
    .unwrap();
    let answer = transport::read_ctl(&mut recv).await.unwrap();
    assert!(
        matches!(&answer, Some(CtlMessage::Response(r)) if matches!(&**r, CtlResponse::Error(e) if e.kind == CtlErrorKind::BadRequest && e.message.contains("expected a control request"))),
        "{answer:?}"
    );
    // Bytes that are no message at all: a frame of garbage.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    send.finish().unwrap();
    let answer = transport::read_ctl(&mut recv).await.unwrap();
    assert!(
        matches!(&answer, Some(CtlMessage::Response(r)) if matches!(&**r, CtlResponse::Error(e) if e.kind == CtlErrorKind::BadRequest)),
        "{answer:?}"
    );
    assert_refusals_logged(
        &lab,
        "a",
        &["malformed operator request: expected a control request"],
    )
    .await;
    let reasons = convoy_tests::refusals_logged(&lab, "a");
    assert!(
        reasons
            .iter()
            .filter(|r| r.contains("malformed operator request"))
            .count()
            >= 2,
        "{reasons:#?}"
    );
    lab.shutdown().await;
}
