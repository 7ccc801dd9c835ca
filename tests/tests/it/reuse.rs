//! Memory reuse when a VM comes back, between two agents on loopback: a
//! host the VM left keeps its image encrypted (only when the agent allows
//! it and the VM opts in), and the trip back sends only the changed pages.

use std::time::Duration;

use convoy_agent::host::retain::RetentionLimits;
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{Outcome, SimVmSpec, VmState};
use convoy_protocol::vm::RETAIN_LABEL;
use convoy_tests::{migrate, sim_spec};

const MEMORY: u64 = 32 << 20;

async fn lab(retain: bool) -> (tempfile::TempDir, Lab) {
    convoy_tests::lab_with(&["a", "b"], move |_, c| {
        if retain {
            c.retain_images = Some(RetentionLimits {
                max_images: 4,
                max_bytes: 1 << 30,
            });
        }
    })
    .await
}

/// A VM that opts in to retention, dirtying `rate` pages a second.
fn opted_in(name: &str, rate: u64) -> SimVmSpec {
    let mut s = sim_spec(name, MEMORY, rate);
    s.attributes
        .labels
        .insert(RETAIN_LABEL.into(), "true".into());
    s
}

/// Whether `bytes` could hold a plaintext page of mixed guest memory: a
/// run of 64 zero bytes (zero pages are common in guest memory and
/// improbable in ciphertext).
fn has_zero_run(bytes: &[u8]) -> bool {
    bytes.windows(64).any(|w| w.iter().all(|b| *b == 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_comes_back_sends_only_what_changed() {
    let (_dir, lab) = lab(true).await;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    // 200 page writes a second, 90% into a 10% hot set: a few hundred of
    // its 8192 pages change while it runs at b.
    a.vm_create(opted_in("web", 200)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let there = a
        .migrate(migrate(&lab, "web", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(there.outcome, Outcome::Completed, "{there:?}");
    assert_eq!(there.encodings.retained, 0);
    // a keeps one image, ciphertext only.
    let images = lab.retained_images("a").unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].vm().as_str(), "web");
    assert!(there.encodings.zero > 0, "mixed memory has zero pages");
    assert!(!has_zero_run(images[0].sealed_bytes()));
    assert!(lab.retained_images("b").unwrap().is_empty());

    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = b
        .migrate(migrate(&lab, "web", "b", "a"), |_| {})
        .await
        .unwrap();
    assert_eq!(back.outcome, Outcome::Completed, "{back:?}");
    assert!(back.verified);
    assert!(back.encodings.retained > 0, "{:?}", back.encodings);
    println!(
        "reuse (agents): there {} payload bytes, back {} ({} pages retained, {} sent)",
        there.payload_bytes, back.payload_bytes, back.encodings.retained, back.pages_sent
    );
    assert!(
        back.payload_bytes * 5 < there.payload_bytes,
        "{} bytes back vs {} there",
        back.payload_bytes,
        there.payload_bytes
    );
    // The VM runs at a from exactly where b paused it, and a's image is
    // gone (b retained one in its turn).
    let vms = a.vm_list().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Running);
    assert_eq!(vms[0].counter_at_start, back.counter_at_pause);
    assert!(lab.retained_images("a").unwrap().is_empty());
    assert_eq!(lab.retained_images("b").unwrap().len(), 1);

    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// A VM with a disk comes back: its memory is reused from the image the
/// host retained (memory only), its disk travels as usual (the blocks
/// written, not the holes), and the one root over both verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_a_disk_that_comes_back_reuses_its_memory_and_moves_its_disk() {
    let (_dir, lab) = lab(true).await;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    let mut spec = opted_in("db", 200);
    spec.disks = vec![convoy_protocol::ctl::SimDiskSpec {
        name: "root".parse().unwrap(),
        bytes: 16 << 20,
        writes_per_sec: 200,
        used_pct: 25,
        base: None,
    }];
    a.vm_create(spec).await.unwrap();
    let with_disk = |from: &str, to: &str| {
        let o = convoy_protocol::model::MigrationPlan {
            copy_storage: true,
            ..Default::default()
        };
        lab.migrate_request("db", from, to, o).unwrap()
    };
    let there = a.migrate(with_disk("a", "b"), |_| {}).await.unwrap();
    assert_eq!(there.outcome, Outcome::Completed, "{there:?}");
    assert_eq!(lab.retained_images("a").unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = b.migrate(with_disk("b", "a"), |_| {}).await.unwrap();
    assert_eq!(back.outcome, Outcome::Completed, "{back:?}");
    assert!(back.verified, "memory and disk roots verified");
    let memory_pages = MEMORY / 4096;
    assert!(
        back.encodings.retained > memory_pages / 2,
        "most memory pages reused: {:?}",
        back.encodings
    );
    // The disk's written blocks travel again (a keeps no disk of a VM that
    // left), counted apart from the reused memory.
    assert!(back.disk_blocks_sent > 0 && back.disk_blocks_sent < (16 << 20) / 4096);
    assert_eq!(back.disks.len(), 1);
    assert!(back.payload_bytes < there.payload_bytes, "{back:?}");
    let vms = a.vm_list().await.unwrap();
    assert_eq!(vms[0].state, VmState::Running);
    assert_eq!(vms[0].counter_at_start, back.counter_at_pause);
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_off_by_default_and_per_vm() {
    // The agent does not allow it: nothing kept, even for a VM that opts in.
    let (_dir, lab_off) = lab(false).await;
    let a = lab_off.client("a").await.unwrap();
    let b = lab_off.client("b").await.unwrap();
    a.vm_create(opted_in("web", 0)).await.unwrap();
    let there = a
        .migrate(migrate(&lab_off, "web", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(there.outcome, Outcome::Completed, "{there:?}");
    assert!(lab_off.retained_images("a").unwrap().is_empty());
    let back = b
        .migrate(migrate(&lab_off, "web", "b", "a"), |_| {})
        .await
        .unwrap();
    assert_eq!(back.outcome, Outcome::Completed, "{back:?}");
    assert_eq!(back.encodings.retained, 0);
    a.close().await;
    b.close().await;
    lab_off.shutdown().await;

    // The agent allows it, the VM does not opt in: nothing kept.
    let (_dir, lab_on) = lab(true).await;
    let a = lab_on.client("a").await.unwrap();
    a.vm_create(sim_spec("db", MEMORY, 0)).await.unwrap();
    let there = a
        .migrate(migrate(&lab_on, "db", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(there.outcome, Outcome::Completed, "{there:?}");
    assert!(lab_on.retained_images("a").unwrap().is_empty());
    a.close().await;
    lab_on.shutdown().await;
}
