//! `convoyctl demo --via URL`: the store-and-forward path on the embedded
//! default. Agent b enrolls its sealing key in the bucket; agent a pushes
//! the busy sim VM there, sealed for b with the operator's ticket, and
//! waits; b restores it and claims it; a sees the claim and lets go. The
//! two agents never connect to each other.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use convoy_agent::units::format_bytes;
use convoy_protocol::ctl::snapshot::{PullRequest, SnapshotRequest, SnapshotResponse};
use convoy_protocol::ctl::{CtlErrorKind, Outcome, VmState};

use super::{listed, opt, Demo};
use crate::conn::Global;
use crate::render;

/// How long a waits for b, seconds.
const WAIT_SECS: u32 = 60;

/// Runs the store-and-forward demo through `url`.
pub async fn run(g: &Global, d: Demo, url: String) -> Result<()> {
    let memory = d.memory.unwrap_or(512 << 20);
    let say = |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    let (_dir, lab, a, b) = super::sim_lab(g).await?;
    b.snapshot(SnapshotRequest::Enroll { url: url.clone() })
        .await?;
    say(format!("b enrolled its sealing key in {url}"));
    a.vm_create(super::sim_spec(&d, memory, Vec::new())?)
        .await?;
    say(format!(
        "VM demo: {} of {:?} memory, workload writing {} pages/s; a pushes it to {url} for b and waits",
        format_bytes(memory),
        d.content,
        d.dirty_rate
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let source = {
        let a = lab.client("a").await?;
        let migrate = lab.migrate_request("demo", "a", "b", d.tuning.options())?;
        let url = url.clone();
        tokio::spawn(async move {
            let r = a
                .snapshot(SnapshotRequest::MigrateVia {
                    migrate,
                    url,
                    wait_secs: WAIT_SECS,
                })
                .await;
            a.close().await;
            r
        })
    };
    // b pulls as soon as the snapshot is there; meanwhile a holds the VM
    // paused, its counter where it stopped.
    let mut at_pause = None;
    let pulled = loop {
        if let Some(v) = listed(&a).await? {
            if v.state == VmState::Paused {
                at_pause = Some(v.counter);
            }
        }
        let r = b
            .snapshot(SnapshotRequest::Pull(PullRequest {
                url: url.clone(),
                snapshot: None,
                vm: Some("demo".parse()?),
                paused: false,
            }))
            .await;
        match r {
            Ok(SnapshotResponse::Pulled(p)) => break p,
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(convoy_agent::client::ClientError::Agent(e))
                if e.kind == CtlErrorKind::NotFound
                    && started.elapsed() < Duration::from_secs(u64::from(WAIT_SECS)) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("b could not restore the VM: {e}"),
        }
    };
    let handed = match source.await?? {
        SnapshotResponse::Handed(h) => h,
        other => bail!("unexpected answer {other:?}"),
    };
    let first = pulled.vm.counter;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = listed(&b).await?.map(|v| v.counter);
    let on_a = listed(&a).await?.is_some();
    let completed = handed.outcome == Outcome::Completed;
    let continuous = matches!((at_pause, after), (Some(p), Some(n)) if first >= p && n > first);
    let verified = completed && !on_a && after.is_some();
    if g.json {
        render::json(&serde_json::json!({
            "backend": "sim",
            "via": url,
            "verified": verified,
            "outcome": format!("{:?}", handed.outcome),
            "counter_continuous": continuous,
            "counter_at_pause": at_pause,
            "counter_at_restore": first,
            "counter_after": after,
            "snapshot": handed.summary.snapshot.to_string(),
            "uploaded_bytes": handed.uploaded.1,
            "push_ms": handed.push_ms,
            "pull_ms": pulled.total_ms,
            "total_ms": started.elapsed().as_secs_f64() * 1e3,
        }))?;
    } else {
        println!(
            "a: pushed snapshot {} ({} chunks, {} uploaded) in {:.0} ms; outcome {:?}",
            handed.summary.snapshot,
            handed.uploaded.0,
            format_bytes(handed.uploaded.1),
            handed.push_ms,
            handed.outcome
        );
        println!(
            "b: checked every chunk, the root and the ticket, claimed the VM and started it in {:.0} ms",
            pulled.total_ms
        );
        println!(
            "counter: paused at {} on a, restored at {first} on b, now {} → {}; on a: {}",
            opt(at_pause),
            opt(after),
            if continuous {
                "continuous"
            } else {
                "NOT continuous"
            },
            if on_a { "STILL THERE" } else { "gone" }
        );
    }
    a.close().await;
    b.close().await;
    lab.shutdown().await;
    if !verified || !continuous {
        bail!("the store-and-forward demo did not verify");
    }
    Ok(())
}
