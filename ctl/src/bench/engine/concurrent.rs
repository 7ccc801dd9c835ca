//! The concurrent table: N VMs created on agent `a` and all migrated to
//! `b` at once through one client, with per-VM and wall-clock times, the
//! aggregate rate against one such VM alone (migrated `--runs` times in
//! the same run), and the agents' own memory at its peak against their
//! budgets. The agents run in this process, so its RSS is theirs (plus
//! this client's): the guest images are its shared memory, what the agents
//! allocate for themselves its anonymous memory ([`crate::bench::rss`]).

use std::time::{Duration, Instant};

use anyhow::Result;
use convoy_agent::units::format_bytes;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::figures::{Figures, Ran};
use super::{Ctx, SETTLE};
use crate::bench::rss::{proc_status, settled, Rss, Sampler, QUIET};
use crate::bench::table::{median, mib, mib_signed};
use crate::render;

#[derive(Serialize)]
pub struct PerVm {
    pub vm: String,
    pub outcome: String,
    pub verified: bool,
    /// When this migration's answer arrived, from the common start.
    pub finished_ms: f64,
    pub figures: Option<Figures>,
}

#[derive(Serialize)]
pub struct Concurrent {
    pub vms: u32,
    pub memory_bytes_each: u64,
    pub dirty_pages_per_sec: u64,
    /// First request to the last answer.
    pub wall_ms: f64,
    pub median_total_ms: f64,
    pub max_total_ms: f64,
    /// Guest bytes of all VMs over the wall-clock time.
    pub aggregate_guest_mb_s: f64,
    pub aggregate_wire_mb_s: f64,
    /// Aggregate guest MB/s over that of one VM alone (the median of its
    /// runs in the same bench); none for the runs of one alone.
    pub vs_one_alone: Option<f64>,
    /// RSS before the VMs were created.
    pub rss_before_bytes: u64,
    /// Highest RSS while the VMs existed (VmHWM after a reset, and a
    /// 10 ms sampler).
    pub peak_rss_bytes: u64,
    /// Shared memory that came with the VMs' creation: the source images.
    pub source_images_bytes: u64,
    /// Shared memory that left when the arrived VMs were deleted: the
    /// destination images.
    pub destination_images_bytes: u64,
    /// Anonymous memory before the VMs were created.
    pub anon_before_bytes: u64,
    /// Highest anonymous memory during the migrations (10 ms sampler).
    pub peak_anon_bytes: u64,
    /// The agents' own memory at its peak: peak − before of the anonymous
    /// memory (windows, queues, caches, trees, the allocator's slack; not
    /// the images, which are shared memory).
    pub overhead_bytes: i64,
    pub overhead_per_vm_bytes: i64,
    /// What the two agents' budgets allow together (the lab's agents run
    /// with the default `--migration-memory`).
    pub budget_bytes: u64,
    /// Whether VmHWM could be reset for this run (else the sampler only).
    pub hwm_reset: bool,
    pub per_vm: Vec<PerVm>,
}

/// `n` VMs of `memory` created on `a` and migrated to `b` at once.
pub async fn run(
    ctx: &Ctx<'_>,
    n: u32,
    memory: u64,
    rate: u64,
    o: MigrationPlan,
) -> Result<Concurrent> {
    ctx.note(&format!(
        "{n} VMs of {} migrated at once …",
        format_bytes(memory)
    ));
    let names: Vec<String> = (0..n).map(|_| ctx.name()).collect();
    // One operator connection a VM, as many `convoyctl migrate` at once
    // would have: a connection carries at most 8 requests at once (an
    // operator's stream credit, `transport::HANDSHAKE_STREAMS`), and
    // through one the ninth VM and later waited for the first ones to
    // finish. Connected before the memory is first read: each client's
    // endpoint (3 MiB of receive buffers) is this process's, not the
    // agents'.
    let mut clients = Vec::new();
    for _ in &names {
        clients.push(ctx.lab.client("a").await?);
    }
    let before = settled().await;
    for (i, vm) in names.iter().enumerate() {
        ctx.create(vm, memory, rate, i as u64 + 1, None).await?;
    }
    tokio::time::sleep(QUIET.max(SETTLE)).await;
    let created = Rss::now();
    // From here on VmHWM is this run's peak (when the kernel lets us
    // reset it); the sampler covers kernels that do not.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let sampler = Sampler::start(Duration::from_millis(10));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (vm, client) in names.iter().zip(clients) {
        let req = ctx.lab.migrate_request(vm, "a", "b", o.clone())?;
        let vm = vm.clone();
        set.spawn(async move {
            let r = client.migrate(req, |_| {}).await;
            let at = start.elapsed();
            client.close().await;
            (vm, r, at)
        });
    }
    let mut per_vm = Vec::new();
    while let Some(done) = set.join_next().await {
        let (vm, r, at) = done?;
        let ran = Ran::of(r, MigrationMode::Precopy)?;
        per_vm.push(PerVm {
            vm,
            outcome: ran.outcome,
            verified: ran.verified,
            finished_ms: at.as_secs_f64() * 1e3,
            figures: ran.figures,
        });
    }
    let wall = start.elapsed();
    let arrived = settled().await;
    let peak = sampler.stop();
    let hwm = if hwm_reset {
        proc_status("VmHWM").unwrap_or(0)
    } else {
        0
    };
    for vm in &names {
        ctx.delete(vm).await?;
    }
    let deleted = settled().await;
    per_vm.sort_by(|x, y| x.vm.cmp(&y.vm));
    let mut totals: Vec<f64> = per_vm
        .iter()
        .filter_map(|v| v.figures.map(|f| f.total_ms))
        .collect();
    totals.sort_by(f64::total_cmp);
    let secs = wall.as_secs_f64().max(1e-9);
    let wire: u64 = per_vm
        .iter()
        .filter_map(|v| v.figures.map(|f| f.wire_bytes))
        .sum();
    let overhead = i64::try_from(peak.anon).unwrap_or(i64::MAX)
        - i64::try_from(before.anon).unwrap_or(i64::MAX);
    Ok(Concurrent {
        vms: n,
        memory_bytes_each: memory,
        dirty_pages_per_sec: rate,
        wall_ms: secs * 1e3,
        median_total_ms: totals.get(totals.len() / 2).copied().unwrap_or(0.0),
        max_total_ms: totals.last().copied().unwrap_or(0.0),
        aggregate_guest_mb_s: u64::from(n) as f64 * memory as f64 / secs / 1e6,
        aggregate_wire_mb_s: wire as f64 / secs / 1e6,
        vs_one_alone: None,
        rss_before_bytes: before.total,
        peak_rss_bytes: peak.total.max(hwm).max(created.total),
        source_images_bytes: created.shmem.saturating_sub(before.shmem),
        destination_images_bytes: arrived.shmem.saturating_sub(deleted.shmem),
        anon_before_bytes: before.anon,
        peak_anon_bytes: peak.anon,
        overhead_bytes: overhead,
        overhead_per_vm_bytes: overhead / i64::from(n.max(1)),
        budget_bytes: 2 * convoy_agent::host::budget::DEFAULT_MIGRATION_MEMORY,
        hwm_reset,
        per_vm,
    })
}

/// Sets each run's aggregate rate against the median of `alone`'s.
pub fn against_one_alone(runs: &mut [Concurrent], alone: &[Concurrent]) {
    let base = median(alone.iter().map(|c| c.aggregate_guest_mb_s));
    if base > 0.0 {
        for c in runs {
            c.vs_one_alone = Some(c.aggregate_guest_mb_s / base);
        }
    }
}

/// The table as text: one VM alone (each run's rate), then a row per run
/// of several at once, with each run's per-VM times (nothing when there
/// are no runs).
pub fn text(alone: &[Concurrent], concurrent: &[Concurrent]) -> String {
    let mut s = String::new();
    if concurrent.is_empty() && alone.is_empty() {
        return s;
    }
    s.push_str(
        "\nVMs migrated at once (this process runs both agents: the images are its shared \
         memory; the agents' peak is the rise of its anonymous memory, against both \
         agents' budgets)\n",
    );
    if !alone.is_empty() {
        let rates: Vec<String> = alone
            .iter()
            .map(|c| format!("{:.0}", c.aggregate_guest_mb_s))
            .collect();
        s.push_str(&format!(
            "  one VM alone, guest MB/s: {} (median {:.0})\n",
            rates.join(", "),
            median(alone.iter().map(|c| c.aggregate_guest_mb_s))
        ));
    }
    let rows: Vec<Vec<String>> = concurrent
        .iter()
        .map(|c| {
            let ok = c.per_vm.iter().filter(|v| v.verified).count();
            vec![
                c.vms.to_string(),
                format_bytes(c.memory_bytes_each),
                format!("{:.0}", c.median_total_ms),
                format!("{:.0}", c.max_total_ms),
                format!("{:.0}", c.wall_ms),
                format!("{:.0}", c.aggregate_guest_mb_s),
                c.vs_one_alone
                    .map_or_else(|| "-".into(), |r| format!("{r:.2}")),
                format!("{:.0}", c.aggregate_wire_mb_s),
                mib(c.peak_rss_bytes),
                mib(c.source_images_bytes),
                mib(c.destination_images_bytes),
                mib_signed(c.overhead_bytes),
                mib(c.budget_bytes),
                format!("{ok}/{}", c.vms),
            ]
        })
        .collect();
    s.push_str(&render::table(
        &[
            "VMs",
            "each",
            "median ms",
            "max ms",
            "wall ms",
            "guest MB/s",
            "× one alone",
            "wire MB/s",
            "peak RSS MiB",
            "source img MiB",
            "dest img MiB",
            "agents' peak MiB",
            "budgets MiB",
            "verified",
        ],
        &rows,
    ));
    for c in concurrent {
        let totals: Vec<String> = c
            .per_vm
            .iter()
            .map(|v| match v.figures {
                Some(f) if v.verified => format!("{:.0}", f.total_ms),
                _ => v.outcome.clone(),
            })
            .collect();
        s.push_str(&format!(
            "  {} VMs, per-VM total ms: {}\n",
            c.vms,
            totals.join(" ")
        ));
    }
    s
}
