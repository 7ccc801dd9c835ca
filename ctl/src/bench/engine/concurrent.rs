//! The concurrent table: N VMs created on agent `a` and all migrated to
//! `b` at once through one client, with per-VM and wall-clock times and
//! this process's peak resident memory beyond the guest images. The agents
//! run in this process, so its RSS is theirs (plus this client's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use convoy_agent::units::format_bytes;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::figures::{Figures, Ran};
use super::{Ctx, SETTLE};
use crate::bench::rss::{proc_status, settled_rss, Sampler, QUIET};
use crate::bench::table::{mib, mib_signed};
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
    /// RSS before the VMs were created.
    pub rss_before_bytes: u64,
    /// Highest RSS while the VMs existed (VmHWM after a reset, and a
    /// 10 ms sampler).
    pub peak_rss_bytes: u64,
    /// RSS rise when the VMs were created (the source images as resident).
    pub source_images_bytes: u64,
    /// RSS drop when the arrived VMs were deleted (the destination images,
    /// and buffers the allocator returned late).
    pub destination_images_bytes: u64,
    /// peak − before − 2 × source images (the destination's images are as
    /// resident as the source's).
    pub overhead_bytes: i64,
    pub overhead_per_vm_bytes: i64,
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
    let rss_before = settled_rss().await;
    let names: Vec<String> = (0..n).map(|_| ctx.name()).collect();
    for (i, vm) in names.iter().enumerate() {
        ctx.create(vm, memory, rate, i as u64 + 1, None).await?;
    }
    tokio::time::sleep(QUIET.max(SETTLE)).await;
    let rss_created = proc_status("VmRSS").unwrap_or(0);
    // From here on VmHWM is this run's peak (when the kernel lets us
    // reset it); the sampler covers kernels that do not.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let sampler = Sampler::start(Duration::from_millis(10));
    let client = Arc::new(ctx.lab.client("a").await?);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for vm in &names {
        let req = ctx.lab.migrate_request(vm, "a", "b", o.clone())?;
        let (client, vm) = (client.clone(), vm.clone());
        set.spawn(async move {
            let r = client.migrate(req, |_| {}).await;
            (vm, r, start.elapsed())
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
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    let rss_arrived = settled_rss().await;
    let sampled = sampler.stop();
    let hwm = if hwm_reset {
        proc_status("VmHWM").unwrap_or(0)
    } else {
        0
    };
    for vm in &names {
        ctx.delete(vm).await?;
    }
    let rss_deleted = settled_rss().await;
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
    let peak = sampled.max(hwm).max(rss_created);
    let source = rss_created.saturating_sub(rss_before);
    let destination = rss_arrived.saturating_sub(rss_deleted);
    // The arrived images are as resident as the source's (the same pages,
    // zero pages untouched at both ends). The RSS drop when they are
    // deleted also measures them, but it includes whatever the allocator
    // hands back late (window buffers of the migrations just ended), which
    // made the overhead swing by hundreds of MiB between runs.
    let overhead = peak as i64 - (rss_before + 2 * source) as i64;
    Ok(Concurrent {
        vms: n,
        memory_bytes_each: memory,
        dirty_pages_per_sec: rate,
        wall_ms: secs * 1e3,
        median_total_ms: totals.get(totals.len() / 2).copied().unwrap_or(0.0),
        max_total_ms: totals.last().copied().unwrap_or(0.0),
        aggregate_guest_mb_s: u64::from(n) as f64 * memory as f64 / secs / 1e6,
        aggregate_wire_mb_s: wire as f64 / secs / 1e6,
        rss_before_bytes: rss_before,
        peak_rss_bytes: peak,
        source_images_bytes: source,
        destination_images_bytes: destination,
        overhead_bytes: overhead,
        overhead_per_vm_bytes: overhead / i64::from(n.max(1)),
        hwm_reset,
        per_vm,
    })
}

/// The table as text, with each run's per-VM times (nothing when there
/// are no runs).
pub fn text(concurrent: &[Concurrent]) -> String {
    let mut s = String::new();
    if !concurrent.is_empty() {
        s.push_str(
            "\nVMs migrated at once (RSS of this process, which runs both agents; \
             overhead = peak − before − 2 × source images)\n",
        );
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
                    format!("{:.0}", c.aggregate_wire_mb_s),
                    mib(c.rss_before_bytes),
                    mib(c.peak_rss_bytes),
                    mib(c.source_images_bytes),
                    mib(c.destination_images_bytes),
                    mib_signed(c.overhead_bytes),
                    mib_signed(c.overhead_per_vm_bytes),
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
                "wire MB/s",
                "RSS before MiB",
                "peak MiB",
                "source img MiB",
                "dest img MiB",
                "overhead MiB",
                "per VM MiB",
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
    }
    s
}
