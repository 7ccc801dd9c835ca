//! QEMU VMs through a bucket: agent a pushes a guest that keeps writing its
//! disk (QEMU saves it while it runs) sealed for b, and the guest runs on
//! at a; b restores it — every chunk and the root checked before a QEMU
//! starts — and the guest's counter and disk carry on at b from where the
//! save left them, without a reboot. A bucket whose chunks were altered is
//! refused and leaves nothing at b: no VM, no disk, no QEMU.

use std::time::Duration;

use convoy_agent::backend::qemu::guest::counters;
use convoy_agent::client::{ClientError, CtlClient};
use convoy_protocol::ctl::snapshot::{PullRequest, PushRequest, SnapshotRequest, SnapshotResponse};
use convoy_protocol::ctl::VmState;
use convoy_protocol::snapshot::SnapshotBackend;

use crate::qemu::{disk_blocks, guest, until, QemuLab};

async fn push(c: &CtlClient, url: &str) -> Result<SnapshotResponse, ClientError> {
    c.snapshot(SnapshotRequest::Push(PushRequest {
        vm: "guest".parse().unwrap(),
        url: url.into(),
        recipients: vec!["b".parse().unwrap()],
        live: true,
    }))
    .await
}

async fn pull(c: &CtlClient, url: &str) -> Result<SnapshotResponse, ClientError> {
    c.snapshot(SnapshotRequest::Pull(PullRequest {
        url: url.into(),
        snapshot: None,
        vm: None,
        paused: false,
    }))
    .await
}

/// A `file://` bucket where b enrolled, its URL, and clients of a and b.
async fn bucket_for_b(q: &QemuLab) -> (tempfile::TempDir, String, CtlClient, CtlClient) {
    let bucket = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", bucket.path().display());
    let (a, b) = (
        q.lab.client("a").await.unwrap(),
        q.lab.client("b").await.unwrap(),
    );
    b.snapshot(SnapshotRequest::Enroll { url: url.clone() })
        .await
        .unwrap();
    (bucket, url, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_and_its_disk_move_through_a_bucket() {
    let Some(g) = guest() else { return };
    let _heavy = convoy_tests::heavy().await;
    let dir = tempfile::tempdir().unwrap();
    let (q, src_disk) = QemuLab::with_written_disk(dir.path(), g).await;
    let (bucket, url, a, b) = bucket_for_b(&q).await;

    let gen_before = disk_blocks(&src_disk, 256)
        .into_iter()
        .flatten()
        .max()
        .unwrap();
    let before = *counters(&q.serial("a", "guest")).last().unwrap();
    let p = match push(&a, &url).await.unwrap() {
        SnapshotResponse::Pushed(p) => p,
        other => panic!("{other:?}"),
    };
    eprintln!(
        "QEMU push: {} chunks ({} stored, {} uploaded, {} bytes), paused {:.0} ms, total {:.0} ms",
        p.summary.chunks.0,
        p.summary.chunks.1,
        p.uploaded,
        p.uploaded_bytes,
        p.paused_ms,
        p.total_ms
    );
    assert_eq!(p.summary.backend, SnapshotBackend::Qemu);
    assert!(p.uploaded > 0 && p.uploaded == p.summary.chunks.1, "{p:?}");
    // The stream (a 128 MiB guest, mostly zero) and the 4 MiB disk.
    assert!(p.summary.vm_bytes > 4 << 20, "{p:?}");
    // The guest runs on at a.
    let after_push = *counters(&q.serial("a", "guest")).last().unwrap();
    assert!(
        until(Duration::from_secs(60), || counters(
            &q.serial("a", "guest")
        )
        .iter()
        .any(|&c| c > after_push))
        .await,
        "the guest stopped at a after the push"
    );
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);

    // Restored paused: its disk is the snapshot's, every block valid and
    // no older than before the push; then it runs on from where the
    // save was, no reboot (a booted guest starts from 1).
    let r = match b
        .snapshot(SnapshotRequest::Pull(PullRequest {
            url: url.clone(),
            snapshot: None,
            vm: None,
            paused: true,
        }))
        .await
        .unwrap()
    {
        SnapshotResponse::Pulled(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (r.vm.backend.as_str(), r.vm.state),
        ("qemu", VmState::Paused)
    );
    let dst_disk = q.images("b").join("disk.img");
    let blocks = disk_blocks(&dst_disk, 256);
    assert!(blocks.iter().all(Option::is_some), "{blocks:?}");
    let gen_at_b = blocks.into_iter().flatten().max().unwrap();
    assert!(gen_at_b >= gen_before, "{gen_at_b} < {gen_before}");
    let log_b = q.serial("b", "guest");
    assert!(counters(&log_b).is_empty(), "the paused guest ran at b");
    let v = b.vm_pause("guest".parse().unwrap(), false).await.unwrap();
    assert_eq!(v.state, VmState::Running);
    assert!(
        until(Duration::from_secs(60), || !counters(&log_b).is_empty()).await,
        "no counter at b: {:?}",
        std::fs::read_to_string(&log_b)
    );
    let first = counters(&log_b)[0];
    assert!(
        first > before,
        "b's guest counts from {first}, before {before}"
    );
    b.vm_delete("guest".parse().unwrap()).await.unwrap();
    std::fs::remove_file(&dst_disk).unwrap();

    // Pushed again: the next generation of the lineage; what QEMU's
    // stream and the disk repeat of the first is not uploaded again.
    let p2 = match push(&a, &url).await.unwrap() {
        SnapshotResponse::Pushed(p) => p,
        other => panic!("{other:?}"),
    };
    eprintln!(
        "second QEMU push: {} stored, {} uploaded",
        p2.summary.chunks.1, p2.uploaded
    );
    assert_eq!(p2.summary.generation, 2);
    assert!(p2.uploaded < p2.summary.chunks.1, "{p2:?}");

    // Every chunk altered in the bucket: refused, naming a chunk, and
    // nothing is left at b.
    let chunks = bucket.path().join("snapshots/chunks");
    for e in std::fs::read_dir(&chunks).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let e = pull(&b, &url).await.unwrap_err();
    eprintln!("refused: {e}");
    assert!(e.to_string().contains("chunk"), "{e}");
    assert!(b.vm_list().await.unwrap().is_empty());
    assert!(!dst_disk.exists(), "the refused pull left its disk");
    let runtime = q.serial("b", "guest");
    assert!(
        !runtime.parent().unwrap().exists(),
        "the refused pull left its runtime directory"
    );
    assert!(
        until(Duration::from_secs(10), || q.processes("b").is_empty()).await,
        "a QEMU runs at b"
    );
    q.lab.shutdown().await;
}

async fn via(
    q: &QemuLab,
    url: &str,
    wait_secs: u32,
) -> Result<convoy_protocol::ctl::snapshot::HandoverReport, ClientError> {
    let req = q
        .lab
        .migrate_request("guest", "a", "b", Default::default())
        .unwrap();
    match q
        .lab
        .client("a")
        .await
        .unwrap()
        .snapshot(SnapshotRequest::MigrateVia {
            migrate: req,
            url: url.into(),
            wait_secs,
        })
        .await?
    {
        SnapshotResponse::Handed(h) => Ok(*h),
        other => panic!("{other:?}"),
    }
}

/// Store-and-forward of a QEMU VM: a saves it into the bucket and waits
/// for the one claim. Unclaimed in time, a claims it back and the guest
/// runs on there; b, late, restores it but loses the claim and keeps
/// nothing. Claimed by b, the guest runs on at b from where it was saved
/// and a's QEMU is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vm_is_handed_over_through_a_bucket_exactly_once() {
    use convoy_protocol::ctl::Outcome;
    let Some(g) = guest() else { return };
    let _heavy = convoy_tests::heavy().await;
    let dir = tempfile::tempdir().unwrap();
    let q = QemuLab::start(dir.path(), g).await;
    q.create("a", "guest", vec![]).await;
    let (_bucket, url, a, b) = bucket_for_b(&q).await;

    // Unclaimed: back at a, running.
    let h = via(&q, &url, 1).await.unwrap();
    assert!(matches!(h.outcome, Outcome::Aborted(_)), "{h:?}");
    assert_eq!(h.summary.backend, SnapshotBackend::Qemu);
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    let log_a = q.serial("a", "guest");
    let now = *counters(&log_a).last().unwrap();
    assert!(
        until(Duration::from_secs(60), || counters(&log_a)
            .iter()
            .any(|&c| c > now))
        .await,
        "the guest claimed back does not run at a"
    );
    // b's late restore must never run the guest: its serial log (while
    // it exists) never shows a counter.
    let log_b = q.serial("b", "guest");
    let ran = std::sync::atomic::AtomicBool::new(false);
    let late = pull(&b, &url);
    let watch = async {
        loop {
            if !counters(&log_b).is_empty() {
                ran.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let e = tokio::select! {
        r = late => r.unwrap_err(),
        () = watch => unreachable!(),
    };
    assert!(!ran.into_inner(), "b's late restore ran the guest");
    assert!(e.to_string().contains("claimed VM guest first"), "{e}");
    assert!(b.vm_list().await.unwrap().is_empty());
    assert!(
        until(Duration::from_secs(10), || q.processes("b").is_empty()).await,
        "a QEMU runs at b"
    );

    // Claimed: b pulls while a waits.
    let before = *counters(&log_a).last().unwrap();
    let source = {
        let url = url.clone();
        let q = &q;
        async move { via(q, &url, 120).await }
    };
    let dest = async {
        for _ in 0..600 {
            match pull(&b, &url).await {
                Ok(SnapshotResponse::Pulled(p)) => return p,
                Ok(other) => panic!("{other:?}"),
                // Not pushed yet, or only the first (spent) one is there.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        panic!("b never restored the guest");
    };
    let (h, p) = tokio::join!(source, dest);
    let h = h.unwrap();
    assert_eq!(h.outcome, Outcome::Completed, "{h:?}");
    assert_eq!(p.summary.generation, 2);
    assert_eq!(p.vm.state, VmState::Running);
    let log_b = q.serial("b", "guest");
    assert!(
        until(Duration::from_secs(60), || !counters(&log_b).is_empty()).await,
        "no counter at b"
    );
    let first = counters(&log_b)[0];
    assert!(
        first > before,
        "b's guest counts from {first}, before {before}"
    );
    assert!(a.vm_list().await.unwrap().is_empty());
    assert!(
        until(Duration::from_secs(10), || q.processes("a").is_empty()).await,
        "a's QEMU still runs"
    );
    q.lab.shutdown().await;
}
