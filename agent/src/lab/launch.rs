//! Starting a lab agent: as a task of the calling runtime, or in a network
//! namespace of the WAN lab on a runtime of its own whose threads all
//! live in that namespace (sockets are made in their thread's namespace).

use std::net::SocketAddr;
use std::sync::Arc;

use convoy_protocol::names::SpiffeId;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::LabError;
use crate::{Agent, AgentConfig};

/// What the lab keeps of a bound agent.
pub(super) struct Facts {
    pub addr: SocketAddr,
    pub id: SpiffeId,
    pub retained: crate::host::retain::RetainedImages,
    pub subjects: crate::host::VmSubjects,
    pub journal: std::sync::Weak<crate::host::journal::Journal>,
}

/// A started agent.
pub(super) struct Launched {
    pub facts: Facts,
    /// Stops the agent.
    pub stop: oneshot::Sender<()>,
    /// Ends when the agent has stopped.
    pub task: JoinHandle<()>,
}

fn facts(agent: &Agent) -> Result<Facts, LabError> {
    Ok(Facts {
        addr: agent.local_addr()?,
        id: agent.id().clone(),
        retained: agent.retained_images(),
        subjects: agent.vm_subjects(),
        journal: agent.journal(),
    })
}

/// Starts an agent with `cfg`, in network namespace `netns` if given.
pub(super) fn launch(cfg: AgentConfig, netns: Option<&str>) -> Result<Launched, LabError> {
    let Some(netns) = netns else {
        let agent = Agent::bind(cfg)?;
        let facts = facts(&agent)?;
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        return Ok(Launched { facts, stop, task });
    };
    let ns = Arc::new(std::fs::File::open(format!("/run/netns/{netns}"))?);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let name = format!("agent@{netns}");
    std::thread::Builder::new().name(name).spawn(move || {
        let runtime = super::wan::enter(&ns).and_then(|()| {
            let ns = ns.clone();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                // Threads inherit the namespace of the thread that makes
                // them; entering it again makes that explicit.
                .on_thread_start(move || {
                    if let Err(e) = super::wan::enter(&ns) {
                        tracing::error!("a lab agent's thread left its namespace: {e}");
                    }
                })
                .build()
        });
        let runtime = match runtime {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(LabError::Io(e)));
                return;
            }
        };
        runtime.block_on(async move {
            let agent = match Agent::bind(cfg) {
                Ok(agent) => agent,
                Err(e) => {
                    let _ = ready_tx.send(Err(LabError::from(e)));
                    return;
                }
            };
            let _ = ready_tx.send(facts(&agent));
            agent
                .run(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        drop(runtime);
        let _ = done_tx.send(());
    })?;
    let facts = ready_rx
        .recv()
        .map_err(|_| LabError::Io(std::io::Error::other("the agent's thread ended")))??;
    let task = tokio::spawn(async move {
        let _ = done_rx.await;
    });
    Ok(Launched { facts, stop, task })
}
