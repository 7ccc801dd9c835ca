//! `convoyctl fleet ls` and `convoyctl where`: the fleet registry, as any
//! agent with `--registry` reads it for the operator (only the VMs their
//! policy lets them see).

use anyhow::Result;
use clap::{Args, Subcommand};
use convoy_protocol::ctl::fleet::{FleetQuery, FleetView};
use convoy_protocol::names::{AgentName, VmName};

use crate::conn::{client, Global};
use crate::render;

/// `convoyctl fleet …`.
#[derive(Subcommand, Debug)]
pub enum Fleet {
    /// Every VM in the registry you may see: its owner, epoch, tenant and
    /// whether its owner is alive; then the agents alive, and what the
    /// asked agent's reconciliation found.
    Ls(Ls),
}

/// `fleet ls`.
#[derive(Args, Debug)]
pub struct Ls {
    /// Only the VMs this agent owns.
    #[arg(long)]
    host: Option<AgentName>,
    /// Only this tenant's VMs.
    #[arg(long)]
    tenant: Option<String>,
}

/// `where VM`.
#[derive(Args, Debug)]
pub struct Where {
    /// The VM.
    vm: VmName,
}

/// Runs `fleet`.
pub async fn run(g: &Global, c: Fleet) -> Result<()> {
    let Fleet::Ls(ls) = c;
    if ls.tenant.as_deref().is_some_and(str::is_empty) {
        anyhow::bail!("--tenant: a tenant's name, not empty");
    }
    let view = ask(
        g,
        FleetQuery {
            host: ls.host,
            tenant: ls.tenant,
            vm: None,
        },
    )
    .await?;
    if g.json {
        return render::json(&view);
    }
    print!("{}", vms(&view));
    if view.hidden > 0 {
        println!(
            "({} more that your policy does not let you see)",
            view.hidden
        );
    }
    println!();
    let rows: Vec<Vec<String>> = view
        .agents
        .iter()
        .map(|a| {
            vec![
                a.id.name().to_string(),
                a.addr.clone(),
                render::mib(a.used_bytes),
                render::mib(a.capacity_bytes),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(&["agent alive", "address", "used", "capacity"], &rows)
    );
    for d in &view.disagreements {
        println!("disagreement: {d}");
    }
    Ok(())
}

/// Runs `where`.
pub async fn run_where(g: &Global, c: Where) -> Result<()> {
    let view = ask(
        g,
        FleetQuery {
            vm: Some(c.vm),
            ..FleetQuery::default()
        },
    )
    .await?;
    if g.json {
        return render::json(&view.vms);
    }
    for v in &view.vms {
        println!(
            "{} runs on {} (epoch {}{})",
            v.vm,
            v.owner.name(),
            v.epoch,
            if v.owner_alive {
                ""
            } else {
                "; that agent is not alive: its lease expired"
            }
        );
    }
    Ok(())
}

async fn ask(g: &Global, q: FleetQuery) -> Result<FleetView> {
    let cl = client(g).await?;
    let view = cl.fleet(q).await;
    cl.close().await;
    Ok(view?)
}

fn vms(view: &FleetView) -> String {
    let rows: Vec<Vec<String>> = view
        .vms
        .iter()
        .map(|v| {
            vec![
                v.vm.to_string(),
                v.owner.name().to_string(),
                if v.owner_alive { "yes" } else { "NO" }.into(),
                v.epoch.to_string(),
                v.tenant.clone(),
                v.cause.clone(),
            ]
        })
        .collect();
    render::table(
        &["vm", "owner", "alive", "epoch", "tenant", "last change"],
        &rows,
    )
}
