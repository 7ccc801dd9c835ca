//! The `qemu` backend (DESIGN.md §4): real QEMU processes, driven over QMP,
//! whose own migration stream Convoy carries through its authenticated
//! streams.
//!
//! Built so far, each tested against a real guest under TCG
//! (`tests/tests/it/qemu.rs`):
//! - [`qmp`]: the QMP client (greeting, capabilities, commands matched by
//!   id, events kept; bounded lines and typed errors for hostile output);
//! - [`process`]: a VM definition becomes a QEMU command line with a QMP
//!   socket and serial log in a directory the agent owns, `-incoming defer`
//!   on a destination, in a process group of its own; the process dies
//!   with its handle until the agent's registry records it, then outlives
//!   the agent; a QEMU someone else started is adopted by its QMP socket,
//!   and a restarted agent finds its QEMUs again ([`identity`]: pid and
//!   start time, executable, command line); [`residue`] holds the ones a
//!   restarted agent must end instead;
//! - [`tunnel`]: a unix socket spliced with a QUIC stream pair, both
//!   directions, counting and BLAKE3-hashing every byte each way — QEMU's
//!   migration stream and return path go through it with the same digests
//!   at both ends.
//!
//! - [`vm`]: operators' VM definitions resolved through the agent's
//!   allow-lists (binary, image directory, no free-form arguments) and the
//!   running VM;
//! - [`guest`]: the tiny test guest of the demo, benchmark and tests;
//! - [`service`]: a client of the test guest's request/response service
//!   (its second serial port), following it across a migration.
//!
//! Migration through agents lives in `engine::qemu::source` and
//! `engine::qemu::destination` (the message sequence and digests are in
//! `convoy_protocol::stream`). Not built: post-copy recovery after a broken
//! link.

mod error;
pub mod guest;
pub mod identity;
pub mod process;
pub mod qmp;
pub mod residue;
pub mod service;
pub mod tunnel;
pub mod vm;
