//! `convoyctl evacuate HOST [--to AGENT…]`: every VM off one host, a few
//! at a time, each to the destination with the most free memory that fits
//! it; a VM that cannot move stays running where it is, and is reported.
//! Without `--to`, the destinations are every other agent alive in the
//! fleet registry, as the host reads it (each is then authenticated by
//! its SPIFFE ID like a named one: the registry only says where to dial).
//!
//! Before placing, the host and each destination are asked whether their
//! policies (and the destination's room) would let each VM go there
//! (`Admission`, with a ticket signed for the question and never spent),
//! so the plan — and `--dry-run` — leaves out what they refuse. Each VM is
//! then one ordinary migration (a ticket this operator signs for exactly
//! that VM and destination, the same rules of exactly once); a migration
//! a destination still refuses is tried on the next destination with
//! room. One line per VM as it ends, then a
//! table and a total; `--dry-run` prints the plan and moves nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_agent::client::ClientError;
use convoy_agent::client::CtlClient;
use convoy_agent::trust::authz::issue_ticket;
use convoy_protocol::ctl::admission::AdmissionQuery;
use convoy_protocol::ctl::{
    CtlErrorKind, MigrateRequest, MigrationReport, Outcome, VmInfo, VmState,
};
use convoy_protocol::names::{AgentName, SpiffeId, VmName};
use futures_util::StreamExt;

use super::migrate::Tuning;
use crate::conn::{parse_agent_ref, session, Global, Session};
use crate::render;

#[derive(clap::Args, Debug, Clone)]
pub struct Evacuate {
    /// The host to empty, as NAME@HOST:PORT.
    pub host: String,
    /// An agent that may receive its VMs, as NAME@HOST:PORT (repeatable).
    /// Without it: every other agent alive in the fleet registry.
    #[arg(long = "to", value_name = "AGENT")]
    pub to: Vec<String>,
    /// Migrations at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub parallel: u16,
    /// Print the plan; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long each VM's ticket is valid, seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ticket_lifetime: u64,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// A destination and its room.
struct Target {
    name: AgentName,
    id: SpiffeId,
    addr: SocketAddr,
    /// Free guest memory, less what the plan sends it.
    free: u64,
    /// Its session, while the plan is made.
    client: Option<CtlClient>,
}

/// Whether the policies let a VM go to a destination: `Err(who: why)`.
type Admitted = HashMap<(VmName, usize), Result<(), String>>;

/// What became of one VM.
struct Moved {
    vm: String,
    memory: u64,
    /// Where it went, or `None`: it stays.
    to: Option<String>,
    what: String,
    report: Option<MigrationReport>,
    in_doubt: bool,
}

pub async fn run(g: &Global, e: Evacuate) -> Result<()> {
    let mut hg = g.clone();
    hg.agent = Some(e.host.clone());
    let host = session(&hg)
        .await
        .with_context(|| format!("the host to evacuate, {}", e.host))?;
    let to = match e.to.is_empty() {
        true => registry_targets(&host).await?,
        false => e.to.clone(),
    };
    let mut targets = Vec::new();
    for t in &to {
        match target(g, t).await {
            Ok(t) if t.id == host.agent => bail!("--to {} is the host being evacuated", t.name),
            Ok(t) if targets.iter().any(|o: &Target| o.id == t.id) => {
                bail!("--to {} is named twice", t.name)
            }
            Ok(t) => targets.push(t),
            Err(err) => eprintln!("leaving out {t}: {err:#}"),
        }
    }
    if targets.is_empty() {
        bail!("no destination answered: nothing moved");
    }
    let vms = host.client.vm_list().await?;
    let options = e.tuning.options();
    let lifetime = Duration::from_secs(e.ticket_lifetime);
    let admitted = admissions(&host, &targets, &vms, &options, lifetime).await?;
    for t in &mut targets {
        if let Some(c) = t.client.take() {
            c.close().await;
        }
    }
    let (plan, mut stays) = place(vms, &mut targets, &admitted);
    if e.dry_run {
        return print_plan(g, &plan, &stays, &targets);
    }
    if !g.json {
        // What stays is known before anything moves.
        for m in &stays {
            println!("{}", line(m, &host.agent));
        }
    }
    let started = Instant::now();
    let total = plan.len();
    let (hs, targets) = (&host, &targets);
    let mut moves = futures_util::stream::iter(plan)
        .map(|(vm, first)| {
            let options = options.clone();
            async move { move_one(hs, targets, vm, first, &options, lifetime).await }
        })
        .buffer_unordered(usize::from(e.parallel));
    let mut done = Vec::new();
    while let Some(m) = moves.next().await {
        if !g.json {
            println!("{}", line(&m, &hs.agent));
        }
        done.push(m);
    }
    drop(moves);
    done.append(&mut stays);
    let moved = done.iter().filter(|m| m.to.is_some()).count();
    let doubt = done.iter().filter(|m| m.in_doubt).count();
    let took = started.elapsed();
    if g.json {
        render::json(&serde_json::json!({
            "host": host.agent.to_string(),
            "moved": moved,
            "planned": total,
            "in_doubt": doubt,
            "seconds": took.as_secs_f64(),
            "vms": done.iter().map(|m| serde_json::json!({
                "vm": m.vm,
                "memory_bytes": m.memory,
                "to": m.to,
                "outcome": m.what,
                "in_doubt": m.in_doubt,
                "total_ms": m.report.as_ref().map(|r| r.total_ms),
                "downtime_ms": m.report.as_ref().map(|r| r.downtime_ms),
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        print!("{}", summary(&done));
        println!(
            "evacuated {moved} of {} VMs from {} in {:.1} s",
            done.len(),
            host.agent,
            took.as_secs_f64()
        );
    }
    host.client.close().await;
    if doubt > 0 {
        bail!("{doubt} VM(s) in doubt or unknown: `convoyctl status` and `convoyctl recover` on the host");
    }
    if moved < done.len() {
        bail!("{} VM(s) stay on the host", done.len() - moved);
    }
    Ok(())
}

/// Every agent alive in the registry but the host, as NAME@ADDR.
async fn registry_targets(host: &Session) -> Result<Vec<String>> {
    let view = host
        .client
        .fleet(convoy_protocol::ctl::fleet::FleetQuery::default())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "no --to given, and {} cannot list the fleet's agents ({e}): name the destinations with --to NAME@HOST:PORT",
                host.agent.name()
            )
        })?;
    let mut to = Vec::new();
    for a in view.agents.iter().filter(|a| a.id != host.agent) {
        // An agent listening on every address registers the wildcard:
        // nothing to dial.
        match a.addr.parse::<SocketAddr>() {
            Ok(s) if s.ip().is_unspecified() => eprintln!(
                "leaving out {}: it registered {} (it listens on every address); name it with --to",
                a.id.name(),
                a.addr
            ),
            _ => to.push(format!("{}@{}", a.id.name(), a.addr)),
        }
    }
    if to.is_empty() {
        bail!(
            "no other agent alive in the fleet registry that you may see (an operator the policy \
             does not let read the audit log sees only the agents running VMs they may see): \
             name the destinations with --to NAME@HOST:PORT"
        );
    }
    Ok(to)
}

/// Connects to destination `t` and reads its room.
async fn target(g: &Global, t: &str) -> Result<Target> {
    let r = parse_agent_ref(t)?;
    let Some(addr) = r.addr else {
        bail!("--to needs an address: NAME@HOST:PORT");
    };
    let mut tg = g.clone();
    tg.agent = Some(t.to_owned());
    let s = session(&tg).await?;
    let st = s.client.status().await?;
    Ok(Target {
        name: r.name,
        id: s.agent,
        addr,
        free: st.capacity_bytes.saturating_sub(st.used_bytes),
        client: Some(s.client),
    })
}

/// Asks the host whether its policy lets each running VM go to each
/// destination, and each destination whether its policy and room let it
/// come, with a ticket signed for the question (verified there, never
/// spent: each migration gets its own). An agent that cannot answer (one
/// of an older build) rules nothing out: the migration decides.
async fn admissions(
    host: &Session,
    targets: &[Target],
    vms: &[VmInfo],
    options: &convoy_protocol::model::MigrationPlan,
    lifetime: Duration,
) -> Result<Admitted> {
    let mut out = HashMap::new();
    for vm in vms.iter().filter(|v| v.state == VmState::Running) {
        let Some(subject) = &vm.subject else { continue };
        for (i, t) in targets.iter().enumerate() {
            let ticket = issue_ticket(
                &host.operator,
                &vm.name,
                subject.clone(),
                host.agent.clone(),
                t.id.clone(),
                options,
                lifetime,
            )?;
            let q = AdmissionQuery {
                ticket,
                attributes: vm.attributes.clone(),
                memory_bytes: vm.memory_bytes,
            };
            let mut verdict = Ok(());
            let asked = [
                (host.agent.name().to_string(), Some(&host.client)),
                (t.name.to_string(), t.client.as_ref()),
            ];
            for (who, client) in asked {
                let Some(c) = client else { continue };
                match c.admission(q.clone()).await {
                    Ok(a) if !a.permitted => {
                        verdict = Err(format!("{who}: {}", a.why));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!(
                        "warning: {who} did not say whether it admits {} ({e}); the migration will",
                        vm.name
                    ),
                }
            }
            out.insert((vm.name.clone(), i), verdict);
        }
    }
    Ok(out)
}

/// The VMs that can move (largest first), each with the destination of
/// most room that fits it; and those that stay, with why.
fn place(
    mut vms: Vec<VmInfo>,
    targets: &mut [Target],
    admitted: &Admitted,
) -> (Vec<(VmInfo, usize)>, Vec<Moved>) {
    vms.sort_by(|a, b| {
        b.memory_bytes
            .cmp(&a.memory_bytes)
            .then(a.name.cmp(&b.name))
    });
    let (mut plan, mut stays) = (Vec::new(), Vec::new());
    for vm in vms {
        let stay = |what: String| Moved {
            vm: vm.name.to_string(),
            memory: vm.memory_bytes,
            to: None,
            what,
            report: None,
            in_doubt: false,
        };
        // An agent migrates running VMs only: a paused one (an
        // operator's pause) stays paused where it is.
        if vm.state != VmState::Running || vm.subject.is_none() {
            stays.push(stay(format!("not moved: it is {:?}", vm.state)));
            continue;
        }
        let refused = |i: usize| {
            admitted
                .get(&(vm.name.clone(), i))
                .and_then(|r| r.clone().err())
        };
        let roomy: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].free >= vm.memory_bytes)
            .collect();
        let best = roomy
            .iter()
            .copied()
            .filter(|&i| refused(i).is_none())
            .max_by_key(|&i| targets[i].free);
        match best {
            Some(i) => {
                targets[i].free -= vm.memory_bytes;
                plan.push((vm, i));
            }
            None if roomy.is_empty() => {
                stays.push(stay("not moved: no destination has room for it".into()));
            }
            None => {
                let why: Vec<String> = roomy.iter().filter_map(|&i| refused(i)).collect();
                stays.push(stay(format!(
                    "not moved: every destination with room refuses it ({})",
                    why.join("; ")
                )));
            }
        }
    }
    (plan, stays)
}

/// Moves `vm` to `targets[first]`, or, if that destination refuses it,
/// to the next with room.
async fn move_one(
    host: &Session,
    targets: &[Target],
    vm: VmInfo,
    first: usize,
    options: &convoy_protocol::model::MigrationPlan,
    lifetime: Duration,
) -> Moved {
    let order = std::iter::once(first).chain((0..targets.len()).filter(|&i| i != first));
    let mut why = Vec::new();
    for i in order {
        let t = &targets[i];
        if i != first && t.free < vm.memory_bytes {
            continue;
        }
        let Some(subject) = vm.subject.clone() else {
            break;
        };
        let ticket = match issue_ticket(
            &host.operator,
            &vm.name,
            subject,
            host.agent.clone(),
            t.id.clone(),
            options,
            lifetime,
        ) {
            Ok(t) => t,
            Err(e) => {
                why.push(format!("ticket: {e}"));
                break;
            }
        };
        let req = MigrateRequest {
            vm: vm.name.clone(),
            to: t.name.clone(),
            to_addr: Some(t.addr.to_string()),
            ticket,
        };
        let r = host.client.migrate(req, |_| {}).await;
        let (what, report) = match r {
            Ok(r) => (r.outcome.to_string(), r),
            // Refused before it began (ticket, policy, capacity, the VM
            // busy): nothing moved, the next destination may take it.
            Err(ClientError::Agent(e)) if e.kind != CtlErrorKind::Internal => {
                why.push(format!("{}: {}", t.name, e.message));
                continue;
            }
            // The answer was lost (the connection, the agent's task): the
            // migration may have run on without us, so never elsewhere.
            Err(e) => {
                return Moved {
                    vm: vm.name.to_string(),
                    memory: vm.memory_bytes,
                    to: None,
                    what: format!(
                        "unknown: no answer from the host about its move to {} ({e}); see `convoyctl status` on both",
                        t.name
                    ),
                    report: None,
                    in_doubt: true,
                };
            }
        };
        match report.outcome {
            Outcome::Completed => {
                return Moved {
                    vm: vm.name.to_string(),
                    memory: vm.memory_bytes,
                    to: Some(t.name.to_string()),
                    what,
                    report: Some(report),
                    in_doubt: false,
                }
            }
            Outcome::Aborted(_) => why.push(format!("{}: {what}", t.name)),
            // In doubt: never tried elsewhere, the VM may run at that
            // destination.
            _ => {
                return Moved {
                    vm: vm.name.to_string(),
                    memory: vm.memory_bytes,
                    to: None,
                    what: format!("{what} (with {})", t.name),
                    report: Some(report),
                    in_doubt: true,
                }
            }
        }
    }
    Moved {
        vm: vm.name.to_string(),
        memory: vm.memory_bytes,
        to: None,
        what: if why.is_empty() {
            "not moved".into()
        } else {
            why.join("; ")
        },
        report: None,
        in_doubt: false,
    }
}

fn line(m: &Moved, host: &SpiffeId) -> String {
    match (&m.to, &m.report) {
        (Some(to), Some(r)) => format!(
            "{} → {to}: {} in {:.1} s, downtime {:.0} ms",
            m.vm,
            m.what,
            r.total_ms / 1e3,
            r.downtime_ms
        ),
        _ if m.in_doubt => format!("{} in doubt: {}", m.vm, m.what),
        _ => format!("{} stays on {}: {}", m.vm, host.name(), m.what),
    }
}

fn summary(done: &[Moved]) -> String {
    let rows: Vec<Vec<String>> = done
        .iter()
        .map(|m| {
            vec![
                m.vm.clone(),
                render::mib(m.memory),
                m.to.clone().unwrap_or_else(|| "-".into()),
                m.report
                    .as_ref()
                    .map_or("-".into(), |r| format!("{:.1} s", r.total_ms / 1e3)),
                m.report
                    .as_ref()
                    .filter(|_| m.to.is_some())
                    .map_or("-".into(), |r| format!("{:.0} ms", r.downtime_ms)),
                m.what.clone(),
            ]
        })
        .collect();
    render::table(
        &["vm", "memory", "to", "took", "downtime", "outcome"],
        &rows,
    )
}

fn print_plan(
    g: &Global,
    plan: &[(VmInfo, usize)],
    stays: &[Moved],
    targets: &[Target],
) -> Result<()> {
    let mut rows: Vec<(String, u64, Option<String>, String)> = plan
        .iter()
        .map(|(vm, i)| {
            (
                vm.name.to_string(),
                vm.memory_bytes,
                Some(targets[*i].name.to_string()),
                "planned".to_string(),
            )
        })
        .collect();
    rows.extend(
        stays
            .iter()
            .map(|m| (m.vm.clone(), m.memory, None, m.what.clone())),
    );
    if g.json {
        return render::json(&serde_json::json!({
            "plan": rows.iter().map(|(vm, mem, to, what)| serde_json::json!({
                "vm": vm, "memory_bytes": mem, "to": to, "note": what,
            })).collect::<Vec<_>>(),
            "free_after": targets.iter().map(|t| (t.name.to_string(), t.free)).collect::<HashMap<_, _>>(),
        }));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(vm, mem, to, what)| {
            vec![
                vm.clone(),
                render::mib(*mem),
                to.clone().unwrap_or_else(|| "-".into()),
                what.clone(),
            ]
        })
        .collect();
    print!("{}", render::table(&["vm", "memory", "to", "note"], &table));
    for t in targets {
        println!(
            "{} keeps {} free after the plan",
            t.name,
            render::mib(t.free)
        );
    }
    println!("dry run: nothing moved");
    Ok(())
}
