//! QEMU migrations: QEMU's own stream (and its multifd channels, return
//! path and disk mirrors) carried through Convoy's authenticated streams,
//! with each channel's digest compared at both ends.

pub(crate) mod common;
pub(crate) mod destination;
pub(crate) mod pacing;
pub(crate) mod recovery;
pub(crate) mod source;
