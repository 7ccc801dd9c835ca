//! `convoyctl bench --engine`: what the native engine does with simulated
//! VMs, in tables from one run on two agents on loopback, one module each:
//! - [`modes`]: one migration per mode and dirty rate. A mode the agent
//!   refuses is a row saying so (pure post-copy of a VM with disks, for
//!   one: disk blocks are not paged on demand).
//! - [`ab`]: at the highest dirty rate, a baseline with every pre-copy
//!   technique on against runs with one technique off (hot-page ordering,
//!   auto-converge), medians of `--runs`, the saving as a ratio. Every arm
//!   runs with `force_stop`, so that an arm that cannot meet the downtime
//!   target within the round limit still completes and shows what that
//!   costs. Delta pages cannot be turned off from a request (the
//!   destination always accepts them), so they get no A/B.
//! - [`concurrent`]: N VMs created on agent `a` and all migrated to `b` at
//!   once through one client, with per-VM and wall-clock times, the
//!   aggregate rate against one VM alone (`--runs` runs of it first), and
//!   the agents' own memory at its peak (the process's anonymous memory:
//!   the images are shared memory) against their budgets.
//! - [`reuse`]: memory reuse when a VM comes back. Per dirty rate, a VM
//!   that opts in to retention goes a → b, runs there for `--reuse-dwell`,
//!   and comes back b → a, where its encrypted image waits; the row sets
//!   the bytes of the trip back against those of the first trip. The
//!   pages sent back (as a share of the VM's pages) bound how much of the
//!   memory changed.
//!
//! [`figures`] holds what one migration measured, shared by every table.

mod ab;
mod concurrent;
mod figures;
mod modes;
mod reuse;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Result};
use convoy_agent::client::CtlClient;
use convoy_agent::host::retain::RetentionLimits;
use convoy_agent::lab::Lab;
use convoy_agent::units::format_bytes;
use convoy_protocol::ctl::{ContentProfile, SimDiskSpec, SimVmSpec};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use serde::Serialize;

use self::figures::Ran;
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

#[derive(Serialize)]
struct Output {
    memory_bytes: u64,
    /// The modes table's VMs' disk, and its workload's block writes.
    disk_bytes: Option<u64>,
    disk_writes_per_sec: Option<u64>,
    streams: u16,
    /// What the agents dialed with (`--transport`).
    transport: String,
    compression_level: i32,
    max_downtime_ms: u32,
    max_rounds: u32,
    runs: u32,
    /// `/proc/loadavg` when the run started and ended: this machine may
    /// be shared.
    load_start: Option<String>,
    load_end: Option<String>,
    modes: Vec<modes::ModeRow>,
    ab: Option<ab::Ab>,
    /// One VM of the concurrent table's shape alone, `--runs` times: the
    /// baseline of its "× one alone".
    concurrent_alone: Vec<concurrent::Concurrent>,
    concurrent: Vec<concurrent::Concurrent>,
    reuse: Vec<reuse::ReuseRow>,
}

/// The lab, its clients and a VM name counter.
pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub a: &'a CtlClient,
    pub b: &'a CtlClient,
    next: std::cell::Cell<u32>,
    quiet: bool,
    /// The disk of the modes table's VMs: size, writes per second.
    disk: Option<(u64, u64)>,
    /// Where each migration's timeline goes (`--timelines`).
    timelines: Option<&'a std::path::Path>,
    /// Each VM's service, requests per second.
    service_rps: u64,
}

impl Ctx<'_> {
    pub fn note(&self, s: &str) {
        if !self.quiet {
            eprintln!("{s}");
        }
    }

    pub fn name(&self) -> String {
        let i = self.next.get();
        self.next.set(i + 1);
        format!("engine-{i}")
    }

    pub async fn create(
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
                service_requests_per_sec: self.service_rps,
            })
            .await?;
        Ok(())
    }

    pub async fn delete(&self, vm: &str) -> Result<()> {
        // Wherever it ended up; the other agent answers "not found".
        let _ = self.b.vm_delete(vm.parse()?).await;
        let _ = self.a.vm_delete(vm.parse()?).await;
        Ok(())
    }

    /// Creates a VM on `a` (same content and workload seed every time, so
    /// runs compare), migrates it to `b`, and deletes it.
    /// With `disk`, the VM has the disk of `self.disk` (and its storage
    /// is copied).
    pub async fn migrate_one(
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
        let probe = match self.timelines {
            Some(_) => Some(crate::timeline::Probe::start(
                vec![self.lab.client("a").await?, self.lab.client("b").await?],
                vm.parse()?,
            )),
            None => None,
        };
        let mut timeline = crate::timeline::Timeline::default();
        let r = self
            .a
            .migrate(self.lab.migrate_request(&vm, "a", "b", o)?, |p| {
                timeline.record(p);
            })
            .await;
        if let (Some(p), Some(dir), Ok(report)) = (probe, self.timelines, &r) {
            // A moment more of the guest where it now runs.
            tokio::time::sleep(Duration::from_millis(300)).await;
            timeline.add_polls(&p.finish().await);
            let name = format!("{vm}-{mode}-{rate}");
            for ext in ["svg", "json"] {
                let path = dir.join(format!("{name}.{ext}"));
                if let Err(e) = timeline.write(&path, report) {
                    self.note(&format!("timeline {}: {e:#}", path.display()));
                }
            }
            if let Some(s) = timeline.service_summary() {
                self.note(&format!("{name}: {s}"));
            }
        }
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
    if let Some(d) = &b.timelines {
        std::fs::create_dir_all(d)
            .map_err(|e| anyhow::anyhow!("--timelines {}: {e}", d.display()))?;
    }
    let want = |t: &str| b.tables.iter().any(|x| x == t);
    let base = b.tuning.options();
    let dir = tempfile::tempdir()?;
    // Retention only matters for VMs that opt in (the reuse table's).
    let retain = want("reuse").then_some(RetentionLimits {
        max_images: 4,
        max_bytes: memory.saturating_mul(2),
    });
    // `--transport` chooses what carries the migrations (auto: QUIC on
    // loopback).
    let transport = g.transport;
    let mut lab = Lab::start(dir.path(), &["a", "b"], move |_, c| {
        c.retain_images = retain;
        c.transport = transport;
    })
    .await?;
    lab.transport = transport;
    let (a, bc) = (lab.client("a").await?, lab.client("b").await?);
    let ctx = Ctx {
        lab: &lab,
        a: &a,
        b: &bc,
        next: std::cell::Cell::new(0),
        quiet: g.json,
        disk: b.disk.map(|d| (d, b.disk_writes)),
        timelines: b.timelines.as_deref(),
        service_rps: b.service_rps,
    };
    let mut out = Output {
        memory_bytes: memory,
        disk_bytes: b.disk,
        disk_writes_per_sec: b.disk.map(|_| b.disk_writes),
        streams: base.streams,
        transport: g.transport.to_string(),
        compression_level: base.compression_level,
        max_downtime_ms: base.max_downtime_ms,
        max_rounds: base.max_rounds,
        runs: b.runs,
        load_start: load_average(),
        load_end: None,
        modes: Vec::new(),
        ab: None,
        concurrent_alone: Vec::new(),
        concurrent: Vec::new(),
        reuse: Vec::new(),
    };
    if want("modes") {
        out.modes = modes::run(&ctx, &b.modes, &b.dirty, memory, &base).await?;
    }
    let heavy = b.dirty.iter().max_by_key(|r| r.pages_per_sec);
    if let Some(heavy) = heavy.filter(|r| want("ab") && r.pages_per_sec > 0) {
        out.ab = Some(ab::run(&ctx, memory, heavy, &base, b.runs).await?);
    }
    if want("concurrent") {
        let o = MigrationPlan {
            mode: MigrationMode::Precopy,
            ..base.clone()
        };
        let (mem, rate) = (b.concurrent_memory, b.concurrent_rate);
        for _ in 0..b.runs {
            out.concurrent_alone
                .push(concurrent::run(&ctx, 1, mem, rate, o.clone()).await?);
        }
        for &n in &b.concurrent {
            out.concurrent
                .push(concurrent::run(&ctx, n, mem, rate, o.clone()).await?);
        }
        concurrent::against_one_alone(&mut out.concurrent, &out.concurrent_alone);
    }
    // Last: the images the agents keep would count in the RSS above.
    if want("reuse") {
        for r in &b.dirty {
            out.reuse.push(
                reuse::run(
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

/// The tables as text.
fn text(o: &Output) -> String {
    let mut s = format!(
        "{} guest (mixed memory, 10% hot set), {} data streams, --transport {}, zstd level {}, \
         {} ms downtime target; load average {} at the start, {} at the end\n",
        format_bytes(o.memory_bytes),
        o.streams,
        o.transport,
        o.compression_level,
        o.max_downtime_ms,
        o.load_start.as_deref().unwrap_or("?"),
        o.load_end.as_deref().unwrap_or("?"),
    );
    if let (Some(d), Some(w)) = (o.disk_bytes, o.disk_writes_per_sec) {
        s.push_str(&format!(
            "modes table: each VM also has a {} disk (25% written, {w} block writes/s), moved with it\n",
            format_bytes(d)
        ));
    }
    s.push_str(&modes::text(&o.modes));
    if let Some(ab) = &o.ab {
        s.push_str(&ab::text(ab, o.runs, o.max_rounds));
    }
    s.push_str(&concurrent::text(&o.concurrent_alone, &o.concurrent));
    s.push_str(&reuse::text(&o.reuse));
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
}
