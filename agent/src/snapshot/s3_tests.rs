//! The snapshot store against a real S3 API: moto's server
//! ([`crate::s3lab`]), each test on its own server and bucket. Without
//! `CONVOY_MOTO_SERVER` these tests fail under `CI=true` and are skipped
//! elsewhere ([`crate::s3lab::moto_server`]).

use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, ObjectStoreExt, PutPayload, RetryConfig};

use convoy_protocol::snapshot::{chunk_object, ChunkRef};

use super::store::{S3Options, MIN_PART_SIZE};
use super::tests::{lab_on, same_memory, Lab};
use super::{SnapshotStore, StoreError};
use crate::s3lab::{Fault, FlakyFront, FlakyPlan, S3Server};

const BUCKET: &str = "convoy-snapshots";
const PREFIX: &str = "site-a/vms";

/// Moto with [`BUCKET`] made, or `None` where the test is skipped.
async fn moto(test: &str) -> Option<S3Server> {
    let s3 = S3Server::for_test(test).await.unwrap()?;
    s3.create_bucket(BUCKET).await.unwrap();
    Some(s3)
}

/// Moto and a store on it under [`PREFIX`], or `None` where the test is
/// skipped.
async fn moto_store(test: &str) -> Option<(S3Server, SnapshotStore)> {
    let s3 = moto(test).await?;
    let store = open(s3.config(), PREFIX);
    Some((s3, store))
}

/// Retries as `object_store` makes them, but quick: a test of a store
/// that always fails ends in a second, not in minutes.
fn quick_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(60),
    }
}

fn open(config: Vec<(AmazonS3ConfigKey, String)>, prefix: &str) -> SnapshotStore {
    let options = S3Options {
        config,
        retry: Some(quick_retries()),
    };
    SnapshotStore::open_with(&format!("s3://{BUCKET}/{prefix}"), &options).unwrap()
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap().wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_new_on_s3_writes_once_and_then_reports_the_object_exists() {
    let Some((_s3, store)) =
        moto_store("s3_tests::put_new_on_s3_writes_once_and_then_reports_the_object_exists").await
    else {
        return;
    };
    assert!(store
        .put_new("o", Bytes::from_static(b"first"))
        .await
        .unwrap());
    // Moto honours `If-None-Match: *` (412): the second write is refused.
    assert!(!store
        .put_new("o", Bytes::from_static(b"second"))
        .await
        .unwrap());
    assert_eq!(store.get("o", 100).await.unwrap(), &b"first"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_new_copies_inside_the_bucket_once() {
    let Some((_s3, store)) = moto_store("s3_tests::copy_new_copies_inside_the_bucket_once").await
    else {
        return;
    };
    store.put_new("a", pattern(1000, 1)).await.unwrap();
    store.put_new("c", pattern(10, 2)).await.unwrap();
    assert!(store.copy_new("a", "b").await.unwrap());
    assert_eq!(store.get("b", 1000).await.unwrap(), pattern(1000, 1));
    // `b` exists: not replaced.
    assert!(!store.copy_new("c", "b").await.unwrap());
    assert_eq!(store.get("b", 1000).await.unwrap(), pattern(1000, 1));
    // No source: an error naming both.
    let e = store
        .copy_new("missing", "d")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing -> d"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_range_reads_a_slice_and_refuses_one_wider_than_allowed() {
    let Some((_s3, store)) =
        moto_store("s3_tests::get_range_reads_a_slice_and_refuses_one_wider_than_allowed").await
    else {
        return;
    };
    let all = pattern(100_000, 3);
    store.put_new("obj", all.clone()).await.unwrap();
    let b = store.get_range("obj", 1000..1500, 500).await.unwrap();
    assert_eq!(b, all.slice(1000..1500));
    let e = store.get_range("obj", 0..501, 500).await.unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { size: 501, .. }), "{e}");
    // Past the end: the store's error, naming the object.
    let e = store
        .get_range("obj", 200_000..200_010, 500)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("/obj"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_large_uploads_in_parts_that_read_back_as_one_object() {
    let Some((_s3, store)) =
        moto_store("s3_tests::put_large_uploads_in_parts_that_read_back_as_one_object").await
    else {
        return;
    };
    let big = pattern(2 * MIN_PART_SIZE + 12345, 4);
    let parts = store
        .put_large("big", big.clone(), MIN_PART_SIZE)
        .await
        .unwrap();
    assert_eq!(parts, 3);
    let back = store.get("big", big.len() as u64).await.unwrap();
    assert!(back == big, "{} bytes back of {}", back.len(), big.len());
    // A part size under S3's minimum is raised to it.
    let parts = store.put_large("big", big.clone(), 1024).await.unwrap();
    assert_eq!(parts, 3);
    // One part or less: one plain write.
    let small = pattern(1000, 5);
    assert_eq!(store.put_large("small", small.clone(), 0).await.unwrap(), 1);
    assert_eq!(store.get("small", 1000).await.unwrap(), small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_delete_stay_under_the_prefix() {
    let Some(s3) = moto("s3_tests::list_and_delete_stay_under_the_prefix").await else {
        return;
    };
    let here = open(s3.config(), PREFIX);
    let there = open(s3.config(), "site-b");
    for n in ["chunks/1", "chunks/2", "manifests/x"] {
        here.put_new(n, Bytes::from_static(b"h")).await.unwrap();
    }
    there
        .put_new("chunks/9", Bytes::from_static(b"t"))
        .await
        .unwrap();
    assert_eq!(here.list("chunks").await.unwrap(), ["chunks/1", "chunks/2"]);
    here.delete("chunks/1").await.unwrap();
    // Gone already is fine.
    here.delete("chunks/1").await.unwrap();
    assert_eq!(here.list("chunks").await.unwrap(), ["chunks/2"]);
    assert_eq!(there.list("chunks").await.unwrap(), ["chunks/9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pushed_to_s3_is_pulled_by_its_recipient_as_it_was() {
    let Some(s3) = moto("s3_tests::a_vm_pushed_to_s3_is_pulled_by_its_recipient_as_it_was").await
    else {
        return;
    };
    let lab = lab_on(open(s3.config(), PREFIX), None);
    let first = lab.push().await;
    // Push resumes the guest; paused, it holds what was pushed.
    lab.vm.pause().unwrap();
    assert_eq!((first.generation, first.chunks), (1, 4));
    assert_eq!(first.uploaded, first.stored);
    let p = lab.pull(None, None).await.unwrap();
    assert!(same_memory(&*lab.vm, &*p.vm));
    assert_eq!(p.manifest.snapshot, first.snapshot);
    p.vm.destroy();
    // The next generation uploads only what changed.
    lab.vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let second = lab.push().await;
    lab.vm.pause().unwrap();
    assert_eq!(second.generation, 2);
    assert!(second.uploaded < second.stored, "{second:?}");
    let p = lab.pull(None, None).await.unwrap();
    assert_eq!(p.manifest.previous, Some(first.digest));
    assert!(same_memory(&*lab.vm, &*p.vm));
    p.vm.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_overwritten_in_the_bucket_is_refused_naming_it() {
    let Some(s3) = moto("s3_tests::a_chunk_overwritten_in_the_bucket_is_refused_naming_it").await
    else {
        return;
    };
    let lab = lab_on(open(s3.config(), PREFIX), None);
    lab.push().await;
    // The bucket's owner, not Convoy, rewrites one chunk.
    let mut raw = AmazonS3Builder::new().with_bucket_name(BUCKET);
    for (k, v) in s3.config() {
        raw = raw.with_config(k, v);
    }
    let raw = raw.build().unwrap();
    let chunk = lab.store.list("chunks").await.unwrap().remove(0);
    let path = object_store::path::Path::from(format!("{PREFIX}/{chunk}"));
    let mut bytes = raw
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[40] ^= 1;
    raw.put(&path, PutPayload::from(bytes)).await.unwrap();
    let e = lab.pull(None, None).await.unwrap_err().to_string();
    let name = chunk.trim_start_matches("chunks/");
    assert!(e.contains("does not authenticate"), "{e}");
    assert!(e.contains(name), "{e}");
}

/// The lab through a flaky front before `s3`.
async fn flaky_lab(s3: &S3Server, plan: FlakyPlan) -> (Lab, FlakyFront) {
    let front = s3.flaky(plan).await.unwrap();
    (lab_on(open(front.config(), PREFIX), None), front)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_succeed_through_a_front_that_fails_one_request_in_three() {
    let Some(s3) =
        moto("s3_tests::push_and_pull_succeed_through_a_front_that_fails_one_request_in_three")
            .await
    else {
        return;
    };
    for (seed, fault) in [(0, Fault::Unavailable), (1, Fault::Hangup)] {
        let plan = FlakyPlan {
            one_in: 3,
            seed,
            fault,
        };
        let (lab, front) = flaky_lab(&s3, plan).await;
        let r = lab.push().await;
        lab.vm.pause().unwrap();
        let p = lab.pull(None, None).await.unwrap();
        assert!(same_memory(&*lab.vm, &*p.vm));
        assert_eq!(p.manifest.snapshot, r.snapshot);
        p.vm.destroy();
        // object_store retried every failed request.
        let (failed, all) = (front.failed(), front.connections());
        assert!(
            failed > 0 && failed <= all / 3 + 1,
            "{fault:?}: {failed} of {all}"
        );
        // The next test starts on an empty bucket.
        for o in lab.store.list("").await.unwrap() {
            lab.store.delete(&o).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_that_fails_every_request_is_reported_naming_the_object() {
    let Some(s3) =
        moto("s3_tests::a_front_that_fails_every_request_is_reported_naming_the_object").await
    else {
        return;
    };
    let plan = FlakyPlan {
        one_in: 1,
        seed: 0,
        fault: Fault::Unavailable,
    };
    let (lab, front) = flaky_lab(&s3, plan).await;
    let e = lab.try_push().await.unwrap_err().to_string();
    // The error names the store and what it was about: a push starts by
    // listing the manifests (for the lineage it may continue).
    assert!(
        e.contains(&format!("s3://{BUCKET}/{PREFIX}/manifests:")),
        "{e}"
    );
    assert!(e.contains("after 10 retries") && e.contains("503"), "{e}");
    // That request was tried 1 + max_retries times, one connection each.
    assert_eq!(front.connections(), 11, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_create_whose_answer_is_lost_reads_as_exists() {
    let Some(s3) =
        moto("s3_tests::a_conditional_create_whose_answer_is_lost_reads_as_exists").await
    else {
        return;
    };
    // The first connection's answer is cut before its status line.
    let plan = FlakyPlan {
        one_in: u64::MAX,
        seed: 0,
        fault: Fault::Cut(0),
    };
    let front = s3.flaky(plan).await.unwrap();
    let store = open(front.config(), PREFIX);
    let made = store.put_new("o", Bytes::from_static(b"mine")).await;
    // The server wrote it; the retry was refused as "exists". A caller
    // cannot tell its own write from another's: push treats a chunk that
    // exists as stored (its name is its content's keyed hash) and a
    // manifest that exists as a lost race.
    assert!(!made.unwrap(), "the retry should have met the first write");
    assert_eq!(front.failed(), 1);
    assert_eq!(store.get("o", 10).await.unwrap(), &b"mine"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_copy_from_a_directory_to_s3_then_within_the_bucket_and_resume() {
    let Some(s3) =
        moto("s3_tests::snapshots_copy_from_a_directory_to_s3_then_within_the_bucket_and_resume")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let local = SnapshotStore::open(&format!("file://{}/bucket", dir.path().display())).unwrap();
    let lab = lab_on(local, Some(dir));
    lab.push().await;
    std::thread::sleep(Duration::from_millis(30));
    let second = lab.push().await;
    lab.vm.pause().unwrap();
    let v = convoy_protocol::fuzz::InsecureCrypto(String::new());

    // Directory → bucket: streamed through this host, both generations.
    let site_b = open(s3.config(), "site-b");
    let r = super::copy::copy(&lab.store, &site_b, &v, None)
        .await
        .unwrap();
    assert!(!r.server_side);
    assert_eq!(r.manifests.len(), 2);
    assert_eq!(r.manifests[0].manifest.generation, 1, "oldest first");
    assert!(r.chunks_copied > 0 && r.bytes_streamed > 0, "{r:?}");
    let stored = site_b.list("chunks").await.unwrap().len() as u64;
    assert_eq!(r.chunks_copied, stored);

    // Cut short: the newest manifest and a chunk are gone at the
    // destination. Run again, only they are copied.
    site_b.delete(&second.object).await.unwrap();
    let one = r.manifests[1]
        .manifest
        .chunks
        .iter()
        .find_map(|c| match c {
            ChunkRef::Stored { name, .. } => Some(chunk_object(name)),
            ChunkRef::Zero => None,
        })
        .unwrap();
    site_b.delete(&one).await.unwrap();
    let again = super::copy::copy(&lab.store, &site_b, &v, None)
        .await
        .unwrap();
    assert_eq!(again.manifests.len(), 1);
    assert_eq!(again.manifests_present, 1);
    assert_eq!(again.chunks_copied, 1, "{again:?}");

    // Within the bucket: the server copies, nothing passes through here.
    let site_c = open(s3.config(), "site-c");
    let r = super::copy::copy(&site_b, &site_c, &v, Some(second.snapshot))
        .await
        .unwrap();
    assert!(r.server_side);
    assert_eq!(r.bytes_streamed, 0);
    assert_eq!(r.manifests.len(), 1);
    // The recipient opens the copy, and it is the VM.
    let p = lab.pull_at(&site_c, None, None).await.unwrap();
    assert_eq!(p.manifest.snapshot, second.snapshot);
    assert!(same_memory(&*lab.vm, &*p.vm));
    p.vm.destroy();

    // Streamed, a chunk of another length than its manifest gives is
    // not copied, and the error names it (a server-side copy moves bytes
    // it never sees: the puller's checks are what catch those).
    let site_d = open(s3.config(), "site-d");
    let victim = lab.store.list("chunks").await.unwrap()[0].clone();
    lab.store
        .put(&victim, Bytes::from_static(b"short"))
        .await
        .unwrap();
    let e = super::copy::copy(&lab.store, &site_d, &v, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&victim) && e.contains("5 bytes"), "{e}");
    // No manifest is there whose chunks are not all there.
    let there = site_d.list("chunks").await.unwrap();
    for m in site_d.list("manifests").await.unwrap() {
        let f = super::read_manifest(&site_d, &m, &v).await.unwrap();
        for c in &f.manifest.chunks {
            if let ChunkRef::Stored { name, .. } = c {
                let o = chunk_object(name);
                assert!(o != victim && there.contains(&o), "{m} names {o}");
            }
        }
    }
}

/// The handover's claim on S3: claimants one after another on one
/// object, the first create succeeds (moto honours `If-None-Match: *`
/// with a 412), every other reads the winner.
///
/// Not racing, as `handover::tests` does on a directory: moto's
/// `PutObject` checks the condition and stores the object in two steps
/// without a lock between them (`moto/s3/responses.py`, `put_object`),
/// and its server serves each request on a thread of its own, so two
/// creates at once can both succeed there (one CI run in many saw two
/// winners). S3 settles concurrent conditional writes itself: the first
/// to finish succeeds, the others get 412, or 409 while it is still
/// being written, which object_store also reports as an existing object;
/// a claimant that then finds no claim yet gets an error, and the
/// handover stays undecided (the VM paused at the source) until a later
/// claim reads the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_claims_on_s3_have_one_winner_that_the_others_read() {
    let Some((_s3, store)) =
        moto_store("s3_tests::handover_claims_on_s3_have_one_winner_that_the_others_read").await
    else {
        return;
    };
    use super::handover::tests::{race, Claims};
    race(&store, 5, 6, Claims::InTurn).await;
}
