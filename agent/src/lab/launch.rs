//! Starting a lab agent: as a task of the calling runtime, or in a network
//! namespace of the WAN lab on a runtime of its own whose threads all
//! live in that namespace (sockets are made in their thread's namespace).

use std::net::SocketAddr;
use std::sync::Arc;

use convoy_protocol::names::SpiffeId;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::LabError;
use crate::cpu::CpuMeter;
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

/// Starts an agent with `cfg`: as a task of the calling runtime, or on a
/// runtime of its own when it runs in network namespace `netns` or its
/// threads' CPU time is charged to `meter`.
pub(super) fn launch(
    cfg: AgentConfig,
    netns: Option<&str>,
    meter: Option<&CpuMeter>,
) -> Result<Launched, LabError> {
    if netns.is_none() && meter.is_none() {
        let agent = Agent::bind(cfg)?;
        let facts = facts(&agent)?;
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        return Ok(Launched { facts, stop, task });
    }
    let ns = match netns {
        Some(n) => Some(Arc::new(std::fs::File::open(format!("/run/netns/{n}"))?)),
        None => None,
    };
    let meter = meter.cloned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let id = cfg.identity.id().to_string();
    let short = id.rsplit('/').next().unwrap_or("agent").to_string();
    let name = match netns {
        Some(n) => format!("agent@{n}"),
        None => format!("agent {short}"),
    };
    std::thread::Builder::new().name(name).spawn(move || {
        let entered = match &ns {
            Some(ns) => super::wan::enter(ns),
            None => Ok(()),
        };
        if let Some(m) = &meter {
            m.enter();
        }
        let runtime = entered.and_then(|()| {
            let (ns, meter) = (ns.clone(), meter.clone());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                // Named apart from the calling runtime's threads (`perf`,
                // `top -H`).
                .thread_name(format!("rt-{short}"))
                .enable_all()
                // Threads inherit the namespace of the thread that makes
                // them; entering it again makes that explicit.
                .on_thread_start(move || {
                    if let Some(ns) = &ns {
                        if let Err(e) = super::wan::enter(ns) {
                            tracing::error!("a lab agent's thread left its namespace: {e}");
                        }
                    }
                    if let Some(m) = &meter {
                        m.enter();
                    }
                })
                .on_thread_stop(CpuMeter::leave)
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
        CpuMeter::leave();
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
