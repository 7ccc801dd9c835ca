//! The agent-wide memory budget of migrations (`--migration-memory`), so
//! that what an agent buffers does not grow with the number of VMs it
//! moves at once (beyond [`MIN_WINDOW`] a connection, once so many
//! migrate together that their shares would be smaller; QEMU migrations'
//! tunnels are not in it).
//!
//! Each migration's memory beyond the guest images is mostly:
//! - the QUIC flow-control windows: data handed to QUIC and not yet
//!   acknowledged at the source (the send window), data received and not
//!   yet read at the destination (the receive window), up to 64 MiB each
//!   per connection by default;
//! - the source's delta cache (previous versions of pages, up to 64 MiB).
//!
//! Half the budget goes to the windows of the active migrations' connections,
//! shared equally and rebalanced whenever one starts or ends (quinn lets a
//! live connection's windows change); a quarter is a pool the delta caches
//! are drawn from, first come first served (a migration that finds it empty
//! sends without deltas); the rest covers the per-stream queues, which are
//! a few batches each. With the default of 256 MiB one migration gets what
//! it got before the budget existed (64 MiB windows, a 64 MiB cache).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::transport::Connection;
use quinn::VarInt;

/// The default budget, bytes.
pub const DEFAULT_MIGRATION_MEMORY: u64 = 256 << 20;

/// The smallest window a connection is given, bytes: below this even a
/// loopback link stalls on flow control.
pub const MIN_WINDOW: u64 = 2 << 20;

/// Which window of a connection the budget sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// An outgoing migration: the send window.
    Send,
    /// An incoming migration: the receive window.
    Receive,
}

/// The budget and the connections that share it.
#[derive(Debug)]
pub struct MigrationBudget {
    total: u64,
    /// The most a window may be (the transport's own setting).
    max_window: u64,
    active: Mutex<Vec<(u64, Connection, Side)>>,
    next: AtomicU64,
    /// Bytes left for delta caches.
    cache_pool: AtomicU64,
}

/// A connection's place in the budget; leaving rebalances the others.
#[derive(Debug)]
pub struct Share {
    budget: Arc<MigrationBudget>,
    id: u64,
}

/// Bytes of delta cache drawn from the pool; returned when dropped.
#[derive(Debug)]
pub struct CacheGrant {
    budget: Arc<MigrationBudget>,
    /// Bytes granted (possibly 0).
    pub bytes: u64,
}

impl MigrationBudget {
    /// A budget of `total` bytes, with windows of at most `max_window`.
    pub fn new(total: u64, max_window: u64) -> Arc<MigrationBudget> {
        Arc::new(MigrationBudget {
            total,
            max_window,
            active: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            cache_pool: AtomicU64::new(total / 4),
        })
    }

    /// The window each of `n` active connections gets.
    pub fn window_for(&self, n: usize) -> u64 {
        (self.total / 2 / n.max(1) as u64).clamp(MIN_WINDOW, self.max_window.max(MIN_WINDOW))
    }

    /// Adds `conn` (its `side` window) and rebalances every connection.
    pub fn join(self: &Arc<Self>, conn: &Connection, side: Side) -> Share {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut active = self.lock();
        active.push((id, conn.clone(), side));
        rebalance(&active, self.window_for(active.len()));
        Share {
            budget: self.clone(),
            id,
        }
    }

    /// Up to `want` bytes of delta cache from the pool.
    pub fn grant_cache(self: &Arc<Self>, want: u64) -> CacheGrant {
        let mut bytes = 0;
        let _ = self
            .cache_pool
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                bytes = want.min(left);
                Some(left - bytes)
            });
        CacheGrant {
            budget: self.clone(),
            bytes,
        }
    }

    /// Connections sharing the budget now.
    pub fn active(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Connection, Side)>> {
        // Entries are whole at every point: a panic elsewhere leaves it usable.
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn rebalance(active: &[(u64, Connection, Side)], window: u64) {
    for (_, c, side) in active {
        match side {
            Side::Send => c.set_send_window(window),
            Side::Receive => {
                c.set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
            }
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut active = self.budget.lock();
        active.retain(|(id, ..)| *id != self.id);
        rebalance(&active, self.budget.window_for(active.len()));
    }
}

impl Drop for CacheGrant {
    fn drop(&mut self) {
        self.budget
            .cache_pool
            .fetch_add(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_with_the_count_within_bounds_and_caches_come_from_one_pool() {
        let b = MigrationBudget::new(256 << 20, 64 << 20);
        assert_eq!(b.window_for(1), 64 << 20, "one migration: as before");
        assert_eq!(b.window_for(2), 64 << 20);
        assert_eq!(b.window_for(4), 32 << 20);
        assert_eq!(b.window_for(8), 16 << 20);
        assert_eq!(b.window_for(1000), MIN_WINDOW);
        let first = b.grant_cache(40 << 20);
        let second = b.grant_cache(40 << 20);
        let third = b.grant_cache(40 << 20);
        assert_eq!(
            (first.bytes, second.bytes, third.bytes),
            (40 << 20, 24 << 20, 0)
        );
        drop(first);
        assert_eq!(b.grant_cache(64 << 20).bytes, 40 << 20);
    }
}
