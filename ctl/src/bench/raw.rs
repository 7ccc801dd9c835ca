//! The default `convoyctl bench`: migrations of a simulated VM (idle with
//! incompressible, mixed and zero memory; busy at several dirty rates) side
//! by side with the raw QUIC bulk throughput of this machine, measured in
//! the same run with the same transport tuning and TLS.

use std::time::Duration;

use anyhow::Result;
use convoy_agent::lab::{Lab, Sink};
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, SimVmSpec};
use serde::Serialize;

use super::table::mib;
use super::Bench;
use crate::conn::Global;
use crate::render;

#[derive(Serialize)]
struct Row {
    scenario: String,
    total_ms: f64,
    downtime_ms: f64,
    rounds: u32,
    guest_bytes: u64,
    wire_bytes: u64,
    guest_mb_s: f64,
    wire_mb_s: f64,
    vs_raw_quic: f64,
    verified: bool,
}

/// Runs the comparison with raw QUIC.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let memory = b.memory.unwrap_or(1 << 30);
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {}).await?;
    let streams = b.tuning.streams;
    let base_bytes = b.baseline_bytes.unwrap_or(memory);
    if !g.json {
        eprintln!("raw QUIC baseline: {base_bytes} bytes on {streams} streams …");
    }
    let base = lab
        .raw_quic_bulk(base_bytes, streams, Sink::Discard)
        .await?;
    let base_mb_s = base_bytes as f64 / base.as_secs_f64() / 1e6;
    let fresh = lab
        .raw_quic_bulk(base_bytes, streams, Sink::FreshMemory)
        .await?;
    let fresh_mb_s = base_bytes as f64 / fresh.as_secs_f64() / 1e6;
    let raw_row = |scenario: String, d: Duration, mb_s: f64| Row {
        scenario,
        total_ms: d.as_secs_f64() * 1e3,
        downtime_ms: 0.0,
        rounds: 0,
        guest_bytes: base_bytes,
        wire_bytes: base_bytes,
        guest_mb_s: mb_s,
        wire_mb_s: mb_s,
        vs_raw_quic: mb_s / base_mb_s,
        verified: true,
    };
    let mut rows = vec![
        raw_row(
            format!("raw QUIC bulk ({streams} streams)"),
            base,
            base_mb_s,
        ),
        raw_row("raw QUIC into fresh memory".into(), fresh, fresh_mb_s),
    ];
    let want = |s: &str| b.scenarios.iter().any(|x| x == s);
    let mut scenarios = Vec::new();
    if want("random") {
        scenarios.push(("idle, random memory".to_string(), ContentProfile::Random, 0));
    }
    if want("mixed") {
        scenarios.push(("idle, mixed memory".to_string(), ContentProfile::Mixed, 0));
    }
    if want("zero") {
        scenarios.push(("idle, zero memory".to_string(), ContentProfile::Zero, 0));
    }
    if want("busy") {
        for r in &b.rates {
            scenarios.push((
                format!("busy {r} pages/s, mixed"),
                ContentProfile::Mixed,
                *r,
            ));
        }
    }
    let a = lab.client("a").await?;
    let bc = lab.client("b").await?;
    for (i, (name, content, rate)) in scenarios.into_iter().enumerate() {
        if !g.json {
            eprintln!("{name} …");
        }
        let vm = format!("bench-{i}");
        a.vm_create(SimVmSpec {
            name: vm.parse()?,
            memory_bytes: memory,
            dirty_pages_per_sec: rate,
            hot_set_pct: 10,
            content,
            seed: i as u64 + 1,
            attributes: Default::default(),
            disks: Vec::new(),
            service_requests_per_sec: 0,
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r: MigrationReport = a
            .migrate(
                lab.migrate_request(&vm, "a", "b", b.tuning.options())?,
                |_| {},
            )
            .await?;
        let secs = r.total_ms / 1e3;
        let guest_mb_s = r.memory_bytes as f64 / secs / 1e6;
        rows.push(Row {
            scenario: name,
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            rounds: r.rounds,
            guest_bytes: r.memory_bytes,
            wire_bytes: r.wire_bytes,
            guest_mb_s,
            wire_mb_s: r.wire_bytes as f64 / secs / 1e6,
            vs_raw_quic: guest_mb_s / base_mb_s,
            verified: r.verified && r.outcome == Outcome::Completed,
        });
        // Free the memory before the next scenario.
        let _ = bc.vm_delete(vm.parse()?).await;
        let _ = a.vm_delete(vm.parse()?).await;
    }
    a.close().await;
    bc.close().await;
    lab.shutdown().await;
    if g.json {
        return render::json(&rows);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scenario.clone(),
                format!("{:.0}", r.total_ms),
                format!("{:.1}", r.downtime_ms),
                r.rounds.to_string(),
                mib(r.guest_bytes),
                mib(r.wire_bytes),
                format!("{:.0}", r.guest_mb_s),
                format!("{:.0}", r.wire_mb_s),
                format!("{:.0}%", r.vs_raw_quic * 100.0),
                if r.verified { "yes" } else { "NO" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "scenario",
                "total ms",
                "downtime ms",
                "rounds",
                "guest MiB",
                "wire MiB",
                "guest MB/s",
                "wire MB/s",
                "vs raw",
                "verified"
            ],
            &table
        )
    );
    Ok(())
}
