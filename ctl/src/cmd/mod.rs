//! One module per `convoyctl` operator command (`demo` and `bench` are
//! folders of their own: `crate::demo`, `crate::bench`).

pub mod abort;
pub mod audit;
pub mod evacuate;
pub mod fleet;
pub mod migrate;
pub mod pki;
pub mod policy;
pub mod recover;
pub mod snapshot;
pub mod status;
pub mod ticket;
pub mod vm;
