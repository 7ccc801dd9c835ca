//! An agent whose audit log (and state) sits on a full disk refuses new
//! migrations and every other governed action — fail closed — and the VM
//! keeps running where it is.
//!
//! Needs root (it mounts a small tmpfs). Without root the test is skipped
//! with a message, except under `CI=true`, where it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use convoy_agent::client::ClientError;
use convoy_agent::lab::Lab;
use convoy_tests::{assert_nothing_moved, migrate, sim_spec};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` until a write fails.
fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0xa5u8; 64 << 10];
    while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_audit_log_refuses_migrations_and_the_vm_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("state");
    let _tmpfs = match Tmpfs::mount(&mnt, "8m") {
        Ok(t) => t,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped (needs root to mount a tmpfs): {e}");
            return;
        }
        Err(e) => panic!("CI=true and the full-disk test cannot run: {e}"),
    };
    let state = mnt.clone();
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], move |name, cfg| {
        if name == "a" {
            cfg.state_dir = Some(state.join("a"));
        }
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();

    fill(&mnt);
    // Every attempt is refused (the durable replay cache cannot record the
    // ticket); each refusal is audited into what is left of the log's last
    // page, until an audit write fails and closes the log.
    let mut closed = false;
    for _ in 0..200 {
        match a.migrate(migrate(&lab, "vm", "a", "b"), |_| {}).await {
            Err(ClientError::Agent(e)) if e.message.contains("audit log cannot be written") => {
                closed = true;
                break;
            }
            Err(ClientError::Agent(e)) => {
                assert!(e.message.contains("replay cache unavailable"), "{e:?}")
            }
            other => panic!("a migration on a full disk: {other:?}"),
        }
    }
    assert!(closed, "the audit log never reported the full disk");
    // The log is closed for good: even with room again, no migration
    // starts until the agent is restarted and its log verified.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    match a.migrate(migrate(&lab, "vm", "a", "b"), |_| {}).await {
        Err(ClientError::Agent(e)) => {
            assert!(e.message.contains("audit log cannot be written"), "{e:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Every other governed action is refused too, not done unaudited, and
    // the VM keeps running.
    use convoy_protocol::names::VmName;
    let vm: VmName = "vm".parse().unwrap();
    let refusals = [
        (
            "create",
            a.vm_create(sim_spec("other", 8 << 20, 0)).await.err(),
        ),
        ("pause", a.vm_pause(vm.clone(), true).await.err()),
        ("delete", a.vm_delete(vm.clone()).await.err()),
        ("abort", a.abort(vm.clone()).await.err()),
        ("audit read", a.audit_log().await.err()),
    ];
    for (what, r) in refusals {
        match r {
            Some(ClientError::Agent(e)) => assert!(
                e.message.contains("audit log cannot be written"),
                "{what}: {e:?}"
            ),
            other => panic!("{what} on a closed audit log: {other:?}"),
        }
    }
    assert_nothing_moved(&a, &lab.client("b").await.unwrap()).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_state_directory_does_not_start() {
    // It would have no audit log and would forget used tickets at restart:
    // it refuses to run rather than act unaudited.
    let dir = tempfile::tempdir().unwrap();
    let e = Lab::start(dir.path(), &["a"], |_, cfg| cfg.state_dir = None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("a state directory is required"),
        "{e}"
    );
}
