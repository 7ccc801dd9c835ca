//! `convoyctl bench --backend qemu`: the same real guest migrated, in one
//! run, (a) by QEMU natively over a local unix socket, with no
//! authentication at all, and (b) through Convoy: two agents, mutual TLS
//! over QUIC, tickets, policies, receipts and audit. Both paths ping-pong
//! one booted guest between two QEMUs `--runs` times and report medians.
//!
//! Both totals cover the same work: from the decision to migrate (the
//! destination QEMU not yet started) to the guest running at the
//! destination. QEMU's own figures (its total time, downtime and bytes)
//! are shown for both paths too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use convoy_agent::backend::qemu::guest::{self, TestGuest};
use convoy_agent::backend::qemu::process::{QemuProcess, QemuSpec};
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{Accel, Outcome};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;
use serde_json::{json, Value};

use super::{table, Bench};
use crate::conn::Global;
use crate::render;

#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Sample {
    /// Decision to guest running at the destination, ms.
    total_ms: f64,
    /// The path's downtime, ms (native: QEMU's; Convoy: to Started).
    downtime_ms: f64,
    /// QEMU's total-time, ms.
    qemu_total_ms: f64,
    /// QEMU's downtime, ms.
    qemu_downtime_ms: f64,
    /// QEMU's ram.transferred, bytes.
    transferred: u64,
}

#[derive(Serialize)]
struct Row {
    path: String,
    runs: usize,
    median: Sample,
    throughput_mb_s: f64,
    vs_native_total: f64,
}

/// Runs the QEMU benchmark.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let memory = b.memory.unwrap_or(256 << 20);
    if memory % (1 << 20) != 0 || memory < (64 << 20) {
        bail!("--memory must be a whole number of MiB, at least 64MiB, for QEMU");
    }
    let o = b.tuning.options();
    if o.mode != MigrationMode::Precopy {
        bail!("the QEMU benchmark compares pre-copy migrations (--mode precopy)");
    }
    let qemu = guest::find_qemu().map_err(|e| anyhow!(e))?;
    let dir = tempfile::tempdir()?;
    let built = guest::build(&dir.path().join("guest"))
        .map_err(|e| anyhow!("cannot build the test guest: {e}"))?;
    let append = format!("console=ttyS0 quiet panic=-1 convoy.fill={}", b.fill_mib);
    let note = |s: &str| {
        if !g.json {
            eprintln!("{s}");
        }
    };
    note("native QEMU migration over a unix socket …");
    let setup = Setup {
        qemu: &qemu,
        guest: &built,
        append: &append,
        memory,
        o: &o,
        runs: b.runs,
        dir: dir.path(),
    };
    let native = native(&setup).await?;
    note("QEMU migration through Convoy …");
    let convoy = through_convoy(&setup).await?;
    let (n, c) = (median(&native), median(&convoy));
    let row = |path: &str, runs: usize, m: Sample| Row {
        path: path.into(),
        runs,
        median: m,
        throughput_mb_s: if m.qemu_total_ms > 0.0 {
            m.transferred as f64 / (m.qemu_total_ms / 1e3) / 1e6
        } else {
            0.0
        },
        vs_native_total: m.total_ms / n.total_ms,
    };
    let rows = vec![
        row("native (unix socket, no TLS)", native.len(), n),
        row("Convoy (QUIC, mutual TLS, receipts)", convoy.len(), c),
    ];
    if g.json {
        return render::json(&json!({
            "memory_bytes": memory,
            "fill_mib": b.fill_mib,
            "streams": o.streams,
            "rows": rows,
            "native_runs": native,
            "convoy_runs": convoy,
        }));
    }
    println!(
        "{} guest, {} MiB of random data, {} ({} runs each, medians)",
        convoy_agent::units::format_bytes(memory),
        b.fill_mib,
        if o.streams > 1 {
            format!("multifd {} channels", o.streams)
        } else {
            "one channel".into()
        },
        b.runs
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path.clone(),
                format!("{:.0}", r.median.total_ms),
                format!("{:.1}", r.median.downtime_ms),
                format!("{:.0}", r.median.qemu_total_ms),
                format!("{:.0}", r.median.qemu_downtime_ms),
                convoy_agent::units::format_bytes(r.median.transferred),
                format!("{:.0}", r.throughput_mb_s),
                format!("{:.2}", r.vs_native_total),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "path",
                "total ms",
                "downtime ms",
                "QEMU total ms",
                "QEMU downtime ms",
                "transferred",
                "MB/s",
                "total vs native",
            ],
            &table
        )
    );
    Ok(())
}

/// What both paths migrate, and how.
#[derive(Clone, Copy)]
struct Setup<'a> {
    qemu: &'a Path,
    guest: &'a TestGuest,
    append: &'a str,
    memory: u64,
    o: &'a MigrationPlan,
    runs: u32,
    dir: &'a Path,
}

fn median(v: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| table::median(v.iter().map(f));
    Sample {
        total_ms: pick(|s| s.total_ms),
        downtime_ms: pick(|s| s.downtime_ms),
        qemu_total_ms: pick(|s| s.qemu_total_ms),
        qemu_downtime_ms: pick(|s| s.qemu_downtime_ms),
        transferred: pick(|s| s.transferred as f64) as u64,
    }
}

fn spec(qemu: &Path, g: &TestGuest, append: &str, memory: u64) -> QemuSpec {
    QemuSpec {
        binary: qemu.to_owned(),
        memory_mib: memory >> 20,
        vcpus: 1,
        kernel: Some(g.kernel.clone()),
        initrd: Some(g.initrd.clone()),
        append: append.to_owned(),
        disks: Vec::new(),
        accel: Accel::Tcg,
        extra_args: Vec::new(),
    }
}

async fn booted(log: &Path) -> Result<()> {
    let t = Instant::now();
    while guest::counters(log).len() < 10 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the guest did not boot in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Native: ping-pong between fresh QEMUs over a unix socket.
async fn native(b: &Setup<'_>) -> Result<Vec<Sample>> {
    let Setup { o, runs, dir, .. } = *b;
    let spec = spec(b.qemu, b.guest, b.append, b.memory);
    let mut cur = QemuProcess::launch(&spec, &dir.join("native-0"), false).await?;
    booted(&cur.serial_log()).await?;
    let caps = json!({ "capabilities": [{ "capability": "multifd", "state": o.streams > 1 }] });
    let mut samples = Vec::new();
    for i in 1..=runs {
        let t0 = Instant::now();
        let mut next = QemuProcess::launch(&spec, &dir.join(format!("native-{i}")), true).await?;
        let sock = dir.join(format!("native-{i}.sock"));
        let uri = json!({ "uri": format!("unix:{}", sock.display()) });
        let mut params = json!({
            "downtime-limit": o.max_downtime_ms,
            "max-bandwidth": o.bandwidth.unwrap_or(1 << 40),
        });
        if o.streams > 1 {
            params["multifd-channels"] = json!(o.streams);
            next.qmp
                .execute("migrate-set-capabilities", Some(caps.clone()))
                .await?;
            next.qmp
                .execute(
                    "migrate-set-parameters",
                    Some(json!({ "multifd-channels": o.streams })),
                )
                .await?;
        }
        next.qmp
            .execute("migrate-incoming", Some(uri.clone()))
            .await?;
        cur.qmp
            .execute("migrate-set-capabilities", Some(caps.clone()))
            .await?;
        cur.qmp
            .execute("migrate-set-parameters", Some(params))
            .await?;
        cur.qmp.execute("migrate", Some(uri)).await?;
        let info = loop {
            let q = cur.qmp.execute("query-migrate", None).await?;
            match q["status"].as_str() {
                Some("completed") => break q,
                Some("failed" | "cancelled") => bail!("native migration failed: {q}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        loop {
            let s = next.qmp.execute("query-status", None).await?;
            if s["status"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        samples.push(native_sample(total_ms, &info));
        cur.quit().await;
        cur = next;
    }
    cur.quit().await;
    Ok(samples)
}

/// A native sample from QEMU's final `query-migrate` (its downtime is
/// the path's downtime).
fn native_sample(total_ms: f64, q: &Value) -> Sample {
    let downtime = q["downtime"].as_f64().unwrap_or(0.0);
    Sample {
        total_ms,
        downtime_ms: downtime,
        qemu_total_ms: q["total-time"].as_f64().unwrap_or(0.0),
        qemu_downtime_ms: downtime,
        transferred: q["ram"]["transferred"].as_u64().unwrap_or(0),
    }
}

/// Through Convoy: ping-pong between two agents.
async fn through_convoy(b: &Setup<'_>) -> Result<Vec<Sample>> {
    let Setup {
        o,
        runs,
        dir,
        memory,
        append,
        ..
    } = *b;
    let lab = Lab::start_qemu(&dir.join("lab"), &["a", "b"], b.qemu, b.guest).await?;
    let a = lab.client("a").await?;
    a.vm_create_qemu(Lab::qemu_test_vm(
        "bench".parse()?,
        memory >> 20,
        append.to_owned(),
    ))
    .await?;
    a.close().await;
    booted(&lab.qemu_serial("a", "bench")).await?;
    let mut samples = Vec::new();
    let mut at = ("a", "b");
    for _ in 0..runs {
        let c = lab.client(at.0).await?;
        let r = c
            .migrate(lab.migrate_request("bench", at.0, at.1, o.clone())?, |_| {})
            .await?;
        c.close().await;
        if r.outcome != Outcome::Completed {
            bail!("migration through Convoy: {:?}", r.outcome);
        }
        let q = r
            .qemu
            .as_deref()
            .ok_or_else(|| anyhow!("no QEMU figures"))?;
        samples.push(Sample {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            qemu_total_ms: q.total_ms.unwrap_or(0) as f64,
            qemu_downtime_ms: q.downtime_ms.unwrap_or(0) as f64,
            transferred: q.transferred_bytes.unwrap_or(0),
        });
        at = (at.1, at.0);
    }
    lab.shutdown().await;
    Ok(samples)
}
