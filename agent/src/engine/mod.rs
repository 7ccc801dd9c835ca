//! Migration engines: thin drivers that move bytes between QUIC streams,
//! the VM backend and the sans-IO state machines of `convoy-protocol`.
//! No migration decision is taken here.
//!
//! - [`outgoing`]: a migration the operator asks of this agent — request,
//!   ticket, plan and policy checked, the VM claimed, the backend's engine
//!   run, the outcome audited.
//! - [`incoming`]: a connection from a source agent — the first message
//!   decides between a page migration, a QEMU stream and a post-copy
//!   resume.
//! - [`error`]: why an outgoing migration could not begin.
//! - [`admission`]: the destination's one check of a proposal (ticket,
//!   plan, policy) for every backend.
//! - [`native`]: page migrations of sim VMs, driving the state machines.
//! - [`qemu`]: QEMU's own migration stream carried through Convoy.

/// `tokio::spawn` inside the caller's span: a migration's tasks log with
/// its fields ([`crate::logging`]).
pub(crate) fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(f))
}

pub(crate) mod admission;
pub(crate) mod clock;
pub(crate) mod error;
pub(crate) mod incoming;
pub(crate) mod native;
pub(crate) mod outgoing;
pub(crate) mod qemu;
