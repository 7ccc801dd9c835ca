//! Polls a VM on a few agents while a migration runs: its work counter
//! and its service's counters wherever it runs, from outside, as a client
//! of the service would see it.

use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::service::ServiceClient;
use convoy_agent::client::CtlClient;
use convoy_protocol::ctl::service::ServiceStats;
use convoy_protocol::ctl::VmState;
use convoy_protocol::names::VmName;

/// One poll: when, the guest's work counter, its service's counters.
#[derive(Debug, Clone)]
pub struct Poll {
    /// When the answer came.
    pub at: Instant,
    /// The work counter of the VM where it runs.
    pub counter: u64,
    /// Its service's counters there.
    pub service: Option<ServiceStats>,
}

/// Polls a VM every 100 ms until finished.
#[derive(Debug)]
pub struct Probe {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Poll>>,
}

/// A probe's clock: a tick each sample period until it is stopped.
struct Ticks {
    tick: tokio::time::Interval,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Ticks {
    /// Waits for the next tick: false once the probe is stopped.
    async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => true,
            _ = self.stopped.changed() => false,
        }
    }
}

impl Probe {
    /// Starts polling `vm` on each of `clients` every 100 ms.
    pub fn start(clients: Vec<CtlClient>, vm: VmName) -> Probe {
        Probe::spawn(|mut ticks| async move {
            let mut seen = Vec::new();
            while ticks.next().await {
                // The counter (and the service's counters, in the device
                // state) carry on wherever the VM runs: the copy with the
                // highest counter is the guest.
                let mut best: Option<(u64, Option<ServiceStats>)> = None;
                for c in &clients {
                    let Ok(list) = c.vm_list().await else {
                        continue;
                    };
                    let running = list.into_iter().find(|v| {
                        v.name == vm
                            && matches!(
                                v.state,
                                VmState::Running | VmState::MigratingOut | VmState::PostcopyIn
                            )
                    });
                    if let Some(v) = running {
                        if best.as_ref().is_none_or(|b| v.counter > b.0) {
                            best = Some((v.counter, v.service));
                        }
                    }
                }
                if let Some((counter, service)) = best {
                    seen.push(Poll {
                        at: Instant::now(),
                        counter,
                        service,
                    });
                }
            }
            for c in clients {
                c.close().await;
            }
            seen
        })
    }

    /// Polls the client of a QEMU test guest's service every 100 ms (the
    /// guest has no work counter: none is drawn). At the end the client
    /// waits up to two seconds for answers still owed, and what it saw
    /// then is the last poll.
    pub fn service(client: ServiceClient) -> Probe {
        Probe::spawn(|mut ticks| async move {
            let mut seen = Vec::new();
            while ticks.next().await {
                seen.push(Poll {
                    at: Instant::now(),
                    counter: 0,
                    service: Some(client.stats()),
                });
            }
            let last = client.finish(Duration::from_secs(2)).await;
            seen.push(Poll {
                at: Instant::now(),
                counter: 0,
                service: Some(last.stats),
            });
            seen
        })
    }

    /// Runs `poll` with ticks every sample period until [`Probe::finish`].
    fn spawn<F>(poll: impl FnOnce(Ticks) -> F) -> Probe
    where
        F: std::future::Future<Output = Vec<Poll>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tick =
            tokio::time::interval(Duration::from_millis(convoy_protocol::ctl::SAMPLE_EVERY_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let task = tokio::spawn(poll(Ticks { tick, stopped }));
        Probe { stop, task }
    }

    /// Stops polling; what was seen.
    pub async fn finish(self) -> Vec<Poll> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}
