//! `convoyctl demo`: the embedded default. A throw-away PKI, two agents on
//! loopback, a busy simulated VM migrated live from one to the other,
//! verified, with the device counter shown continuing at the destination.

mod qemu;

use std::time::Duration;

use anyhow::{bail, Result};
use convoy_agent::lab::Lab;
use convoy_agent::units::format_bytes;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ctl::{MigrationReport, Outcome, SimDiskSpec, SimVmSpec};
use convoy_protocol::evidence::{build_bundle, check_bundle};
use convoy_protocol::names::DiskName;
use convoy_protocol::receipt::SignedReceipt;
use convoy_protocol::vm::VmAttributes;

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
    /// Initial memory content.
    #[arg(long, value_enum, default_value = "mixed")]
    pub content: Content,
    /// sim: give the VM a disk of this size (a sparse file, a quarter of
    /// it written, the workload writing 500 blocks/s), migrated with the
    /// memory and verified block by block at the destination.
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub disk: Option<u64>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Runs the demo.
pub async fn run(g: &Global, d: Demo) -> Result<()> {
    if d.backend == "qemu" {
        return qemu::run(g, d).await;
    }
    let memory = d.memory.unwrap_or(512 << 20);
    let say = |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {}).await?;
    let (a_info, b_info) = (lab.agent("a")?, lab.agent("b")?);
    say(format!(
        "PKI: throw-away Ed25519 CA (trust domain {}) in {}",
        lab.pki.domain(),
        dir.path().display()
    ));
    say(format!(
        "agent {} on {} (QUIC, mutual TLS 1.3)",
        a_info.id, a_info.addr
    ));
    say(format!("agent {} on {}", b_info.id, b_info.addr));
    let a = lab.client("a").await?;
    let b = lab.client("b").await?;
    let spec = SimVmSpec {
        name: "demo".parse()?,
        memory_bytes: memory,
        dirty_pages_per_sec: d.dirty_rate,
        hot_set_pct: d.hot_set,
        content: d.content.into(),
        seed: 1,
        attributes: VmAttributes {
            tenant: "default".into(),
            security_level: 1,
            labels: [("app".to_string(), "demo".to_string())].into(),
        },
        disks: d
            .disk
            .map(|bytes| -> Result<SimDiskSpec> {
                Ok(SimDiskSpec {
                    name: "root".parse::<DiskName>()?,
                    bytes,
                    writes_per_sec: 500,
                    used_pct: 25,
                    base: None,
                })
            })
            .transpose()?
            .into_iter()
            .collect(),
    };
    say(format!(
        "VM demo: {} of {:?} memory, workload writing {} pages/s ({}% hot set)",
        format_bytes(memory),
        d.content,
        d.dirty_rate,
        d.hot_set
    ));
    if let Some(bytes) = d.disk {
        say(format!(
            "disk root: {} sparse file, 25% written, the workload writing 500 blocks/s",
            format_bytes(bytes)
        ));
    }
    a.vm_create(spec).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(format!("migrating demo: a → b (live {})", d.tuning.mode));
    let bar = render::Bar::new(g.json);
    let mut options = d.tuning.options();
    options.copy_storage |= d.disk.is_some();
    let report = a
        .migrate(lab.migrate_request("demo", "a", "b", options)?, |p| {
            bar.update(p)
        })
        .await;
    bar.finish();
    let report = report?;

    // Exactly once, and the guest carries on where it stopped.
    let on_a = a
        .vm_list()
        .await?
        .into_iter()
        .any(|v| v.name.as_str() == "demo");
    let arrived = b
        .vm_list()
        .await?
        .into_iter()
        .find(|v| v.name.as_str() == "demo");
    let at_start = arrived.as_ref().and_then(|v| v.counter_at_start);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = b
        .vm_list()
        .await?
        .into_iter()
        .find(|v| v.name.as_str() == "demo")
        .map(|v| v.counter);
    let counter_continuous = report.counter_at_pause.is_some()
        && at_start == report.counter_at_pause
        && matches!((after, at_start), (Some(n), Some(s)) if n > s);
    let completed = report.outcome == Outcome::Completed;
    // The destination checked one root over memory and disk blocks before
    // the VM could start there; each disk's own root is reported.
    let disks_verified = d.disk.is_none()
        || (completed && report.verified && report.disks.len() == 1 && report.disk_blocks_sent > 0);
    let verified = completed && report.verified && disks_verified && !on_a && arrived.is_some();
    let ev = evidence(&lab, &report.migration, &report.receipts);

    if g.json {
        let mut out = report_json(
            "sim",
            &report,
            &ev,
            Continuity {
                verified,
                continuous: counter_continuous,
                at_pause: report.counter_at_pause,
                at_start,
                after,
            },
            d.tuning.streams,
        );
        out["pages"] = serde_json::json!(report.encodings);
        out["dirty_pages_per_sec"] = serde_json::json!(d.dirty_rate);
        out["mode"] = serde_json::json!(d.tuning.mode.to_string());
        out["convergence"] = serde_json::json!(report.convergence);
        if let Some(bytes) = d.disk {
            out["disk_bytes"] = serde_json::json!(bytes);
            out["disk_blocks_sent"] = serde_json::json!(report.disk_blocks_sent);
            out["disk_verified"] = serde_json::json!(disks_verified);
        }
        if let Some(pc) = &report.postcopy {
            let f = pc.faults.unwrap_or_default();
            out["postcopy_owed_pages"] = serde_json::json!(pc.owed);
            out["faults"] = serde_json::json!(f.faults);
            out["fault_median_us"] = serde_json::json!(f.median_us);
            out["fault_p99_us"] = serde_json::json!(f.p99_us);
        }
        render::json(&out)?;
    } else {
        print!("{}", render::report(&report));
        println!(
            "counter: paused at {} on a, resumed at {} on b, now {} → {}",
            opt(report.counter_at_pause),
            opt(at_start),
            opt(after),
            if counter_continuous {
                "continuous"
            } else {
                "NOT continuous"
            }
        );
        if d.disk.is_some() {
            println!(
                "disk: {}",
                if disks_verified {
                    "verified at b (the root it checked covers every disk block)"
                } else {
                    "NOT verified"
                }
            );
        }
        print!("{}", ev.lines(on_a, arrived.is_some()));
    }
    a.close().await;
    b.close().await;
    lab.shutdown().await;
    if !verified || !counter_continuous || !ev.all_good() {
        bail!("the demo migration did not verify");
    }
    Ok(())
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

pub(crate) fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// What the trust path left behind, checked offline with the CA bundle.
pub(crate) struct Evidence {
    pub ticket_verified: bool,
    pub permitted_source: bool,
    pub permitted_destination: bool,
    pub receipts_source: usize,
    pub receipts_destination: usize,
    pub audit_verified: bool,
    /// Size of the evidence bundle built from both logs and checked
    /// offline with only the CA bundle, when that succeeded.
    pub bundle_bytes: Option<usize>,
}

impl Evidence {
    /// Whether every trust check passed.
    pub fn all_good(&self) -> bool {
        self.ticket_verified
            && self.audit_verified
            && self.permitted_source
            && self.permitted_destination
    }

    /// The trust, policy and exactly-once lines of the demo's report.
    pub fn lines(&self, on_a: bool, on_b: bool) -> String {
        format!(
            "trust: operator ticket verified by both agents: {}; receipts verified offline: {} held by a, {} by b; both audit logs verify offline: {}; evidence bundle ({}) checked offline with only the CA certificate: {}\n\
             policy: MigrateOut permitted at a: {}; MigrateIn permitted at b: {} (decisions read back from the signed audit logs)\n\
             exactly once: {} on a, {} on b\n",
            yes(self.ticket_verified),
            self.receipts_source,
            self.receipts_destination,
            yes(self.audit_verified),
            self.bundle_bytes.map_or_else(|| "-".into(), |n| format_bytes(n as u64)),
            yes(self.bundle_bytes.is_some()),
            yes(self.permitted_source),
            yes(self.permitted_destination),
            if on_a { "still present" } else { "gone" },
            if on_b { "running" } else { "absent" },
        )
    }
}

pub(crate) fn evidence(lab: &Lab, migration: &str, receipts: &[SignedReceipt]) -> Evidence {
    let read = |name: &str| {
        std::fs::read(lab.pki.dir().join("state").join(name).join("audit.log"))
            .ok()
            .and_then(|b| verify_log(&b, &lab.trust).ok())
    };
    let (a, b) = (read("a"), read("b"));
    let accepted = |log: &Option<convoy_protocol::audit::VerifiedLog>, as_role: &str| {
        log.as_ref().is_some_and(|l| {
            l.records.iter().any(|r| {
                matches!(&r.event, AuditEvent::TicketAccepted { migration: m, role, .. }
                    if m.to_string() == migration && role == as_role)
            })
        })
    };
    let permitted = |log: &Option<convoy_protocol::audit::VerifiedLog>, what: &str| {
        log.as_ref().is_some_and(|l| {
            l.records.iter().any(|r| {
                matches!(&r.event, AuditEvent::Decision { migration: Some(m), action, permitted: true, .. }
                    if m.to_string() == migration && action == what)
            })
        })
    };
    let ours = |r: &SignedReceipt| {
        r.verify(&lab.trust)
            .is_ok_and(|v| v.receipt.migration.to_string() == migration)
    };
    // The evidence bundle a third party would get: built from both logs,
    // encoded, then checked from its bytes with only the CA bundle.
    let id = a.as_ref().and_then(|l| {
        l.records.iter().find_map(|r| match &r.event {
            AuditEvent::TicketAccepted { migration: m, .. } if m.to_string() == migration => {
                Some(*m)
            }
            _ => None,
        })
    });
    let bundle_bytes = match (id, &a, &b) {
        (Some(id), Some(a), Some(b)) => build_bundle(id, &[a.clone(), b.clone()])
            .ok()
            .and_then(|bundle| bundle.encode().ok())
            .filter(|bytes| check_bundle(bytes, &lab.trust).is_ok_and(|s| s.started))
            .map(|bytes| bytes.len()),
        _ => None,
    };
    Evidence {
        bundle_bytes,
        ticket_verified: accepted(&a, "source") && accepted(&b, "destination"),
        permitted_source: permitted(&a, "MigrateOut"),
        permitted_destination: permitted(&b, "MigrateIn"),
        receipts_source: receipts.iter().filter(|r| ours(r)).count(),
        receipts_destination: b.as_ref().map_or(0, |l| {
            l.records
                .iter()
                .filter(|r| matches!(&r.event, AuditEvent::Receipt(x) if ours(x)))
                .count()
        }),
        audit_verified: a.is_some() && b.is_some() && bundle_bytes.is_some(),
    }
}
