//! An agent's liveness record: written under a lease and renewed at a
//! third of its TTL. An agent cut off from etcd longer than the TTL finds
//! its lease expired when it is back, says so, and registers again.

use std::sync::Weak;
use std::time::Duration;

use convoy_protocol::registry::AgentRecord;

use super::Registry;

pub(super) async fn keep_alive(registry: Weak<Registry>, record: impl Fn() -> AgentRecord) {
    let mut registered = false;
    loop {
        let Some(r) = registry.upgrade() else { return };
        let ttl = r.config.lease_ttl;
        let timeout = r.config.timeout.min(ttl);
        if registered {
            match r.store.renew(timeout).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "registry: this agent's liveness lease expired (cut off for longer than its {} s TTL): registering again",
                        ttl.as_secs()
                    );
                    registered = false;
                    continue;
                }
                Err(e) => tracing::warn!("registry: the liveness lease was not renewed: {e}"),
            }
        } else {
            match r.store.register(r.prefix(), &record(), ttl, timeout).await {
                Ok(()) => {
                    registered = true;
                    tracing::info!("registry: alive as {} (lease of {} s)", r.me, ttl.as_secs());
                }
                Err(e) => tracing::warn!("registry: the liveness record was not written: {e}"),
            }
        }
        drop(r);
        tokio::time::sleep((ttl / 3).max(Duration::from_millis(200))).await;
    }
}
