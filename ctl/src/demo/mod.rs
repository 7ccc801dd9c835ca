//! `convoyctl demo`: a complete live migration on this machine. A
//! throw-away PKI, two agents on loopback, a VM migrated live from one to
//! the other, verified, with the guest's counter shown continuing at the
//! destination, and the trust path checked offline.
//! - [`sim`]: the embedded default, a busy simulated VM.
//! - [`qemu`] (`--backend qemu`): a real Linux guest under QEMU.
//! - [`evidence`]: what the trust path left behind, checked offline.
//! - [`via`] (`--via URL`): the store-and-forward path through a bucket,
//!   the agents never connecting.
//!
//! Both print the `--json` fields of [`report_json`].

mod evidence;
mod qemu;
mod sim;
mod via;

use std::path::Path;

use anyhow::{bail, Result};
use convoy_agent::client::CtlClient;
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{MigrationReport, SimDiskSpec, SimVmSpec, VmInfo};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::vm::VmAttributes;

use self::evidence::Evidence;
use crate::cmd::migrate::Tuning;
use crate::cmd::vm::Content;
use crate::conn::Global;
use crate::render;

/// `demo` flags.
#[derive(clap::Args, Debug)]
pub struct Demo {
    /// sim (the embedded simulated VM) or qemu (a real Linux guest under
    /// QEMU, built from installed Debian packages).
    #[arg(long, default_value = "sim", value_parser = ["sim", "qemu"])]
    pub backend: String,
    /// Guest memory of the demo VM (default: 512MiB for sim, 256MiB for
    /// qemu).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub memory: Option<u64>,
    /// qemu: MiB of random data the guest holds in memory (so the
    /// migration carries real bytes, not only zero pages).
    #[arg(long, default_value_t = 64)]
    pub fill_mib: u32,
    /// Pages the workload writes per second.
    #[arg(long, default_value_t = 25_000)]
    pub dirty_rate: u64,
    /// Percent of memory that takes 90% of the writes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub hot_set: u8,
    /// sim: requests per second the guest's service takes (0 = none);
    /// `--plot` draws their throughput and response time.
    #[arg(long, default_value_t = 1000)]
    pub service_rps: u64,
    /// Initial memory content.
    #[arg(long, value_enum, default_value = "mixed")]
    pub content: Content,
    /// sim: give the VM a disk of this size (a sparse file, a quarter of
    /// it written, the workload writing 500 blocks/s), migrated with the
    /// memory and verified block by block at the destination.
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub disk: Option<u64>,
    /// sim: move the VM through object storage instead (`file:///DIR` or
    /// `s3://BUCKET/PREFIX`): a pushes it there sealed for b and waits, b
    /// restores and claims it; the agents never connect.
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,
    /// Draw the migration over time to FILE.svg or FILE.png, or write its
    /// series to FILE.json (see `migrate --plot`).
    #[arg(long, value_name = "FILE", conflicts_with = "via")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Runs the demo on the backend the flags choose.
pub async fn run(g: &Global, d: Demo) -> Result<()> {
    if let Some(p) = &d.plot {
        crate::timeline::format(p)?;
    }
    if d.backend == "qemu" {
        if d.via.is_some() {
            bail!("--via takes the sim backend (QEMU VMs are not pushed to object storage yet)");
        }
        return qemu::run(g, d).await;
    }
    if let Some(url) = d.via.clone() {
        if d.disk.is_some() {
            bail!("--via takes a VM without --disk in the demo");
        }
        return via::run(g, d, url).await;
    }
    sim::run(g, d).await
}

/// Whether the guest moved and carried on where it stopped.
pub(crate) struct Continuity {
    /// The migration completed, verified, the VM only at the destination.
    pub verified: bool,
    /// The counter resumed just after where it paused.
    pub continuous: bool,
    /// Counter at the source's pause.
    pub at_pause: Option<u64>,
    /// First counter at the destination.
    pub at_start: Option<u64>,
    /// Counter a moment later.
    pub after: Option<u64>,
}

/// The `--json` fields every demo backend prints.
pub(crate) fn report_json(
    backend: &str,
    report: &MigrationReport,
    ev: &Evidence,
    c: Continuity,
    streams: u16,
) -> serde_json::Value {
    serde_json::json!({
        "backend": backend,
        "verified": c.verified,
        "outcome": report.outcome,
        "counter_continuous": c.continuous,
        "memory_bytes": report.memory_bytes,
        "wire_bytes": report.wire_bytes,
        "payload_bytes": report.payload_bytes,
        "total_ms": report.total_ms,
        "downtime_ms": report.downtime_ms,
        "rounds": report.rounds,
        "converged": report.converged,
        "pages_sent": report.pages_sent,
        "memory_root": report.memory_root.map(|d| d.to_hex()),
        "counter_at_pause": c.at_pause,
        "counter_at_start": c.at_start,
        "counter_after": c.after,
        "streams": streams,
        "source": report.source,
        "destination": report.destination,
        "ticket_verified": ev.ticket_verified,
        "policy_permitted": { "source": ev.permitted_source, "destination": ev.permitted_destination },
        "receipts": { "source": ev.receipts_source, "destination": ev.receipts_destination },
        "audit_verified": ev.audit_verified,
        "evidence_bundle_bytes": ev.bundle_bytes,
    })
}

pub(crate) fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The demo VM's tenant, security level and labels, for the policies.
fn attributes() -> VmAttributes {
    VmAttributes {
        tenant: "default".into(),
        security_level: 1,
        labels: [("app".to_string(), "demo".to_string())].into(),
    }
}

/// The lines that introduce the lab in `dir`: its PKI, then agents a
/// (with `a_extra` at the end of its line) and b.
fn lab_lines(lab: &Lab, dir: &Path, a_extra: &str) -> Result<[String; 3]> {
    let (a, b) = (lab.agent("a")?, lab.agent("b")?);
    Ok([
        format!(
            "PKI: throw-away Ed25519 CA (trust domain {}) in {}",
            lab.pki.domain(),
            dir.display()
        ),
        format!(
            "agent {} on {} (QUIC, mutual TLS 1.3){a_extra}",
            a.id, a.addr
        ),
        format!("agent {} on {}", b.id, b.addr),
    ])
}

/// The demo's sim VM as the flags describe it, with `disks`.
fn sim_spec(d: &Demo, memory: u64, disks: Vec<SimDiskSpec>) -> Result<SimVmSpec> {
    Ok(SimVmSpec {
        name: "demo".parse()?,
        memory_bytes: memory,
        dirty_pages_per_sec: d.dirty_rate,
        hot_set_pct: d.hot_set,
        content: d.content.into(),
        seed: 1,
        attributes: attributes(),
        disks,
        service_requests_per_sec: d.service_rps,
    })
}

/// A throw-away lab of sim agents a and b in a temporary directory,
/// introduced on standard output (not with `--json`), and a client of
/// each.
async fn sim_lab(g: &Global) -> Result<(tempfile::TempDir, Lab, CtlClient, CtlClient)> {
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {}).await?;
    if !g.json {
        for line in lab_lines(&lab, dir.path(), "")? {
            println!("{line}");
        }
    }
    let a = lab.client("a").await?;
    let b = lab.client("b").await?;
    Ok((dir, lab, a, b))
}

/// Migrates the demo VM from a to b with a progress bar (none with
/// `--json`); with `plot`, draws its timeline there, with what `probe`
/// saw of the guest.
async fn migrate(
    g: &Global,
    lab: &Lab,
    a: &CtlClient,
    options: MigrationPlan,
    plot: Option<&std::path::Path>,
    probe: Option<crate::timeline::Probe>,
) -> Result<MigrationReport> {
    let bar = render::Bar::new(g.json);
    let mut timeline = crate::timeline::Timeline::default();
    let report = a
        .migrate(lab.migrate_request("demo", "a", "b", options)?, |p| {
            timeline.record(p);
            bar.update(p);
        })
        .await;
    bar.finish();
    if let Some(p) = probe {
        // A moment more of the guest where it now runs.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        timeline.add_polls(&p.finish().await);
    }
    let report = report?;
    if let Some(path) = plot {
        timeline.write(path, &report)?;
        if !g.json {
            eprintln!("timeline: {}", path.display());
            if let Some(s) = timeline.service_summary() {
                eprintln!("{s}");
            }
        }
    }
    Ok(report)
}

/// The demo VM as agent `c` lists it, if it does.
async fn listed(c: &CtlClient) -> Result<Option<VmInfo>> {
    Ok(c.vm_list()
        .await?
        .into_iter()
        .find(|v| v.name.as_str() == "demo"))
}

/// Closes the clients and the lab; an error unless the migration verified,
/// the counter carried on and every trust check passed.
async fn finish(
    lab: Lab,
    a: CtlClient,
    b: CtlClient,
    verified: bool,
    counter_continuous: bool,
    ev: &Evidence,
) -> Result<()> {
    a.close().await;
    b.close().await;
    lab.shutdown().await;
    if !verified || !counter_continuous || !ev.all_good() {
        bail!("the demo migration did not verify");
    }
    Ok(())
}
