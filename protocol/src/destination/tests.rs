//! Unit tests of the destination state machine (the `Pair` harness in
//! `protocol/tests/pair` drives it against a source).

use std::time::Duration;

use super::*;
use crate::fuzz::InsecureCrypto;
use crate::message::{Capabilities, Manifest, VersionRange};
use crate::model::{MigrationMode, MigrationPlan};
use crate::page::MemoryGeometry;

/// A destination allowing `bookkeeping` bytes of bookkeeping.
fn destination(now: Instant, bookkeeping: u64) -> Destination {
    Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 30,
        max_disk_bytes: 1 << 30,
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(1),
        peer: "spiffe://t/agent/a".parse().unwrap(),
        notary: InsecureCrypto::notary("spiffe://t/agent/b", now),
        recovery: Duration::ZERO,
        silence: Duration::from_secs(60),
        max_bookkeeping_bytes: bookkeeping,
    })
}

/// The proposal of a hybrid migration of 16 pages and one 16-block disk.
fn proposal(plan: &MigrationPlan) -> Message {
    Message::Propose(Propose {
        versions: VersionRange::OURS,
        capabilities: Capabilities::OURS,
        migration: MigrationId([1; 16]),
        vm: "vm".parse().unwrap(),
        attributes: Default::default(),
        manifest: Manifest {
            memory: MemoryGeometry::from_bytes(16 * 4096).unwrap(),
            data_streams: plan.streams,
            qemu: None,
            postcopy: true,
            reuse: None,
            disks: vec![crate::disk::DiskGeometry {
                name: "d".parse().unwrap(),
                bytes: 16 * 4096,
                base: None,
            }],
            start_paused: false,
            plan: plan.clone(),
        },
        ticket: crate::ticket::SignedTicket::from_parts(Vec::new(), Vec::new(), Vec::new()),
    })
}

/// A hybrid migration of 16 pages and one 16-block disk, admitted and
/// receiving.
fn receiving(plan: &MigrationPlan, now: Instant) -> Destination {
    let mut d = destination(now, 1 << 30);
    d.handle_message(now, proposal(plan)).unwrap();
    while let Some(a) = d.poll_action() {
        if let DestinationAction::PrepareStaging { .. } = a {
            d.handle_staging_ready(now);
        }
    }
    d
}

#[test]
fn a_proposal_whose_bookkeeping_would_not_fit_is_refused_before_anything_is_reserved() {
    let now = Instant::now();
    // 16 pages and 16 disk blocks: 32 leaves, 2 048 bytes of bookkeeping.
    let mut d = destination(now, 2047);
    d.handle_message(now, proposal(&MigrationPlan::default()))
        .unwrap();
    let actions: Vec<_> = std::iter::from_fn(|| d.poll_action()).collect();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, DestinationAction::PrepareStaging { .. })),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            DestinationAction::Send(Message::Reject(r))
                if r.reason.to_string().contains("2048 bytes of bookkeeping")
        )),
        "{actions:?}"
    );
    // With exactly that much allowed, it goes on to staging.
    let mut d = destination(now, 2048);
    d.handle_message(now, proposal(&MigrationPlan::default()))
        .unwrap();
    assert!(std::iter::from_fn(|| d.poll_action())
        .any(|a| matches!(a, DestinationAction::PrepareStaging { .. })));
}

fn switch(streams: u16, storage: bool) -> Message {
    // 16 pages, or 32 leaves with the disk: one bitmap word either way.
    Message::PostcopySwitch(PostcopySwitch {
        batches: vec![0; usize::from(streams)],
        device_state: Vec::new(),
        owed: vec![0],
        storage,
    })
}

#[test]
fn a_switch_must_carry_the_admitted_plan_s_storage_flag() {
    let now = Instant::now();
    let plan = MigrationPlan {
        mode: MigrationMode::Hybrid,
        copy_storage: true,
        ..MigrationPlan::default()
    };
    // Storage post-copy the plan did not grant.
    let mut d = receiving(&plan, now);
    let err = d
        .handle_message(now, switch(plan.streams, true))
        .unwrap_err();
    assert!(
        matches!(err, DestinationError::BadSwitch(m) if m.contains("storage")),
        "{err}"
    );
    // And the plan's storage post-copy withheld from the switch.
    let plan = MigrationPlan {
        storage_postcopy: true,
        ..plan
    };
    let mut d = receiving(&plan, now);
    let err = d
        .handle_message(now, switch(plan.streams, false))
        .unwrap_err();
    assert!(
        matches!(err, DestinationError::BadSwitch(m) if m.contains("storage")),
        "{err}"
    );
    // The switch the plan grants is taken.
    let mut d = receiving(&plan, now);
    d.handle_message(now, switch(plan.streams, true)).unwrap();
}

#[test]
fn a_source_silent_after_accept_loses_its_staging_after_the_silence_limit() {
    let t0 = Instant::now();
    let plan = MigrationPlan {
        mode: MigrationMode::Hybrid,
        copy_storage: true,
        ..MigrationPlan::default()
    };
    let mut d = receiving(&plan, t0);
    let limit = Duration::from_secs(60);
    assert_eq!(d.poll_timeout(), Some(t0 + limit));
    // Anything from the source moves the deadline.
    let later = t0 + Duration::from_secs(50);
    for s in 0..plan.streams {
        d.handle_stream_opened(s).unwrap();
    }
    d.handle_batch_applied(later, 0, 0, &[]).unwrap();
    assert_eq!(d.poll_timeout(), Some(later + limit));
    // Early: nothing happens.
    d.handle_timeout(later + limit - Duration::from_secs(1));
    assert!(!d.is_finished());
    // Then the source is given up: told why, staging discarded.
    d.handle_timeout(later + limit);
    let actions: Vec<_> = std::iter::from_fn(|| d.poll_action()).collect();
    assert!(
        actions.iter().any(|a| matches!(
            a,
            DestinationAction::Send(Message::Abort(Abort {
                reason: Reason::Timeout
            }))
        )),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, DestinationAction::DiscardStaging)),
        "{actions:?}"
    );
    let failed = std::iter::from_fn(|| d.poll_event())
        .any(|e| matches!(e, DestinationEvent::Failed(m) if m.contains("sent nothing for 60 s")));
    assert!(failed);
    assert!(d.is_finished());
}

#[test]
fn a_probe_is_answered_at_once_while_receiving_and_refused_before_a_proposal() {
    let now = Instant::now();
    let probe = |seq| Message::Probe(crate::stream::Probe { seq });
    // A connection must begin with a proposal: a probe first is refused.
    let mut d = destination(now, 1 << 30);
    assert!(d.handle_message(now, probe(1)).is_err());
    assert!(
        !matches!(
            d.poll_action(),
            Some(DestinationAction::Send(Message::Probe(_)))
        ),
        "answered before a proposal"
    );
    let plan = MigrationPlan {
        mode: MigrationMode::Precopy,
        ..MigrationPlan::default()
    };
    let mut d = receiving(&plan, now);
    d.handle_message(now, probe(7)).unwrap();
    match d.poll_action() {
        Some(DestinationAction::Send(Message::Probe(p))) => assert_eq!(p.seq, 7),
        other => panic!("{other:?}"),
    }
    // Nothing else changed: the migration still receives.
    assert!(!d.is_finished());
}
