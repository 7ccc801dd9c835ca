//! The destination's one admission check, for sim and QEMU proposals alike:
//! a source agent holding a valid ticket cannot propose anything the ticket
//! does not grant. Each mismatch is refused before anything is reserved, and
//! the refusal is in the destination's signed audit log.

use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_agent::trust::authz::issue_ticket;
use convoy_protocol::disk::DiskGeometry;
use convoy_protocol::message::Manifest;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::page::MemoryGeometry;
use convoy_protocol::stream::{DiskManifest, QemuManifest};
use convoy_protocol::ticket::SignedTicket;
use convoy_protocol::vm::VmAttributes;
use convoy_protocol::vm::VmSubject;
use convoy_tests::{
    assert_refusals_logged, assert_unauthorized, propose_claiming, propose_manifest_as,
};

/// A change to one field of a plan.
type Change = fn(&mut MigrationPlan);

fn ticket(lab: &Lab, plan: &MigrationPlan) -> SignedTicket {
    let (a, b) = (lab.agent("a").unwrap(), lab.agent("b").unwrap());
    issue_ticket(
        &lab.operator,
        &"vm".parse().unwrap(),
        // The VM `sim` describes.
        VmSubject::plain(4 << 20),
        a.id.clone(),
        b.id.clone(),
        plan,
        Duration::from_secs(60),
    )
    .unwrap()
}

/// A sim manifest that follows `plan` exactly.
fn sim(plan: &MigrationPlan) -> Manifest {
    Manifest {
        memory: MemoryGeometry::from_bytes(4 << 20).unwrap(),
        data_streams: plan.streams,
        qemu: None,
        postcopy: plan.mode != MigrationMode::Precopy,
        start_paused: plan.start_paused,
        plan: plan.clone(),
        reuse: None,
        disks: Vec::new(),
    }
}

/// A QEMU manifest that follows `plan`, with `multifd` channels and `disks`
/// mirrored disks.
fn qemu(plan: &MigrationPlan, multifd: u16, disks: usize) -> Manifest {
    let spec = convoy_protocol::fuzz::qemu_spec(disks);
    let q = QemuManifest {
        spec,
        mode: plan.mode,
        multifd_channels: multifd,
        disks: (0..disks)
            .map(|_| DiskManifest {
                size: 1 << 20,
                format: "raw".into(),
            })
            .collect(),
    };
    Manifest {
        memory: MemoryGeometry::from_bytes(16 << 20).unwrap(),
        data_streams: q.channels() as u16,
        qemu: Some(Box::new(q)),
        postcopy: false,
        start_paused: false,
        plan: plan.clone(),
        reuse: None,
        disks: Vec::new(),
    }
}

/// `b` refuses `manifest` under a ticket granting `plan`, naming `why`,
/// reserves nothing, and audits the refusal.
async fn refused(lab: &Lab, plan: &MigrationPlan, manifest: Manifest, why: &str) {
    let answer = propose_manifest_as(lab, "a", "b", ticket(lab, plan), manifest).await;
    assert_unauthorized(&answer, why);
    let b = lab.client("b").await.unwrap();
    assert!(b.vm_list().await.unwrap().is_empty(), "{why}: b reserved");
    assert_refusals_logged(lab, "b", &[why]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mismatch_between_proposal_and_ticket_is_refused_for_sim_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {})
        .await
        .unwrap();
    let precopy = MigrationPlan::default();

    // Sim: a post-copy switch announced under a pre-copy ticket (the hole
    // the two admission paths left: only the QEMU one checked the mode).
    let mut m = sim(&precopy);
    m.postcopy = true;
    refused(&lab, &precopy, m, "announces a post-copy switch").await;
    // The source restates another plan than the ticket's, field by field.
    let changes: Vec<(&str, Change)> = vec![
        ("mode", |p| p.mode = MigrationMode::Postcopy),
        ("streams", |p| p.streams = 4),
        ("copy_storage", |p| p.copy_storage = true),
        ("storage_postcopy", |p| p.storage_postcopy = true),
        ("start_paused", |p| p.start_paused = true),
        ("force_stop", |p| p.force_stop = true),
        ("max_downtime_ms", |p| p.max_downtime_ms = 60_000),
        ("max_rounds", |p| p.max_rounds = 1_000),
        ("bandwidth", |p| p.bandwidth = Some(1 << 40)),
    ];
    for (field, change) in changes {
        let mut m = sim(&precopy);
        change(&mut m.plan);
        refused(
            &lab,
            &precopy,
            m,
            &format!("differs from the ticket's in {field}"),
        )
        .await;
    }
    // The manifest's own facts against the plan.
    let mut m = sim(&precopy);
    m.data_streams = 3;
    refused(&lab, &precopy, m, "opens 3 data streams").await;
    let mut m = sim(&precopy);
    m.start_paused = true;
    refused(&lab, &precopy, m, "starts the VM paused").await;
    let mut m = sim(&precopy);
    m.disks = vec![DiskGeometry {
        name: "root".parse().unwrap(),
        bytes: 1 << 20,
        base: None,
    }];
    refused(&lab, &precopy, m, "does not allow copying storage").await;

    // QEMU: the same rule, through the same function.
    // (One stream: QEMU cannot combine multifd with post-copy.)
    let one = MigrationPlan {
        streams: 1,
        ..MigrationPlan::default()
    };
    let mut m = qemu(&one, 0, 0);
    if let Some(q) = m.qemu.as_mut() {
        q.mode = MigrationMode::Postcopy;
    }
    refused(&lab, &one, m, "QEMU manifest runs postcopy").await;
    refused(&lab, &precopy, qemu(&precopy, 4, 0), "4 multifd channels").await;
    let mut m = qemu(&precopy, 2, 0);
    m.plan.force_stop = true;
    refused(&lab, &precopy, m, "differs from the ticket's in force_stop").await;
    refused(
        &lab,
        &precopy,
        qemu(&precopy, 2, 1),
        "does not allow copying storage",
    )
    .await;

    // The VM itself: the ticket binds a 4 MiB VM without disks and with
    // default attributes. Another size, sim or QEMU (16 MiB), is refused.
    let mut m = sim(&precopy);
    m.memory = MemoryGeometry::from_bytes(64 << 20).unwrap();
    refused(&lab, &precopy, m, "ticket was issued for 4194304 bytes").await;
    refused(
        &lab,
        &precopy,
        qemu(&precopy, 2, 0),
        "describes 16777216 bytes of memory",
    )
    .await;
    // A tenant or security level relabelled on the way.
    for attributes in [
        VmAttributes {
            tenant: "other".into(),
            ..VmAttributes::default()
        },
        VmAttributes {
            security_level: 3,
            ..VmAttributes::default()
        },
    ] {
        let t = ticket(&lab, &precopy);
        let answer = propose_claiming(&lab, "a", "b", t, sim(&precopy), attributes).await;
        assert_unauthorized(&answer, "attributes differ from those the ticket binds");
    }
    let b = lab.client("b").await.unwrap();
    assert!(b.vm_list().await.unwrap().is_empty());
    assert_refusals_logged(&lab, "b", &["attributes differ"]).await;
    lab.shutdown().await;
}
