//! `convoyctl recover`: the migrations an agent (`--agent`) holds
//! unfinished — after it was killed or restarted, or lost its link across
//! a handover — resolved by the same rules the agents apply by themselves
//! (SECURITY.md, "Exactly once"), with what was decided for each and why.
//!
//! Exits 1 when a migration stays undecided (its VM stays paused, or a
//! post-copy migration taken up again is still being finished), so that
//! scripts notice.

use anyhow::{bail, Result};
use convoy_protocol::names::VmName;

use crate::conn::{client, Global};
use crate::render;

/// `recover` flags.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["vm", "all"]))]
pub struct Recover {
    /// Only this VM's migrations.
    pub vm: Option<VmName>,
    /// Every unfinished migration on the agent.
    #[arg(long)]
    pub all: bool,
    /// On a source: resume the paused VM here without the destination's
    /// word. Only for an operator who knows the destination is gone for
    /// good and never ran the VM: if it did, the VM now runs twice.
    /// Audited as the operator's decision.
    #[arg(long)]
    pub force_resume_here: bool,
}

/// Runs `recover`.
pub async fn run(g: &Global, r: Recover) -> Result<()> {
    let cl = client(g).await?;
    let reports = cl.recover(r.vm.clone(), r.force_resume_here).await;
    cl.close().await;
    let reports = reports?;
    let undecided = reports.iter().filter(|r| r.decision.undecided()).count();
    if g.json {
        render::json(&serde_json::json!({
            "migrations": reports.iter().map(|r| serde_json::json!({
                "migration": r.migration.to_string(),
                "vm": r.vm,
                "role": r.role,
                "peer": r.peer,
                "phase": r.phase,
                "decision": r.decision.describe(),
                "undecided": r.decision.undecided(),
                "reason": r.reason,
            })).collect::<Vec<_>>(),
        }))?;
    } else if reports.is_empty() {
        println!("nothing to recover: no unfinished migration here");
    } else {
        for r in &reports {
            println!(
                "{} {} ({}, {} with {}): {} — {}",
                r.migration,
                r.vm,
                r.role,
                r.phase,
                r.peer,
                r.decision.describe(),
                r.reason
            );
        }
    }
    if undecided > 0 {
        bail!(
            "{undecided} migration(s) undecided: their VMs stay paused, or are still being \
             finished (see the reasons above)"
        );
    }
    Ok(())
}
