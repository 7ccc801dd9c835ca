//! The fault matrix's QEMU cases: a TCG guest migrated pre-copy between
//! two real agents, held at a journal point — the destination's staging
//! (before commit), the source's commit, the destination's start — while
//! the source or the destination is SIGKILLed and started again. QEMU
//! outlives its agent, so each case checks where the guest runs by its
//! own counter on its serial console, and that no other QEMU is left.
//!
//! Needs QEMU and the test guest: fails under `CI=true` without them,
//! skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::guest::{self, counters};
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{MigrateRequest, VmState};
use convoy_protocol::model::MigrationPlan;
use rustix::process::Signal;

use super::support::{test_guest, until, AgentProcess, Setup};
use super::{find, heavy, list, recover, vm_name, Expect};

/// Kills, when dropped, every process whose command line names `dir`
/// (the QEMUs a failed case would leave behind).
struct KillUnder(PathBuf);

/// The QEMUs whose command line names `dir`.
fn qemus_under(dir: &Path) -> Vec<i32> {
    {
        let needle = dir.to_string_lossy().into_owned();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for KillUnder {
    fn drop(&mut self) {
        for pid in qemus_under(&self.0) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, Signal::KILL);
            }
        }
    }
}

fn serial(a: &AgentProcess) -> PathBuf {
    a.state.join("qemu").join("vm").join("serial.log")
}

/// The end of what `a`'s QEMU wrote on its standard error (while its
/// runtime directory is there): for a failure's message.
fn qemu_stderr(a: &AgentProcess) -> String {
    convoy_agent::backend::qemu::vm::stderr_tail(
        &a.state.join("qemu").join("vm").join("qemu.stderr"),
    )
    .unwrap_or_default()
}

/// The guest's last counter on `a`'s console, if any.
fn last_counter(a: &AgentProcess) -> Option<u64> {
    counters(&serial(a)).last().copied()
}

/// Whether the guest's counter goes on at `a` (a new one within 30 s).
async fn counting(a: &AgentProcess) -> bool {
    let log = serial(a);
    let n = counters(&log).len();
    until(Duration::from_secs(30), || counters(&log).len() > n).await
}

pub(super) async fn run(point: &'static str, kill_source: bool, expect: Expect) {
    let Some(g) = test_guest() else { return };
    let _heavy = heavy(2).await;
    let s = Setup::new(&["a", "b"]).await;
    let _reaper = KillUnder(s.dir.path().to_owned());
    let qemu = guest::find_qemu().unwrap();
    let extra = |name: &str| {
        let images = s.dir.path().join(format!("images-{name}"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy(&g.kernel, images.join("vmlinuz")).unwrap();
        std::fs::copy(&g.initrd, images.join("initrd.img")).unwrap();
        [
            "--qemu-binary",
            &qemu.display().to_string(),
            "--image-dir",
            &images.display().to_string(),
            "--link-timeout",
            "5",
            "--dangerous-pause-at",
            point,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut a = s.agent("a", &extra("a"));
    let mut b = s.agent("b", &extra("b"));
    a.start().await;
    b.start().await;
    let ca = s.client(&a).await;
    ca.vm_create_qemu(Lab::qemu_test_vm(
        vm_name(),
        128,
        "console=ttyS0 quiet panic=-1".into(),
    ))
    .await
    .unwrap();
    assert!(
        until(Duration::from_secs(180), || counters(&serial(&a)).len()
            >= 3)
        .await,
        "the guest did not come up\n{}",
        a.output()
    );
    let before = last_counter(&a).unwrap();
    let subject = find(&ca.vm_list().await.unwrap())
        .unwrap()
        .subject
        .clone()
        .unwrap();
    let plan = MigrationPlan::default();
    let ticket = convoy_agent::trust::authz::issue_ticket(
        &s.lab.operator,
        &vm_name(),
        subject,
        a.id.clone(),
        b.id.clone(),
        &plan,
        Duration::from_secs(600),
    )
    .unwrap();
    let req = MigrateRequest {
        vm: vm_name(),
        to: "b".parse().unwrap(),
        to_addr: Some(b.addr.to_string()),
        ticket,
    };
    let held = if point.starts_with("destination") {
        &b
    } else {
        &a
    };
    let mark = held.mark();
    let mover = tokio::spawn(async move { ca.migrate(req, |_| {}).await });
    assert!(
        held.wait_for_from(
            mark,
            &format!("paused at {point}"),
            Duration::from_secs(120)
        )
        .await,
        "never reached {point}\n--- a ---\n{}\n--- b ---\n{}\n--- a's QEMU's standard error ---\n{}",
        a.output(),
        b.output(),
        qemu_stderr(&a)
    );
    let held_is_b = point.starts_with("destination");
    if kill_source {
        a.stop(Signal::KILL, true).await;
        if held_is_b {
            b.release();
        }
        a.args.truncate(a.args.len() - 2);
        a.start().await;
    } else {
        b.stop(Signal::KILL, true).await;
        if !held_is_b {
            a.release();
        }
        b.args.truncate(b.args.len() - 2);
        b.start().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(120), mover).await;

    let end = Instant::now() + Duration::from_secs(120);
    let mut reports = Vec::new();
    loop {
        reports.extend(recover(&s, &b).await);
        reports.extend(recover(&s, &a).await);
        let (at_a, at_b) = (
            find(&list(&s, &a).await).cloned(),
            find(&list(&s, &b).await).cloned(),
        );
        let running = |v: &Option<convoy_protocol::ctl::VmInfo>| {
            v.as_ref().is_some_and(|v| v.state == VmState::Running)
        };
        let settled = match expect {
            Expect::Source => running(&at_a) && at_b.is_none(),
            Expect::Destination => running(&at_b) && at_a.is_none(),
            Expect::PausedOnBoth => unreachable!("no QEMU case is expected undecided"),
        };
        if settled {
            break;
        }
        assert!(
            Instant::now() < end,
            "{point} kill_source={kill_source}: at a {at_a:?}, at b {at_b:?}\n{reports:#?}\n--- a ---\n{}\n--- b ---\n{}",
            a.output(),
            b.output()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // One QEMU runs the guest, counting on from where it was.
    let (runner, other) = match expect {
        Expect::Source => (&a, &b),
        _ => (&b, &a),
    };
    assert!(
        counting(runner).await,
        "the guest does not run\n{}",
        runner.output()
    );
    assert!(
        last_counter(runner).unwrap() >= before,
        "the counter went back"
    );
    assert!(
        qemus_under(&other.state.join("qemu")).is_empty(),
        "a QEMU is left where the guest does not run"
    );
    for agent in [&a, &b] {
        let left = recover(&s, agent).await;
        assert!(left.is_empty(), "{} still holds {left:?}", agent.id);
    }
}
