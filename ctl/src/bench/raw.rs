//! The default `convoyctl bench`: migrations of a simulated VM (idle with
//! incompressible, mixed and zero memory; busy at several dirty rates) side
//! by side with raw bulk transfers of this machine over the same transport
//! (QUIC, and TLS over TCP), measured in the same run with the same tuning
//! and TLS: into nothing, into fresh memory, and with the unavoidable work
//! of a verified migration (every page digested at both ends into fresh
//! memory). Each agent and each side of a raw transfer runs on a runtime
//! of its own, so the CPU time of the source and of the destination is
//! measured apart ([`convoy_agent::cpu`]).

use std::time::Duration;

use anyhow::{bail, Result};
use convoy_agent::lab::{BulkCpu, Lab, Sink};
use convoy_agent::transport::{Choice, Kind, Tuning};
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, SimVmSpec};
use serde::Serialize;

use super::table::{median, mib};
use super::Bench;
use crate::conn::Global;
use crate::render;

const GIB: f64 = 1_073_741_824.0;

#[derive(Serialize)]
struct Row {
    transport: &'static str,
    scenario: String,
    total_ms: f64,
    downtime_ms: f64,
    rounds: u32,
    guest_bytes: u64,
    wire_bytes: u64,
    guest_mb_s: f64,
    wire_mb_s: f64,
    /// Guest bytes per second against the raw transfer into nothing.
    vs_raw: f64,
    /// Against the raw transfer that digests every page at both ends into
    /// fresh memory (issue 20's baseline, target ≥ 0.9).
    vs_verified_raw: f64,
    /// The lowest and highest `vs_verified_raw` of the runs.
    vs_verified_raw_range: (f64, f64),
    /// CPU seconds of the source's (sender's) threads per GiB of guest
    /// memory.
    source_cpu_s_per_gib: f64,
    /// The same at the destination (receiver).
    destination_cpu_s_per_gib: f64,
    /// Every run's migration completed and verified.
    verified: bool,
    /// Runs the medians are of.
    runs: usize,
}

/// Runs the comparison with the raw transfers, one transport at a time.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let kinds: Vec<Kind> = b
        .transports
        .iter()
        .filter_map(|t| match t {
            Choice::Quic => Some(Kind::Quic),
            Choice::Tcp => Some(Kind::Tcp),
            Choice::Auto => None,
        })
        .collect();
    if kinds.is_empty() {
        bail!("the bench compares one transport at a time: --transports quic, tcp or both");
    }
    let mut rows = Vec::new();
    for kind in kinds {
        rows.extend(run_transport(g, &b, kind).await?);
    }
    print_rows(g, &rows, b.quic_congestion)
}

/// `--runs` runs of every row over `kind` on one lab, merged.
async fn run_transport(g: &Global, b: &Bench, kind: Kind) -> Result<Vec<Row>> {
    let choice = Choice::from(kind);
    let dir = tempfile::tempdir()?;
    let congestion = b.quic_congestion;
    let mut lab = Lab::start_metered(dir.path(), &["a", "b"], |_, cfg| {
        cfg.transport = choice;
        cfg.tuning.congestion = congestion;
    })
    .await?;
    lab.transport = choice;
    let mut runs = Vec::new();
    for run in 0..b.runs {
        if !g.json {
            eprintln!("run {} of {} over {}", run + 1, b.runs, kind.as_str());
        }
        match one_run(g, b, &lab, kind).await {
            Ok(rows) => runs.push(rows),
            Err(e) => {
                lab.shutdown().await;
                return Err(e);
            }
        }
    }
    lab.shutdown().await;
    Ok(merge(runs))
}

/// Each row's median over the runs, column by column (rows come in the
/// same order in every run), with the range of `vs_verified_raw`.
fn merge(runs: Vec<Vec<Row>>) -> Vec<Row> {
    let mut runs = runs.into_iter();
    let Some(mut out) = runs.next() else {
        return Vec::new();
    };
    let rest: Vec<Vec<Row>> = runs.collect();
    for (i, row) in out.iter_mut().enumerate() {
        let all: Vec<&Row> = std::iter::once(&*row)
            .chain(rest.iter().filter_map(|r| r.get(i)))
            .collect();
        let m = |f: fn(&Row) -> f64| median(all.iter().map(|r| f(r)));
        let merged = Row {
            transport: row.transport,
            scenario: row.scenario.clone(),
            total_ms: m(|r| r.total_ms),
            downtime_ms: m(|r| r.downtime_ms),
            rounds: m(|r| f64::from(r.rounds)) as u32,
            guest_bytes: m(|r| r.guest_bytes as f64) as u64,
            wire_bytes: m(|r| r.wire_bytes as f64) as u64,
            guest_mb_s: m(|r| r.guest_mb_s),
            wire_mb_s: m(|r| r.wire_mb_s),
            vs_raw: m(|r| r.vs_raw),
            vs_verified_raw: m(|r| r.vs_verified_raw),
            vs_verified_raw_range: (
                all.iter()
                    .map(|r| r.vs_verified_raw)
                    .fold(f64::INFINITY, f64::min),
                all.iter().map(|r| r.vs_verified_raw).fold(0.0, f64::max),
            ),
            source_cpu_s_per_gib: m(|r| r.source_cpu_s_per_gib),
            destination_cpu_s_per_gib: m(|r| r.destination_cpu_s_per_gib),
            verified: all.iter().all(|r| r.verified),
            runs: all.len(),
        };
        *row = merged;
    }
    out
}

/// One run of every row over `kind`.
async fn one_run(g: &Global, b: &Bench, lab: &Lab, kind: Kind) -> Result<Vec<Row>> {
    let memory = b.memory.unwrap_or(1 << 30);
    let streams = b.tuning.streams;
    let transport = kind.as_str();
    let base_bytes = b.baseline_bytes.unwrap_or(memory);
    let gib = |bytes: u64| bytes as f64 / GIB;
    let mut base = Vec::new();
    for (sink, what) in [
        (Sink::Discard, "into nothing"),
        (Sink::FreshMemory, "into fresh memory"),
        (
            Sink::VerifiedMemory,
            "pages digested at both ends, into fresh memory",
        ),
    ] {
        if !g.json {
            eprintln!("raw {transport} {what}: {base_bytes} bytes on {streams} streams …");
        }
        let (d, cpu): (Duration, BulkCpu) = lab
            .raw_bulk_metered(base_bytes, streams, sink, &Tuning::default(), kind)
            .await?;
        base.push((what, d, cpu));
    }
    let rate = |d: Duration| base_bytes as f64 / d.as_secs_f64() / 1e6;
    let (raw_mb_s, verified_mb_s) = (rate(base[0].1), rate(base[2].1));
    let mut rows: Vec<Row> = base
        .iter()
        .map(|(what, d, cpu)| Row {
            transport,
            scenario: format!("raw {what}"),
            total_ms: d.as_secs_f64() * 1e3,
            downtime_ms: 0.0,
            rounds: 0,
            guest_bytes: base_bytes,
            wire_bytes: base_bytes,
            guest_mb_s: rate(*d),
            wire_mb_s: rate(*d),
            vs_raw: rate(*d) / raw_mb_s,
            vs_verified_raw: rate(*d) / verified_mb_s,
            vs_verified_raw_range: (rate(*d) / verified_mb_s, rate(*d) / verified_mb_s),
            source_cpu_s_per_gib: cpu.sender.as_secs_f64() / gib(base_bytes),
            destination_cpu_s_per_gib: cpu.receiver.as_secs_f64() / gib(base_bytes),
            verified: true,
            runs: 1,
        })
        .collect();
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
            eprintln!("{transport}: {name} …");
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
        let cpu = |n| lab.cpu(n).unwrap_or_default();
        let (src0, dst0) = (cpu("a"), cpu("b"));
        let r: MigrationReport = a
            .migrate(
                lab.migrate_request(&vm, "a", "b", b.tuning.options())?,
                |_| {},
            )
            .await?;
        let (src, dst) = (cpu("a").saturating_sub(src0), cpu("b").saturating_sub(dst0));
        let secs = r.total_ms / 1e3;
        let guest_mb_s = r.memory_bytes as f64 / secs / 1e6;
        rows.push(Row {
            transport,
            scenario: name,
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            rounds: r.rounds,
            guest_bytes: r.memory_bytes,
            wire_bytes: r.wire_bytes,
            guest_mb_s,
            wire_mb_s: r.wire_bytes as f64 / secs / 1e6,
            vs_raw: guest_mb_s / raw_mb_s,
            vs_verified_raw: guest_mb_s / verified_mb_s,
            vs_verified_raw_range: (guest_mb_s / verified_mb_s, guest_mb_s / verified_mb_s),
            source_cpu_s_per_gib: src.as_secs_f64() / gib(r.memory_bytes),
            destination_cpu_s_per_gib: dst.as_secs_f64() / gib(r.memory_bytes),
            verified: r.verified && r.outcome == Outcome::Completed,
            runs: 1,
        });
        // Free the memory before the next scenario.
        let _ = bc.vm_delete(vm.parse()?).await;
        let _ = a.vm_delete(vm.parse()?).await;
    }
    a.close().await;
    bc.close().await;
    Ok(rows)
}

fn print_rows(
    g: &Global,
    rows: &[Row],
    congestion: convoy_agent::transport::Congestion,
) -> Result<()> {
    if g.json {
        return render::json(&rows);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.transport.to_string(),
                r.scenario.clone(),
                format!("{:.0}", r.total_ms),
                format!("{:.1}", r.downtime_ms),
                r.rounds.to_string(),
                mib(r.guest_bytes),
                mib(r.wire_bytes),
                format!("{:.0}", r.guest_mb_s),
                format!("{:.0}", r.wire_mb_s),
                format!("{:.0}%", r.vs_raw * 100.0),
                format!(
                    "{:.0}% ({:.0}–{:.0})",
                    r.vs_verified_raw * 100.0,
                    r.vs_verified_raw_range.0 * 100.0,
                    r.vs_verified_raw_range.1 * 100.0
                ),
                format!("{:.2}", r.source_cpu_s_per_gib),
                format!("{:.2}", r.destination_cpu_s_per_gib),
                if r.verified { "yes" } else { "NO" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "transport",
                "scenario",
                "total ms",
                "downtime ms",
                "rounds",
                "guest MiB",
                "wire MiB",
                "guest MB/s",
                "wire MB/s",
                "vs raw",
                "vs verified raw (range)",
                "src CPU s/GiB",
                "dst CPU s/GiB",
                "verified"
            ],
            &table
        )
    );
    println!("QUIC congestion controller: {congestion}");
    Ok(())
}
