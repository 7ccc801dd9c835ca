//! `convoyctl bench --engine`: what the native engine does with simulated
//! VMs, in three tables from one run on two agents on loopback:
//! - **modes**: one migration per mode and dirty rate. A mode the agent
//!   refuses is a row saying so (pure post-copy of a VM with disks, for
//!   one: disk blocks are not paged on demand).
//! - **ab**: at the highest dirty rate, a baseline with every pre-copy
//!   technique on against runs with one technique off (hot-page ordering,
//!   auto-converge), medians of `--runs`, the saving as a ratio. Every arm
//!   runs with `force_stop`, so that an arm that cannot meet the downtime
//!   target within the round limit still completes and shows what that
//!   costs. Delta pages cannot be turned off from a request (the
//!   destination always accepts them), so they get no A/B.
//! - **concurrent**: N VMs created on agent `a` and all migrated to `b` at
//!   once through one client, with per-VM and wall-clock times and this
//!   process's peak resident memory beyond the guest images. The agents
//!   run in this process, so its RSS is theirs (plus this client's).
//! - **reuse**: memory reuse when a VM comes back. Per dirty rate, a VM
//!   that opts in to retention goes a → b, runs there for `--reuse-dwell`,
//!   and comes back b → a, where its encrypted image waits; the row sets
//!   the bytes of the trip back against those of the first trip. The
//!   pages sent back (as a share of the VM's pages) bound how much of the
//!   memory changed.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use convoy_agent::client::{ClientError, CtlClient};
use convoy_agent::lab::Lab;
use convoy_agent::retain::RetentionLimits;
use convoy_agent::units::format_bytes;
use convoy_protocol::ctl::{
    ContentProfile, CtlErrorKind, MigrationReport, Outcome, SimDiskSpec, SimVmSpec,
};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use super::Bench;
use crate::conn::Global;
use crate::render;

/// A dirty rate with a name for the tables (`heavy=100000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRate {
    /// Name (`idle`, `moderate`, `heavy`, ...).
    pub name: String,
    /// Pages the workload dirties per second.
    pub pages_per_sec: u64,
}

impl FromStr for NamedRate {
    type Err = String;

    /// `NAME=PAGES_PER_SEC`, or a bare rate (named by itself).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rate) = match s.split_once('=') {
            Some((n, r)) => (n.trim(), r.trim()),
            None => (s.trim(), s.trim()),
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("bad dirty rate name in {s:?}"));
        }
        let pages_per_sec = rate
            .parse()
            .map_err(|_| format!("bad dirty rate {rate:?} (pages per second)"))?;
        Ok(NamedRate {
            name: name.into(),
            pages_per_sec,
        })
    }
}

/// How long a new VM's workload runs before its migration starts.
const SETTLE: Duration = Duration::from_millis(500);

/// How long to wait for freed memory to leave the process (mimalloc
/// returns freed pages to the OS after a short delay) before reading RSS.
const QUIET: Duration = Duration::from_millis(700);

/// What one migration measured.
#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u32,
    wire_bytes: u64,
    pages_sent: u64,
    /// Sends of pages already sent before (`convergence.resent_pages`).
    resent_pages: u64,
    /// Pages sent as XOR deltas.
    delta_pages: u64,
    /// Hot-page sends deferred to the final round.
    held_back: u64,
    /// Highest auto-converge throttle, percent.
    throttle_pct: u8,
    /// The engine's last dirty-rate estimate, pages per second.
    measured_dirty_rate: u64,
    /// Of the pages sent, disk blocks.
    disk_blocks_sent: u64,
    /// Post-copy: pages the VM touched before they had arrived, and the
    /// fault-to-installed latency (median, 99th percentile), µs.
    faults: Option<u64>,
    fault_median_us: Option<u64>,
    fault_p99_us: Option<u64>,
}

impl Figures {
    fn of(r: &MigrationReport) -> Figures {
        Figures {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            rounds: r.rounds,
            wire_bytes: r.wire_bytes,
            pages_sent: r.pages_sent,
            resent_pages: r.convergence.resent_pages,
            delta_pages: r.encodings.delta,
            held_back: r.convergence.held_back,
            throttle_pct: r.convergence.throttle,
            measured_dirty_rate: r.convergence.dirty_rate,
            disk_blocks_sent: r.disk_blocks_sent,
            faults: r.postcopy.as_ref().and_then(|p| p.faults).map(|f| f.faults),
            fault_median_us: r
                .postcopy
                .as_ref()
                .and_then(|p| p.faults)
                .map(|f| f.median_us),
            fault_p99_us: r.postcopy.as_ref().and_then(|p| p.faults).map(|f| f.p99_us),
        }
    }

    /// The per-field median of `v` (`None` when empty).
    fn median(v: &[Figures]) -> Option<Figures> {
        if v.is_empty() {
            return None;
        }
        let pick = |f: fn(&Figures) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x.get(x.len() / 2).copied().unwrap_or(0.0)
        };
        // Over the runs that have the figure.
        let pick_some = |f: fn(&Figures) -> Option<u64>| {
            let mut x: Vec<u64> = v.iter().filter_map(f).collect();
            x.sort_unstable();
            x.get(x.len() / 2).copied()
        };
        Some(Figures {
            faults: pick_some(|s| s.faults),
            fault_median_us: pick_some(|s| s.fault_median_us),
            fault_p99_us: pick_some(|s| s.fault_p99_us),
            total_ms: pick(|s| s.total_ms),
            downtime_ms: pick(|s| s.downtime_ms),
            rounds: pick(|s| f64::from(s.rounds)) as u32,
            wire_bytes: pick(|s| s.wire_bytes as f64) as u64,
            pages_sent: pick(|s| s.pages_sent as f64) as u64,
            resent_pages: pick(|s| s.resent_pages as f64) as u64,
            delta_pages: pick(|s| s.delta_pages as f64) as u64,
            held_back: pick(|s| s.held_back as f64) as u64,
            throttle_pct: pick(|s| f64::from(s.throttle_pct)) as u8,
            measured_dirty_rate: pick(|s| s.measured_dirty_rate as f64) as u64,
            disk_blocks_sent: pick(|s| s.disk_blocks_sent as f64) as u64,
        })
    }
}

/// How one migration ended.
#[derive(Debug, Clone)]
struct Ran {
    /// `completed`, `aborted: …`, `in doubt: …`, `failed: …` or
    /// `not supported: …`.
    outcome: String,
    completed: bool,
    verified: bool,
    figures: Option<Figures>,
}

impl Ran {
    fn of(r: Result<MigrationReport, ClientError>, mode: MigrationMode) -> Result<Ran> {
        match r {
            Ok(r) => {
                let completed = r.outcome == Outcome::Completed;
                Ok(Ran {
                    outcome: match &r.outcome {
                        Outcome::Completed => "completed".into(),
                        Outcome::Aborted(w) => format!("aborted: {w}"),
                        Outcome::InDoubt(w) => format!("in doubt: {w}"),
                        other => format!("{other:?}"),
                    },
                    completed,
                    verified: completed && r.verified,
                    figures: Some(Figures::of(&r)),
                })
            }
            // The agent refuses modes it cannot do yet for sim VMs.
            Err(ClientError::Agent(e))
                if e.kind == CtlErrorKind::BadRequest && mode != MigrationMode::Precopy =>
            {
                Ok(Ran::none(format!("not supported: {}", e.message)))
            }
            // A failed migration is a result, not a failed benchmark.
            Err(ClientError::Agent(e)) => Ok(Ran::none(format!("failed: {}", e.message))),
            Err(e) => Err(e.into()),
        }
    }

    fn none(outcome: String) -> Ran {
        Ran {
            outcome,
            completed: false,
            verified: false,
            figures: None,
        }
    }
}

/// An outcome for a table cell: `completed, verified`, the agent's whole
/// refusal of a mode, or a failure cut before the details of its reason.
fn outcome_cell(outcome: &str, completed: bool, verified: bool) -> String {
    if completed {
        return if verified {
            "completed, verified".into()
        } else {
            "completed, NOT verified".into()
        };
    }
    if outcome.starts_with("not supported:") {
        return outcome.to_string();
    }
    match outcome.match_indices(':').nth(1) {
        Some((i, _)) => outcome[..i].to_string(),
        None => outcome.to_string(),
    }
}

#[derive(Serialize)]
struct ModeRow {
    mode: MigrationMode,
    dirty: String,
    dirty_pages_per_sec: u64,
    outcome: String,
    completed: bool,
    verified: bool,
    figures: Option<Figures>,
}

#[derive(Serialize)]
struct AbArm {
    /// `baseline` (every technique on) or the technique turned off.
    arm: String,
    hold_hot_pages: bool,
    auto_converge: bool,
    runs: u32,
    completed: u32,
    outcomes: Vec<String>,
    /// Medians over the completed runs.
    median: Option<Figures>,
}

/// One technique's saving: its figure with it off divided by the
/// baseline's (above 1: the technique saves that much).
#[derive(Serialize)]
struct Saving {
    technique: String,
    resent_pages: Option<f64>,
    wire_bytes: Option<f64>,
    downtime: Option<f64>,
    /// Why there is no A/B for it.
    skipped: Option<String>,
}

#[derive(Serialize)]
struct Ab {
    dirty: String,
    dirty_pages_per_sec: u64,
    arms: Vec<AbArm>,
    savings: Vec<Saving>,
}

#[derive(Serialize)]
struct PerVm {
    vm: String,
    outcome: String,
    verified: bool,
    /// When this migration's answer arrived, from the common start.
    finished_ms: f64,
    figures: Option<Figures>,
}

#[derive(Serialize)]
struct Concurrent {
    vms: u32,
    memory_bytes_each: u64,
    dirty_pages_per_sec: u64,
    /// First request to the last answer.
    wall_ms: f64,
    median_total_ms: f64,
    max_total_ms: f64,
    /// Guest bytes of all VMs over the wall-clock time.
    aggregate_guest_mb_s: f64,
    aggregate_wire_mb_s: f64,
    /// RSS before the VMs were created.
    rss_before_bytes: u64,
    /// Highest RSS while the VMs existed (VmHWM after a reset, and a
    /// 10 ms sampler).
    peak_rss_bytes: u64,
    /// RSS rise when the VMs were created (the source images as resident).
    source_images_bytes: u64,
    /// RSS drop when the arrived VMs were deleted (the destination images,
    /// and buffers the allocator returned late).
    destination_images_bytes: u64,
    /// peak − before − 2 × source images (the destination's images are as
    /// resident as the source's).
    overhead_bytes: i64,
    overhead_per_vm_bytes: i64,
    /// Whether VmHWM could be reset for this run (else the sampler only).
    hwm_reset: bool,
    per_vm: Vec<PerVm>,
}

#[derive(Serialize)]
struct Output {
    memory_bytes: u64,
    /// The modes table's VMs' disk, and its workload's block writes.
    disk_bytes: Option<u64>,
    disk_writes_per_sec: Option<u64>,
    streams: u16,
    compression_level: i32,
    max_downtime_ms: u32,
    max_rounds: u32,
    runs: u32,
    /// `/proc/loadavg` when the run started and ended: this machine may
    /// be shared.
    load_start: Option<String>,
    load_end: Option<String>,
    modes: Vec<ModeRow>,
    ab: Option<Ab>,
    concurrent: Vec<Concurrent>,
    reuse: Vec<ReuseRow>,
}

/// A VM's trip out and back (the reuse table).
#[derive(Serialize)]
struct ReuseRow {
    dirty: String,
    dirty_pages_per_sec: u64,
    /// How long it ran at b before coming back.
    dwell_ms: u64,
    outcome: String,
    completed: bool,
    verified: bool,
    there: Option<Figures>,
    back: Option<Figures>,
    /// Pages that came back as retained (not sent).
    retained_pages: u64,
    /// Pages sent on the way back, over the VM's pages.
    sent_back_share: Option<f64>,
    /// Wire bytes back ÷ wire bytes there.
    wire_ratio: Option<f64>,
}

/// The lab, its clients and a VM name counter.
struct Ctx<'a> {
    lab: &'a Lab,
    a: &'a CtlClient,
    b: &'a CtlClient,
    next: std::cell::Cell<u32>,
    quiet: bool,
    /// The disk of the modes table's VMs: size, writes per second.
    disk: Option<(u64, u64)>,
}

impl Ctx<'_> {
    fn note(&self, s: &str) {
        if !self.quiet {
            eprintln!("{s}");
        }
    }

    fn name(&self) -> String {
        let i = self.next.get();
        self.next.set(i + 1);
        format!("engine-{i}")
    }

    async fn create(
        &self,
        vm: &str,
        memory: u64,
        rate: u64,
        seed: u64,
        disk: Option<(u64, u64)>,
    ) -> Result<()> {
        let disks = match disk {
            Some((bytes, writes_per_sec)) => vec![SimDiskSpec {
                name: "root".parse()?,
                bytes,
                writes_per_sec,
                used_pct: 25,
                base: None,
            }],
            None => Vec::new(),
        };
        self.a
            .vm_create(SimVmSpec {
                name: vm.parse()?,
                memory_bytes: memory,
                dirty_pages_per_sec: rate,
                hot_set_pct: 10,
                content: ContentProfile::Mixed,
                seed,
                attributes: Default::default(),
                disks,
            })
            .await?;
        Ok(())
    }

    async fn delete(&self, vm: &str) -> Result<()> {
        // Wherever it ended up; the other agent answers "not found".
        let _ = self.b.vm_delete(vm.parse()?).await;
        let _ = self.a.vm_delete(vm.parse()?).await;
        Ok(())
    }

    /// Creates a VM on `a` (same content and workload seed every time, so
    /// runs compare), migrates it to `b`, and deletes it.
    /// With `disk`, the VM has the disk of `self.disk` (and its storage
    /// is copied).
    async fn migrate_one(
        &self,
        memory: u64,
        rate: u64,
        mut o: MigrationPlan,
        disk: bool,
    ) -> Result<Ran> {
        let vm = self.name();
        let disk = self.disk.filter(|_| disk);
        o.copy_storage = disk.is_some();
        // --storage-postcopy applies where there is a switch and a disk.
        o.storage_postcopy &= disk.is_some() && o.mode != MigrationMode::Precopy;
        self.create(&vm, memory, rate, 1, disk).await?;
        tokio::time::sleep(SETTLE).await;
        let mode = o.mode;
        let r = self
            .a
            .migrate(self.lab.migrate_request(&vm, "a", "b", o)?, |_| {})
            .await;
        self.delete(&vm).await?;
        Ran::of(r, mode)
    }
}

/// Runs the engine benchmark.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    if b.backend != "sim" {
        bail!("--engine measures simulated VMs (--backend sim)");
    }
    if b.dirty.is_empty() {
        bail!("--dirty needs at least one rate");
    }
    let memory = b.memory.unwrap_or(1 << 30);
    let want = |t: &str| b.tables.iter().any(|x| x == t);
    let base = b.tuning.options();
    let dir = tempfile::tempdir()?;
    // Retention only matters for VMs that opt in (the reuse table's).
    let retain = want("reuse").then_some(RetentionLimits {
        max_images: 4,
        max_bytes: memory.saturating_mul(2),
    });
    let lab = Lab::start(dir.path(), &["a", "b"], move |_, c| {
        c.retain_images = retain;
    })
    .await?;
    let (a, bc) = (lab.client("a").await?, lab.client("b").await?);
    let ctx = Ctx {
        lab: &lab,
        a: &a,
        b: &bc,
        next: std::cell::Cell::new(0),
        quiet: g.json,
        disk: b.disk.map(|d| (d, b.disk_writes)),
    };
    let mut out = Output {
        memory_bytes: memory,
        disk_bytes: b.disk,
        disk_writes_per_sec: b.disk.map(|_| b.disk_writes),
        streams: base.streams,
        compression_level: base.compression_level,
        max_downtime_ms: base.max_downtime_ms,
        max_rounds: base.max_rounds,
        runs: b.runs,
        load_start: load_average(),
        load_end: None,
        modes: Vec::new(),
        ab: None,
        concurrent: Vec::new(),
        reuse: Vec::new(),
    };
    if want("modes") {
        for &mode in &b.modes {
            for r in &b.dirty {
                ctx.note(&format!(
                    "{mode}, {} ({} pages/s) …",
                    r.name, r.pages_per_sec
                ));
                let o = MigrationPlan {
                    mode,
                    ..base.clone()
                };
                let ran = ctx.migrate_one(memory, r.pages_per_sec, o, true).await?;
                out.modes.push(ModeRow {
                    mode,
                    dirty: r.name.clone(),
                    dirty_pages_per_sec: r.pages_per_sec,
                    outcome: ran.outcome,
                    completed: ran.completed,
                    verified: ran.verified,
                    figures: ran.figures,
                });
            }
        }
    }
    let heavy = b.dirty.iter().max_by_key(|r| r.pages_per_sec);
    if let Some(heavy) = heavy.filter(|r| want("ab") && r.pages_per_sec > 0) {
        out.ab = Some(ab(&ctx, memory, heavy, &base, b.runs).await?);
    }
    if want("concurrent") {
        for &n in &b.concurrent {
            let o = MigrationPlan {
                mode: MigrationMode::Precopy,
                ..base.clone()
            };
            out.concurrent
                .push(concurrent(&ctx, n, b.concurrent_memory, b.concurrent_rate, o).await?);
        }
    }
    // Last: the images the agents keep would count in the RSS above.
    if want("reuse") {
        for r in &b.dirty {
            out.reuse.push(
                there_and_back(
                    &ctx,
                    memory,
                    r,
                    &base,
                    Duration::from_millis(b.reuse_dwell_ms),
                )
                .await?,
            );
        }
    }
    a.close().await;
    bc.close().await;
    lab.shutdown().await;
    out.load_end = load_average();
    if g.json {
        return render::json(&out);
    }
    print!("{}", text(&out));
    Ok(())
}

/// The A/B runs at `heavy`: the baseline and each technique off, in turn
/// within each run so that drifts of the machine hit every arm alike.
async fn ab(
    ctx: &Ctx<'_>,
    memory: u64,
    heavy: &NamedRate,
    base: &MigrationPlan,
    runs: u32,
) -> Result<Ab> {
    let arms = [
        ("baseline (all on)", true, true),
        ("hot-page ordering off", false, true),
        ("auto-converge off", true, false),
    ];
    let mut ran: Vec<Vec<Ran>> = vec![Vec::new(); arms.len()];
    for run in 1..=runs {
        for (i, &(name, hold, converge)) in arms.iter().enumerate() {
            ctx.note(&format!(
                "A/B at {} ({} pages/s), run {run}/{runs}: {name} …",
                heavy.name, heavy.pages_per_sec
            ));
            let o = MigrationPlan {
                mode: MigrationMode::Precopy,
                hold_hot_pages: hold,
                auto_converge: converge,
                force_stop: true,
                ..base.clone()
            };
            let r = ctx
                .migrate_one(memory, heavy.pages_per_sec, o, false)
                .await?;
            if let Some(v) = ran.get_mut(i) {
                v.push(r);
            }
        }
    }
    let arms: Vec<AbArm> = arms
        .iter()
        .zip(ran)
        .map(|(&(name, hold, converge), v)| {
            let done: Vec<Figures> = v
                .iter()
                .filter(|r| r.completed)
                .filter_map(|r| r.figures)
                .collect();
            AbArm {
                arm: name.into(),
                hold_hot_pages: hold,
                auto_converge: converge,
                runs: v.len() as u32,
                completed: done.len() as u32,
                outcomes: v.into_iter().map(|r| r.outcome).collect(),
                median: Figures::median(&done),
            }
        })
        .collect();
    let on = arms.first().and_then(|a| a.median);
    let ratio = |off: f64, on: f64| (on > 0.0).then(|| off / on);
    let mut savings: Vec<Saving> = arms
        .iter()
        .skip(1)
        .map(|arm| {
            let both = on.zip(arm.median);
            Saving {
                technique: arm.arm.trim_end_matches(" off").into(),
                resent_pages: both
                    .and_then(|(on, off)| ratio(off.resent_pages as f64, on.resent_pages as f64)),
                wire_bytes: both
                    .and_then(|(on, off)| ratio(off.wire_bytes as f64, on.wire_bytes as f64)),
                downtime: both.and_then(|(on, off)| ratio(off.downtime_ms, on.downtime_ms)),
                skipped: None,
            }
        })
        .collect();
    savings.push(Saving {
        technique: "delta pages".into(),
        resent_pages: None,
        wire_bytes: None,
        downtime: None,
        skipped: Some(
            "no request option turns delta pages off (the destination always accepts them)".into(),
        ),
    });
    Ok(Ab {
        dirty: heavy.name.clone(),
        dirty_pages_per_sec: heavy.pages_per_sec,
        arms,
        savings,
    })
}

/// `n` VMs of `memory` created on `a` and migrated to `b` at once.
async fn concurrent(
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

/// A VM that opts in to retention goes a → b, runs there for `dwell`, and
/// comes back to a, which kept its image.
async fn there_and_back(
    ctx: &Ctx<'_>,
    memory: u64,
    rate: &NamedRate,
    base: &MigrationPlan,
    dwell: Duration,
) -> Result<ReuseRow> {
    ctx.note(&format!(
        "reuse: {} ({} pages/s), {} ms at b …",
        rate.name,
        rate.pages_per_sec,
        dwell.as_millis()
    ));
    let vm = ctx.name();
    let mut attributes = convoy_protocol::vm::VmAttributes::default();
    attributes.labels.insert(
        convoy_protocol::vm::RETAIN_LABEL.to_owned(),
        "true".to_owned(),
    );
    ctx.a
        .vm_create(SimVmSpec {
            name: vm.parse()?,
            memory_bytes: memory,
            dirty_pages_per_sec: rate.pages_per_sec,
            hot_set_pct: 10,
            content: ContentProfile::Mixed,
            seed: 1,
            attributes,
            disks: Vec::new(),
        })
        .await?;
    tokio::time::sleep(SETTLE).await;
    let o = MigrationPlan {
        mode: MigrationMode::Precopy,
        ..base.clone()
    };
    let there = ctx
        .a
        .migrate(ctx.lab.migrate_request(&vm, "a", "b", o.clone())?, |_| {})
        .await;
    let there = Ran::of(there, MigrationMode::Precopy)?;
    let mut row = ReuseRow {
        dirty: rate.name.clone(),
        dirty_pages_per_sec: rate.pages_per_sec,
        dwell_ms: dwell.as_millis() as u64,
        outcome: there.outcome.clone(),
        completed: false,
        verified: false,
        there: there.figures,
        back: None,
        retained_pages: 0,
        sent_back_share: None,
        wire_ratio: None,
    };
    if there.completed {
        tokio::time::sleep(dwell).await;
        let back = ctx
            .b
            .migrate(ctx.lab.migrate_request(&vm, "b", "a", o)?, |_| {})
            .await;
        if let Ok(r) = &back {
            row.retained_pages = r.encodings.retained;
            row.sent_back_share = Some(r.pages_sent as f64 / r.memory_bytes.max(1) as f64 * 4096.0);
        }
        let back = Ran::of(back, MigrationMode::Precopy)?;
        row.outcome = back.outcome;
        row.completed = back.completed;
        row.verified = back.verified;
        row.back = back.figures;
        if let (Some(t), Some(b)) = (&row.there, &row.back) {
            row.wire_ratio = Some(b.wire_bytes as f64 / t.wire_bytes.max(1) as f64);
        }
    }
    ctx.delete(&vm).await?;
    Ok(row)
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// RSS once it has stopped moving: the previous migrations' connections
/// and buffers are released a while after they end (a destination waits
/// up to 2 s for the source to close, and mimalloc returns freed pages
/// late), and a read taken while they go would count their release
/// against the next images. At least [`QUIET`], at most 5 s.
async fn settled_rss() -> u64 {
    tokio::time::sleep(QUIET).await;
    let mut last = proc_status("VmRSS").unwrap_or(0);
    for _ in 0..22 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = proc_status("VmRSS").unwrap_or(0);
        if now.abs_diff(last) < 1 << 20 {
            return now;
        }
        last = now;
    }
    last
}

/// A field of `/proc/self/status` given in kB (`VmRSS`, `VmHWM`), in
/// bytes; `None` where there is no such file or field.
fn proc_status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Reads VmRSS every `every` on its own thread (not a tokio task: the
/// runtime's workers are busy with the migrations) and keeps the highest.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(rss) = proc_status("VmRSS") {
                        m.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(every);
                }
            })
            .ok();
        Sampler { stop, max, thread }
    }

    /// Stops sampling; the highest RSS seen.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / 1048576.0)
}

fn mib_signed(b: i64) -> String {
    format!("{:.0}", b as f64 / 1048576.0)
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}×"))
}

/// The tables as text.
fn text(o: &Output) -> String {
    let mut s = format!(
        "{} guest (mixed memory, 10% hot set), {} data streams, zstd level {}, \
         {} ms downtime target; load average {} at the start, {} at the end\n",
        format_bytes(o.memory_bytes),
        o.streams,
        o.compression_level,
        o.max_downtime_ms,
        o.load_start.as_deref().unwrap_or("?"),
        o.load_end.as_deref().unwrap_or("?"),
    );
    let figure_cells = |f: &Option<Figures>| -> Vec<String> {
        match f {
            Some(f) => vec![
                format!("{:.0}", f.total_ms),
                format!("{:.1}", f.downtime_ms),
                f.rounds.to_string(),
                mib(f.wire_bytes),
                f.pages_sent.to_string(),
                f.resent_pages.to_string(),
                f.delta_pages.to_string(),
                f.held_back.to_string(),
                f.throttle_pct.to_string(),
                f.disk_blocks_sent.to_string(),
                f.faults.map_or("-".into(), |n| n.to_string()),
                match (f.fault_median_us, f.fault_p99_us) {
                    (Some(m), Some(p)) => format!("{m}/{p}"),
                    _ => "-".into(),
                },
            ],
            None => vec!["-".to_string(); 12],
        }
    };
    let figure_heads = [
        "total ms",
        "downtime ms",
        "rounds",
        "wire MiB",
        "pages sent",
        "re-sent",
        "delta",
        "held back",
        "throttle %",
        "disk blocks",
        "faults",
        "fault µs p50/p99",
    ];
    if let (Some(d), Some(w)) = (o.disk_bytes, o.disk_writes_per_sec) {
        s.push_str(&format!(
            "modes table: each VM also has a {} disk (25% written, {w} block writes/s), moved with it\n",
            format_bytes(d)
        ));
    }
    if !o.modes.is_empty() {
        let rows: Vec<Vec<String>> = o
            .modes
            .iter()
            .map(|r| {
                let mut row = vec![
                    r.mode.to_string(),
                    format!("{} ({}/s)", r.dirty, r.dirty_pages_per_sec),
                ];
                row.extend(figure_cells(&r.figures));
                row.push(outcome_cell(&r.outcome, r.completed, r.verified));
                row
            })
            .collect();
        let mut heads = vec!["mode", "dirty pages"];
        heads.extend(figure_heads);
        heads.push("outcome");
        s.push('\n');
        s.push_str(&render::table(&heads, &rows));
    }
    if let Some(ab) = &o.ab {
        s.push_str(&format!(
            "\npre-copy techniques at {} ({} pages/s), medians of {} runs, \
             all with --force-stop at {} rounds\n",
            ab.dirty, ab.dirty_pages_per_sec, o.runs, o.max_rounds
        ));
        let rows: Vec<Vec<String>> = ab
            .arms
            .iter()
            .map(|a| {
                let mut row = vec![a.arm.clone(), format!("{}/{}", a.completed, a.runs)];
                row.extend(figure_cells(&a.median));
                row
            })
            .collect();
        let mut heads = vec!["arm", "completed"];
        heads.extend(figure_heads);
        s.push_str(&render::table(&heads, &rows));
        for a in ab.arms.iter().filter(|a| a.completed < a.runs) {
            for why in a.outcomes.iter().filter(|w| w.as_str() != "completed") {
                s.push_str(&format!("  {}: {why}\n", a.arm));
            }
        }
        s.push_str("\nsaving = figure with the technique off ÷ baseline (above 1: it saves)\n");
        let rows: Vec<Vec<String>> = ab
            .savings
            .iter()
            .map(|v| match &v.skipped {
                Some(why) => vec![
                    v.technique.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("no A/B: {why}"),
                ],
                None => vec![
                    v.technique.clone(),
                    ratio_cell(v.resent_pages),
                    ratio_cell(v.wire_bytes),
                    ratio_cell(v.downtime),
                    String::new(),
                ],
            })
            .collect();
        s.push_str(&render::table(
            &[
                "technique",
                "re-sent pages",
                "wire bytes",
                "downtime",
                "note",
            ],
            &rows,
        ));
    }
    if !o.concurrent.is_empty() {
        s.push_str(
            "\nVMs migrated at once (RSS of this process, which runs both agents; \
             overhead = peak − before − 2 × source images)\n",
        );
        let rows: Vec<Vec<String>> = o
            .concurrent
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
        for c in &o.concurrent {
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
    if !o.reuse.is_empty() {
        s.push_str(
            "\nmemory reuse: out a → b, back b → a where the image was kept \
             (sent back = pages sent back ÷ the VM's pages)\n",
        );
        let rows: Vec<Vec<String>> = o
            .reuse
            .iter()
            .map(|r| {
                let fig = |f: &Option<Figures>, g: fn(&Figures) -> String| {
                    f.as_ref().map_or("-".to_string(), g)
                };
                vec![
                    format!("{} ({}/s)", r.dirty, r.dirty_pages_per_sec),
                    r.dwell_ms.to_string(),
                    fig(&r.there, |f| mib(f.wire_bytes)),
                    fig(&r.back, |f| mib(f.wire_bytes)),
                    r.wire_ratio
                        .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
                    r.sent_back_share
                        .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
                    r.retained_pages.to_string(),
                    fig(&r.there, |f| format!("{:.0}", f.total_ms)),
                    fig(&r.back, |f| format!("{:.0}", f.total_ms)),
                    fig(&r.back, |f| format!("{:.1}", f.downtime_ms)),
                    outcome_cell(&r.outcome, r.completed, r.verified),
                ]
            })
            .collect();
        s.push_str(&render::table(
            &[
                "dirty pages",
                "dwell ms",
                "there MiB",
                "back MiB",
                "back/there",
                "sent back",
                "retained",
                "there ms",
                "back ms",
                "back downtime ms",
                "outcome",
            ],
            &rows,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_rates_parse() {
        assert_eq!(
            "heavy=100000".parse(),
            Ok(NamedRate {
                name: "heavy".into(),
                pages_per_sec: 100_000
            })
        );
        assert_eq!(
            "500".parse(),
            Ok(NamedRate {
                name: "500".into(),
                pages_per_sec: 500
            })
        );
        assert!("=5".parse::<NamedRate>().is_err());
        assert!("busy=lots".parse::<NamedRate>().is_err());
    }

    #[test]
    fn the_outcome_cell_keeps_the_reason_and_drops_its_details() {
        assert_eq!(
            outcome_cell("aborted: cannot converge: dirties 5 pages/s", false, false),
            "aborted: cannot converge"
        );
        assert_eq!(
            outcome_cell(
                "not supported: invalid options: pre-copy only",
                false,
                false
            ),
            "not supported: invalid options: pre-copy only"
        );
        assert_eq!(outcome_cell("completed", true, true), "completed, verified");
    }

    #[test]
    fn medians_pick_the_middle_of_each_figure() {
        let f = |t: f64, resent: u64| Figures {
            total_ms: t,
            resent_pages: resent,
            ..Figures::default()
        };
        let m = Figures::median(&[f(3.0, 10), f(1.0, 30), f(2.0, 20)]);
        assert_eq!(m.map(|m| (m.total_ms, m.resent_pages)), Some((2.0, 20)));
        assert!(Figures::median(&[]).is_none());
    }
}
