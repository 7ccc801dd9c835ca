//! Storage migration without shared disks: a sim VM's disk files move with
//! its memory while its workload keeps writing them, verified by the
//! destination's root and, independently, by hashing the destination's
//! files; bad disk requests are refused and lose nothing.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{Outcome, SimDiskSpec, VmState};
use convoy_protocol::digest::Digest;
use convoy_protocol::disk::{file_root, DiskGeometry};
use convoy_protocol::message::Manifest;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::page::MemoryGeometry;
use convoy_protocol::receipt::ReceiptKind;
use convoy_tests::{
    agents_a_and_b, alter_one_raw_batch, assert_refusals_logged, assert_unauthorized, close,
    eventually, lab_where_a_alters_batches, propose_manifest_as, sim_spec, ticket, uffd_or_skip,
};

const MEMORY: u64 = 32 << 20;
const ROOT_DISK: u64 = 64 << 20;
const DATA_DISK: u64 = 16 << 20;

fn disk(name: &str, bytes: u64, writes_per_sec: u64, used_pct: u8) -> SimDiskSpec {
    SimDiskSpec {
        name: name.parse().unwrap(),
        bytes,
        writes_per_sec,
        used_pct,
        base: None,
    }
}

/// `dir` is `0700` and every file in it `0600`.
fn assert_private(dir: &Path) {
    use convoy_agent::private::mode_of;
    assert_eq!(mode_of(dir).unwrap(), 0o700, "{}", dir.display());
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode_of(&p).unwrap(), 0o600, "{}", p.display());
    }
}

fn root_of(path: &Path, bytes: u64) -> Digest {
    file_root(std::fs::File::open(path).unwrap(), bytes, 4096).unwrap()
}

/// A request that copies storage, with `f` applied to its options.
fn with_storage(
    lab: &Lab,
    vm: &str,
    f: impl FnOnce(&mut MigrationPlan),
) -> convoy_protocol::ctl::MigrateRequest {
    let mut o = MigrationPlan {
        copy_storage: true,
        ..MigrationPlan::default()
    };
    f(&mut o);
    lab.migrate_request(vm, "a", "b", o).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_the_guest_keeps_writing_moves_with_the_vm_and_verifies_block_by_block() {
    let (_dir, lab, a, b) = agents_a_and_b().await;
    let mut spec = sim_spec("db", MEMORY, 5_000);
    // The root disk: 30% written, 2 000 block writes a second; the data
    // disk: all holes, never written.
    spec.disks = vec![
        disk("root", ROOT_DISK, 2_000, 30),
        disk("data", DATA_DISK, 0, 0),
    ];
    a.vm_create(spec).await.unwrap();
    let src = lab.sim_disks("a", "db");
    // Private at rest whatever the test's umask: the VM's directory and
    // its disks are the agent's alone.
    assert_private(&src);
    let used = std::fs::metadata(src.join("root.img")).unwrap().blocks() * 512;
    assert!(
        used < ROOT_DISK / 2,
        "the source disk is sparse ({used} bytes used)"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Kept paused at b once verified, so its files can be read as they
    // arrived before the guest writes them again.
    let report = a
        .migrate(with_storage(&lab, "db", |o| o.start_paused = true), |_| {})
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert!(
        report.verified,
        "the destination confirmed the root over memory and disks"
    );
    assert_eq!(report.disks.len(), 2, "{report:?}");
    // Holes and zero blocks are not sent: about 30% of the root disk,
    // plus blocks written during the migration, none of the data disk.
    let blocks = (ROOT_DISK + DATA_DISK) / 4096;
    assert!(
        report.disk_blocks_sent > 0 && report.disk_blocks_sent < blocks / 2,
        "{} of {blocks} blocks sent",
        report.disk_blocks_sent
    );
    assert!(report.wire_bytes < MEMORY + ROOT_DISK / 2, "{report:?}");
    // Every receipt after Accepted binds the one root.
    for r in &report.receipts {
        let v = r.verify(&lab.trust).unwrap();
        if v.receipt.kind != ReceiptKind::Accepted {
            assert_eq!(v.receipt.memory_root, report.memory_root);
        }
    }

    // The destination's files, hashed here, are what the source's disks
    // held at the pause; the never-written disk is still all holes.
    let dst = lab.sim_disks("b", "db");
    assert_eq!(
        root_of(&dst.join("root.img"), ROOT_DISK),
        report.disks[0].root
    );
    assert_eq!(
        root_of(&dst.join("data.img"), DATA_DISK),
        report.disks[1].root
    );
    assert_eq!(std::fs::metadata(dst.join("data.img")).unwrap().blocks(), 0);
    // What arrived is as private as what left.
    assert_private(&dst);
    assert!(!src.exists(), "the source's disks are gone with the VM");
    assert!(a.vm_list().await.unwrap().is_empty());

    // Paused at b: nothing runs until it is resumed; then the guest
    // carries on where it stopped, writing its disk.
    let vm = b.vm_list().await.unwrap().pop().unwrap();
    assert_eq!(vm.state, VmState::Paused);
    assert_eq!(Some(vm.counter), report.counter_at_pause);
    let err = b.vm_pause("db".parse().unwrap(), true).await.unwrap_err();
    assert!(err.to_string().contains("only a Running VM"), "{err}");
    let resumed = b.vm_pause("db".parse().unwrap(), false).await.unwrap();
    assert_eq!(resumed.state, VmState::Running);
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.vm_list().await.unwrap()[0].counter > vm.counter
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            root_of(&dst.join("root.img"), ROOT_DISK) != report.disks[0].root
        })
        .await,
        "the guest writes its disk at b"
    );

    // And moves back, disks and all, running this time.
    let back = b
        .migrate(
            {
                let o = MigrationPlan {
                    copy_storage: true,
                    ..MigrationPlan::default()
                };
                lab.migrate_request("db", "b", "a", o).unwrap()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(back.outcome, Outcome::Completed, "{back:?}");
    assert!(!dst.exists());
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    // Deleting the VM deletes its disks.
    a.vm_delete("db".parse().unwrap()).await.unwrap();
    assert!(!src.exists());
    close(lab, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_block_altered_in_flight_aborts_and_the_disk_stays_at_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    // A raw batch of disk blocks (leaves past the memory's pages).
    let hook = alter_one_raw_batch(armed.clone(), MEMORY / 4096, 77, 0x10);
    let lab = lab_where_a_alters_batches(dir.path(), hook).await;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    // Idle, so the altered block is sent once.
    let mut spec = sim_spec("db", MEMORY, 0);
    spec.disks = vec![disk("root", ROOT_DISK, 0, 20)];
    a.vm_create(spec).await.unwrap();
    let src = lab.sim_disks("a", "db");
    let before = root_of(&src.join("root.img"), ROOT_DISK);
    let raw = |lab: &Lab| with_storage(lab, "db", |o| o.compression_level = 0);
    let report = a.migrate(raw(&lab), |_| {}).await.unwrap();
    assert!(!armed.load(Ordering::SeqCst), "a disk block was altered");
    assert!(
        matches!(&report.outcome, Outcome::Aborted(why) if why.contains("root")),
        "{report:?}"
    );
    // The VM and its disk, untouched, at the source; nothing left at b.
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    assert_eq!(root_of(&src.join("root.img"), ROOT_DISK), before);
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.vm_list().await.unwrap().is_empty() && !lab.sim_disks("b", "db").exists()
        })
        .await,
        "staging and its disk files discarded at the destination"
    );
    assert_refusals_logged(&lab, "b", &["failed"]).await;
    // A retry (a new ticket) gets it across.
    let report = a.migrate(raw(&lab), |_| {}).await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert_eq!(
        root_of(&lab.sim_disks("b", "db").join("root.img"), ROOT_DISK),
        before
    );
    close(lab, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_requests_are_refused_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // b takes at most 32 MiB of disks per VM.
    let lab = Lab::start(dir.path(), &["a", "b"], |name, cfg| {
        if name == "b" {
            cfg.disk_capacity_bytes = 32 << 20;
        }
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();

    // Bad disk sets: nothing created, no directory left.
    for (disks, why) in [
        (vec![disk("root", 4097, 0, 0)], "4096-byte blocks"),
        (
            vec![disk("root", 1 << 20, 0, 0), disk("root", 1 << 20, 0, 0)],
            "two disks named root",
        ),
        (vec![disk("root", 1 << 20, 0, 101)], "over 100%"),
    ] {
        let mut spec = sim_spec("bad", 4 << 20, 0);
        spec.disks = disks;
        let err = a.vm_create(spec).await.unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
        assert!(!lab.sim_disks("a", "bad").exists());
    }
    assert!(a.vm_list().await.unwrap().is_empty());

    let mut spec = sim_spec("db", 8 << 20, 1_000);
    spec.disks = vec![disk("root", ROOT_DISK, 500, 10)];
    a.vm_create(spec).await.unwrap();
    // A VM of that name exists already (and its disk directory with it).
    let mut again = sim_spec("db", 8 << 20, 0);
    again.disks = vec![disk("root", 1 << 20, 0, 0)];
    let err = a.vm_create(again).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // Options that cannot move disks are refused before anything starts.
    for (o, why) in [
        (MigrationPlan::default(), "pass --copy-storage"),
        (
            MigrationPlan {
                copy_storage: true,
                mode: MigrationMode::Postcopy,
                ..MigrationPlan::default()
            },
            "paged on demand only with --storage-postcopy",
        ),
        (
            MigrationPlan {
                copy_storage: true,
                storage_postcopy: true,
                ..MigrationPlan::default()
            },
            "needs disks and --mode postcopy or hybrid",
        ),
    ] {
        let err = a
            .migrate(lab.migrate_request("db", "a", "b", o).unwrap(), |_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    // The destination has no room for 64 MiB of disks: refused at Accept.
    let r = a
        .migrate(with_storage(&lab, "db", |_| {}), |_| {})
        .await
        .unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Aborted(why) if why.contains("exceeds this agent's limit")),
        "{r:?}"
    );
    assert!(b.vm_list().await.unwrap().is_empty());
    assert!(!lab.sim_disks("b", "db").exists());
    // The VM runs on at a with its disk, which its workload keeps writing.
    let vm = a.vm_list().await.unwrap().pop().unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(lab.sim_disks("a", "db").join("root.img").exists());

    // A VM without disks has none to copy.
    a.vm_create(sim_spec("plain", 4 << 20, 0)).await.unwrap();
    let err = a
        .migrate(with_storage(&lab, "plain", |_| {}), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no disks to copy"), "{err}");

    // A source that sends disks on a ticket that does not allow copying
    // storage is refused by the destination.
    let ticket = ticket(&lab, "sneaky", "a", "b");
    let manifest = Manifest {
        memory: MemoryGeometry::from_bytes(4 << 20).unwrap(),
        data_streams: MigrationPlan::default().streams,
        qemu: None,
        postcopy: false,
        start_paused: false,
        plan: MigrationPlan::default(),
        reuse: None,
        disks: vec![DiskGeometry {
            name: "root".parse().unwrap(),
            bytes: 1 << 20,
            base: None,
        }],
    };
    assert_unauthorized(
        &propose_manifest_as(&lab, "a", "b", ticket, manifest).await,
        "does not allow copying storage",
    );
    assert!(!lab.sim_disks("b", "sneaky").exists());
    close(lab, a, b).await;
}

const BASE: u64 = 64 << 20;

/// Writes a base image of `BASE` bytes: every fourth block holds data
/// drawn from `seed`, the rest are holes.
fn write_base(path: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(BASE).unwrap();
    let mut block = [0u8; 4096];
    // Incompressible (xorshift), so that what travels shows in the bytes.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in (0..BASE / 4096).step_by(4) {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&block, b * 4096).unwrap();
    }
}

/// Migrates `vm` a → b with its disk, kept paused at b, and checks it
/// completed and that b's disk file is the disk as the source paused it.
async fn moves_paused_as_it_was(
    lab: &Lab,
    a: &convoy_agent::client::CtlClient,
    vm: &str,
) -> convoy_protocol::ctl::MigrationReport {
    let r = a
        // Uncompressed: the wire bytes are then the blocks', not what
        // adaptive compression made of them under load.
        .migrate(
            with_storage(lab, vm, |o| {
                o.start_paused = true;
                o.compression_level = 0;
            }),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{vm}: {r:?}");
    assert!(r.verified, "{vm}");
    let dst = lab.sim_disks("b", vm).join("root.img");
    assert_eq!(root_of(&dst, BASE), r.disks[0].root, "{vm}");
    r
}

fn cloned(name: &str, base: &str, writes_per_sec: u64) -> SimDiskSpec {
    SimDiskSpec {
        base: Some(base.parse().unwrap()),
        ..disk(name, BASE, writes_per_sec, 0)
    }
}

/// Base-image dedup: a disk cloned from a base the destination holds (same
/// name and content) sends only the blocks written since; a base missing
/// there, or different under the same name, costs the whole disk and still
/// verifies; bad bases are refused at creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_cloned_from_a_base_the_destination_holds_sends_only_what_changed() {
    let (_dir, lab, a, b) = agents_a_and_b().await;
    let (at_a, at_b) = (lab.base_images("a").unwrap(), lab.base_images("b").unwrap());
    write_base(&at_a.join("debian"), 1);
    write_base(&at_b.join("debian"), 1);
    // Only at a.
    write_base(&at_a.join("alpine"), 2);
    // Same name, one block different at b.
    write_base(&at_a.join("ubuntu"), 3);
    write_base(&at_b.join("ubuntu"), 3);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(at_b.join("ubuntu"))
            .unwrap();
        f.write_all_at(&[0xee; 16], 40 * 4096).unwrap();
    }
    let data_blocks = BASE / 4096 / 4;

    // Refused at creation, nothing made.
    for (d, why) in [
        (cloned("root", "nope", 0), "nope"),
        (
            SimDiskSpec {
                bytes: BASE / 2,
                ..cloned("root", "debian", 0)
            },
            "bytes",
        ),
    ] {
        let mut spec = sim_spec("bad", MEMORY, 0);
        spec.disks = vec![d];
        let e = a.vm_create(spec).await.unwrap_err().to_string();
        assert!(e.contains(why), "{e} lacks {why:?}");
    }
    assert!(a.vm_list().await.unwrap().is_empty());
    assert!(!lab.sim_disks("a", "bad").exists());

    let mut moved = Vec::new();
    for (vm, base) in [("web", "debian"), ("api", "alpine"), ("db", "ubuntu")] {
        let mut spec = sim_spec(vm, MEMORY, 0);
        spec.disks = vec![cloned("root", base, 200)];
        a.vm_create(spec).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = moves_paused_as_it_was(&lab, &a, vm).await;
        println!(
            "{vm} (base {base}): {} disk blocks sent of {data_blocks} in the base, {} frame bytes, {} wire bytes",
            r.disk_blocks_sent, r.payload_bytes, r.wire_bytes
        );
        moved.push(r);
    }
    // Held at b: the blocks written since the clone (200 a second), not
    // the base's.
    assert!(
        moved[0].disk_blocks_sent < data_blocks / 4,
        "{} blocks sent",
        moved[0].disk_blocks_sent
    );
    // Not held (missing, or other content under the name): all of it.
    for r in &moved[1..] {
        assert!(
            r.disk_blocks_sent >= data_blocks,
            "{} blocks sent",
            r.disk_blocks_sent
        );
    }
    // And the bytes sent say so: each block not sent is a page's bytes
    // less. Counted on the pages sent whole (uncompressed: raw): a block
    // the guest wrote again goes again as a small delta, and how many do
    // depends on the rounds, not on what the destination held. The
    // frames' bytes, not the wire's: the wire also carries what the
    // transport sends again and its acknowledgements, which vary with the
    // host's load (in one CI run the first migration's wire held 4.6 MB
    // more besides its pages than the second's).
    let whole = |r: &convoy_protocol::ctl::MigrationReport| r.encodings.raw;
    let more = whole(&moved[1]).saturating_sub(whole(&moved[0]));
    assert!(
        more >= data_blocks / 2,
        "{} and {} pages sent whole",
        whole(&moved[0]),
        whole(&moved[1])
    );
    assert!(
        moved[1].payload_bytes > moved[0].payload_bytes + more * 4096 * 9 / 10,
        "{} and {} frame bytes for {more} whole pages more ({:?}, {:?})",
        moved[0].payload_bytes,
        moved[1].payload_bytes,
        moved[0].encodings,
        moved[1].encodings
    );
    close(lab, a, b).await;
}

/// Hybrid with a disk: pre-copy rounds move memory and disk, the disk
/// blocks written since go while the VM is paused at the switch (disk
/// blocks are not paged on demand), and memory is paged on demand at the
/// destination; the one root covers both. Pure post-copy with disks is
/// refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_moves_a_written_disk_before_the_switch_and_pages_memory_after() {
    let (_dir, lab, a, b) = agents_a_and_b().await;
    let mut spec = sim_spec("db", MEMORY, 5_000);
    spec.disks = vec![disk("root", ROOT_DISK, 2_000, 30)];
    a.vm_create(spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let e = a
        .migrate(
            with_storage(&lab, "db", |o| o.mode = MigrationMode::Postcopy),
            |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--storage-postcopy"), "{e}");
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);

    let r = a
        .migrate(
            with_storage(&lab, "db", |o| {
                o.mode = MigrationMode::Hybrid;
                // A target pre-copy cannot meet: hybrid switches.
                o.max_downtime_ms = 1;
            }),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "the root over memory and disk matched");
    let pc = r.postcopy.as_ref().expect("switched to post-copy");
    // Only memory is owed after the switch.
    assert!(pc.owed <= MEMORY / 4096, "{pc:?}");
    // The written 30% and the blocks written since, not the holes.
    let blocks = ROOT_DISK / 4096;
    assert!(
        r.disk_blocks_sent > blocks / 5 && r.disk_blocks_sent < blocks / 2,
        "{} of {blocks}",
        r.disk_blocks_sent
    );
    assert_eq!(r.disks.len(), 1);
    // It runs at b, writing its disk there.
    let vm = b.vm_list().await.unwrap().pop().unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(!lab.sim_disks("a", "db").exists());
    assert!(lab.sim_disks("b", "db").join("root.img").exists());
    close(lab, a, b).await;
}

/// Storage post-copy: the VM resumes at the destination before its disk
/// blocks are there; a guest write to a block not yet synced asks the
/// source for it and waits, the rest is pushed in the background, and the
/// one root over memory and disks verifies. Pure post-copy owes every
/// leaf; hybrid owes the memory pages and disk blocks left at its switch,
/// so its pause carries no disk blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_postcopy_fetches_disk_blocks_on_demand_after_the_vm_resumes() {
    if !uffd_or_skip() {
        return;
    }
    let (_dir, lab, a, b) = agents_a_and_b().await;
    let leaves = (MEMORY + ROOT_DISK) / 4096;
    for (vm, mode) in [
        ("db", MigrationMode::Postcopy),
        ("web", MigrationMode::Hybrid),
    ] {
        let mut spec = sim_spec(vm, MEMORY, 5_000);
        spec.disks = vec![disk("root", ROOT_DISK, 2_000, 30)];
        a.vm_create(spec).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = a
            .migrate(
                with_storage(&lab, vm, |o| {
                    o.mode = mode;
                    o.storage_postcopy = true;
                    // Hybrid: a target pre-copy cannot meet, so it switches.
                    o.max_downtime_ms = 1;
                    // Slow enough that the guest writes blocks still owed.
                    o.bandwidth = Some(16 << 20);
                }),
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Completed, "{vm}: {r:?}");
        assert!(r.verified, "{vm}: the root over memory and disk matched");
        let pc = r.postcopy.clone().expect("switched to post-copy");
        if mode == MigrationMode::Postcopy {
            assert_eq!(pc.owed, leaves, "every page and block is owed");
            // Disk writes waited for blocks, and were served.
            let f = pc.faults.expect("fault figures");
            assert!(f.faults > 0 && pc.fetches > 0, "{pc:?}");
        } else {
            // Dirty disk blocks were owed, not sent in the pause.
            assert!(pc.owed > 0 && pc.owed < leaves, "{pc:?}");
        }
        assert!(r.disk_blocks_sent > 0, "{r:?}");
        assert_eq!(r.disks.len(), 1);
        // It runs at b, writing its disk there; gone from a.
        let there = b
            .vm_list()
            .await
            .unwrap()
            .into_iter()
            .find(|v| v.name.as_str() == vm)
            .unwrap();
        assert_eq!(there.state, VmState::Running);
        assert_eq!(there.counter_at_start, r.counter_at_pause);
        assert!(!lab.sim_disks("a", vm).exists());
        let dst = lab.sim_disks("b", vm).join("root.img");
        assert!(
            eventually(Duration::from_secs(5), || async {
                root_of(&dst, ROOT_DISK) != r.disks[0].root
            })
            .await,
            "{vm}: the guest writes its disk at b"
        );
    }
    close(lab, a, b).await;
}

/// Zeroes block `b` of a disk file, as a guest that wipes a block would.
fn zero_block(path: &Path, b: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0u8; 4096], b * 4096).unwrap();
}

/// A block zeroed over a non-zero base block reaches the destination as
/// zeros, whether the source still holds the base (the zero is sent
/// explicitly) or no longer does (then the whole disk goes, zero blocks
/// included): the destination's file is exactly the source's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_zeroed_over_a_base_arrive_as_zeros_even_when_the_source_lost_the_base() {
    let (_dir, lab, a, b) = agents_a_and_b().await;
    let (at_a, at_b) = (lab.base_images("a").unwrap(), lab.base_images("b").unwrap());
    write_base(&at_a.join("debian"), 1);
    write_base(&at_b.join("debian"), 1);
    for (vm, lose_base) in [("web", false), ("api", true)] {
        let mut spec = sim_spec(vm, MEMORY, 0);
        spec.disks = vec![cloned("root", "debian", 0)];
        a.vm_create(spec).await.unwrap();
        // Blocks 0 and 8 hold base data (every fourth block does).
        let src = lab.sim_disks("a", vm).join("root.img");
        zero_block(&src, 0);
        zero_block(&src, 8);
        if lose_base {
            std::fs::remove_file(at_a.join("debian")).unwrap();
        }
        let r = moves_paused_as_it_was(&lab, &a, vm).await;
        let dst = lab.sim_disks("b", vm).join("root.img");
        let bytes = std::fs::read(&dst).unwrap();
        assert!(bytes[..4096].iter().all(|x| *x == 0), "{vm}: block 0");
        assert!(
            bytes[8 * 4096..9 * 4096].iter().all(|x| *x == 0),
            "{vm}: block 8"
        );
        println!("{vm}: {} disk blocks sent", r.disk_blocks_sent);
    }
    close(lab, a, b).await;
}
