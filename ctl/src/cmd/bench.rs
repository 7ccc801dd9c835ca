//! `convoyctl bench`: migrations of a simulated VM (idle with incompressible,
//! mixed and zero memory; busy at several dirty rates) side by side with the
//! raw QUIC bulk throughput of this machine, measured in the same run with
//! the same transport tuning and TLS.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use convoy_agent::identity;
use convoy_agent::lab::Lab;
use convoy_agent::transport::{self, Tuning, ALPN_AGENT};
use convoy_protocol::ctl::{ContentProfile, MigrateRequest, MigrationReport, Outcome, SimVmSpec};
use convoy_protocol::names::{AgentName, Role};
use serde::Serialize;

use crate::cmd::migrate::Tuning as MigrateTuning;
use crate::conn::Global;
use crate::render;

/// `bench` flags.
#[derive(clap::Args, Debug)]
pub struct Bench {
    /// Guest memory of each VM.
    #[arg(long, default_value = "1GiB", value_parser = convoy_agent::units::parse_size)]
    pub memory: u64,
    /// Busy dirty rates to measure, pages per second.
    #[arg(long, value_delimiter = ',', default_value = "25000,100000")]
    pub rates: Vec<u64>,
    /// Scenarios to run besides the baseline: random, mixed, zero, busy.
    #[arg(long, value_delimiter = ',', default_value = "random,mixed,zero,busy")]
    pub scenarios: Vec<String>,
    /// Bytes for the raw QUIC baseline (default: the VM size).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub baseline_bytes: Option<u64>,
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
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {}).await?;
    let streams = b.tuning.streams;
    let base_bytes = b.baseline_bytes.unwrap_or(b.memory);
    if !g.json {
        eprintln!("raw QUIC baseline: {base_bytes} bytes on {streams} streams …");
    }
    let base = raw_quic(&lab, base_bytes, streams).await?;
    let base_mb_s = base_bytes as f64 / base.as_secs_f64() / 1e6;
    let mut rows = vec![Row {
        scenario: format!("raw QUIC bulk ({streams} streams)"),
        total_ms: base.as_secs_f64() * 1e3,
        downtime_ms: 0.0,
        rounds: 0,
        guest_bytes: base_bytes,
        wire_bytes: base_bytes,
        guest_mb_s: base_mb_s,
        wire_mb_s: base_mb_s,
        vs_raw_quic: 1.0,
        verified: true,
    }];
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
    let to = lab.agent("b")?;
    for (i, (name, content, rate)) in scenarios.into_iter().enumerate() {
        if !g.json {
            eprintln!("{name} …");
        }
        let vm = format!("bench-{i}");
        a.vm_create(SimVmSpec {
            name: vm.parse()?,
            memory_bytes: b.memory,
            dirty_pages_per_sec: rate,
            hot_set_pct: 10,
            content,
            seed: i as u64 + 1,
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r: MigrationReport = a
            .migrate(
                MigrateRequest {
                    vm: vm.parse()?,
                    to: to.name.clone(),
                    to_addr: Some(to.addr.to_string()),
                    options: b.tuning.options(),
                },
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

/// Raw QUIC bulk transfer between two endpoints tuned and authenticated
/// exactly like agents: `bytes` over `streams` unidirectional streams.
async fn raw_quic(lab: &Lab, bytes: u64, streams: u16) -> Result<Duration> {
    let (na, nb): (AgentName, AgentName) = ("a".parse()?, "b".parse()?);
    let ida = lab.pki.identity(Role::Agent, &na)?;
    let idb = lab.pki.identity(Role::Agent, &nb)?;
    let tuning = Tuning::default();
    let server_tls = identity::server_config(&ida, &lab.trust, &[ALPN_AGENT])?;
    let server = transport::endpoint("127.0.0.1:0".parse()?, Some(server_tls), &tuning)?;
    let addr = server.local_addr()?;
    let client = transport::endpoint("127.0.0.1:0".parse()?, None, &tuning)?;
    let per_stream = bytes / u64::from(streams);
    let total = per_stream * u64::from(streams);
    let recv = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .ok_or_else(|| anyhow!("no connection"))?
            .await?;
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let mut s = conn.accept_uni().await?;
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(c) = s.read_chunk(1 << 20, false).await? {
                    n += c.bytes.len() as u64;
                }
                anyhow::Ok(n)
            }));
        }
        let mut n = 0;
        for t in tasks {
            n += t.await??;
        }
        let done = Instant::now();
        conn.close(0u32.into(), b"done");
        anyhow::Ok((n, done))
    });
    let conn = transport::connect(
        &client,
        addr,
        ida.id().clone(),
        ALPN_AGENT,
        &idb,
        &lab.trust,
        &tuning,
    )
    .await
    .context("baseline connect")?;
    let mut chunk = vec![0u8; 1 << 20];
    rand_fill(&mut chunk);
    let chunk = Bytes::from(chunk);
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..streams {
        let mut s = conn.open_uni().await?;
        let chunk = chunk.clone();
        senders.push(tokio::spawn(async move {
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_chunk(chunk.slice(..n)).await?;
                left -= n as u64;
            }
            s.finish()?;
            anyhow::Ok(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let (n, done) = recv.await??;
    if n != total {
        return Err(anyhow!("baseline received {n} of {total} bytes"));
    }
    Ok(done - start)
}

fn rand_fill(buf: &mut [u8]) {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}
