//! The `qemu` backend (DESIGN.md §4), in progress: QEMU processes the agent
//! launches and owns ([`process`]) and drives over QMP ([`qmp`]). Carrying
//! QEMU's migration stream and its disks through Convoy's authenticated
//! streams builds on these.

pub mod process;
pub mod qmp;
pub mod tunnel;
