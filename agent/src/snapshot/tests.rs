//! Push and pull through a `file://` bucket, and a bucket that lies. The
//! lab here ([`Lab`], [`same_memory`]) serves the `s3://` tests too
//! (`s3_tests`).

use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::ctl::ContentProfile;
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::page::PageIndex;

use super::pull::{pull, PullRequest};
use super::push::{push, PushReport, PushRequest};
use super::sealing::{open_statement, SealingKeys};
use super::{SnapshotError, SnapshotStore};
use crate::backend::sim::SimVm;
use crate::backend::VmBackend;

const A: &str = "spiffe://lab/agent/a";
const B: &str = "spiffe://lab/agent/b";

pub(super) fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// A sim VM of 4 MiB on agent A, and agent B to pull it, over `store`.
pub(super) struct Lab {
    _dir: Option<tempfile::TempDir>,
    pub(super) store: SnapshotStore,
    url: String,
    a: Arc<SealingKeys>,
    b: SealingKeys,
    pub(super) vm: Arc<dyn VmBackend>,
    /// Where a first push records its lineage (`None`: nowhere).
    journal: Option<Arc<super::seen::SeenLineages>>,
    /// Where a pull keeps its chunks (`None`: nowhere).
    partial: Option<Arc<super::partial::Partial>>,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let store = SnapshotStore::open(&url).unwrap();
    lab_on(store, Some(dir))
}

/// The lab over `store` (and the directory it lives in, if any).
pub(super) fn lab_on(store: SnapshotStore, dir: Option<tempfile::TempDir>) -> Lab {
    lab_sized(store, dir, 4 << 20)
}

/// The lab over `store` with a VM of `bytes` bytes.
fn lab_sized(store: SnapshotStore, dir: Option<tempfile::TempDir>, bytes: u64) -> Lab {
    let url = store.url().to_owned();
    let spec = crate::backend::sim::testing::spec(bytes, 500, ContentProfile::Mixed);
    let vm: Arc<dyn VmBackend> = SimVm::create(&spec, None, None).unwrap();
    Lab {
        _dir: dir,
        store,
        url,
        a: Arc::new(SealingKeys::ephemeral().unwrap()),
        b: SealingKeys::ephemeral().unwrap(),
        vm,
        journal: None,
        partial: None,
    }
}

impl Lab {
    pub(super) async fn push(&self) -> PushReport {
        self.try_push().await.unwrap()
    }

    pub(super) async fn try_push(&self) -> Result<PushReport, SnapshotError> {
        self.push_as(false).await
    }

    /// A push of the VM, cold (paused around it) or live (running; the
    /// push pauses it, and it is left paused).
    pub(super) async fn push_as(&self, live: bool) -> Result<PushReport, SnapshotError> {
        let v = InsecureCrypto(String::new());
        let st = self
            .b
            .statement(&InsecureCrypto(B.into()), id(B), 1)
            .unwrap();
        let st = open_statement(&st, &v, &id(B)).unwrap();
        if !live {
            self.vm.pause().unwrap();
        }
        let r = push(
            &self.store,
            &v,
            PushRequest {
                name: "vm-1".parse().unwrap(),
                attributes: Default::default(),
                vm: self.vm.clone(),
                me: id(A),
                signer: Arc::new(InsecureCrypto(A.into())),
                keys: self.a.clone(),
                recipients: vec![st],
                level: 3,
                now_unix: 1_700_000_000,
                ticket: None,
                snapshot: None,
                live,
                backend: convoy_protocol::snapshot::SnapshotBackend::Sim,
                journal: self.journal.clone(),
            },
        )
        .await;
        if !live {
            self.vm.resume().unwrap();
        }
        r
    }

    pub(super) async fn pull(
        &self,
        snapshot: Option<convoy_protocol::snapshot::SnapshotId>,
        seen: Option<(u64, convoy_protocol::digest::Digest)>,
    ) -> Result<super::pull::Pulled, SnapshotError> {
        self.pull_at(&self.store, snapshot, seen).await
    }

    /// As [`Lab::pull`], from `store`.
    pub(super) async fn pull_at(
        &self,
        store: &SnapshotStore,
        snapshot: Option<convoy_protocol::snapshot::SnapshotId>,
        seen: Option<(u64, convoy_protocol::digest::Digest)>,
    ) -> Result<super::pull::Pulled, SnapshotError> {
        let v = InsecureCrypto(String::new());
        pull(
            store,
            PullRequest {
                me: id(B),
                keys: &self.b,
                verifier: &v,
                snapshot,
                seen,
                capacity: 1 << 30,
                disk_dir: None,
                paused: true,
                partial: self.partial.clone(),
            },
        )
        .await
    }
}

pub(super) fn same_memory(a: &dyn VmBackend, b: &dyn VmBackend) -> bool {
    let page = a.geometry().page_size().bytes();
    let (mut x, mut y) = (vec![0u8; page], vec![0u8; page]);
    (0..a.geometry().page_count()).all(|p| {
        a.read_page(PageIndex(p), &mut x);
        b.read_page(PageIndex(p), &mut y);
        x == y
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_vm_is_pulled_by_its_recipient_as_it_was() {
    let lab = lab();
    std::thread::sleep(Duration::from_millis(50));
    lab.vm.pause().unwrap();
    let r = lab.push().await;
    lab.vm.pause().unwrap();
    assert_eq!((r.generation, r.chunks), (1, 4));
    assert_eq!(r.uploaded, r.stored);
    let p = lab.pull(None, None).await.unwrap();
    assert!(same_memory(&*lab.vm, &*p.vm));
    assert_eq!(p.counter, lab.vm.counter());
    assert_eq!(p.manifest.snapshot, r.snapshot);
    assert!(!p.vm.is_running());
    p.vm.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_push_uploads_only_what_changed_and_a_pull_takes_the_newest() {
    let lab = lab();
    let first = lab.push().await;
    // The guest dirties 500 pages a second in a 10% hot set.
    std::thread::sleep(Duration::from_millis(30));
    lab.vm.pause().unwrap();
    let second = lab.push().await;
    assert_eq!(second.generation, 2);
    assert!(second.uploaded < second.stored, "{second:?}");
    let p = lab.pull(None, None).await.unwrap();
    assert_eq!(p.manifest.snapshot, second.snapshot);
    assert_eq!(p.manifest.previous, Some(first.digest));
    p.vm.destroy();
    // The older one, by name, from a host that saw the newer: a rollback.
    let e = lab
        .pull(Some(first.snapshot), Some((2, second.digest)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("rollback"), "{e}");
}

/// A first push cut short (its future dropped once some chunks are up)
/// and run again: with the agent's record it takes the same lineage and
/// key, so what is up is not uploaded again; without, it starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_push_cut_short_resumes_with_the_chunks_already_up() {
    for journalled in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/bucket", dir.path().display());
        let chunks = dir.path().join("bucket/chunks");
        let db = dir.path().join("snapshots.redb");
        let mut lab = lab_sized(SnapshotStore::open(&url).unwrap(), None, 48 << 20);
        if journalled {
            lab.journal = Some(Arc::new(super::seen::SeenLineages::open(&db).unwrap()));
        }
        // Chunks stored, not the store's staging files (`NAME#N`) of
        // uploads under way.
        let count = || {
            std::fs::read_dir(&chunks).map_or(0, |d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().contains('#'))
                    .count() as u64
            })
        };
        tokio::select! {
            r = lab.try_push() => panic!("the push was not cut: {r:?}"),
            () = async {
                while count() < 8 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            } => {}
        }
        // (Paused by the push it was cut from.)
        let _ = lab.vm.resume();
        let up = count();
        if let Some(j) = &lab.journal {
            assert!(j
                .started_push(&url, &"vm-1".parse().unwrap())
                .unwrap()
                .is_some());
        }
        assert!(!dir.path().join("bucket/manifests").exists());
        let r = lab.push().await;
        assert_eq!(r.generation, 1);
        eprintln!(
            "journalled {journalled}: {up} chunks up at the cut, then {} of {} uploaded",
            r.uploaded, r.stored
        );
        if journalled {
            // The VM runs (500 page writes a second) between the cut and
            // the second push's pause: the chunks of the few pages it
            // wrote go again, with the vCPU's counter page.
            assert!(r.uploaded + up <= r.stored + 4, "{up} up, {r:?}");
            let j = lab.journal.as_ref().unwrap();
            assert_eq!(
                j.started_push(&url, &"vm-1".parse().unwrap()).unwrap(),
                None
            );
        } else {
            assert_eq!(r.uploaded, r.stored, "{up} up, {r:?}");
        }
        let p = lab.pull(None, None).await.unwrap();
        p.vm.destroy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_cut_short_fetches_again_only_what_it_lacked_and_trusts_nothing_kept() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let mut lab = lab_sized(SnapshotStore::open(&url).unwrap(), None, 48 << 20);
    lab.vm.pause().unwrap();
    let r = lab.push().await;
    lab.vm.pause().unwrap();
    let v = InsecureCrypto(String::new());
    let found = super::pull::choose(&lab.store, &v, &id(B), None, None)
        .await
        .unwrap();
    assert_eq!(found.manifest.snapshot, r.snapshot);
    let stored = found.manifest.stored().0;
    let root = dir.path().join("pulls");
    let kept_dir = root.join(found.digest.to_hex());
    let kept = || {
        std::fs::read_dir(&kept_dir).map_or(0, |d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".part"))
                .count() as u64
        })
    };
    let open_kept = || {
        super::partial::Partial::open(
            &root,
            &found.digest,
            found.manifest.stored().1,
            found.layout.max_sealed() as u64,
        )
        .map(Arc::new)
    };
    lab.partial = open_kept();
    assert!(lab.partial.is_some());
    tokio::select! {
        r = lab.pull(None, None) => panic!("the pull was not cut: {:?}", r.map(|p| p.fetched)),
        () = async {
            while kept() < 8 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } => {}
    }
    let up = kept();
    assert!(up < stored, "{up} of {stored} kept: the pull was not cut");

    // One kept chunk altered: it does not open, so it is fetched again.
    let first = std::fs::read_dir(&kept_dir)
        .unwrap()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().ends_with(".part"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&first, &bytes).unwrap();

    lab.partial = open_kept();
    let p = lab.pull(None, None).await.unwrap();
    eprintln!("{up} kept at the cut, then {:?} of {stored}", p.fetched);
    assert!(
        p.fetched.kept >= up - 1 && p.fetched.kept < up + 8,
        "{up}: {:?}",
        p.fetched
    );
    assert_eq!(p.fetched.chunks + p.fetched.kept, stored, "{:?}", p.fetched);
    assert!(same_memory(&*lab.vm, &*p.vm));
    p.vm.destroy();
    assert_eq!(kept(), stored, "every chunk kept until the pull is done");
    lab.partial.as_ref().unwrap().finish();
    assert!(!kept_dir.exists());

    // Kept chunks of a pull never retried go after a day, at the next pull.
    lab.partial = open_kept();
    let p = lab.pull(None, None).await.unwrap();
    p.vm.destroy();
    let day_old = std::time::SystemTime::now() - super::partial::KEEP - Duration::from_secs(60);
    std::fs::File::open(&kept_dir)
        .unwrap()
        .set_modified(day_old)
        .unwrap();
    super::partial::sweep(&root, super::partial::KEEP);
    assert!(!kept_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_loses_alters_or_renames_objects_is_refused_naming_them() {
    let lab = lab();
    let r = lab.push().await;
    let root = lab.url.strip_prefix("file://").unwrap().to_owned();
    let chunks: Vec<_> = std::fs::read_dir(format!("{root}/chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    // One chunk altered.
    let mut bytes = std::fs::read(&chunks[0]).unwrap();
    let orig = bytes.clone();
    bytes[40] ^= 1;
    std::fs::write(&chunks[0], &bytes).unwrap();
    let e = lab.pull(None, None).await.unwrap_err().to_string();
    assert!(e.contains("does not authenticate"), "{e}");
    std::fs::write(&chunks[0], &orig).unwrap();

    // One chunk gone.
    std::fs::remove_file(&chunks[0]).unwrap();
    let e = lab.pull(None, None).await.unwrap_err().to_string();
    let name = chunks[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(e.contains(&name), "{e}");
    std::fs::write(&chunks[0], &orig).unwrap();

    // The manifest under another generation's name.
    let m = format!("{root}/{}", r.object);
    let renamed = format!(
        "{root}/{}",
        convoy_protocol::snapshot::manifest_object(7, &r.snapshot)
    );
    std::fs::rename(&m, &renamed).unwrap();
    let e = lab.pull(None, None).await.unwrap_err().to_string();
    assert!(e.contains("holds generation 1"), "{e}");
    std::fs::rename(&renamed, &m).unwrap();

    // All back: it pulls.
    lab.pull(None, None).await.unwrap().vm.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_not_named_finds_nothing_it_can_open() {
    let lab = lab();
    lab.push().await;
    let c = SealingKeys::ephemeral().unwrap();
    let v = InsecureCrypto(String::new());
    let e = pull(
        &lab.store,
        PullRequest {
            me: id("spiffe://lab/agent/c"),
            keys: &c,
            verifier: &v,
            snapshot: None,
            seen: None,
            capacity: 1 << 30,
            disk_dir: None,
            paused: true,
            partial: None,
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("no snapshot for spiffe://lab/agent/c"), "{e}");
}

#[test]
fn urls_convoy_does_not_take_are_refused() {
    for bad in [
        "file://relative/dir",
        "s3://",
        "gs://",
        "az:///prefix",
        "gs://bucket/a//b",
        "http://example.com/x",
        "no-scheme",
        "s3://bucket/prefix?X-Amz-Credential=secret",
        "s3://key:secret@bucket/p",
    ] {
        let e = SnapshotStore::open(bad).unwrap_err().to_string();
        assert!(e.contains("snapshot URL"), "{bad}: {e}");
        assert!(!e.contains("secret"), "{e}");
        // The same checks with options given in-process.
        let opts = super::store::S3Options::default();
        let e2 = SnapshotStore::open_with(bad, &opts)
            .unwrap_err()
            .to_string();
        assert_eq!(e, e2);
    }
}

/// Google Cloud Storage and Azure Blob Storage open through the same
/// library, with credentials from their standard environments; two
/// prefixes of one bucket copy server-side, two services never do. (No
/// service of either kind runs here: what is tested is how URLs open.)
#[test]
fn gs_and_az_urls_open_as_their_services() {
    let gs = SnapshotStore::open("gs://convoy-bucket/snaps/").unwrap();
    assert_eq!(gs.url(), "gs://convoy-bucket/snaps");
    let other = SnapshotStore::open("gs://convoy-bucket/other").unwrap();
    assert!(gs.copies_server_side_from(&other));
    let s3 = SnapshotStore::open("s3://convoy-bucket/snaps");
    if let Ok(s3) = s3 {
        assert!(!gs.copies_server_side_from(&s3));
    }
    // Azure needs its account (AZURE_STORAGE_ACCOUNT_NAME): without one
    // the error says so and names the URL.
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
        let e = SnapshotStore::open("az://container/snaps")
            .unwrap_err()
            .to_string();
        assert!(e.contains("az://container/snaps"), "{e}");
        assert!(e.to_lowercase().contains("account"), "{e}");
    }
}

#[test]
fn s3_options_show_their_keys_but_not_their_values() {
    use object_store::aws::AmazonS3ConfigKey;
    let opts = super::store::S3Options {
        config: vec![(AmazonS3ConfigKey::SecretAccessKey, "hunter2".into())],
        retry: None,
    };
    let shown = format!("{opts:?}");
    assert!(
        shown.contains("SecretAccessKey") && !shown.contains("hunter2"),
        "{shown}"
    );
}

/// A live push: rounds while the guest writes, then a short pause for
/// the chunks written last; what is pulled is the guest as paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_push_copies_while_the_vm_runs_and_pauses_it_for_the_rest() {
    let lab = lab();
    let r = lab.push_as(true).await.unwrap();
    assert!(r.rounds >= 1, "{r:?}");
    let (paused_for, resealed) = r.paused.unwrap();
    // The guest (500 page writes a second into a hot set) rewrote only
    // some of the 4 chunks between the last round and the pause.
    assert!(resealed <= r.chunks, "{r:?}");
    assert!(paused_for < r.took);
    assert!(!lab.vm.is_running(), "the push leaves it paused");
    let p = lab.pull(None, None).await.unwrap();
    assert!(same_memory(&*lab.vm, &*p.vm));
    assert_eq!(p.counter, lab.vm.counter());
    p.vm.destroy();
}
