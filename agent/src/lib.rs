//! # convoy-agent
//!
//! The Convoy agent: one per hypervisor host. Agents authenticate each
//! other and their operators with mutual TLS 1.3 (rustls, ring provider)
//! over QUIC (quinn), and move running VMs between hosts by driving the
//! sans-IO state machines of `convoy-protocol` against a VM backend.
//!
//! # Layout
//! - [`server`]: binds an agent ([`Agent`]), the accept loop, credential and
//!   policy reloads; [`run`]. [`config`]: how an agent runs
//!   ([`AgentConfig`]).
//! - [`host`]: the host's state (`Host`) — the VM registry and its
//!   capacity (kept on disk and found again at start, so VMs outlive the
//!   agent), credentials and policy in force, audit log, replay cache,
//!   the migration budget ([`host::budget`]), retained images
//!   ([`host::retain`]) and the migration journal ([`host::journal`]).
//! - `control`: the operator API (`convoy-ctl/1`), one file per family of
//!   requests; [`client`]: the operator side of it, used by `convoyctl` and
//!   the tests.
//! - [`trust`]: identities and TLS configurations, tickets and the replay
//!   cache, Cedar policies, the signed audit log, a file-based PKI.
//! - [`transport`]: the tuned quinn endpoint, connect/authorize, framed I/O,
//!   close codes.
//! - `engine`: outgoing and incoming migrations, the one admission check,
//!   the page engines of sim VMs (`native`) and QEMU's carried stream
//!   (`qemu`).
//! - [`backend`]: the VM backend traits, the simulated VM ([`backend::sim`],
//!   split by concern) and QEMU.
//! - [`cpu`]: CPU time charged to groups of threads from their own clocks
//!   (`convoyctl bench`'s CPU per GiB at each side); [`alloc`]: how long
//!   the allocator keeps freed memory (the agent and `convoyctl` call
//!   [`alloc::tune`] first thing).
//! - [`lab`]: an in-process PKI and agents on loopback (demo, bench, tests)
//!   and the UDP impairment relay between them ([`lab::impair`]);
//!   [`units`]: human sizes for command lines.
//!
//! # Where `unsafe` lives
//!
//! The crate is `#![deny(unsafe_code)]`; the lint is allowed only on
//! these modules, under [`backend`], one in the lab, one in the engine
//! and [`alloc`]:
//! - [`backend::memory`]: the guest mapping viewed as atomic words,
//!   registering it with a userfaultfd, dropping its pages (`madvise`).
//! - [`backend::uffd`]'s `descriptor` (the `userfaultfd` syscall and its
//!   ioctls) and `region` (`madvise` on a checked range), and its tests.
//! - [`lab::impair::tun`]: the one `TUNSETIFF` ioctl that makes the WAN
//!   lab's TUN device.
//! - `engine::priority`: `sched_setscheduler`, which puts a post-copy
//!   push's threads at `SCHED_IDLE` and back.
//! - [`alloc`]: reading and setting mimalloc's purge delay.
//!
//! Every `unsafe` block carries a `// SAFETY:` argument (the workspace
//! denies `clippy::undocumented_unsafe_blocks`); [`backend::uffd`]'s module
//! doc gives the argument for the whole of it.

#![deny(unsafe_code)]

#[allow(unsafe_code)] // mimalloc's `mi_option_get` and `mi_option_set`, nothing else.
pub mod alloc;
pub mod backend;
pub mod client;
pub mod config;
pub(crate) mod control;
pub mod cpu;
pub(crate) mod engine;
pub mod host;
pub mod lab;
pub mod logging;
pub mod metrics;
pub mod private;
pub mod registry;
pub mod s3lab;
pub mod server;
pub mod snapshot;
pub mod transport;
pub mod trust;
pub mod units;

pub use config::{AgentConfig, AgentError, OnExit};
/// Where a test may stop a migration (`--dangerous-pause-at`).
pub use host::pause;
pub use server::{run, Agent};
