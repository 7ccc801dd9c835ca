//! `convoyctl abort`: cancel a VM's outgoing migration on the source agent
//! (`--agent`); returns when the VM runs there again. Refused once the VM
//! was handed over to its destination.

use anyhow::Result;
use convoy_protocol::names::VmName;

use crate::conn::{client, Global};
use crate::render;

/// `abort` flags.
#[derive(clap::Args, Debug)]
pub struct Abort {
    /// The VM whose migration to cancel (on --agent, its source).
    pub vm: VmName,
}

/// Runs `abort`.
pub async fn run(g: &Global, a: Abort) -> Result<()> {
    let cl = client(g).await?;
    let r = cl.abort(a.vm.clone()).await;
    cl.close().await;
    r?;
    if g.json {
        render::json(&serde_json::json!({ "aborted": a.vm, "running_at_source": true }))
    } else {
        println!("aborted: {} runs on the source again", a.vm);
        Ok(())
    }
}
