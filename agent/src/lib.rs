//! # convoy-agent
//!
//! The Convoy agent: one per hypervisor host. Agents authenticate each
//! other and their operators with mutual TLS 1.3 (rustls, ring provider)
//! over QUIC (quinn), and move running VMs between hosts by driving the
//! sans-IO state machines of `convoy-protocol` against a VM backend.
//!
//! # Layout
//! - [`agent`]: configuration, the VM registry, the accept loop; [`run`].
//! - [`audit`]: the signed, fsynced, tamper-evident audit log.
//! - [`authz`]: operator-signed tickets: issuing, checking, replay cache.
//! - [`identity`]: certificates, keys, CA bundles, SPIFFE IDs, rustls
//!   configurations (including the SPIFFE-ID server verifier).
//! - [`pki`]: a file-based Ed25519 PKI for a quick start (`convoyctl pki`).
//! - [`transport`]: the tuned quinn endpoint, connect/authorize, framed I/O.
//! - `control`: the operator API (`convoy-ctl/1`).
//! - [`client`]: the operator side of that API, used by `convoyctl` and
//!   the tests.
//! - [`lab`]: an in-process PKI and agents on loopback (demo, bench, tests).
//! - [`units`]: human sizes for command lines.
//! - [`engine`]: source and destination migration drivers.
//! - [`retain`]: memory reuse when a VM comes back — the sealed images kept
//!   for VMs that left, the keys held for VMs that arrived.
//! - [`backend`]: the VM backend traits, the simulated VM ([`backend::sim`],
//!   split by concern) and QEMU.
//!
//! # Where `unsafe` lives
//!
//! The crate is `#![deny(unsafe_code)]`; the lint is allowed only on
//! these modules, all under [`backend`]:
//! - [`backend::memory`]: the guest mapping viewed as atomic words,
//!   registering it with a userfaultfd, dropping its pages (`madvise`).
//! - [`backend::uffd`]'s `descriptor` (the `userfaultfd` syscall and its
//!   ioctls) and `region` (`madvise` on a checked range), and its tests.
//!
//! Every `unsafe` block carries a `// SAFETY:` argument (the workspace
//! denies `clippy::undocumented_unsafe_blocks`); [`backend::uffd`]'s module
//! doc gives the argument for the whole of it.

#![deny(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod authz;
pub mod backend;
pub mod budget;
pub mod client;
pub(crate) mod control;
pub mod engine;
pub mod identity;
pub mod lab;
pub mod pki;
pub mod policy;
pub mod retain;
pub mod transport;
pub mod units;

pub use agent::{run, Agent, AgentConfig, AgentError};
