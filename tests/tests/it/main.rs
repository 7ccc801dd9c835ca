//! Convoy's cross-crate integration tests, as one test binary: each topic
//! is a module (`audit::…`, `qemu::…`), so the agent is linked once rather
//! than once per topic. Shared helpers live in `convoy_tests`
//! (`tests/src/lib.rs`).
//!
//! Topics run in parallel (libtest's default), so anything heavy or
//! process-wide is bounded: the QEMU tests hold [`convoy_tests::heavy`],
//! one at a time. `secrets` stays a test binary of its own
//! (`tests/tests/secrets.rs`): it installs a process-wide log subscriber.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Tests: small sizes, counts and timings.

mod admission;
mod audit;
mod federation;
mod fulldisk;
mod hostile;
mod indoubt;
mod journal;
mod lanes;
mod limits;
mod metrics;
mod migration;
mod peers;
mod policy;
mod postcopy;
mod qemu;
mod qemu_snapshot;
mod registry;
mod resume;
mod reuse;
mod revocation;
mod snapshot;
mod snapshot_clouds;
mod storage;
mod tickets;
mod transport;
mod wan;
