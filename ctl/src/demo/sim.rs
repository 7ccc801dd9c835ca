//! `convoyctl demo`: the embedded default. A throw-away PKI, two agents on
//! loopback, a busy simulated VM migrated live from one to the other,
//! verified, with the device counter shown continuing at the destination.

use std::time::Duration;

use anyhow::Result;
use convoy_agent::units::format_bytes;
use convoy_protocol::ctl::{Outcome, SimDiskSpec};
use convoy_protocol::names::DiskName;

use super::evidence::evidence;
use super::{finish, listed, migrate, opt, report_json, Continuity, Demo};
use crate::conn::Global;
use crate::render;

/// Runs the demo with a simulated VM.
pub async fn run(g: &Global, d: Demo) -> Result<()> {
    let memory = d.memory.unwrap_or(512 << 20);
    let say = |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    let (_dir, lab, a, b) = super::sim_lab(g).await?;
    let disks = d
        .disk
        .map(|bytes| -> Result<SimDiskSpec> {
            Ok(SimDiskSpec {
                name: "root".parse::<DiskName>()?,
                bytes,
                writes_per_sec: 500,
                used_pct: 25,
                base: None,
            })
        })
        .transpose()?
        .into_iter()
        .collect();
    let spec = super::sim_spec(&d, memory, disks)?;
    say(format!(
        "VM demo: {} of {:?} memory, workload writing {} pages/s ({}% hot set)",
        format_bytes(memory),
        d.content,
        d.dirty_rate,
        d.hot_set
    ));
    if let Some(bytes) = d.disk {
        say(format!(
            "disk root: {} sparse file, 25% written, the workload writing 500 blocks/s",
            format_bytes(bytes)
        ));
    }
    a.vm_create(spec).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(format!("migrating demo: a → b (live {})", d.tuning.mode));
    let mut options = d.tuning.options();
    options.copy_storage |= d.disk.is_some();
    let probe = match d.plot {
        Some(_) => Some(crate::timeline::Probe::start(
            vec![lab.client("a").await?, lab.client("b").await?],
            "demo".parse()?,
        )),
        None => None,
    };
    let report = migrate(g, &lab, &a, options, d.plot.as_deref(), probe).await?;

    // Exactly once, and the guest carries on where it stopped.
    let on_a = listed(&a).await?.is_some();
    let arrived = listed(&b).await?;
    let at_start = arrived.as_ref().and_then(|v| v.counter_at_start);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = listed(&b).await?.map(|v| v.counter);
    let counter_continuous = report.counter_at_pause.is_some()
        && at_start == report.counter_at_pause
        && matches!((after, at_start), (Some(n), Some(s)) if n > s);
    let completed = report.outcome == Outcome::Completed;
    // The destination checked one root over memory and disk blocks before
    // the VM could start there; each disk's own root is reported.
    let disks_verified = d.disk.is_none()
        || (completed && report.verified && report.disks.len() == 1 && report.disk_blocks_sent > 0);
    let verified = completed && report.verified && disks_verified && !on_a && arrived.is_some();
    let ev = evidence(&lab, &report.migration, &report.receipts);

    if g.json {
        let mut out = report_json(
            "sim",
            &report,
            &ev,
            Continuity {
                verified,
                continuous: counter_continuous,
                at_pause: report.counter_at_pause,
                at_start,
                after,
            },
            d.tuning.streams,
        );
        out["pages"] = serde_json::json!(report.encodings);
        out["dirty_pages_per_sec"] = serde_json::json!(d.dirty_rate);
        out["mode"] = serde_json::json!(d.tuning.mode.to_string());
        out["convergence"] = serde_json::json!(report.convergence);
        if let Some(bytes) = d.disk {
            out["disk_bytes"] = serde_json::json!(bytes);
            out["disk_blocks_sent"] = serde_json::json!(report.disk_blocks_sent);
            out["disk_verified"] = serde_json::json!(disks_verified);
        }
        if let Some(pc) = &report.postcopy {
            let f = pc.faults.unwrap_or_default();
            out["postcopy_owed_pages"] = serde_json::json!(pc.owed);
            out["faults"] = serde_json::json!(f.faults);
            out["fault_median_us"] = serde_json::json!(f.median_us);
            out["fault_p99_us"] = serde_json::json!(f.p99_us);
        }
        render::json(&out)?;
    } else {
        print!("{}", render::report(&report));
        println!(
            "counter: paused at {} on a, resumed at {} on b, now {} → {}",
            opt(report.counter_at_pause),
            opt(at_start),
            opt(after),
            if counter_continuous {
                "continuous"
            } else {
                "NOT continuous"
            }
        );
        if d.disk.is_some() {
            println!(
                "disk: {}",
                if disks_verified {
                    "verified at b (the root it checked covers every disk block)"
                } else {
                    "NOT verified"
                }
            );
        }
        print!("{}", ev.lines(on_a, arrived.is_some()));
    }
    finish(lab, a, b, verified, counter_continuous, &ev).await
}
