//! The allocator's one setting: how long mimalloc keeps freed memory
//! resident before it gives it back to the kernel (its *purge delay*).
//!
//! The agents run on mimalloc (see `main.rs` of the agent and of
//! `convoyctl`). mimalloc 3 waits 1000 ms before it purges freed pages.
//! Migrations free memory in bursts (a window's worth of sent batches, a
//! finished migration's queues and caches), so with many at once that
//! second of retention is what put the agents over their memory budget:
//! 15 VMs migrated at once rose by 479–544 MiB against the 512 MiB of
//! both budgets, 4 runs of 5 over it. At 100 ms all 8 stayed under
//! (463–507 MiB), and one migration's CPU per GiB did not move beyond its
//! run-to-run spread (docs/benchmarks.md, "The allocator's purge delay").
//! mimalloc 2 used 10 ms, which did cost CPU: freed batch buffers went
//! back to the kernel and came back as fresh pages to clear.
//!
//! An operator's own `MIMALLOC_PURGE_DELAY` (or its old name,
//! `MIMALLOC_RESET_DELAY`) wins: mimalloc read it as the process started,
//! and [`tune`] leaves the setting alone.

use std::ffi::c_long;

/// The purge delay the agents run with, in milliseconds.
pub const PURGE_DELAY_MS: c_long = 100;

/// mimalloc 3's default purge delay, in milliseconds: [`tune`] changes
/// only this value, so that a mimalloc whose options differ (another
/// major version, another option table) is left as it is.
const MIMALLOC_DEFAULT_MS: c_long = 1000;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (libmimalloc-sys
/// declares no constant for it).
const OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeDelay {
    /// Set to [`PURGE_DELAY_MS`].
    Set,
    /// The environment set it: left as mimalloc read it.
    FromEnvironment(c_long),
    /// mimalloc's value was not the default this module knows: left as is.
    Unrecognised(c_long),
}

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`] unless the
/// environment chose one. Call it first thing in `main`, before any other
/// thread starts (mimalloc's option table is not synchronised); a second
/// call finds the value set and writes nothing.
pub fn tune() -> PurgeDelay {
    let from_env = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let now = get();
    if from_env {
        return PurgeDelay::FromEnvironment(now);
    }
    if now == PURGE_DELAY_MS {
        return PurgeDelay::Set;
    }
    if now != MIMALLOC_DEFAULT_MS {
        return PurgeDelay::Unrecognised(now);
    }
    set(PURGE_DELAY_MS);
    PurgeDelay::Set
}

/// mimalloc's purge delay now, in milliseconds.
pub fn get() -> c_long {
    // SAFETY: `mi_option_get` reads one entry of mimalloc's option table
    // (an index it checks against the table's end; an entry not yet read
    // from the environment is read then) and takes no pointers.
    unsafe { libmimalloc_sys::mi_option_get(OPTION_PURGE_DELAY) }
}

fn set(ms: c_long) {
    // SAFETY: `mi_option_set` stores one value in mimalloc's option table
    // (an index it checks against the table's end) and takes no pointers.
    // The store is a plain one that mimalloc's threads read without
    // synchronisation, so it is made only from `tune`, which the agent and
    // `convoyctl` call before they start any other thread, and only when
    // the value is not already the one wanted.
    unsafe { libmimalloc_sys::mi_option_set(OPTION_PURGE_DELAY, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary runs on the system allocator, but mimalloc's option
    /// table is there all the same (libmimalloc-sys is linked; nothing else
    /// here reads it): the index is mimalloc 3's purge delay, whose
    /// default is 1000 ms.
    #[test]
    fn the_option_index_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_RESET_DELAY").is_some()
        {
            assert!(matches!(tune(), PurgeDelay::FromEnvironment(_)));
            return;
        }
        let before = get();
        assert!(
            before == MIMALLOC_DEFAULT_MS || before == PURGE_DELAY_MS,
            "mimalloc's purge delay reads {before} ms: not mimalloc 3's option table?"
        );
        assert_eq!(tune(), PurgeDelay::Set);
        assert_eq!(get(), PURGE_DELAY_MS);
        assert_eq!(tune(), PurgeDelay::Set, "a second call changes nothing");
    }
}
