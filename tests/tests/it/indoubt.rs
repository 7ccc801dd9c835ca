//! Inquiries between agents about a migration in doubt: the destination
//! answers only the agent the migration came from, about the ticket it
//! came with, with a statement it signs; a fence is in its journal before
//! it says `Fenced`, and a handover that arrives after the fence never
//! runs the VM there. (The kill -9 and cut-link matrix over every phase is
//! `convoy-agent`'s `faults` test: real agent processes.)

use std::time::Duration;

use convoy_agent::host::journal::JournalPoint;
use convoy_agent::transport::{read_message, write_message};
use convoy_protocol::ctl::{Outcome, VmState};
use convoy_protocol::indoubt::{Inquiry, Verdict};
use convoy_protocol::journal::{JournalOutcome, JournalPhase, JournalRole};
use convoy_protocol::message::Message;
use convoy_protocol::names::MigrationId;
use convoy_protocol::receipt::ticket_digest;
use convoy_protocol::ticket::Ticket;
use convoy_tests::{assert_refusals_logged, connect_as, eventually, lab_with, migrate, sim_spec};

/// Agent `from` asks agent `to` `inquiry`: the statement's verdict and
/// signer, or `None` when `to` closed without one.
async fn ask(
    lab: &convoy_agent::lab::Lab,
    from: &str,
    to: &str,
    inquiry: Inquiry,
) -> Option<(
    convoy_protocol::indoubt::Statement,
    convoy_protocol::names::SpiffeId,
)> {
    let (_ep, conn) = connect_as(lab, from, to).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::Inquire(inquiry))
        .await
        .unwrap();
    let _ = send.finish();
    match read_message(&mut recv).await {
        Ok(Some(Message::Statement(s))) => Some(
            s.open(&lab.trust, convoy_agent::trust::authz::now_unix())
                .unwrap(),
        ),
        Ok(None) | Err(_) => None,
        Ok(Some(other)) => panic!("{to} answered with {}", other.kind()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_is_journalled_before_it_is_said_and_only_the_source_is_answered() {
    let (_dir, lab) = lab_with(&["a", "b", "c"], |name, cfg| {
        if name == "b" {
            cfg.dangerous().pause_at(JournalPoint::DestinationStaged);
        }
    })
    .await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("web", 16 << 20, 1000)).await.unwrap();
    let before = a.vm_list().await.unwrap()[0].counter;
    let req = migrate(&lab, "web", "a", "b");
    let body: Ticket = postcard::from_bytes(&req.ticket.body).unwrap();
    let migration = body.id;
    let digest = ticket_digest(&req.ticket);
    let mover = tokio::spawn(async move { a.migrate(req, |_| {}).await });
    // b journalled its staging and holds there, before Accept.
    assert!(
        eventually(Duration::from_secs(20), || async {
            lab.journal("b")
                .unwrap()
                .iter()
                .any(|r| r.migration == migration && r.phase == JournalPhase::Staged)
        })
        .await
    );
    let question = Inquiry {
        migration,
        ticket: digest,
        epoch: 1,
    };
    // Another agent, or the source with another ticket: no answer, and
    // nothing fenced.
    assert!(ask(&lab, "c", "b", question.clone()).await.is_none());
    let forged = Inquiry {
        ticket: convoy_protocol::digest::Digest([7; 32]),
        ..question.clone()
    };
    assert!(ask(&lab, "a", "b", forged).await.is_none());
    assert!(lab
        .journal("b")
        .unwrap()
        .iter()
        .any(|r| r.migration == migration && r.phase == JournalPhase::Staged));
    assert_refusals_logged(&lab, "b", &["which it did not come from", "another ticket"]).await;
    // A migration b never saw: signed, and says nothing.
    let (st, signer) = ask(
        &lab,
        "a",
        "b",
        Inquiry {
            migration: MigrationId([3; 16]),
            ..question.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (st.verdict, &signer),
        (Verdict::Unknown, &lab.agent("b").unwrap().id)
    );
    // The source about its staging: fenced, and the fence is in b's
    // journal as the answer arrives.
    let (st, signer) = ask(&lab, "a", "b", question.clone()).await.unwrap();
    assert_eq!(st.verdict, Verdict::Fenced);
    assert_eq!(signer, lab.agent("b").unwrap().id);
    assert_eq!((st.migration, st.ticket, st.epoch), (migration, digest, 1));
    let fenced = lab.journal("b").unwrap();
    let r = fenced
        .iter()
        .find(|r| r.migration == migration && r.role == JournalRole::Destination)
        .unwrap();
    assert_eq!(
        r.phase,
        JournalPhase::Ended(JournalOutcome::Failed),
        "{r:?}"
    );
    // Released, the migration goes on to the handover, which b refuses:
    // the VM never runs there and runs on at a.
    lab.release("b").unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), mover)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(report.outcome, Outcome::Aborted(_)), "{report:?}");
    let a = lab.client("a").await.unwrap();
    let vms = a.vm_list().await.unwrap();
    assert_eq!(vms[0].state, VmState::Running, "{vms:?}");
    assert!(vms[0].counter > before);
    let b = lab.client("b").await.unwrap();
    assert!(b.vm_list().await.unwrap().is_empty());
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}
