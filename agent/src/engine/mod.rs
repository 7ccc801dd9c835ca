//! Migration engines: thin drivers that move bytes between QUIC streams,
//! the VM backend and the sans-IO state machines of `convoy-protocol`.
//! No migration decision is taken here.

pub(crate) mod admission;
pub mod destination;
mod pacer;
mod qemu_common;
pub mod qemu_destination;
pub mod qemu_source;
pub mod source;
