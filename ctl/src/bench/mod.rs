//! `convoyctl bench`: migrations of a simulated VM (idle with incompressible,
//! mixed and zero memory; busy at several dirty rates) side by side with the
//! raw QUIC bulk throughput of this machine, measured in the same run with
//! the same transport tuning and TLS. With `--engine`, the engine tables
//! of [`engine`] instead.

mod engine;
mod qemu;

use std::time::Duration;

use anyhow::Result;
use convoy_agent::lab::{Lab, Sink};
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, SimVmSpec};
use convoy_protocol::model::MigrationMode;
use serde::Serialize;

use self::engine::NamedRate;
use crate::cmd::migrate::Tuning as MigrateTuning;
use crate::conn::Global;
use crate::render;

/// `bench` flags.
#[derive(clap::Args, Debug)]
pub struct Bench {
    /// sim: migrations of simulated VMs against raw QUIC; qemu: the same
    /// real guest migrated by QEMU natively and through Convoy.
    #[arg(long, default_value = "sim", value_parser = ["sim", "qemu"])]
    pub backend: String,
    /// Guest memory of each VM (default: 1GiB for sim, 256MiB for qemu).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub memory: Option<u64>,
    /// qemu: migrations per path; --engine: migrations per A/B arm (the
    /// median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// qemu: MiB of random data the guest holds in memory.
    #[arg(long, default_value_t = 64)]
    pub fill_mib: u32,
    /// Busy dirty rates to measure, pages per second.
    #[arg(long, value_delimiter = ',', default_value = "25000,100000")]
    pub rates: Vec<u64>,
    /// Scenarios to run besides the baseline: random, mixed, zero, busy.
    #[arg(long, value_delimiter = ',', default_value = "random,mixed,zero,busy")]
    pub scenarios: Vec<String>,
    /// Bytes for the raw QUIC baseline (default: the VM size).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub baseline_bytes: Option<u64>,
    /// sim: instead of the comparison with raw QUIC, the engine tables:
    /// one migration per mode and dirty rate, A/B runs of the pre-copy
    /// techniques, and several VMs migrated at once.
    #[arg(long)]
    pub engine: bool,
    /// --engine: migration modes (precopy, postcopy, hybrid); a mode the
    /// agent refuses is shown as not supported.
    #[arg(long, value_delimiter = ',', default_value = "precopy")]
    pub modes: Vec<MigrationMode>,
    /// --engine: dirty rates as NAME=PAGES_PER_SEC; the A/B runs use the
    /// highest.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle=0,moderate=25000,heavy=100000"
    )]
    pub dirty: Vec<NamedRate>,
    /// --engine: which tables to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "modes,ab,concurrent,reuse",
        value_parser = ["modes", "ab", "concurrent", "reuse"]
    )]
    pub tables: Vec<String>,
    /// --engine: how many VMs to migrate at once, one run per count.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4,8",
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub concurrent: Vec<u32>,
    /// --engine: guest memory of each VM migrated at once.
    #[arg(long, default_value = "256MiB", value_parser = convoy_agent::units::parse_size)]
    pub concurrent_memory: u64,
    /// --engine: dirty rate of each VM migrated at once, pages per second.
    #[arg(long, default_value_t = 0)]
    pub concurrent_rate: u64,
    /// --engine: give each VM of the modes table a disk of this size (a
    /// quarter of it written, the rest holes), moved with its memory.
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub disk: Option<u64>,
    /// --engine: how long the reuse table's VMs run at b before they come
    /// back (milliseconds).
    #[arg(long = "reuse-dwell", default_value_t = 2000)]
    pub reuse_dwell_ms: u64,
    /// --engine: blocks the workload writes to that disk per second.
    #[arg(long, default_value_t = 2000)]
    pub disk_writes: u64,
    #[command(flatten)]
    pub tuning: MigrateTuning,
}

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

/// Runs the benchmark.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    if b.engine {
        return engine::run(g, b).await;
    }
    if b.backend == "qemu" {
        return qemu::run(g, b).await;
    }
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
                format!("{:.0}", r.guest_bytes as f64 / 1048576.0),
                format!("{:.0}", r.wire_bytes as f64 / 1048576.0),
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
