//! The `qemu` backend (DESIGN.md §4): real QEMU processes, driven over QMP,
//! whose own migration stream Convoy carries through its authenticated
//! streams.
//!
//! Built so far, each tested against a real guest under TCG
//! (`tests/tests/qemu.rs`):
//! - [`qmp`]: the QMP client (greeting, capabilities, commands matched by
//!   id, events kept; bounded lines and typed errors for hostile output);
//! - [`process`]: a VM definition becomes a QEMU command line with a QMP
//!   socket and serial log in a directory the agent owns, `-incoming defer`
//!   on a destination; the process dies with its handle;
//! - [`tunnel`]: a unix socket spliced with a QUIC stream pair, both
//!   directions, counting and BLAKE3-hashing every byte each way — QEMU's
//!   migration stream and return path go through it with the same digests
//!   at both ends.
//!
//! Still to come, in this order (issue 3/4):
//! 1. **VM definitions from operators, safely.** `vm create --backend qemu`
//!    must not let an operator run arbitrary commands as the agent: the
//!    binary comes from the agent's allow-list, kernels and images from its
//!    image directory, and no free-form arguments cross the wire (extra
//!    arguments are agent-side templates). Adoption of a running QEMU by
//!    its QMP socket likewise names a socket under the agent's runtime
//!    directory only.
//! 2. **Migration.** `Propose` carries a QEMU manifest (machine, memory,
//!    vCPUs, devices, disk sizes and formats) for the destination's policy
//!    and capacity check; the destination starts QEMU with `-incoming
//!    defer` and `migrate-incoming` on its own socket; the source sets
//!    capabilities and parameters (multifd channels = data streams,
//!    `postcopy-ram` with the return path) and runs `migrate` to its own
//!    socket; one [`tunnel`] per channel. `Sent` and `Ready` bind each
//!    channel's digests, `Started` follows QEMU's `RESUME` at the
//!    destination, and only then does the source quit its QEMU.
//! 3. **Disks without shared storage**: an NBD export on the destination's
//!    QEMU, `blockdev-mirror` from the source through a tunnel, completed at
//!    switch-over.
//! 4. Failures (either QEMU dying, a QMP or mirror error, a broken link
//!    before switch-over) → `migrate_cancel`, the destination QEMU killed,
//!    its images removed, the guest running at the source.

pub mod guest;
pub mod process;
pub mod qmp;
pub mod tunnel;
pub mod vm;
