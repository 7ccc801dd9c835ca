//! `convoyctl migrate`: live-migrate a VM, with a progress bar and a
//! summary table.

use std::time::Duration;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use convoy_agent::trust::authz::issue_ticket;
use convoy_protocol::ctl::{MigrateRequest, Outcome};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::names::{SpiffeId, TrustDomain, VmName};
use convoy_protocol::ticket::SignedTicket;
use convoy_protocol::vm::VmSubject;

use crate::conn::{parse_agent_ref, session, AgentRef, Global, Session};
use crate::render;

/// `migrate` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Migrate {
    /// The VM to move (running on --agent).
    #[arg(required_unless_present = "ticket")]
    pub vm: Option<VmName>,
    /// Destination agent: NAME, or NAME@HOST:PORT when the source agent
    /// has no peer entry for it. For an agent of a federated trust domain,
    /// its SPIFFE ID: `spiffe://DOMAIN/agent/NAME[@HOST:PORT]`.
    #[arg(long, required_unless_present = "ticket")]
    pub to: Option<String>,
    /// Submit a ticket requested with `ticket request` and approved by its
    /// parties (`ticket approve`): the VM, destination and plan are the
    /// ticket's; this operator signs it with the approvals inside.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vm", "Tuning", "start_paused", "ticket_lifetime"])]
    pub ticket: Option<PathBuf>,
    /// Validity of the signed ticket, seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ticket_lifetime: u64,
    /// Keep the VM paused at the destination once it has arrived and
    /// verified (sim VMs, pre-copy): resume it with `vm resume`, after
    /// checking it (its disk files, say) if you wish.
    #[arg(long)]
    pub start_paused: bool,
    /// Store-and-forward through object storage (`file:///DIR`,
    /// `s3://BUCKET/PREFIX`): the agents never connect. The source pushes
    /// the VM sealed for --to with this ticket, keeps it paused and waits
    /// for the destination's `snapshot pull URL`; one create-only claim
    /// object decides where it runs.
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,
    /// With --via: seconds the source waits for the destination to claim
    /// the VM before it claims it back (at most the ticket's lifetime).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub via_wait: u32,
    /// Draw the migration over time to FILE.svg or FILE.png (bytes per
    /// second, dirty rate and pages left, the guest's work, the pause),
    /// or write its series to FILE.json (sim VMs).
    #[arg(long, value_name = "FILE", conflicts_with = "via")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Migration tuning flags (shared with `demo` and `bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct Tuning {
    /// Parallel data streams.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub streams: u16,
    /// Connections to spread the data streams over (at most --streams):
    /// each has its own congestion control, so on a long lossy link
    /// several get more of it than one. With post-copy one more: the
    /// first carries only control and faults. Sim VMs only. Signed into
    /// the ticket.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub connections: u16,
    /// Downtime target, milliseconds: the most pre-copy lets the pause
    /// be expected to take. It aims lower first (30 ms of pages plus the
    /// handover's round trips, then half as much again each round after
    /// the fourth, up to the target).
    #[arg(long, default_value_t = 300)]
    pub max_downtime: u32,
    /// Most pre-copy rounds; past them the migration fails (the VM keeps
    /// running here) unless --force-stop.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Highest zstd level (0 = no compression); the level used adapts to
    /// the link and CPU unless --fixed-compression.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub compression: i32,
    /// precopy, postcopy or hybrid (sim VMs with disks: postcopy needs
    /// --storage-postcopy).
    #[arg(long, default_value = "precopy")]
    pub mode: MigrationMode,
    /// Copy the VM's disks too; no shared storage needed (sim VMs: their
    /// blocks travel with the memory, by pre-copy, the last ones inside
    /// the downtime (at hybrid's switch too); QEMU VMs: mirrored
    /// to the destination over NBD through Convoy). Required for a VM
    /// with disks.
    #[arg(long)]
    pub copy_storage: bool,
    /// Bandwidth cap, e.g. 100MiB (per second).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub bandwidth: Option<u64>,
    /// Hybrid: switch to post-copy after this many milliseconds of
    /// pre-copy (default: after the first full pass).
    #[arg(long)]
    pub postcopy_after: Option<u32>,
    /// Do not throttle the guest when pre-copy rounds stop shrinking.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Re-send hot pages every round instead of holding them back for
    /// the final round.
    #[arg(long)]
    pub no_hot_page_ordering: bool,
    /// At the round limit, stop and copy even if the downtime target
    /// cannot be met.
    #[arg(long)]
    pub force_stop: bool,
    /// Always compress at --compression instead of adapting the level
    /// (none included) to the measured link and CPU.
    #[arg(long)]
    pub fixed_compression: bool,
    /// Sim VMs with disks, --mode postcopy or hybrid: the disk blocks left
    /// at the switch are fetched on demand after the VM resumes at the
    /// destination (a guest write to one waits for it) instead of going
    /// inside the downtime.
    #[arg(long)]
    pub storage_postcopy: bool,
    /// Seconds the migration has to reach its handover (or post-copy
    /// switch); past them it is cancelled and the VM runs on at the
    /// source. Signed into the ticket.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub deadline: Option<u32>,
}

impl Tuning {
    /// The wire options.
    pub fn options(&self) -> MigrationPlan {
        MigrationPlan {
            streams: self.streams,
            max_downtime_ms: self.max_downtime,
            max_rounds: self.max_rounds,
            compression_level: self.compression,
            mode: self.mode,
            copy_storage: self.copy_storage,
            bandwidth: self.bandwidth,
            postcopy_after_ms: self.postcopy_after,
            auto_converge: !self.no_auto_converge,
            hold_hot_pages: !self.no_hot_page_ordering,
            force_stop: self.force_stop,
            adaptive_compression: !self.fixed_compression,
            start_paused: false,
            storage_postcopy: self.storage_postcopy,
            deadline_ms: self.deadline.map(|s| s.saturating_mul(1000)),
            connections: self.connections,
        }
    }
}

/// The destination `--to` names: its SPIFFE ID (in `domain` unless given
/// as a full `spiffe://` ID) and how to reach it (name, address).
pub fn destination(to: &str, domain: &TrustDomain) -> Result<(SpiffeId, AgentRef)> {
    // A federated destination is named by its full SPIFFE ID.
    let (to_domain, to) = match to.strip_prefix("spiffe://") {
        Some(_) => {
            let (id, addr) = match to.rsplit_once('@') {
                Some((id, addr)) => (id, Some(addr)),
                None => (to, None),
            };
            let id: SpiffeId = id.parse()?;
            let r = parse_agent_ref(&match addr {
                Some(a) => format!("{}@{a}", id.name()),
                None => id.name().to_string(),
            })?;
            (id.domain().clone(), r)
        }
        None => (domain.clone(), parse_agent_ref(to)?),
    };
    Ok((SpiffeId::agent(to_domain, to.name.clone()), to))
}

/// The VM as the source (the session's agent) reports it now: its size,
/// disks and attributes. The source refuses a ticket for another
/// incarnation of the VM, the destination a proposal that differs.
pub async fn subject(s: &Session, vm: &VmName) -> Result<VmSubject> {
    s.client
        .vm_list()
        .await?
        .into_iter()
        .find(|v| &v.name == vm)
        .ok_or_else(|| anyhow!("no VM named {vm} on {}", s.agent))?
        .subject
        .ok_or_else(|| anyhow!("VM {vm} is not ready to move (being created or arriving)"))
}

/// Runs `migrate`.
pub async fn run(g: &Global, m: Migrate) -> Result<()> {
    if let Some(p) = &m.plot {
        crate::timeline::format(p)?;
    }
    let s = session(g).await?;
    let req = match &m.ticket {
        Some(file) => submit(&s, file, m.to.as_deref())?,
        None => {
            let (Some(vm), Some(to)) = (&m.vm, &m.to) else {
                bail!("which VM, to which agent? pass VM --to AGENT, or --ticket FILE");
            };
            let (dest, to) = destination(to, &s.domain)?;
            let mut options = m.tuning.options();
            options.start_paused = m.start_paused;
            // The operator's signed authorization of exactly this migration.
            let ticket = issue_ticket(
                &s.operator,
                vm,
                subject(&s, vm).await?,
                s.agent.clone(),
                dest,
                &options,
                Duration::from_secs(m.ticket_lifetime),
            )?;
            MigrateRequest {
                vm: vm.clone(),
                to: to.name,
                to_addr: to.addr.map(|a| a.to_string()),
                ticket,
            }
        }
    };
    let probe = match &m.plot {
        Some(_) => Some(probe(g, &s.domain, &req).await),
        None => None,
    };
    let cl = s.client;
    if let Some(url) = m.via {
        return via(g, cl, req, url, m.via_wait).await;
    }
    let bar = render::Bar::new(g.json);
    let mut timeline = crate::timeline::Timeline::default();
    let report = cl
        .migrate(req, |p| {
            timeline.record(p);
            bar.update(p);
        })
        .await;
    bar.finish();
    cl.close().await;
    if let Some(p) = probe {
        // A moment more of the guest where it now runs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        timeline.add_polls(&p.finish().await);
    }
    let report = report?;
    if let Some(path) = &m.plot {
        // The migration is done either way: a plot that fails is said,
        // not fatal.
        if let Err(e) = timeline.write(path, &report) {
            eprintln!("warning: {e:#}");
        }
    }
    if g.json {
        render::json(&report)?;
    } else {
        print!("{}", render::report(&report));
        if let Some(s) = timeline.service_summary() {
            println!("{s}");
        }
    }
    match report.outcome {
        Outcome::Completed => Ok(()),
        Outcome::InDoubt(_) => {
            bail!("migration outcome in doubt; the VM is kept paused at the source")
        }
        _ => bail!("migration aborted; the VM still runs at the source"),
    }
}

/// For `--plot`: polls the VM's work on the source and, when `--to` gave
/// its address, on the destination (of this trust domain). An agent that
/// cannot be reached is left out: the plot then shows less, and says so
/// by its legend.
async fn probe(g: &Global, domain: &TrustDomain, req: &MigrateRequest) -> crate::timeline::Probe {
    let mut clients = Vec::new();
    if let Ok(c) = crate::conn::client(g).await {
        clients.push(c);
    }
    let to = req.to_addr.as_deref().and_then(|a| a.parse().ok());
    if let (Some(addr), Ok((pki, identity))) = (to, crate::conn::operator(g)) {
        if let Ok(trust) = pki.trust() {
            let id = SpiffeId::agent(domain.clone(), req.to.clone());
            let c = convoy_agent::client::CtlClient::connect_with(
                addr,
                id,
                &identity,
                &trust,
                g.transport,
            )
            .await;
            if let Ok(c) = c {
                clients.push(c);
            }
        }
    }
    crate::timeline::Probe::start(clients, req.vm.clone())
}

/// `migrate --via URL`: the source's side of a store-and-forward
/// migration; it answers once the handover is decided.
async fn via(
    g: &Global,
    cl: convoy_agent::client::CtlClient,
    migrate: MigrateRequest,
    url: String,
    wait_secs: u32,
) -> Result<()> {
    use convoy_protocol::ctl::snapshot::{SnapshotRequest, SnapshotResponse};
    if !g.json {
        eprintln!(
            "pushing {} to {url}; waiting up to {wait_secs} s for {} to pull it",
            migrate.vm, migrate.to
        );
    }
    let r = cl
        .snapshot(SnapshotRequest::MigrateVia {
            migrate,
            url,
            wait_secs,
        })
        .await;
    cl.close().await;
    let h = match r? {
        SnapshotResponse::Handed(h) => h,
        other => bail!("unexpected answer {other:?}"),
    };
    let outcome = match &h.outcome {
        Outcome::Completed => {
            "completed: the destination claimed the VM; it is gone here".to_string()
        }
        other => other.to_string(),
    };
    if g.json {
        render::json(&serde_json::json!({
            "migration": h.migration.to_string(),
            "snapshot": h.summary.snapshot.to_string(),
            "manifest": h.summary.object,
            "digest": h.summary.digest.to_hex(),
            "uploaded_chunks": h.uploaded.0,
            "uploaded_bytes": h.uploaded.1,
            "push_ms": h.push_ms,
            "waited_ms": h.waited_ms,
            "outcome": outcome,
        }))?;
    } else {
        println!(
            "migration {} of {}: snapshot {} ({} chunks, {} bytes uploaded in {:.0} ms), waited {:.0} ms; {outcome}",
            h.migration,
            h.summary.vm,
            h.summary.snapshot,
            h.uploaded.0,
            h.uploaded.1,
            h.push_ms,
            h.waited_ms
        );
    }
    match h.outcome {
        Outcome::Completed => Ok(()),
        Outcome::InDoubt(_) => bail!("handover in doubt; the VM is kept paused at the source"),
        _ => bail!("migration aborted; the VM still runs at the source"),
    }
}

/// `migrate --ticket FILE`: the requested ticket, its approvals inside,
/// signed by this operator and addressed as it says (`--to`, if given,
/// must name its destination and may add an address).
fn submit(s: &Session, file: &Path, to: Option<&str>) -> Result<MigrateRequest> {
    let t = super::ticket::read(file)?;
    if t.source != s.agent {
        bail!(
            "the ticket moves {} from {}, not from {} (--agent)",
            t.vm,
            t.source,
            s.agent
        );
    }
    let addr = match to {
        None => None,
        Some(to) => {
            let (dest, r) = destination(to, &s.domain)?;
            if dest != t.destination {
                bail!(
                    "--to {to} is not the ticket's destination {}",
                    t.destination
                );
            }
            r.addr
        }
    };
    let ticket = SignedTicket::sign(&t, &s.operator)?;
    Ok(MigrateRequest {
        vm: t.vm.clone(),
        to: t.destination.name().clone(),
        to_addr: addr.map(|a| a.to_string()),
        ticket,
    })
}
