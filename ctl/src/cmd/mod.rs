//! One module per `convoyctl` command.

pub mod abort;
pub mod audit;
pub mod bench;
mod bench_engine;
mod bench_qemu;
pub mod demo;
mod demo_qemu;
pub mod migrate;
pub mod pki;
pub mod policy;
pub mod status;
pub mod vm;
