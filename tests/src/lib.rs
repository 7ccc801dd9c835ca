//! Shared helpers for the cross-crate integration tests in `tests/tests/`.

use std::time::{Duration, Instant};

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{ContentProfile, MigrateOptions, MigrateRequest, SimVmSpec};

/// A simulated VM spec with mixed content.
pub fn sim_spec(name: &str, bytes: u64, dirty_pages_per_sec: u64) -> SimVmSpec {
    SimVmSpec {
        name: name.parse().expect("valid VM name"),
        memory_bytes: bytes,
        dirty_pages_per_sec,
        hot_set_pct: 10,
        content: ContentProfile::Mixed,
        seed: 1,
    }
}

/// A migration request of `vm` from lab agent `from` to `to`, with a ticket
/// signed by the lab's operator.
pub fn migrate(lab: &Lab, vm: &str, from: &str, to: &str) -> MigrateRequest {
    lab.migrate_request(vm, from, to, MigrateOptions::default())
        .expect("lab agents exist")
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
