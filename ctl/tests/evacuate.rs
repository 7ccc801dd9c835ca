//! `convoyctl evacuate`, run as an operator would against three lab
//! agents: a dry run moves nothing; the run places each VM by free memory,
//! moves what it may two at a time, and leaves a VM the policy pins
//! running where it is and a paused VM paused, reported, with exit status
//! 1; every VM is on exactly one agent afterwards. And `convoyctl fleet
//! ls` and `convoyctl where`, against agents sharing a real etcd.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::PathBuf;
use std::process::{Command, Output};

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::VmState;

const MIB: u64 = 1 << 20;

/// Runs `convoyctl --pki PKI ARGS` (off the runtime).
async fn convoyctl(pki: PathBuf, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_convoyctl"))
            .arg("--pki")
            .arg(&pki)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuate_places_by_free_memory_and_leaves_what_cannot_move_running() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b", "c"], |name, cfg| {
        cfg.capacity_bytes = match name {
            "b" => 96 * MIB,
            "c" => 192 * MIB,
            _ => 1 << 30,
        };
    })
    .await
    .unwrap();
    let pki = lab.pki.dir().to_path_buf();
    let at = |n: &str| format!("{n}@{}", lab.agent(n).unwrap().addr);
    let a = lab.client("a").await.unwrap();
    for (name, mib) in [("huge", 160), ("mid", 64), ("small", 32)] {
        a.vm_create(Lab::sim_test_vm(name.parse().unwrap(), mib * MIB, 200))
            .await
            .unwrap();
    }
    let mut pinned = Lab::sim_test_vm("pinned".parse().unwrap(), 8 * MIB, 200);
    pinned
        .attributes
        .labels
        .insert("pinned".into(), "true".into());
    a.vm_create(pinned).await.unwrap();
    // An operator's pause: such a VM is left where it is.
    a.vm_create(Lab::sim_test_vm("resting".parse().unwrap(), 8 * MIB, 0))
        .await
        .unwrap();
    a.vm_pause("resting".parse().unwrap(), true).await.unwrap();
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "evacuate".into(),
            at("a"),
            "--to".into(),
            at("b"),
            "--to".into(),
            at("c"),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // No --to and no registry: told what to do, nothing moved.
    let out = convoyctl(pki.clone(), vec!["evacuate".into(), at("a")]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no registry") && text(&out).contains("--to NAME@HOST:PORT"),
        "{}",
        text(&out)
    );
    // The plan: the largest first, each where most room is left.
    let out = convoyctl(pki.clone(), args(&["--dry-run"])).await;
    let t = text(&out);
    eprintln!("{t}");
    assert!(out.status.success(), "{t}");
    let row = |vm: &str| {
        t.lines()
            .find(|l| l.split_whitespace().next() == Some(vm))
            .unwrap_or_else(|| panic!("no row for {vm}: {t}"))
            .to_owned()
    };
    assert!(row("huge").contains(" c "), "{t}");
    assert!(row("mid").contains(" b "), "{t}");
    assert!(row("resting").contains("not moved: it is Paused"), "{t}");
    // The policies were asked first: the pinned VM is not in the plan.
    assert!(
        row("pinned").contains("every destination with room refuses it"),
        "{t}"
    );
    assert!(t.contains("dry run: nothing moved"), "{t}");
    assert_eq!(
        a.vm_list().await.unwrap().len(),
        5,
        "the dry run moved something"
    );

    // The run.
    let out = convoyctl(pki.clone(), args(&["--parallel", "2"])).await;
    let t = text(&out);
    eprintln!("{t}");
    assert!(!out.status.success(), "the pinned VM stays, so exit 1: {t}");
    for vm in ["huge", "mid", "small"] {
        assert!(t.contains(&format!("{vm} → ")), "{vm}: {t}");
    }
    assert!(t.contains("pinned stays on a"), "{t}");
    assert!(t.contains("evacuated 3 of 5 VMs"), "{t}");
    assert!(t.contains("2 VM(s) stay on the host"), "{t}");

    // Exactly once, and running.
    let mut seen = Vec::new();
    for n in ["a", "b", "c"] {
        for v in lab.client(n).await.unwrap().vm_list().await.unwrap() {
            let want = if v.name.as_str() == "resting" {
                VmState::Paused
            } else {
                VmState::Running
            };
            assert_eq!(v.state, want, "{n}: {v:?}");
            seen.push((v.name.to_string(), n.to_owned()));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("huge".into(), "c".into()),
            ("mid".into(), "b".into()),
            ("pinned".into(), "a".into()),
            ("resting".into(), "a".into()),
            ("small".into(), seen[4].1.clone()),
        ]
    );
    assert_ne!(seen[4].1, "a");

    // Again, as JSON: nothing left that may move.
    let out = convoyctl(pki.clone(), {
        let mut v = vec!["--json".to_string()];
        v.extend(args(&[]));
        v
    })
    .await;
    assert!(!out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["moved"], 0, "{j}");
    let vms = j["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{j}");
    let pinned = vms.iter().find(|v| v["vm"] == "pinned").unwrap();
    assert!(
        pinned["outcome"].as_str().unwrap().contains("pinned"),
        "{j}"
    );
    assert!(pinned["to"].is_null(), "{j}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_ls_and_where_answer_from_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = convoy_agent::lab::etcd::etcd_binary("fleet ls").unwrap() else {
        return;
    };
    let etcd = convoy_agent::lab::etcd::EtcdCluster::start(&etcd, &dir.path().join("etcd"), 1)
        .await
        .unwrap();
    let ep = etcd.endpoints();
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |_, cfg| {
        cfg.registry = Some(convoy_agent::registry::RegistryConfig::new(ep.clone()));
    })
    .await
    .unwrap();
    let pki = lab.pki.dir().to_path_buf();
    let at = |n: &str| format!("{n}@{}", lab.agent(n).unwrap().addr);
    let b = lab.client("b").await.unwrap();
    b.vm_create(Lab::sim_test_vm("web".parse().unwrap(), 8 * MIB, 0))
        .await
        .unwrap();
    let run = |args: &[&str]| {
        let mut v = vec!["--agent".to_string(), at("a")];
        v.extend(args.iter().map(ToString::to_string));
        convoyctl(pki.clone(), v)
    };
    let out = run(&["where", "web"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "web runs on b (epoch 1)"
    );
    let out = run(&["fleet", "ls"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    let row = t.lines().find(|l| l.starts_with("web")).unwrap();
    assert_eq!(
        row.split_whitespace().take(5).collect::<Vec<_>>(),
        ["web", "b", "yes", "1", "default"],
        "{t}"
    );
    assert!(t.lines().any(|l| l.starts_with("a ")), "{t}");
    let out = run(&["--json", "fleet", "ls", "--host", "a"]).await;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["vms"].as_array().unwrap().len(), 0, "{j}");
    let out = run(&["where", "nowhere"]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("not in the registry"), "{}", text(&out));
    // Evacuating b with no --to: the destinations are the other agents
    // alive in the registry (a), and the registry follows the move.
    let out = convoyctl(pki.clone(), vec!["evacuate".into(), at("b")]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("web → a"), "{}", text(&out));
    let out = run(&["where", "web"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "web runs on a (epoch 2)"
    );
    lab.shutdown().await;
}
