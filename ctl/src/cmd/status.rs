//! `convoyctl status`: an agent's identity, VMs and recent migrations.

use anyhow::Result;
use convoy_protocol::ctl::Outcome;

use crate::conn::{client, Global};
use crate::render;

/// Runs `status`.
pub async fn run(g: &Global) -> Result<()> {
    let cl = client(g).await?;
    let s = cl.status().await?;
    cl.close().await;
    if g.json {
        return render::json(&s);
    }
    println!("agent      {}", s.identity);
    println!("listening  {}", s.listen);
    println!("version    {}", s.version);
    println!(
        "memory     {} of {} held",
        render::mib(s.used_bytes),
        render::mib(s.capacity_bytes)
    );
    println!("migrations {} running", s.active_migrations);
    println!();
    print!("{}", render::vms(&s.vms));
    if !s.recent.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .recent
            .iter()
            .map(|r| {
                vec![
                    r.migration.clone(),
                    r.vm.to_string(),
                    r.destination.clone(),
                    match &r.outcome {
                        Outcome::Completed => "completed".into(),
                        Outcome::Aborted(_) => "aborted".into(),
                        Outcome::InDoubt(_) => "in doubt".into(),
                        _ => "?".into(),
                    },
                    format!("{:.0}", r.total_ms),
                    format!("{:.1}", r.downtime_ms),
                ]
            })
            .collect();
        print!(
            "{}",
            render::table(
                &[
                    "migration",
                    "vm",
                    "to",
                    "outcome",
                    "total ms",
                    "downtime ms"
                ],
                &rows
            )
        );
    }
    Ok(())
}
